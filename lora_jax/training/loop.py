"""The training loop, for one run and for N runs trained as one program alike
(`lora_jax.training.program`): resume, step, log, evaluate, checkpoint, export.

    results = run(program, workdirs, inputs, clock)   # one result per member, as `train` returns

and the decisions it makes at each step, in one place:

    state = checkpoint_state(trainable, opt_state, step, steps_per_epoch, rng)
    due = StepEvents.at(done, total_steps, config.train, checkpoints, preempted)
    log_losses(log, rows, lr_of, tokens_per_s, total_steps, checkpoints)   # raises on divergence
    return run_result(final_metrics, best, trainable, stack, log.environments())
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from lora_jax.errors import Preempted, WorkdirError
from lora_jax.methods import MethodStack, count_params
from lora_jax.training import compile_cache, sharding
from lora_jax.training.checkpoint import Checkpoints, abstract, divergence_error
from lora_jax.training.compile_clock import CompileClock
from lora_jax.training.base_model import run_keys
from lora_jax.training.preemption import PreemptionNotice
from lora_jax.training.program import Program
from lora_jax.training.run_log import RunLog
from lora_jax.training.workdir import Workdir


def checkpoint_state(trainable: Any, opt_state: Any, step: int, steps_per_epoch: int,
                     rng: jax.Array) -> dict:
    """What a checkpoint holds at `step`: the trainable tree, its optimizer state, the step, the
    data position (epoch, batch index) and the run's data key (to refuse another seed)."""
    epoch, index = divmod(step, steps_per_epoch)
    return {"trainable": trainable, "opt_state": opt_state, "step": np.int64(step),
            "data": {"epoch": np.int64(epoch), "index": np.int64(index)}, "rng": rng}


def check_same_seed(saved: dict, key: jax.Array, workdir: Any) -> None:
    """Refuses a checkpoint written by a run with another seed (its data key differs)."""
    if not np.array_equal(np.asarray(saved["rng"]), np.asarray(jax.random.key_data(key))):
        raise WorkdirError(f"{workdir} holds a run with another seed; use a new workdir")


@dataclasses.dataclass(frozen=True)
class StepEvents:
    """What is due once step `done` has run: a log line, an evaluation, a checkpoint."""

    log: bool
    evaluate: bool
    checkpoint: bool

    @classmethod
    def at(cls, done: int, total_steps: int, train: ml_collections.ConfigDict,
           checkpoints: Checkpoints, preempted: bool) -> "StepEvents":
        evaluate = done % train.eval_every == 0 or done == total_steps
        checkpoint = checkpoints.should_save(done) or done == total_steps or preempted
        # Losses are fetched (a sync) only when the loop syncs anyway: they are logged and checked
        # before anything of this state is evaluated, saved or exported.
        return cls(log=done % train.log_every == 0 or evaluate or checkpoint,
                   evaluate=evaluate, checkpoint=checkpoint)


def log_losses(log: RunLog, rows: Sequence[tuple[int, float, bool]],
               lr_of: Callable[[int], float], tokens_per_s: float, total_steps: int,
               checkpoints: Checkpoints) -> None:
    """Logs fetched (step, loss, parameters finite) rows up to the first non-finite one, and
    raises DivergenceError there (naming the last good checkpoint)."""
    bad = next((i for i, (_, loss, finite) in enumerate(rows)
                if not (np.isfinite(loss) and finite)), None)
    shown = rows if bad is None else rows[:bad + 1]
    log.train([(step, loss, lr_of(step - 1)) for step, loss, _ in shown], tokens_per_s,
              total_steps)
    if bad is not None:
        raise divergence_error(*rows[bad], checkpoints)


def run_result(final: dict[str, float], best: dict, trainable: Any, stack: MethodStack,
               environments: Sequence[dict] = ()) -> dict[str, Any]:
    """`train`'s result: the final metrics, the best evaluation, the trained parameters and
    those in the stack's low-rank factors (`MethodStack.low_rank_params`), and where the steps
    ran (`RunLog.environments`)."""
    return {**final, "best": best, "trained_params": count_params(trainable),
            "lora_params": stack.low_rank_params(jax.device_get(trainable)),
            "environments": list(environments)}


class Loop:
    """One program's run over its members' workdirs (see `run`)."""

    def __init__(self, program: Program, dirs: Sequence[Workdir]):
        self.program, self.dirs = program, list(dirs)
        configs = program.configs
        self.logs = [RunLog(d.path, enabled=d.writer) for d in self.dirs]
        self.checkpoints = [Checkpoints(d.path / "checkpoints", c.train.checkpoint_every,
                                        c.train.keep_checkpoints)
                            for d, c in zip(self.dirs, configs)]
        self.keys = [run_keys(c.seed)[2] for c in configs]
        # Global (replicated) arrays: orbax saves no host-local arrays in a multi-host run.
        replicated = sharding.replicated(program.mesh)
        self.rng_data = [sharding.place(jax.random.key_data(k), replicated) for k in self.keys]
        self.trainable, self.opt_state = program.trainable, program.opt_state
        # (step, losses, finite, tokens per member): on the device until the loop syncs anyway.
        self.pending: list[tuple[int, Any, Any, list[int]]] = []
        self.tick = time.perf_counter()
        self.best: list[dict] = []  # each member's best evaluation so far
        self.inputs: list[dict] = []  # each member's record of what it reads (its base's)
        self.first_step_s: float | None = None

    def state(self, index: int, step: int) -> dict:
        """Member `index`'s checkpoint at `step`, as its own run's."""
        trainable, opt_state = self.program.member(self.trainable, self.opt_state, index)
        return checkpoint_state(trainable, opt_state, step, self.program.steps_per_epoch,
                                self.rng_data[index])

    def restore(self) -> int:
        """Every member from its newest readable checkpoint; the step they resume from.

        Raises:
          WorkdirError: the members' checkpoints are at different steps, or another seed's.
        """
        restored = [c.restore_latest(abstract(self.state(i, 0)))
                    for i, c in enumerate(self.checkpoints)]
        starts = [0 if r is None else r[0] for r in restored]
        if len(set(starts)) > 1:
            behind = [str(self.dirs[i].path) for i, s in enumerate(starts) if s < max(starts)]
            raise WorkdirError(f"the members' newest checkpoints are at steps {starts}: "
                               f"{', '.join(behind)} is behind; run it alone with lora_jax.train")
        for i, r in enumerate(restored):
            if r is not None:
                check_same_seed(r[1], self.keys[i], self.dirs[i].path)
                self.trainable, self.opt_state = self.program.with_member(
                    self.trainable, self.opt_state, i, r[1]["trainable"], r[1]["opt_state"])
        return starts[0]

    def begin(self, inputs: Sequence[dict], start: int, cleanup: contextlib.ExitStack) -> None:
        """From here on the workdirs are written: records committed, writers opened."""
        configs, self.inputs = self.program.configs, list(inputs)
        for run_dir, config, own in zip(self.dirs, configs, inputs):
            run_dir.commit(config, own, fresh=start == 0)
        compile_cache.use(configs[0].train.compilation_cache, self.dirs[0].path)  # before compiles
        for checkpoints, log in zip(self.checkpoints, self.logs):
            checkpoints.start_writing()
            log.start(start)
            self.best.append(log.best())
            cleanup.callback(log.close)
            cleanup.callback(checkpoints.close)
            if start:
                epoch, index = divmod(start, self.program.steps_per_epoch)
                log.info(f"resumed from step {start} (epoch {epoch}, batch {index})")

    def flush(self) -> None:
        """Fetches the pending losses, logs them per member, and stops a diverged run."""
        if not self.pending:
            return
        elapsed, self.tick = time.perf_counter() - self.tick, time.perf_counter()
        fetched = [(s, self.program.fetch(l, f), t) for s, l, f, t in self.pending]
        self.pending = []
        for i, log in enumerate(self.logs):
            rows = [(s, *per_member[i]) for s, per_member, _ in fetched]
            tokens = sum(t[i] for *_, t in fetched)
            log_losses(log, rows, lambda step, i=i: self.program.learning_rate(i, step),
                       tokens / elapsed, self.program.total_steps, self.checkpoints[i])

    def evaluate(self, done: int) -> list[dict[str, float]]:
        """Every member's evaluation at step `done`, logged; a new best is exported."""
        task, metrics = self.program.task, []
        for i, log in enumerate(self.logs):
            metrics.append(self.program.evaluate(self.trainable, i))
            self.best[i] = log.eval(done, metrics[-1], task.main_metric,
                                    higher_is_better=task.kind != "lm")
            if self.dirs[i].writer and self.best[i]["step"] == done:
                self.program.export(self.dirs[i].path / "best_adapter", self.trainable, i,
                                    self.inputs[i]["base"])
        return metrics

    def steps(self, start: int, clock: CompileClock) -> list[dict[str, float]]:
        """Steps from `start` to the end; the last evaluation's metrics per member."""
        program, total = self.program, self.program.total_steps
        metrics: list[dict[str, float]] = []
        upcoming = program.batch(start) if start < total else None
        with PreemptionNotice() as notice:
            for step in range(start, total):
                batch, tokens = upcoming
                self.trainable, self.opt_state, losses, finite = program.step(
                    self.trainable, self.opt_state, batch, step)
                if step == start:  # one wait, for the time to the first step (compiles included)
                    self.first_step_s = (jax.block_until_ready(losses), clock.since_open())[1]
                # Dispatch is asynchronous: the next batch is built and copied while this runs.
                upcoming = program.batch(step + 1) if step + 1 < total else None
                done = step + 1
                self.pending.append((done, losses, finite, tokens))
                preempted = notice.reached(done)
                # Members share their train settings (members.groups): one decides for all.
                due = StepEvents.at(done, total, program.configs[0].train, self.checkpoints[0],
                                    preempted)
                if due.log:
                    self.flush()
                if due.evaluate:
                    metrics = self.evaluate(done)
                if due.checkpoint:
                    for i, checkpoints in enumerate(self.checkpoints):
                        checkpoints.save(done, self.state(i, done), force=True)
                if preempted:
                    where = ", ".join(str(c.directory) for c in self.checkpoints)
                    raise Preempted(f"SIGTERM at step {done}: checkpointed step {done} in "
                                    f"{where}; rerun the same command to resume")
        return metrics


def run(program: Program, dirs: Sequence[Workdir], inputs: Sequence[dict],
        clock: CompileClock) -> list[dict[str, Any]]:
    """Trains `program`'s members, each writing its own workdir as its run would; resumes them
    from their checkpoints (all at one step). Returns each member's `run_result`.

    Raises:
      WorkdirError: a checkpoint of another seed, or members at different steps.
      DivergenceError: a loss or trainable tree became non-finite.
      Preempted: SIGTERM arrived; the current step was checkpointed first.
    """
    loop = Loop(program, dirs)
    if (line := program.describe()) is not None:
        for log in loop.logs:
            log.info(line)
    start = loop.restore()
    total = program.total_steps
    with contextlib.ExitStack() as cleanup:  # logs and checkpoint managers closed however it ends
        loop.begin(inputs, start, cleanup)
        # .get: configs saved before the field existed.
        if start == 0 and program.configs[0].train.get("eval_at_start", False):
            loop.evaluate(0)  # where training starts from (LoRA's: the base model itself)
        metrics = loop.steps(start, clock)
        results = []
        for i, log in enumerate(loop.logs):
            final = program.evaluate(loop.trainable, i) if start == total else metrics[i]
            if start < total:
                log.compile(total, {**clock.record(), "first_step_s": round(loop.first_step_s, 3)})
            if dirs[i].writer:
                program.export(dirs[i].path / "adapter", loop.trainable, i, inputs[i]["base"])
            own, _ = program.member(loop.trainable, loop.opt_state, i)
            results.append(run_result(final, loop.best[i], own, program.stack(i),
                                      log.environments()))
        return results
