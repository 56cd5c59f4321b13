"""Tokens/s and peak memory of one LoRA / full fine-tuning train step for GPT-2.

lora_jax against PEFT on PyTorch (eager and torch.compile), in the same run, on
random-init weights of the real GPT-2 shapes. Each measurement runs in its own
subprocess so that peak memory is that of one framework and one mode: on a GPU
the device's peak allocation, on the CPU the process's peak resident set.

    python benchmarks/train_step.py --size small --batch 2 --seq 128 --steps 5
    python benchmarks/train_step.py --size medium --batch 8 --seq 512 --dtype bf16   # GPU

lora_jax adapts q and v of the fused c_attn (the paper's setup); PEFT's
convention for GPT-2 is one LoRA on the whole fused c_attn, which costs slightly
more FLOPs (rank-r update over 3d outputs instead of 2d).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SIZES = {  # n_layer, n_embd, n_head: the released GPT-2 shapes.
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (36, 1280, 20),
}
VOCAB, POSITIONS = 50257, 1024


def hf_config(size: str, dropout: float = 0.0):
    import transformers

    n_layer, n_embd, n_head = SIZES[size]
    return transformers.GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=VOCAB, n_positions=POSITIONS,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_steps(run_step, sync, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        run_step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        run_step()
    sync()
    return (time.perf_counter() - start) / steps


def host_random_params(model, sample_ids, seed: int = 1):
    """Random weights drawn on the host, one float32 array at a time.

    A jitted `model.init` would be simpler, but on the CPU its random-number temporaries raise the
    process's peak memory far above what the train step itself needs, and that is what we measure.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    rng = np.random.default_rng(seed)
    shapes = traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), sample_ids))
    params = {}
    for path, shape in shapes.items():
        if path[-1] == "scale":  # layer norms start as the identity
            value = np.ones(shape.shape, np.float32)
        else:
            value = 0.02 * rng.standard_normal(shape.shape, dtype=np.float32)
        params[path] = jnp.asarray(value, shape.dtype)
    return traverse_util.unflatten_dict(params)["params"]


def bench_jax(args) -> dict:
    import jax
    import jax.numpy as jnp

    from lora_jax import lora, optim
    from lora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel, lm_loss

    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    config = GPT2Config.from_hf(hf_config(args.size), dtype=dtype, param_dtype=dtype)
    model = GPT2LMHeadModel(config)
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, VOCAB)
    params = host_random_params(model, ids[:, :8])
    if args.mode == "lora":
        spec = lora.LoraSpec(targets=(r"attn/c_attn",), rank=args.rank, alpha=32.0, dropout=0.1,
                             split_outputs={r"attn/c_attn": (True, False, True)})
    else:  # full fine-tuning: no adapters, every parameter trained.
        spec = lora.LoraSpec(targets=(), also_train=(".*",))
    frozen, trainable = lora.split(spec, params, jax.random.key(2))  # trainable is float32
    apply = lora.adapt(model.apply, spec)

    def loss_fn(frozen, trainable, batch, rng):
        logits = apply(frozen, trainable, batch["input_ids"], lora_rng=rng).logits
        return lm_loss(logits.astype(jnp.float32), batch["input_ids"], batch["loss_mask"])

    tx = optim.adamw(2e-4, weight_decay=0.01)
    opt_state = tx.init(trainable)
    step = optim.make_train_step(loss_fn, tx)
    batch = {"input_ids": ids, "loss_mask": jnp.ones_like(ids)}
    state = {"trainable": trainable, "opt": opt_state, "loss": None, "i": 0}

    def run_step():
        state["i"] += 1
        state["trainable"], state["opt"], state["loss"] = step(
            frozen, state["trainable"], state["opt"], batch, jax.random.key(state["i"]))

    seconds = time_steps(run_step, lambda: jax.block_until_ready(state["loss"]),
                         args.warmup, args.steps)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", peak_rss_bytes())
    return {"seconds_per_step": seconds, "peak_bytes": peak, "device": device.device_kind,
            "trainable": lora.count_params(trainable), "loss": float(state["loss"])}


def bench_torch(args, compiled: bool) -> dict:
    import peft
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_config(args.size)).to(device)
    if args.mode == "lora":
        config = peft.LoraConfig(r=args.rank, lora_alpha=32, lora_dropout=0.1,
                                 target_modules=["c_attn"], fan_in_fan_out=True)
        model = peft.get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.01)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), device=device)
    forward = torch.compile(model) if compiled else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    state = {}

    def run_step():
        with autocast:
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["loss"] = loss

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(run_step, torch.cuda.synchronize if cuda else (lambda: None),
                         args.warmup, args.steps)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    return {"seconds_per_step": seconds, "peak_bytes": peak, "device": name,
            "trainable": sum(p.numel() for p in trainable), "loss": float(state["loss"])}


def run_one(args) -> None:
    if args.framework == "jax":
        result = bench_jax(args)
    else:
        result = bench_torch(args, compiled=args.framework == "peft-compile")
    print(json.dumps(result))


def spawn(args, framework: str, mode: str) -> dict | None:
    cmd = [sys.executable, __file__, "--one", "--framework", framework, "--mode", mode,
           "--size", args.size, "--batch", str(args.batch), "--seq", str(args.seq),
           "--rank", str(args.rank), "--dtype", args.dtype, "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"[{framework}/{mode}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--frameworks", default="jax,peft,peft-compile")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--framework", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(args)

    tokens = args.batch * args.seq
    print(f"GPT-2 {args.size}, batch {args.batch} x {args.seq}, {args.dtype}, LoRA r={args.rank}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'framework':<14}{'mode':<6}{'device':<22}{'trainable':>12}{'ms/step':>10}"
          f"{'tokens/s':>11}{'peak MiB':>10}")
    results = {}
    for mode in args.modes.split(","):
        for framework in args.frameworks.split(","):
            r = spawn(args, framework, mode)
            if r is None:
                continue
            results[framework, mode] = r
            print(f"{framework:<14}{mode:<6}{r['device'][:21]:<22}{r['trainable']:>12,}"
                  f"{1e3 * r['seconds_per_step']:>10.1f}{tokens / r['seconds_per_step']:>11,.0f}"
                  f"{r['peak_bytes'] / 2**20:>10,.0f}", flush=True)
    for mode in args.modes.split(","):
        ours = results.get(("jax", mode))
        for ref in ("peft", "peft-compile"):
            theirs = results.get((ref, mode))
            if ours and theirs:
                print(f"{mode}: lora_jax / {ref}: "
                      f"{theirs['seconds_per_step'] / ours['seconds_per_step']:.2f}x tokens/s, "
                      f"{ours['peak_bytes'] / theirs['peak_bytes']:.2f}x peak memory")
    lora_r, full_r = results.get(("jax", "lora")), results.get(("jax", "full"))
    if lora_r and full_r:
        print(f"lora_jax LoRA step time / full fine-tuning step time: "
              f"{lora_r['seconds_per_step'] / full_r['seconds_per_step']:.2f}")


if __name__ == "__main__":
    main()
