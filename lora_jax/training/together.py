"""Trains a group of runs (`members.groups`) as one program, each writing its own workdir.

    results = train_together([config_0, config_1], ["runs/r4", "runs/r8"])

Every member's workdir ends as its own `lora_jax.train` run leaves it: config.json, inputs.json,
metrics.jsonl (its losses and evaluations at the same steps), checkpoints (its own trainable tree
and optimizer state, at its own rank), best_adapter/ and adapter/ exports. The members step
together, so they evaluate, checkpoint and export at the same steps; a rerun resumes them from
their checkpoints (they must be at one step: a member whose newest checkpoint is older than the
others' is a WorkdirError naming it; run it alone with `lora_jax.train`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from lora_jax.config_checks import check_config
from lora_jax.errors import Preempted, WorkdirError
from lora_jax.interop import exports
from lora_jax.training import compile_cache, evaluation, optim, sharding
from lora_jax.training.checkpoint import Checkpoints, abstract
from lora_jax.training.compile_clock import CompileClock
from lora_jax.training.inputs import run_inputs
from lora_jax.training.loop import (StepEvents, check_same_seed, checkpoint_state, log_losses,
                                    run_result)
from lora_jax.training.members import MemberGroup
from lora_jax.training.modeling import run_keys
from lora_jax.training.preemption import PreemptionNotice
from lora_jax.training.run_log import RunLog
from lora_jax.training.workdir import Workdir


def train_together(configs: Sequence[ml_collections.ConfigDict],
                   workdirs: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Trains the members of one group as one program; returns each member's `train` result.

    Raises:
      ConfigError: a config is invalid, or the configs cannot share a program.
      WorkdirError: a member's workdir holds another run, or members are at other steps.
      DivergenceError, Preempted: as `lora_jax.train.train`.
    """
    configs = list(configs)
    for config in configs:
        check_config(config)
    with contextlib.ExitStack() as stack:
        dirs = [stack.enter_context(Workdir(w, jax.process_index())) for w in workdirs]
        inputs = []
        for run_dir, config in zip(dirs, configs):
            run_dir.check_config(config)
            inputs.append(run_inputs(config))
            run_dir.check_inputs(inputs[-1])
        clock = stack.enter_context(CompileClock())
        group = MemberGroup.build(configs)
        n = len(configs)
        replicated = sharding.replicated(group.run.mesh)
        keys = [run_keys(c.seed)[2] for c in configs]
        rng_data = [sharding.place(jax.random.key_data(k), replicated) for k in keys]
        checkpoints = [Checkpoints(d.path / "checkpoints", c.train.checkpoint_every,
                                   c.train.keep_checkpoints) for d, c in zip(dirs, configs)]
        logs = [RunLog(d.path, enabled=d.writer) for d in dirs]
        trainable, opt_state = group.trainable, group.opt_state
        spe = group.steps_per_epoch

        def member_state(i: int, step: int, trainable, opt_state) -> dict:
            return checkpoint_state(group.member_trainable(trainable, i),
                                    group.member_opt_state(opt_state, i), step, spe, rng_data[i])

        # --- Resume: every member from its own checkpoint, all at one step -------------------
        restored = [c.restore_latest(abstract(member_state(i, 0, trainable, opt_state)))
                    for i, c in enumerate(checkpoints)]
        starts = [0 if r is None else r[0] for r in restored]
        if len(set(starts)) > 1:
            behind = [str(dirs[i].path) for i, s in enumerate(starts) if s < max(starts)]
            raise WorkdirError(f"the members' newest checkpoints are at steps {starts}: "
                               f"{', '.join(behind)} is behind; run it alone with lora_jax.train")
        start = starts[0]
        for i, r in enumerate(restored):
            if r is not None:
                saved = r[1]
                check_same_seed(saved, keys[i], dirs[i].path)
                trainable, opt_state = group.with_member(trainable, opt_state, i,
                                                         saved["trainable"], saved["opt_state"])

        # --- The members start: their workdirs are written from here on --------------------
        for run_dir, config, own_inputs in zip(dirs, configs, inputs):
            run_dir.commit(config, own_inputs, fresh=start == 0)
        compile_cache.use(configs[0].train.compilation_cache, dirs[0].path)
        for c in checkpoints:
            c.start_writing()
        for log in logs:
            log.start(start)
            stack.callback(log.close)
        for c in checkpoints:
            stack.callback(c.close)
        notice = stack.enter_context(PreemptionNotice())

        total = group.total_steps
        lr_of = [_schedule(c, total) for c in configs]
        best = [log.best() for log in logs]
        pending: list[tuple[int, Any, Any, list[int]]] = []
        tick = time.perf_counter()

        def evaluate(i: int, trainable) -> dict[str, float]:
            member = group.members[i]
            return evaluation.evaluate(group.task, member.eval_step(group.task.kind),
                                       member.frozen, group.member_trainable(trainable, i),
                                       member.mesh, configs[i].data.eval_batch_size)

        def export(i: int, name: str, trainable) -> None:
            member = group.members[i]
            if dirs[i].writer:
                exports.save(dirs[i].path / name, member.stack, configs[i].method,
                             group.member_trainable(trainable, i), frozen=member.frozen,
                             **member.info)

        def flush() -> None:
            nonlocal pending, tick
            if not pending:
                return
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            fetched = [(s, np.asarray(jax.device_get(l)), np.asarray(jax.device_get(f)), t)
                       for s, l, f, t in pending]
            pending = []
            for i in range(n):
                rows = [(s, float(l[i]), bool(f[i])) for s, l, f, _ in fetched]
                tokens = sum(t[i] for *_, t in fetched)
                log_losses(logs[i], rows, lr_of[i], tokens / elapsed, total, checkpoints[i])

        first_step_s = None
        metrics: list[dict] = [{} for _ in range(n)]
        for step in range(start, total):
            batch = group.batches(step)
            batch_tokens = [int(x) for x in np.asarray(batch["attention_mask"]).sum(axis=(1, 2, 3))]
            trainable, opt_state, losses, finite = group.step(trainable, opt_state, step, batch)
            if step == start:
                first_step_s = (jax.block_until_ready(losses), clock.since_open())[1]
            done = step + 1
            pending.append((done, losses, finite, batch_tokens))
            preempted = notice.reached(done)
            # The members share their train settings (members.groups), so one decides for all.
            due = StepEvents.at(done, total, configs[0].train, checkpoints[0], preempted)
            if due.log:
                flush()
            if due.evaluate:
                for i in range(n):
                    metrics[i] = evaluate(i, trainable)
                    best[i] = logs[i].eval(done, metrics[i], group.task.main_metric,
                                           higher_is_better=group.task.kind != "lm")
                    if best[i]["step"] == done:
                        export(i, "best_adapter", trainable)
            if due.checkpoint:
                for i in range(n):
                    checkpoints[i].save(done, member_state(i, done, trainable, opt_state),
                                        force=True)
            if preempted:
                raise Preempted(f"SIGTERM at step {done}: every member checkpointed step {done}; "
                                "rerun the same command to resume")

        results = []
        for i in range(n):
            final = evaluate(i, trainable) if start == total else metrics[i]
            if start < total:
                logs[i].compile(total, {**clock.record(),
                                        "first_step_s": round(first_step_s, 3)})
            export(i, "adapter", trainable)
            results.append(run_result(final, best[i], group.member_trainable(trainable, i),
                                      logs[i].environments()))
        return results


def _schedule(config: ml_collections.ConfigDict, total_steps: int):
    """The member's learning-rate schedule, for its log (as its run logs it)."""
    schedule = optim.learning_rate_schedule(config.optim, total_steps)
    return lambda step: float(schedule(step))
