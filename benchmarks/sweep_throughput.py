"""A 5-member rank study (LoRA r in {1, 2, 4, 8, 64} on Wq, Wv) trained one run after another
against all five as one program (`lora_jax.training.members`), on MiniLM- and RoBERTa-base-shaped
encoders (random weights of those sizes, BERT layout and vocabulary) and real SST-2 batches.

    python benchmarks/sweep_throughput.py --steps 10 --repeats 3

For each shape: the wall time of `steps` training steps of every member (compiles excluded: each
program is run twice before timing), examples per second over all members, and the memory of the
compiled step per member (XLA's memory analysis: arguments + outputs + temporaries, minus what
donated buffers alias), sequential against together. The two are timed alternately `repeats`
times and the ratio is the median of the per-repeat ratios (this machine's speed drifts). On a
GPU add `--device-memory` to report the device's peak bytes instead.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from lora_jax.config import load_config
from lora_jax.training import members, setup, sharding
from lora_jax.training.base_model import run_keys

RANKS = (1, 2, 4, 8, 64)
SHAPES = {  # hidden size, layers, heads, intermediate size
    "minilm": (384, 6, 12, 1536),
    "roberta-base": (768, 12, 12, 3072),
}


def study(shape: str, batch_size: int, max_len: int) -> list:
    hidden, layers, heads, intermediate = SHAPES[shape]
    configs = []
    for rank in RANKS:
        c = load_config("configs/glue.py:task=sst2,model=tiny")
        c.model.random_init = dict(c.model.random_init, hidden_size=hidden,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   intermediate_size=intermediate)
        c.method.lora.rank = rank
        c.data.batch_size, c.data.max_len = batch_size, max_len
        c.data.max_eval_examples = 64
        c.train.max_steps = 1000
        configs.append(c)
    return configs


def compiled_bytes(jitted, *args) -> int:
    m = jitted.lower(*args).compile().memory_analysis()
    if m is None:
        return 0
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


class Sequential:
    """The members as separate runs, stepped one after another (as a sweep runs them)."""

    def __init__(self, configs):
        self.runs = []
        for c in configs:
            run = setup.build(c)
            training = setup.for_training(run)
            self.runs.append([c, run, training, run.trainable, training.opt_state])

    def batch(self, i: int, step: int):
        c, run, training, *_ = self.runs[i]
        host = training.task.train_batches(c.data.batch_size, c.seed, 0)[
            step % training.steps_per_epoch]
        return sharding.global_batch(host, run.mesh, c.optim.grad_accum)

    def steps(self, start: int, n: int) -> None:
        for i, entry in enumerate(self.runs):
            c, run, training, trainable, opt_state = entry
            key = run_keys(c.seed)[2]
            for step in range(start, start + n):
                trainable, opt_state, loss, _ = training.train_step(
                    run.frozen, trainable, opt_state, self.batch(i, step),
                    jax.random.fold_in(key, step))
            jax.block_until_ready(loss)
            entry[3], entry[4] = trainable, opt_state

    def bytes_per_member(self) -> int:
        total = 0
        for i, (c, run, training, trainable, opt_state) in enumerate(self.runs):
            total += compiled_bytes(training.train_step, run.frozen, trainable, opt_state,
                                    self.batch(i, 0), jax.random.key(0))
        return total // len(self.runs)


class Together:
    def __init__(self, configs):
        self.group = members.MemberGroup.build(configs)
        self.trainable, self.opt_state = self.group.trainable, self.group.opt_state

    def steps(self, start: int, n: int) -> None:
        for step in range(start, start + n):
            batch, _ = self.group.batch(step)
            self.trainable, self.opt_state, losses, _ = self.group.step(
                self.trainable, self.opt_state, batch, step)
        jax.block_until_ready(losses)

    def bytes_per_member(self) -> int:
        g = self.group
        return compiled_bytes(g._train_step, g.frozen, self.trainable, self.opt_state,
                              g.batches(0), g.rngs(0)) // len(g.configs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--device-memory", action="store_true",
                        help="report the device's peak bytes in use (GPU) per member")
    args = parser.parse_args(argv)
    print(f"devices: {jax.devices()}; jax {jax.__version__}")
    print(f"{'shape':13} {'mode':10} {'wall s':>8} {'examples/s':>11} {'MiB/member':>11}")
    for shape in args.shapes:
        configs = study(shape, args.batch_size, args.max_len)
        modes = {"sequential": Sequential(configs), "together": Together(configs)}
        for mode in modes.values():
            mode.steps(0, 2)  # compile (every batch length the timed steps meet is warmed below)
        walls = {name: [] for name in modes}
        for r in range(args.repeats):
            start = 2 + r * args.steps
            for name, mode in modes.items():
                mode.steps(start, args.steps)  # warms this window's batch lengths
                tick = time.perf_counter()
                mode.steps(start, args.steps)
                walls[name].append(time.perf_counter() - tick)
        examples = len(RANKS) * args.steps * args.batch_size
        for name, mode in modes.items():
            wall = statistics.median(walls[name])
            if args.device_memory:
                stats = jax.devices()[0].memory_stats() or {}
                memory = stats.get("peak_bytes_in_use", 0) / len(RANKS)
            else:
                memory = mode.bytes_per_member()
            print(f"{shape:13} {name:10} {wall:8.2f} {examples / wall:11.1f} "
                  f"{memory / 2**20:11.1f}")
        ratios = [s / t for s, t in zip(walls["sequential"], walls["together"])]
        print(f"{shape:13} together / sequential speed: {statistics.median(ratios):.2f}x "
              f"(per repeat: {', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
