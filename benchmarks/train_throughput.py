"""Training throughput of LoRA against PEFT on PyTorch, on the paper's settings, in one run.

For each setting (GPT-2 medium / large with the E2E config: LoRA r=4 on q and v, alpha 32, LoRA
dropout 0.1, batch 8 x 512; RoBERTa base / large with the GLUE config: r=8 on query and value,
batch 16 x 128), on random weights of the real shapes:

  jax           the lora_jax trainer's own step (`lora_jax.training.steps.build_train_step` on the
                experiment config, its optimizer, mesh and batch placement), not a special path;
  peft          PEFT on torch, eager;
  peft-compile  PEFT with torch.compile;

each for LoRA and for full fine-tuning. Figures: step time, tokens/s, peak memory (the device's
peak allocation on a GPU, the process's peak resident set on a CPU) and model FLOPs utilization:
the step's model FLOPs (counted below, the same count for every framework) per second over the
matmul peak this script measures on the device in the compute dtype. Each measurement runs in its
own subprocess, so a peak belongs to one framework and one mode.

    python benchmarks/train_throughput.py                                   # GPU: all settings, bf16
    python benchmarks/train_throughput.py --settings gpt2-medium,roberta-base --dtype fp32 \\
        --batch 2 --seq 128 --steps 3 --warmup 1                           # a CPU-sized run
    python benchmarks/train_throughput.py --packing --settings gpt2-medium  # sequence packing

--packing measures what users wait for on E2E: the LoRA step's useful (non-padding) tokens/s on
the same real training examples, with rows padded to 512 tokens, length-bucketed (the trainer's
default) or packed (`data.packing`).

On a GPU the compute is bf16 with bf16 frozen weights and fp32 adapters, heads and optimizer
state in both frameworks (PEFT: base model cast to bf16, adapters kept fp32 by PEFT, autocast;
full fine-tuning: fp32 master weights and autocast, as usual in torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import time

REPO = __file__.rsplit("/benchmarks/", 1)[0]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the benchmark: a model of real shape and the experiment config it trains with."""

    family: str  # 'gpt2' or 'roberta'
    layers: int
    width: int
    heads: int
    batch: int
    seq: int
    config: str  # the experiment config the trainer would run

    @property
    def hf_fields(self) -> dict:
        """HF config fields of the real model (vocabularies and positions included)."""
        if self.family == "gpt2":
            return dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_layer=self.layers,
                        n_embd=self.width, n_head=self.heads)
        return dict(model_type="roberta", vocab_size=50265, max_position_embeddings=514,
                    type_vocab_size=1, pad_token_id=1, num_hidden_layers=self.layers,
                    hidden_size=self.width, num_attention_heads=self.heads,
                    intermediate_size=4 * self.width)


SETTINGS = {
    "gpt2-medium": Setting("gpt2", 24, 1024, 16, 8, 512, "configs/e2e.py:model=gpt2-medium"),
    "gpt2-large": Setting("gpt2", 36, 1280, 20, 8, 512, "configs/e2e.py:model=gpt2-large"),
    "roberta-base": Setting("roberta", 12, 768, 12, 16, 128,
                            "configs/glue.py:task=sst2,model=roberta-base"),
    "roberta-large": Setting("roberta", 24, 1024, 16, 16, 128,
                             "configs/glue.py:task=sst2,model=roberta-large"),
}


def shape(setting: Setting, args) -> tuple[int, int]:
    """(batch, seq): the setting's, unless the command line shrinks them (CPU runs)."""
    return args.batch or setting.batch, args.seq or setting.seq


# --- Model FLOPs ----------------------------------------------------------------------------------

def model_flops(setting: Setting, mode: str, batch: int, seq: int, rank: int) -> float:
    """Matmul FLOPs of one training step, the numerator of MFU (the same for every framework).

    Forward: 2 FLOPs per multiply-add over every projection (12 d^2 per layer: q, k, v, o and the
    4d MLP), the attention scores and values (2 * 2 * seq * d per token and layer, the whole
    square counted as the kernels compute it) and GPT-2's tied LM head (d x vocab). Backward:
    full fine-tuning needs the gradients of activations and of weights (2x forward); LoRA only of
    activations (1x forward) plus the adapters' own, small, forward and backward.
    """
    tokens = batch * seq
    d = setting.width
    per_token = setting.layers * (2 * 12 * d * d + 2 * 2 * seq * d)
    if setting.family == "gpt2":
        per_token += 2 * d * 50257
    forward = per_token * tokens
    if mode == "full":
        return 3 * forward
    adapted = 2 * setting.layers  # q and v in every layer
    adapters = 3 * 2 * tokens * rank * (d + d) * adapted
    return 2 * forward + adapters


# --- Measurement helpers --------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_steps(run_step, sync, warmup: int, steps: int) -> float:
    """Seconds per step: `warmup` untimed steps (compilation), then `steps` with one final sync,
    so nothing waits on the host inside the timed loop."""
    for _ in range(warmup):
        run_step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        run_step()
    sync()
    return (time.perf_counter() - start) / steps


def random_params(model, sample_ids, param_dtype, mesh, seed: int = 1):
    """Random weights of the real shapes, drawn on the host one array at a time and each placed
    on the mesh at once, sharded as the trainer shards frozen weights.

    A jitted `model.init` would be simpler, but its random-number temporaries (and a host copy of
    the whole model) would count in the peak memory, which is what we measure.
    """
    import jax
    import numpy as np
    from flax import traverse_util

    from lora_jax.training import sharding

    rng = np.random.default_rng(seed)
    shapes = traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), sample_ids))
    fsdp = mesh.shape["fsdp"]
    params = {}
    for path, leaf in shapes.items():
        if path[-1] == "scale":  # layer norms start as the identity
            value = np.ones(leaf.shape, np.float32)
        else:
            value = 0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)
        placement = jax.sharding.NamedSharding(mesh, sharding.frozen_spec(leaf.shape, fsdp))
        params[path] = sharding.place(value.astype(param_dtype), placement)
    return traverse_util.unflatten_dict(params)["params"]


def matmul_peak(dtype: str, n: int, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n x n matmul chain on the default device, in the compute dtype."""
    import jax
    import jax.numpy as jnp

    dt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    b = jax.random.normal(jax.random.key(1), (n, n), dt)

    @jax.jit
    def chain(a, b):  # several dependent matmuls per dispatch: launch overhead does not count
        for _ in range(4):
            a = (a @ b).astype(dt) * 0.01
        return a

    chain(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        chain(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 4 * 2 * n**3 / best


# --- lora_jax -------------------------------------------------------------------------------------

def trainer_config(setting: Setting, mode: str, dtype: str, attention: str | None = None):
    """The experiment config, on random weights of the real shape, for LoRA or full training."""
    import ml_collections

    from lora_jax.config import load_config

    config = load_config(f"{REPO}/{setting.config}")
    config.model.name = ""
    config.model.random_init = ml_collections.ConfigDict(setting.hf_fields)
    config.model.dtype = "bfloat16" if dtype == "bf16" else "float32"
    # Frozen weights in the compute dtype; trained ones are fp32 (full fine-tuning: all of them,
    # drawn in fp32 at once, as torch keeps fp32 master weights).
    config.model.param_dtype = "float32" if mode == "full" else config.model.dtype
    config.model.attention_implementation = attention
    if mode == "full":
        config.method.use = ("full",)
    return config


def synthetic_batch(setting: Setting, batch: int, seq: int) -> dict:
    """A host batch in the trainer's format (every token real)."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 50000, (batch, seq), dtype=np.int32)
    ones = np.ones((batch, seq), np.int32)
    if setting.family == "gpt2":
        return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}
    return {"input_ids": ids, "attention_mask": ones,
            "labels": rng.integers(0, 2, (batch,), dtype=np.int32)}


def build_jax_step(setting: Setting, config):
    """The trainer's step and state for `config` on random weights: (step, frozen, trainable,
    optimizer state, mesh), built by `lora_jax.training.setup` as the trainer builds them (the weights
    drawn here, leaf by leaf on the mesh)."""
    import jax
    import jax.numpy as jnp
    import transformers

    from lora_jax.interop import hub
    from lora_jax.training import setup, sharding, steps
    from lora_jax.training.base_model import DTYPES
    from lora_jax.models import family as model_family

    fields = dict(config.model.random_init)
    hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    task = None if setting.family == "gpt2" else "classification"
    model = hub.model_from_hf_config(hf_config, task=task, num_labels=task and 2,
                                     dtype=DTYPES[config.model.dtype],
                                     param_dtype=DTYPES[config.model.param_dtype],
                                     remat=config.model.remat,
                                     attention_implementation=config.model.attention_implementation)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    params = random_params(model, jnp.ones((1, 8), jnp.int32), DTYPES[config.model.param_dtype],
                           mesh)
    base = setup.Base(model, params, None, model_family(hf_config.model_type),
                      {"model_type": hf_config.model_type, "task": task})
    run = setup.build(config, base_model=base)  # already placed: placing again copies nothing
    del params, base
    tx, _ = setup.optimizer(config.optim, 1000, run.stack.update_scales(run.trainable))
    opt_state = jax.jit(tx.init, out_shardings=sharding.replicated(run.mesh))(run.trainable)
    kind = "lm" if setting.family == "gpt2" else "classification"
    step = steps.build_train_step(run.forward, kind, tx, run.mesh, config.optim.label_smoothing)
    return step, run.frozen, run.trainable, opt_state, run.mesh


def peak_bytes() -> int:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", peak_rss_bytes())


def bench_jax(setting: Setting, args) -> dict:
    import jax

    from lora_jax import methods
    from lora_jax.training import sharding

    batch, seq = shape(setting, args)
    config = trainer_config(setting, args.mode, args.dtype, args.attention or None)
    step, frozen, trainable, opt_state, mesh = build_jax_step(setting, config)
    placed = sharding.global_batch(synthetic_batch(setting, batch, seq), mesh)
    key = jax.random.key(3)
    state = {"trainable": trainable, "opt": opt_state, "loss": None, "i": 0}

    def run_step():
        state["i"] += 1
        state["trainable"], state["opt"], state["loss"], _ = step(
            frozen, state["trainable"], state["opt"], placed, jax.random.fold_in(key, state["i"]))

    from lora_jax.training.compile_clock import CompileClock

    with CompileClock() as clock:  # the first step compiles: its time and the compiler's
        run_step()
        jax.block_until_ready(state["loss"])
        first_step_s = clock.since_open()
    seconds = time_steps(run_step, lambda: jax.block_until_ready(state["loss"]),
                         args.warmup, args.steps)
    device = jax.devices()[0]
    return {"seconds_per_step": seconds, "peak_bytes": peak_bytes(),
            "first_step_s": first_step_s, **clock.record(),
            "device": device.device_kind, "trainable": methods.count_params(trainable),
            "loss": float(sharding.first_replica(state["loss"])),
            "matmul_peak": matmul_peak(args.dtype, 8192 if device.platform == "gpu" else 1024)}


# --- Sequence packing on real E2E data ------------------------------------------------------------

LAYOUTS = ("padded", "bucketed", "packed")


def bench_layout(setting: Setting, args) -> dict:
    """Useful (non-padding) tokens/s of the LoRA step on real E2E training batches, laid out as
    rows padded to the full length, length-bucketed rows (the default), or packed rows."""
    import jax

    from lora_jax.training import sharding
    from lora_jax.data import tasks
    from lora_jax.data import tokenizers

    batch, seq = shape(setting, args)
    config = trainer_config(setting, "lora", args.dtype, args.attention or None)
    config.data.max_len = seq
    config.data.max_train_examples = args.examples
    config.data.packing = args.layout == "packed"
    if args.layout == "padded":
        config.data.buckets = (seq,)
    task = tasks.build_task(config.data, tokenizers.load("gpt2"), with_train=True)
    host_batches = task.train_batches(batch, seed=0, epoch=0)[:args.steps]
    step, frozen, trainable, opt_state, mesh = build_jax_step(setting, config)
    placed = [sharding.global_batch(b, mesh) for b in host_batches]
    key = jax.random.key(3)
    state = {"trainable": trainable, "opt": opt_state, "loss": None}

    def run_pass():
        for i, b in enumerate(placed):
            state["trainable"], state["opt"], state["loss"], _ = step(
                frozen, state["trainable"], state["opt"], b, jax.random.fold_in(key, i))
        jax.block_until_ready(state["loss"])

    run_pass()  # compiles every row length the batches have
    start = time.perf_counter()
    run_pass()
    seconds = time.perf_counter() - start
    useful = sum(int(b["attention_mask"].sum()) for b in host_batches)
    slots = sum(b["input_ids"].size for b in host_batches)
    # A packed row holds as many examples as its highest segment id; otherwise one per row.
    examples = sum(int(b["segment_ids"].max(axis=1).sum()) if "segment_ids" in b
                   else len(b["input_ids"]) for b in host_batches)
    return {"seconds": seconds, "steps": len(host_batches), "useful_tokens": useful,
            "slots": slots, "examples": examples, "device": jax.devices()[0].device_kind}


# --- PEFT on torch --------------------------------------------------------------------------------

def bench_torch(setting: Setting, args, compiled: bool) -> dict:
    import peft
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    fields = dict(setting.hf_fields)
    hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    if setting.family == "gpt2":
        model = transformers.GPT2LMHeadModel(hf_config)
        lora_config = peft.LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1,
                                      target_modules=["c_attn"], fan_in_fan_out=True)
    else:
        hf_config.num_labels = 2
        model = transformers.RobertaForSequenceClassification(hf_config)
        lora_config = peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, task_type="SEQ_CLS",
                                      target_modules=["query", "value"])
    bf16 = args.dtype == "bf16"
    if args.mode == "lora":
        if bf16:
            model = model.to(torch.bfloat16)  # frozen weights in bf16; PEFT keeps adapters fp32
        model = peft.get_peft_model(model, lora_config)
    model = model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.01, fused=cuda)
    batch, seq = shape(setting, args)
    host = synthetic_batch(setting, batch, seq)
    inputs = {k: torch.as_tensor(v, device=device).long() for k, v in host.items()
              if k in ("input_ids", "attention_mask")}
    labels = (inputs["input_ids"] if setting.family == "gpt2"
              else torch.as_tensor(host["labels"], device=device).long())
    forward = torch.compile(model) if compiled else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    state = {}

    def run_step():
        with autocast:
            loss = forward(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["loss"] = loss

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(run_step, torch.cuda.synchronize if cuda else (lambda: None),
                         args.warmup, args.steps)
    return {"seconds_per_step": seconds,
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(),
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "trainable": sum(p.numel() for p in trainable), "loss": float(state["loss"])}


# --- Driver ---------------------------------------------------------------------------------------

def run_one(args) -> None:
    setting = SETTINGS[args.setting]
    if args.layout:
        result = bench_layout(setting, args)
    elif args.framework == "jax":
        result = bench_jax(setting, args)
    else:
        result = bench_torch(setting, args, compiled=args.framework == "peft-compile")
    print(json.dumps(result))


def spawn(args, setting: str, framework: str = "jax", mode: str = "lora",
          layout: str = "") -> dict | None:
    cmd = [sys.executable, __file__, "--one", "--setting", setting, "--framework", framework,
           "--mode", mode, "--dtype", args.dtype, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
           "--layout", layout, "--examples", str(args.examples), "--attention", args.attention]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"[{setting} {framework} {mode} {layout}] failed:\n{proc.stderr[-3000:]}",
              file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def versions() -> str:
    import importlib.metadata as md

    names = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft")
    found = []
    for name in names:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return f"python {platform.python_version()}, " + ", ".join(found)


def report(args) -> None:
    print(f"{versions()}; {args.dtype} compute; {args.steps} timed steps after {args.warmup} "
          f"warm-up; command: python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}")
    print(f"| setting | batch x seq | framework | mode | device | trainable | ms/step | tokens/s "
          f"| peak MiB | MFU |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    results = {}
    for name in args.settings.split(","):
        setting = SETTINGS[name]
        batch, seq = shape(setting, args)
        peak = None
        for mode in args.modes.split(","):
            for framework in args.frameworks.split(","):
                r = spawn(args, name, framework, mode)
                if r is None:
                    continue
                results[name, framework, mode] = r
                peak = r.get("matmul_peak", peak)
                flops = model_flops(setting, mode, batch, seq, 4 if setting.family == "gpt2" else 8)
                mfu = "" if peak is None else f"{flops / r['seconds_per_step'] / peak:.1%}"
                print(f"| {name} | {batch} x {seq} | {framework} | {mode} | {r['device'][:24]} "
                      f"| {r['trainable']:,} | {1e3 * r['seconds_per_step']:,.1f} "
                      f"| {batch * seq / r['seconds_per_step']:,.0f} "
                      f"| {r['peak_bytes'] / 2**20:,.0f} | {mfu} |", flush=True)
        if peak:
            print(f"| {name} | measured matmul peak ({args.dtype}) | | | | | | "
                  f"{peak / 1e12:.2f} TFLOP/s | | |", flush=True)
    print()
    for name in args.settings.split(","):
        lora_r, full_r = results.get((name, "jax", "lora")), results.get((name, "jax", "full"))
        for mode in args.modes.split(","):
            ours = results.get((name, "jax", mode))
            for ref in ("peft", "peft-compile"):
                theirs = results.get((name, ref, mode))
                if ours and theirs:
                    print(f"{name} {mode}: lora_jax / {ref}: "
                          f"{theirs['seconds_per_step'] / ours['seconds_per_step']:.2f}x tokens/s, "
                          f"{ours['peak_bytes'] / theirs['peak_bytes']:.2f}x peak memory")
        if lora_r and full_r:
            print(f"{name}: lora_jax LoRA step time / its full fine-tuning step time: "
                  f"{lora_r['seconds_per_step'] / full_r['seconds_per_step']:.2f}")
        for mode in args.modes.split(","):
            ours = results.get((name, "jax", mode))
            if ours and "first_step_s" in ours:
                print(f"{name} {mode}: lora_jax time to the first step {ours['first_step_s']:.1f} s"
                      f", of which compiling {ours['compile_s']:.1f} s "
                      f"({ours['programs_compiled']} programs)")


def report_packing(args) -> None:
    """Useful tokens/s of the LoRA step on the same real E2E examples, per row layout."""
    print(f"{versions()}; {args.dtype} compute; LoRA step on the first {args.steps} training "
          f"batches of E2E (first {args.examples} examples), timed on a second pass; command: "
          f"python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}")
    print("| setting | layout | rows x length | steps | examples | padding | useful tokens/s "
          "| examples/s |\n|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.settings.split(","):
        batch, seq = shape(SETTINGS[name], args)
        found = {}
        for layout in LAYOUTS:
            r = spawn(args, name, layout=layout)
            if r is None:
                continue
            found[layout] = r
            print(f"| {name} | {layout} | {batch} x {seq} | {r['steps']} | {r['examples']:,} "
                  f"| {1 - r['useful_tokens'] / r['slots']:.1%} "
                  f"| {r['useful_tokens'] / r['seconds']:,.0f} "
                  f"| {r['examples'] / r['seconds']:,.1f} |", flush=True)
        if "packed" in found:
            packed = found["packed"]["useful_tokens"] / found["packed"]["seconds"]
            for other in ("padded", "bucketed"):
                if other in found:
                    ratio = packed / (found[other]["useful_tokens"] / found[other]["seconds"])
                    print(f"{name}: packed / {other}: {ratio:.2f}x useful tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, from {sorted(SETTINGS)}")
    parser.add_argument("--frameworks", default="jax,peft,peft-compile")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--batch", type=int, default=0, help="override the settings' batch (CPU)")
    parser.add_argument("--seq", type=int, default=0, help="override the settings' length (CPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attention", default="", choices=["", "cudnn"],
                        help="lora_jax attention kernel: XLA (default) or cuDNN's fused one "
                        "(GPU, bf16; where attention dropout is off)")
    parser.add_argument("--packing", action="store_true",
                        help="instead: useful tokens/s on real E2E batches, padded / bucketed / "
                        "packed rows (GPT-2 settings)")
    parser.add_argument("--examples", type=int, default=4000,
                        help="--packing: E2E training examples read")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--framework", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in args.settings.split(","):
        if name not in SETTINGS:
            parser.error(f"unknown setting {name!r}; choose from {sorted(SETTINGS)}")
    if args.one:
        return run_one(args)
    if args.packing:
        if any(SETTINGS[n].family != "gpt2" for n in args.settings.split(",")):
            parser.error("--packing applies to the GPT-2 settings (E2E)")
        return report_packing(args)
    report(args)


if __name__ == "__main__":
    main()
