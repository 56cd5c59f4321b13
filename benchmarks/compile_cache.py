"""What the persistent compilation cache saves a study: two runs of the same config in sibling
workdirs (as a sweep's), the second reading the first's compiled programs. Each run is its own
process (`python -m lora_jax.train`), so nothing but the on-disk cache carries over.

    python benchmarks/compile_cache.py --steps 20 --out /tmp/compile_cache

Prints, for each run, the time from start to the first finished step, the seconds spent
compiling (tracing + lowering + XLA) and the programs compiled and read from the cache, from
the runs' own `compile` records; then the second run's figures as a share of the first's.
Defaults: configs/quickstart.py (the real MiniLM on SST-2). The OUT directory must be new.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def compile_record(workdir: pathlib.Path) -> dict:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "compile"][-1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/quickstart.py"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; the benchmark needs a new directory (an old cache "
                         "would serve the first run too)")
    figures = {}
    for name in ("first", "second"):
        subprocess.run([sys.executable, "-m", "lora_jax.train", "--config", args.config,
                        "--workdir", str(args.out / name),
                        f"--config.train.max_steps={args.steps}",
                        f"--config.train.eval_every={args.steps}",
                        f"--config.train.checkpoint_every={args.steps}",
                        "--config.train.compilation_cache=auto"], check=True, cwd=REPO)
        figures[name] = compile_record(args.out / name)
    print(f"{'run':8} {'first step s':>12} {'compile s':>10} {'compiled':>9} {'cached':>7}")
    for name, r in figures.items():
        print(f"{name:8} {r['first_step_s']:12.1f} {r['compile_s']:10.1f} "
              f"{r['programs_compiled']:9d} {r['cache_hits']:7d}")
    first, second = figures["first"], figures["second"]
    print(f"second / first: time to first step {second['first_step_s'] / first['first_step_s']:.2f}"
          f", compile time {second['compile_s'] / first['compile_s']:.2f}")
    return figures


if __name__ == "__main__":
    main()
