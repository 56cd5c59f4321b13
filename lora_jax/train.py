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
import sys
import time
from contextlib import closing
from typing import Any

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lora_jax.training import compile_cache, evaluation, setup, sharding
from lora_jax.methods import count_params
from lora_jax.interop import exports
from lora_jax.training.checkpoint import Checkpoints, abstract
from lora_jax.config_checks import check_config
from lora_jax.errors import Preempted, RunError
from lora_jax.training.inputs import run_inputs
from lora_jax.training.loop import (StepEvents, check_same_seed, checkpoint_state, log_losses,
                                    run_result)
from lora_jax.training.modeling import run_keys
from lora_jax.training.preemption import PreemptionNotice
from lora_jax.training.compile_clock import CompileClock
from lora_jax.training.run_log import RunLog
from lora_jax.training.workdir import Workdir

FLAGS = flags.FLAGS

logger = logging.getLogger(__name__)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains, evaluates and exports adapters as `config` says; resumes from `workdir`.

    Every config value is checked, the workdir locked and its records compared with this run's
    config and inputs before anything is written (see `lora_jax.training.workdir`).

    Returns:
      The final evaluation metrics, plus 'best' (the best evaluation seen and its step),
      'trained_params' (scalars in the trainable tree) and 'lora_params' (those in low-rank A
      and B matrices, as trained: a fused projection's slice counts its own size).

    Raises:
      ConfigError, WorkdirError, IncompatibleCheckpoint: before anything is written.
      DivergenceError: the loss or the trainable parameters became non-finite.
      Preempted: SIGTERM arrived; the current step was checkpointed first.
    """
    check_config(config)
    with Workdir(workdir, jax.process_index()) as run_dir:
        run_dir.check_config(config)
        inputs = run_inputs(config)
        run_dir.check_inputs(inputs)
        with CompileClock() as clock:
            return _train(config, run_dir, inputs, clock)


def _train(config: ml_collections.ConfigDict, run_dir: Workdir, inputs: dict,
           clock: CompileClock) -> dict[str, Any]:
    workdir = run_dir.path
    log = RunLog(workdir, enabled=run_dir.writer)
    _, _, key_train = run_keys(config.seed)

    # --- Model, methods, mesh, data, optimizer, steps (lora_jax.training.setup) ----------------
    run = setup.build(config)
    stack, frozen, trainable, mesh = run.stack, run.frozen, run.trainable, run.mesh
    log.info(f"{stack.describe()}: {count_params(trainable):,} trained and "
             f"{count_params(frozen):,} frozen parameters; mesh {dict(mesh.shape)} over "
             f"{jax.device_count()} devices")
    training = setup.for_training(run)
    task, steps_per_epoch, total_steps = training.task, training.steps_per_epoch, \
        training.total_steps
    schedule, opt_state = training.schedule, training.opt_state
    train_step, eval_step = training.train_step, training.eval_step
    replicated = sharding.replicated(mesh)
    batch_size = config.data.batch_size

    def evaluate(trainable) -> dict[str, float]:
        return evaluation.evaluate(task, eval_step, frozen, trainable, mesh,
                                   config.data.eval_batch_size)

    # --- Resume ---------------------------------------------------------------------------------
    checkpoints = Checkpoints(workdir / "checkpoints", config.train.checkpoint_every,
                              config.train.keep_checkpoints)

    # A global (replicated) array: orbax saves no host-local arrays in a multi-host run.
    rng_data = sharding.place(jax.random.key_data(key_train), replicated)

    def state(step: int):
        return checkpoint_state(trainable, opt_state, step, steps_per_epoch, rng_data)

    start = 0
    restored = checkpoints.restore_latest(abstract(state(0)))
    if restored is not None:
        start, saved = restored
        check_same_seed(saved, key_train, workdir)
        trainable, opt_state = saved["trainable"], saved["opt_state"]

    # --- The run starts: from here on the workdir is written ------------------------------------
    run_dir.commit(config, inputs, fresh=start == 0)
    compile_cache.use(config.train.compilation_cache, workdir)  # before the steps compile
    checkpoints.start_writing()
    log.start(start)
    if start:
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

    # Losses and finiteness flags stay on the device until the loop syncs anyway (StepEvents).
    pending: list[tuple[int, jax.Array, jax.Array, int]] = []
    tick = time.perf_counter()

    def flush() -> None:
        nonlocal pending, tick
        if not pending:
            return
        elapsed, tick = time.perf_counter() - tick, time.perf_counter()
        tokens = sum(t for *_, t in pending)
        fetched = [(s, float(sharding.first_replica(l)), bool(sharding.first_replica(f)))
                   for s, l, f, _ in pending]
        pending = []
        log_losses(log, fetched, lambda s: float(schedule(s)), tokens / elapsed, total_steps,
                   checkpoints)

    upcoming = batch_at(start) if start < total_steps else None
    # closing(): the checkpoint manager and the log are closed however the loop ends.
    with closing(checkpoints), closing(log), PreemptionNotice() as notice:
        for step in range(start, total_steps):
            host_batch, batch = upcoming
            trainable, opt_state, loss, finite = train_step(
                frozen, trainable, opt_state, batch, jax.random.fold_in(key_train, step))
            if step == start:  # one wait, for the time to the first step (compiles included)
                first_step_s = (jax.block_until_ready(loss), clock.since_open())[1]
            # Dispatch is asynchronous: the next batch is built and copied while this step runs.
            upcoming = batch_at(step + 1) if step + 1 < total_steps else None
            done = step + 1
            pending.append((done, loss, finite, int(host_batch["attention_mask"].sum())))
            preempted = notice.reached(done)
            due = StepEvents.at(done, total_steps, config.train, checkpoints, preempted)
            if due.log:
                flush()
            if due.evaluate:
                metrics = evaluate(trainable)
                best = log.eval(done, metrics, task.main_metric,
                                higher_is_better=task.kind != "lm")
                if run_dir.writer and best["step"] == done:
                    exports.save(workdir / "best_adapter", stack, config.method,
                                jax.device_get(trainable), frozen=frozen, **run.info)
            if due.checkpoint:
                checkpoints.save(done, state(done), force=True)
            if preempted:
                raise Preempted(f"SIGTERM at step {done}: checkpointed step {done} in "
                                f"{checkpoints.directory}; rerun the same command to resume")

        # --- Export -----------------------------------------------------------------------------
        final = evaluate(trainable) if start == total_steps else metrics
        if start < total_steps:
            log.compile(total_steps, {**clock.record(), "first_step_s": round(first_step_s, 3)})
        if run_dir.writer:
            exports.save(workdir / "adapter", stack, config.method, jax.device_get(trainable),
                         frozen=frozen, **run.info)
    return run_result(final, best, trainable, log.environments())


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    if FLAGS.num_processes > 1:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    try:
        result = train(FLAGS.config, FLAGS.workdir)
    except (RunError, FileNotFoundError) as error:
        # The message names the problem and the remedy; a traceback would bury it.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 1))
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in result.items()}, default=float))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a misspelt `--config.<field>` reported in one line (its "did
    you mean" suggestion) instead of ml_collections' chained tracebacks."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        print(f"error: {error}\n(see --helpfull)", file=sys.stderr)
    except (AttributeError, KeyError) as error:
        # ml_collections raises these for an unknown config field; their text carries the
        # field and the suggestion, quoted with escaped newlines.
        text = str(error.args[0] if error.args else error).strip("'\"")
        text = text.replace("\\n", "\n").replace("\\'", "'")
        print(f"error: unknown config field: {text}", file=sys.stderr)
    sys.exit(2)


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
    app.run(main, flags_parser=parse_flags)
