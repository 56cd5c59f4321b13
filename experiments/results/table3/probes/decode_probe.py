import sys, time, json, pathlib
from lora_jax import evaluate
run = evaluate.load_run(pathlib.Path(sys.argv[1]), "test")
n = int(sys.argv[2])
for spec in sys.argv[3].split(","):
    b, bs = map(int, spec.split("x"))
    run.config.generate.beam_size = b
    t = time.perf_counter()
    lines, scores = evaluate.evaluate_generation(run, "test", n, bs)
    words = sum(len(l.split()) for l in lines) / len(lines)
    print(f"beam {b} batch {bs}: {time.perf_counter()-t:.1f} s, words {words:.1f}", json.dumps({k: round(v, 4) for k, v in scores.items()}), flush=True)
    print(lines[:2], flush=True)
