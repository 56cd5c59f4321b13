"""What a training loop decides and records at each step, for one run (`lora_jax.train`) and for
runs trained as one program (`lora_jax.training.together`) alike.

    state = checkpoint_state(trainable, opt_state, step, steps_per_epoch, rng)
    due = StepEvents.at(done, total_steps, config.train, checkpoints, preempted)
    log_losses(log, rows, lr_of, tokens_per_s, total_steps, checkpoints)   # raises on divergence
    return run_result(final_metrics, best, trainable, log.environments())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from lora_jax.errors import WorkdirError
from lora_jax.methods import count_params
from lora_jax.training.checkpoint import Checkpoints, divergence_error
from lora_jax.training.run_log import RunLog


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


def run_result(final: dict[str, float], best: dict, trainable: Any,
               environments: Sequence[dict] = ()) -> dict[str, Any]:
    """`train`'s result: the final metrics, the best evaluation, the trained parameters and
    those in low-rank A and B matrices, and where the steps ran (`RunLog.environments`)."""
    flat = traverse_util.flatten_dict(jax.device_get(trainable))
    return {**final, "best": best, "trained_params": count_params(trainable),
            "lora_params": sum(int(v.size) for k, v in flat.items()
                               if k[-1] in ("lora_a", "lora_b")),
            "environments": list(environments)}
