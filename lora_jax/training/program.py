"""What the training loop (`lora_jax.training.loop`) steps: a program of N >= 1 members.

A program holds its members' trainable trees and optimizer states, steps them, and answers for
each member what its own run would (its checkpoint state, its evaluation, its export). Two
programs implement it:

    OneRun.build(config)                 # one run: the trainer's jitted step, as it always was
    members.MemberGroup.build(configs)   # N LoRA runs as one vmapped program (a study)

so a single run is the one-member case of the same loop, and every decision the loop makes
(resume, log, evaluate, checkpoint, export, preemption) is made in one place for both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

from lora_jax import exports
from lora_jax.methods import MethodStack, count_params
from lora_jax.quant.kernels import frozen_bytes
from lora_jax.training import evaluation, setup, sharding


class Program(Protocol):
    """N members stepped as one program (see the module docstring).

    Attributes:
      configs: the members' configs, in member order (they share data and train settings).
      task, total_steps, steps_per_epoch: the data and length every member shares.
      mesh: where the program runs.
      trainable, opt_state: the program's own trees at step 0 (stacked for N > 1).
    """

    configs: list
    task: Any
    total_steps: int
    steps_per_epoch: int
    trainable: Any
    opt_state: Any

    @property
    def mesh(self) -> jax.sharding.Mesh: ...

    def describe(self) -> str | None:
        """A line for the log at the start (None: nothing to say)."""

    def batch(self, step: int) -> tuple[dict, list[int]]:
        """(the step's batch placed on the mesh, each member's count of real tokens)."""

    def step(self, trainable, opt_state, batch: dict, step: int):
        """One optimizer step: (trainable, opt_state, losses, finite), still on the device."""

    def fetch(self, losses, finite) -> list[tuple[float, bool]]:
        """One step's (loss, trainable tree finite) per member, fetched to the host."""

    def member(self, trainable, opt_state, index: int) -> tuple[Any, Any]:
        """Member `index`'s (trainable, opt_state) as its own run holds them."""

    def stack(self, index: int) -> MethodStack:
        """Member `index`'s methods, as its own run builds them."""

    def with_member(self, trainable, opt_state, index: int, own_trainable, own_opt_state):
        """The program's trees with member `index`'s replaced by its own run's (a resume)."""

    def evaluate(self, trainable, index: int) -> dict[str, float]:
        """Member `index`'s dev metrics."""

    def export(self, directory, trainable, index: int, base_record: dict | None) -> None:
        """Writes member `index`'s trained methods (`exports.save`), with the fingerprint of
        the base they were trained on."""

    def learning_rate(self, index: int, step: int) -> float:
        """Member `index`'s learning rate at `step`, for its log."""


@dataclasses.dataclass
class OneRun:
    """One run as a one-member program: the trainer's own jitted step (`setup.for_training`)."""

    run: setup.Run
    training: setup.Training
    key: jax.Array  # the run's training key; step s folds s into it
    _epochs: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, config: ml_collections.ConfigDict, workdir: Any = None) -> "OneRun":
        run = setup.build(config, workdir=workdir)
        return cls(run, setup.for_training(run), setup.run_keys(config.seed)[2])

    # The loop reads these as it reads a group's.
    configs = property(lambda self: [self.run.config])
    task = property(lambda self: self.training.task)
    total_steps = property(lambda self: self.training.total_steps)
    steps_per_epoch = property(lambda self: self.training.steps_per_epoch)
    trainable = property(lambda self: self.run.trainable)
    opt_state = property(lambda self: self.training.opt_state)
    mesh = property(lambda self: self.run.mesh)

    def describe(self) -> str:
        run = self.run
        return (f"{run.stack.describe()}: {count_params(run.trainable):,} trained and "
                f"{count_params(run.frozen):,} frozen parameters "
                f"({frozen_bytes(run.frozen) / 2**20:,.1f} MiB held); "
                f"mesh {dict(run.mesh.shape)} over {jax.device_count()} devices")

    def batch(self, step: int) -> tuple[dict, list[int]]:
        # A pure function of seed and step; an epoch's batches are drawn once.
        config = self.run.config
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch not in self._epochs:
            self._epochs.clear()
            self._epochs[epoch] = self.task.train_batches(config.data.batch_size, config.seed,
                                                          epoch)
        host = self._epochs[epoch][index]
        placed = sharding.global_batch(host, self.mesh, config.optim.grad_accum)
        return placed, [int(host["attention_mask"].sum())]

    def step(self, trainable, opt_state, batch: dict, step: int):
        return self.training.train_step(self.run.frozen, trainable, opt_state, batch,
                                        jax.random.fold_in(self.key, step))

    def fetch(self, losses, finite) -> list[tuple[float, bool]]:
        return [(float(sharding.first_replica(losses)), bool(sharding.first_replica(finite)))]

    def member(self, trainable, opt_state, index: int) -> tuple[Any, Any]:
        return trainable, opt_state

    def stack(self, index: int) -> MethodStack:
        return self.run.stack

    def with_member(self, trainable, opt_state, index: int, own_trainable, own_opt_state):
        return own_trainable, own_opt_state

    def evaluate(self, trainable, index: int) -> dict[str, float]:
        return evaluation.evaluate(self.task, self.training.eval_step, self.run.frozen, trainable,
                                   self.mesh, self.run.config.data.eval_batch_size)

    def export(self, directory, trainable, index: int, base_record: dict | None) -> None:
        exports.save(directory, self.run.stack, self.run.config.method,
                     jax.device_get(trainable), frozen=self.run.frozen, base_record=base_record,
                     **self.run.info)

    def learning_rate(self, index: int, step: int) -> float:
        return float(self.training.schedule(step))


def fetch_stacked(losses, finite) -> list[tuple[float, bool]]:
    """A stacked program's (loss, finite) per member: arrays with a leading member axis."""
    losses, finite = np.asarray(jax.device_get(losses)), np.asarray(jax.device_get(finite))
    return [(float(l), bool(f)) for l, f in zip(losses, finite)]


__all__ = ["OneRun", "Program", "fetch_stacked"]
