"""From a config to everything a run needs before its first step, in one place.

    run = setup.build(config)                  # base model, methods split, mesh, placed trees
    training = setup.for_training(run)         # task data, schedule, optimizer, jitted steps
    run = setup.build(config, export=workdir / "adapter")   # evaluation: the trained methods

`lora_jax.train` adds the loop (resume, log, evaluate, checkpoint, export) to these;
`lora_jax.evaluate` and the benchmarks start from them too, so all of them run the same model,
methods and steps.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import optax
from flax import traverse_util

from lora_jax import methods
from lora_jax.training import calibration, optim, sharding, steps
from lora_jax.data import tasks
from lora_jax.config_checks import check_against_base, refusal
from lora_jax.errors import ConfigError
from lora_jax.interop import hub
from lora_jax.methods import MethodStack
from lora_jax import exports
from lora_jax.methods.base import SettingError, combine
from lora_jax.training.base_model import build_model, run_keys
from lora_jax.models import ModelFamily
from lora_jax.models import family as model_family


@dataclasses.dataclass
class Base:
    """A config's base model: module, weights, tokenizer, family, export info."""

    model: Any
    params: Any
    tokenizer: Any
    family: ModelFamily
    info: dict  # model_type, task, base_model_name_or_path


@dataclasses.dataclass
class Run:
    """The base model with its methods, the frozen and trainable trees placed on the mesh."""

    config: ml_collections.ConfigDict
    model: Any
    tokenizer: Any
    family: ModelFamily
    info: dict
    stack: MethodStack
    frozen: Any
    trainable: Any
    mesh: jax.sharding.Mesh

    @property
    def vocab_size(self) -> int:
        """The token embedding's rows (the frozen tree lacks it when FT trains it)."""
        return self.family.vocab_size(combine(self.frozen, self.trainable))

    @property
    def forward(self):
        """forward(frozen, trainable, batch, rng, train) -> logits (`steps.make_forward`)."""
        return steps.make_forward(self.stack.adapt(self.model.apply))

    def task(self, data: ml_collections.ConfigDict | None = None, with_train: bool = True):
        """The config's task (or `data`'s), its examples prepared by the methods."""
        data = self.config.data if data is None else data
        vocab_size = self.vocab_size
        return tasks.build_task(data, self.tokenizer, with_train=with_train).prepared(
            lambda e: self.stack.prepare_example(e, data.max_len, vocab_size))

    def eval_step(self, kind: str):
        return steps.make_eval_step(self.forward, kind, sharding.replicated(self.mesh))


def base(config: ml_collections.ConfigDict) -> Base:
    """The base model the config names (random weights are drawn from its seed)."""
    key_init, _, _ = run_keys(config.seed)
    model, params, tokenizer, info = build_model(config.model, key_init, config.data.data_dir,
                                                 unquantized=original_kernels(config))
    return Base(model, params, tokenizer, model_family(info["model_type"]), info)


def original_kernels(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The target patterns of the methods that read their targets' original weights (LoftQ):
    loaded unquantized whatever model.quantize says."""
    return tuple(pattern for name in config.method.use
                 if methods.METHODS[name].reads_original_kernels
                 for pattern in config.method[name].targets)


def reseeded(base_model: Base, config: ml_collections.ConfigDict) -> Base:
    """`base_model` as `config` (same model, another seed) would load it, without reading the
    checkpoint again: what a seed draws (the heads a checkpoint lacks) is drawn from `config`'s
    seed, every other weight is shared, not copied. Random weights are drawn whole."""
    if not config.model.name:
        return base(config)
    checkpoint = hub.resolve_checkpoint(hub.checkpoint_path(config.model.name))
    missing = hub.missing_leaves(base_model.model, checkpoint)
    if not missing:
        return base_model
    flat = traverse_util.flatten_dict(base_model.params)
    flat.update(hub.init_missing_heads(base_model.model, missing, run_keys(config.seed)[0],
                                       base_model.family.model_type))
    return dataclasses.replace(base_model, params=traverse_util.unflatten_dict(flat))


def build(config: ml_collections.ConfigDict, *, base_model: Base | None = None,
          export: str | os.PathLike | None = None, base_record: dict | None = None,
          workdir: str | os.PathLike | None = None) -> Run:
    """The run a config describes, on a ('data', 'fsdp') mesh.

    Args:
      config: a training config.
      base_model: the base model, if the caller built it (benchmarks draw weights their way).
      export: a trained run's exported directory: its methods and trained values instead of a
        fresh split (see `lora_jax.exports.load`).
      base_record: with `export`, the fingerprint of this base (`fingerprints.base_inputs`):
        an export that records another base is refused (`OtherBase`).
      workdir: the run's directory, where a data-driven start keeps its calibration
        (`calibration.calibrate`; None: taken, not kept).
    """
    b = base(config) if base_model is None else base_model
    if export is None:
        check_against_base(config, b.params, b.family)  # targets, ranks: named, not a traceback
        stack = calibration.calibrate(methods.build(config.method, b.family), config, b, workdir)
        frozen, trainable = stack.split(b.params, run_keys(config.seed)[1])
    else:
        stack, trainable = exports.load(export, b.params, b.family, b.info["task"],
                                        base_record=base_record, strict_base=True)
        frozen = stack.frozen(b.params, trainable)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    frozen = sharding.place(frozen, sharding.frozen_shardings(frozen, mesh))
    trainable = sharding.place(trainable, sharding.replicated(mesh))
    return Run(config, b.model, b.tokenizer, b.family, b.info, stack, frozen, trainable, mesh)


@dataclasses.dataclass
class Training:
    """What the training loop steps through."""

    task: tasks.Task
    steps_per_epoch: int
    total_steps: int
    schedule: Any
    tx: Any
    opt_state: Any
    train_step: Any
    eval_step: Any


def optimizer(cfg: ml_collections.ConfigDict, total_steps: int, update_scales: Any = None,
              stack: MethodStack | None = None):
    """(AdamW with the config's schedule and clipping, the schedule); `update_scales`: the
    stack's per-leaf update multipliers (`MethodStack.update_scales`), if any; `stack`: its
    methods' optimizer rules wrap the result (`MethodStack.optimizer`)."""
    schedule = optim.learning_rate_schedule(cfg, total_steps)
    tx = optim.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     clip_norm=cfg.clip_norm)
    if update_scales is not None:
        tx = optax.chain(tx, optim.scale_updates(update_scales))
    if stack is not None:
        tx = stack.optimizer(tx, total_steps)
    return tx, schedule


def for_training(run: Run) -> Training:
    """The task data, schedule, optimizer state and jitted steps of `run`.

    Raises:
      ConfigError: the batch size leaves not one batch of training data, or a method's
        schedule does not fit the run's length (AdaLoRA's tinit, tfinal).
    """
    config = run.config
    task = run.task()
    batch_size = config.data.batch_size
    steps_per_epoch = task.steps_per_epoch(batch_size)
    if steps_per_epoch == 0:
        rows = f" in {len(task.packed_rows)} packed rows" if task.packing else ""
        raise ConfigError(f"config.data.batch_size = {batch_size}: {len(task.train)} training "
                          f"examples{rows} make no batch of that size")
    total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch
    try:
        tx, schedule = optimizer(config.optim, total_steps,
                                 run.stack.update_scales(run.trainable), run.stack)
    except SettingError as error:  # the run's length is known only now that the data are
        raise refusal(config, error) from None
    opt_state = jax.jit(tx.init, out_shardings=sharding.replicated(run.mesh))(run.trainable)
    train_step = steps.build_train_step(run.forward, task.kind, tx, run.mesh,
                                        config.optim.label_smoothing, run.stack.regularizer)
    return Training(task, steps_per_epoch, total_steps, schedule, tx, opt_state, train_step,
                    run.eval_step(task.kind))
