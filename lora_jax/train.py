"""Config-driven LoRA training: config -> mesh -> state -> jitted step -> eval -> checkpoint.

    python -m lora_jax.train --config configs/quickstart.py --workdir /tmp/quickstart
    python -m lora_jax.train --config configs/glue.py:task=mrpc,model=minilm \\
        --config.optim.lr=4e-4 --workdir /tmp/mrpc

Rerunning with the same workdir resumes from its newest checkpoint. Multi-host: pass
--coordinator_address, --num_processes and --process_id (or the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID environment variables) to every process.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lora_jax import lora, optim, peft_adapters, sharding, tasks
from lora_jax.checkpoint import Checkpoints, abstract
from lora_jax.modeling import build_model, run_keys
from lora_jax.run_log import RunLog

FLAGS = flags.FLAGS

logger = logging.getLogger(__name__)


def spec_from_config(cfg: ml_collections.ConfigDict) -> lora.LoraSpec:
    """The LoraSpec a config's `lora` section describes."""
    return lora.LoraSpec(
        targets=tuple(cfg.targets), rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
        init=cfg.init, rslora=cfg.rslora, rank_pattern=dict(cfg.rank_pattern),
        alpha_pattern=dict(cfg.alpha_pattern),
        split_outputs={k: tuple(v) for k, v in cfg.split_outputs.items()},
        also_train=tuple(cfg.also_train))


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int):
    """Linear warmup (steps, or a ratio of all steps) to `lr`, then linear decay to 0."""
    import optax

    warmup = cfg.warmup_steps if cfg.warmup_steps else int(cfg.warmup_ratio * total_steps)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
         optax.linear_schedule(cfg.lr, 0.0, max(total_steps - warmup, 1))], [warmup])


def build_train_step(forward, kind: str, tx, mesh, label_smoothing: float = 0.0):
    """The trainer's jitted step(frozen, trainable, opt_state, batch, rng) -> (trainable,
    opt_state, mean loss), for a batch of [accum, micro, ...] arrays (`sharding.global_batch`).

    `trainable` and `opt_state` are donated (updated in place); benchmarks call this same function.

    Args:
      forward: `tasks.make_forward` of an adapted apply.
      kind: the task's kind ('classification', 'regression', 'lm'), for `tasks.loss_sum`.
      tx: the optax optimizer.
      mesh: where the step runs; its outputs are replicated over it.
      label_smoothing: for classification and LM losses.
    """

    def loss_fn(frozen, trainable, batch, rng):
        logits = forward(frozen, trainable, batch, rng, train=True)
        return tasks.loss_sum(kind, logits, batch, label_smoothing)

    replicated = sharding.replicated(mesh)
    return jax.jit(optim.make_accumulating_train_step(loss_fn, tx), donate_argnums=(1, 2),
                   out_shardings=(replicated, replicated, replicated))


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains, evaluates and exports adapters as `config` says; resumes from `workdir`.

    Returns:
      The final evaluation metrics, plus 'best' (the best evaluation seen and its step).
    """
    workdir = pathlib.Path(workdir)
    log = RunLog(workdir, config, enabled=jax.process_index() == 0)
    key_init, key_lora, key_train = run_keys(config.seed)

    # --- Model, adapters and mesh -------------------------------------------------------------
    model, params, tokenizer, model_info = build_model(config.model, key_init)
    spec = spec_from_config(config.lora)
    frozen, trainable = lora.split(spec, params, key_lora)
    del params
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    replicated = sharding.replicated(mesh)
    frozen = sharding.place(frozen, sharding.frozen_shardings(frozen, mesh))
    trainable = sharding.place(trainable, replicated)
    log.info(f"{lora.count_params(frozen):,} frozen and {lora.count_params(trainable):,} trainable "
             f"parameters; mesh {dict(mesh.shape)} over {jax.device_count()} devices")

    # --- Data and optimizer ---------------------------------------------------------------------
    task = tasks.build_task(config.data, tokenizer)
    batch_size = config.data.batch_size
    steps_per_epoch = task.steps_per_epoch(batch_size)
    if steps_per_epoch == 0:
        rows = f" in {len(task.packed_rows)} packed rows" if task.packing else ""
        raise ValueError(f"{len(task.train)} training examples{rows} make no batch of {batch_size}")
    total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch
    schedule = learning_rate_schedule(config.optim, total_steps)
    tx = optim.adamw(schedule, b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps,
                     weight_decay=config.optim.weight_decay, clip_norm=config.optim.clip_norm)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(trainable)

    # --- Steps ----------------------------------------------------------------------------------
    forward = tasks.make_forward(lora.adapt(model.apply, spec))

    train_step = build_train_step(forward, task.kind, tx, mesh, config.optim.label_smoothing)
    eval_step = tasks.make_eval_step(forward, task.kind, replicated)

    def evaluate(trainable) -> dict[str, float]:
        return tasks.evaluate(task, eval_step, frozen, trainable, mesh,
                              config.data.eval_batch_size)

    # --- Resume ---------------------------------------------------------------------------------
    checkpoints = Checkpoints(workdir / "checkpoints", config.train.checkpoint_every,
                              config.train.keep_checkpoints)

    # A global (replicated) array: orbax saves no host-local arrays in a multi-host run.
    rng_data = sharding.place(jax.random.key_data(key_train), replicated)

    def state(step: int):
        epoch, index = divmod(step, steps_per_epoch)
        return {"trainable": trainable, "opt_state": opt_state, "step": np.int64(step),
                "data": {"epoch": np.int64(epoch), "index": np.int64(index)},
                "rng": rng_data}

    start = 0
    restored = checkpoints.restore_latest(abstract(state(0)))
    if restored is not None:
        start, saved = restored
        if not np.array_equal(np.asarray(saved["rng"]), np.asarray(jax.random.key_data(key_train))):
            raise ValueError(f"{workdir} holds a run with another seed; use a new workdir")
        trainable, opt_state = saved["trainable"], saved["opt_state"]
        log.resume_at(start)
        log.info(f"resumed from step {start} (epoch {int(saved['data']['epoch'])}, "
                 f"batch {int(saved['data']['index'])})")

    # --- Loop -----------------------------------------------------------------------------------
    best = log.best()
    epoch_cache: dict[int, list[dict]] = {}

    def batch_at(step: int) -> tuple[dict, dict]:
        """(host batch, the same placed on the mesh) of a step: a pure function of seed and step."""
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = task.train_batches(batch_size, config.seed, epoch)
        host_batch = epoch_cache[epoch][index]
        return host_batch, sharding.global_batch(host_batch, mesh, config.optim.grad_accum)

    pending: list[tuple[int, jax.Array, int]] = []  # losses fetched only when logged
    tick = time.perf_counter()
    upcoming = batch_at(start) if start < total_steps else None
    for step in range(start, total_steps):
        host_batch, batch = upcoming
        trainable, opt_state, loss = train_step(frozen, trainable, opt_state, batch,
                                                jax.random.fold_in(key_train, step))
        # Dispatch is asynchronous: the next batch is built and copied while this step runs.
        upcoming = batch_at(step + 1) if step + 1 < total_steps else None
        pending.append((step + 1, loss, int(host_batch["attention_mask"].sum())))
        done = step + 1
        if done % config.train.log_every == 0 or done == total_steps:
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            tokens = sum(t for _, _, t in pending)
            log.train([(s, float(tasks.first_replica(l)), float(schedule(s - 1)))
                       for s, l, _ in pending], tokens / elapsed, total_steps)
            pending = []
        if done % config.train.eval_every == 0 or done == total_steps:
            metrics = evaluate(trainable)
            best = log.eval(done, metrics, task.main_metric, higher_is_better=task.kind != "lm")
            if jax.process_index() == 0 and best["step"] == done:
                peft_adapters.export_peft(workdir / "best_adapter", spec,
                                          jax.device_get(trainable), **model_info)
        checkpoints.save(done, state(done), force=done == total_steps)

    # --- Export ---------------------------------------------------------------------------------
    final = evaluate(trainable) if start == total_steps else metrics
    if jax.process_index() == 0:
        peft_adapters.export_peft(workdir / "adapter", spec, jax.device_get(trainable),
                                  **model_info)
    checkpoints.close()
    log.close()
    return {**final, "best": best}


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    if FLAGS.num_processes > 1:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    result = train(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in result.items()}, default=float))


def define_flags() -> None:
    """The command line; defined only when run as a program, so that importing this module
    next to another entry point (evaluate) does not clash on flag names."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the adapter export go.")
    flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                        "host:port of process 0, for multi-host runs.")
    flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 1)),
                         "Number of processes in a multi-host run.")
    flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", 0)),
                         "This process's index in a multi-host run.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
