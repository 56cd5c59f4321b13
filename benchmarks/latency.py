"""What adapters cost at inference: the LoRA paper's Table 1 and Figure 5, on GPT-2 medium.

One jitted forward pass (logits included) of GPT-2 medium with random weights, for
  base        the model alone, which is also LoRA merged into its weights (and full fine-tuning);
  lora        LoRA r=4 on q and v kept apart (the low-rank path computed next to W0);
  adapter_l   Lin et al.'s adapter, one per block;
  adapter_h   Houlsby et al.'s, two per block;
all through `lora_jax.methods`, as the trainer and `evaluate` run them. Compilation is excluded;
the variants are timed in interleaved rounds (one call of each per round), so that drift in the
machine's speed falls on all of them alike, and reported as mean +- std in ms with the slowdown
against the base, as the paper prints them.

    python benchmarks/latency.py                         # a GPU: Table 1, then Figure 5's grid
    python benchmarks/latency.py --table 1 --shapes 1x128,2x128 --trials 5 --dtype fp32  # a CPU
    python benchmarks/latency.py --size tiny --trials 2  # a smoke run

Table 1 uses adapter bottlenecks of about 11M parameters on GPT-2 medium (Adapter^L r=224:
11,089,152; Adapter^H r=112: 11,164,928), the paper's 11M columns. Figure 5 sweeps batch
{1, 2, 4, 8, 16, 32} x sequence {128, 256, 512} x bottleneck {10, 100, 250}.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

TABLE_1 = ((32, 512), (16, 256), (1, 128))
FIGURE_5 = tuple((b, s) for s in (128, 256, 512) for b in (1, 2, 4, 8, 16, 32))
SIZES = {"medium": dict(n_layer=24, n_embd=1024, n_head=16),
         "tiny": dict(n_layer=2, n_embd=64, n_head=4)}
TABLE_1_BOTTLENECKS = {"adapter_l": 224, "adapter_h": 112}


def build(size: str, dtype: str):
    """(model, params, family) of GPT-2 with random weights in the compute dtype."""
    import jax
    import jax.numpy as jnp
    import transformers

    from lora_jax.interop import hub
    from lora_jax.models import family

    hf = transformers.GPT2Config(vocab_size=50257, n_positions=1024, **SIZES[size],
                                 embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    compute = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    model = hub.model_from_hf_config(hf, dtype=compute, param_dtype=compute)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    return model, params, family("gpt2")


def variants(model, params, family, bottleneck: dict[str, int]) -> dict:
    """name -> forward(ids) -> logits, each a jitted function of (weights, ids) with its
    method's frozen and trained trees bound as arguments (not baked into the program)."""
    import functools

    import jax

    from lora_jax import methods
    from lora_jax.config import base_config

    out = {}
    for name in ("base", "lora", "adapter_l", "adapter_h"):
        if name == "base":
            forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids).logits)
            out[name] = functools.partial(forward, params)
            continue
        c = base_config().method
        c.use, c.also_train = (name,), ()
        if name == "lora":
            c.lora.targets, c.lora.rank = family.lora_targets, 4
            c.lora.split_outputs = dict(family.lora_split_outputs)
        else:
            c[name].bottleneck = bottleneck[name]
        stack = methods.build(c, family)
        frozen, trainable = stack.split(params, jax.random.key(1))
        adapted = stack.adapt(model.apply)
        forward = jax.jit(lambda f, t, ids, a=adapted: a(f, t, ids).logits)
        out[name] = functools.partial(forward, frozen, trainable)
    return out


def time_shape(forwards: dict, batch: int, seq: int, trials: int, warmup: int) -> dict:
    """name -> [ms per call], from interleaved rounds after `warmup` untimed ones."""
    import jax
    import numpy as np

    ids = np.random.default_rng(0).integers(0, 50000, (batch, seq), dtype=np.int32)
    times = {name: [] for name in forwards}
    for round_ in range(warmup + trials):
        for name, forward in forwards.items():
            start = time.perf_counter()
            jax.block_until_ready(forward(ids))
            if round_ >= warmup:
                times[name].append(1e3 * (time.perf_counter() - start))
    return times


def cell(ms: list[float], base: list[float] | None) -> str:
    mean, std = statistics.mean(ms), statistics.stdev(ms) if len(ms) > 1 else 0.0
    text = f"{mean:.1f} +- {std:.1f}"
    if base is not None:
        text += f" ({100 * (mean / statistics.mean(base) - 1):+.1f}%)"
    return text


def table_1(args, model, params, family) -> None:
    forwards = variants(model, params, family, TABLE_1_BOTTLENECKS)
    results = {shape: time_shape(forwards, *shape, args.trials, args.warmup)
               for shape in args.shapes or TABLE_1}
    shapes = list(results)
    print(f"\nTable 1: one forward pass, ms (mean +- std of {args.trials}), slowdown vs base")
    print(f"{'batch x seq':<24}" + "".join(f"{f'{b} x {s}':>26}" for b, s in shapes))
    labels = {"base": "Fine-Tune/LoRA (merged)", "lora": "LoRA kept apart",
              "adapter_l": f"Adapter^L (r={TABLE_1_BOTTLENECKS['adapter_l']})",
              "adapter_h": f"Adapter^H (r={TABLE_1_BOTTLENECKS['adapter_h']})"}
    for name, label in labels.items():
        base = None if name == "base" else "base"
        print(f"{label:<24}" + "".join(
            f"{cell(results[s][name], results[s][base] if base else None):>26}" for s in shapes))


def figure_5(args, model, params, family) -> None:
    print(f"\nFigure 5: slowdown vs base, % (mean of {args.trials})")
    print(f"{'bottleneck':<12}{'batch x seq':<14}{'base ms':>10}{'Adapter^L':>12}{'Adapter^H':>12}")
    for r in args.bottlenecks:
        forwards = variants(model, params, family, {"adapter_l": r, "adapter_h": r})
        forwards.pop("lora")
        for batch, seq in args.shapes or FIGURE_5:
            times = time_shape(forwards, batch, seq, args.trials, args.warmup)
            base = statistics.mean(times["base"])
            slow = {n: 100 * (statistics.mean(times[n]) / base - 1) for n in ("adapter_l",
                                                                              "adapter_h")}
            print(f"{r:<12}{f'{batch} x {seq}':<14}{base:>10.1f}{slow['adapter_l']:>+11.1f}%"
                  f"{slow['adapter_h']:>+11.1f}%")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def main(argv=None) -> None:
    import jax

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", choices=("1", "5", "both"), default="both",
                        help="Table 1, Figure 5's grid, or both")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="batch x seq list, e.g. 1x128,2x128 (default: the paper's)")
    parser.add_argument("--bottlenecks", type=lambda t: [int(v) for v in t.split(",")],
                        default=[10, 100, 250], help="Figure 5's adapter bottlenecks")
    parser.add_argument("--trials", type=int, default=100, help="timed calls per variant (paper: 100)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="compute dtype; default bf16 on a GPU, fp32 elsewhere")
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    args.dtype = args.dtype or ("bf16" if device.platform == "gpu" else "fp32")
    print(f"device {device.device_kind} ({jax.device_count()}), jax {jax.__version__}, "
          f"{platform.machine()}, GPT-2 {args.size}, {args.dtype}")
    model, params, family = build(args.size, args.dtype)
    if args.table in ("1", "both"):
        table_1(args, model, params, family)
    if args.table in ("5", "both"):
        figure_5(args, model, params, family)


if __name__ == "__main__":
    main()
