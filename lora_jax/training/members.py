"""A study as one program: the members' adapters trained together over one frozen base.

A rank or seeds study trains N LoRA runs that differ only in a few settings, on the same frozen
weights and data. Here their trainable trees, optimizer states, batches and PRNG keys are stacked
on a leading member axis and one jitted step, a `jax.vmap` of the trainer's own step, trains them
all, reading the frozen tree once:

    group = MemberGroup.build([config_0, config_1, ...])   # each a full training config
    trainable, opt_state = group.trainable, group.opt_state
    for step in range(group.total_steps):
        batch, _ = group.batch(step)
        trainable, opt_state, losses, finite = group.step(trainable, opt_state, batch, step)
    adapters_0 = group.member_trainable(trainable, 0)      # as member 0's own run has them

`lora_jax.train.train_members` runs a group through the trainer's one loop
(`lora_jax.training.loop`), each member writing its own workdir.

What members may differ in, and why each stays exact:
  - seed: each member draws its own adapters, head, dropout masks and data order, as its run
    (where the model has dropout, only if every batch has one width: see `group_key`);
  - rank: adapters are zero-padded to the largest rank R. A padded row of A and column of B start
    at zero; the gradient of a padded column of B is (A_pad x)^T g = 0 and that of a padded row of
    A is B_pad^T g x^T = 0, so Adam's moments, its update and the weight decay stay exactly zero,
    and the padding never changes the product B A;
  - targets: every member gets an adapter on the union of the members' target kernels; where a
    member has none, its A and B are zero and stay zero by the same argument (with LoRA dropout,
    whose masks are numbered by the adapted modules, members must share their targets);
  - alpha (and rsLoRA): the scale s = alpha / r is a per-member array buffer
    (`lora.SCALES`), since the padded spec's static alpha / R cannot differ per member;
  - learning rate: each member's peak rate is a leaf of its optimizer state that multiplies the
    update of AdamW run at rate 1 (`scale_by_member_lr`), equal to AdamW at that rate.
Everything else (model, data, batch size, steps, schedule shape, optimizer settings) must be
equal: `group_key` says what two configs must share, and `groups` splits a study into groups that
can each run as one program.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from lora_jax.errors import ConfigError
from lora_jax import exports
from lora_jax.methods import MethodStack, lora, stacked_lora
from lora_jax.methods.base import join
from lora_jax.training import evaluation, optim, setup, sharding, steps
from lora_jax.training.base_model import run_keys
from lora_jax.training.program import fetch_stacked

LORA = lora.LoRA.name  # LoRA's key in a trainable tree (and its config section's)

# The config fields in which members of one group may differ (see the module docstring).
MEMBER_FIELDS = ("seed", "method.lora.rank", "method.lora.alpha", "method.lora.rslora",
                 "method.lora.targets", "optim.lr")


def group_key(config: ml_collections.ConfigDict) -> str | None:
    """What a config must share with the others of its group, as text; None: it can only run
    alone (a method other than plain LoRA, per-pattern ranks, packing)."""
    cfg = config.method
    if tuple(cfg.use) != (LORA,) or cfg.lora.rank_pattern or cfg.lora.alpha_pattern \
            or config.data.get("packing", False):
        return None
    shared = copy.deepcopy(config.to_dict())
    for dotted in MEMBER_FIELDS:
        *parents, leaf = dotted.split(".")
        node = shared
        for name in parents:
            node = node[name]
        node.pop(leaf)
    if not config.model.name:  # random base weights are drawn from the seed: it is shared too
        shared["seed"] = config.seed
    # The model's dropout masks are drawn for the batch's shape, so a member whose batch is padded
    # to another member's longer bucket would draw other masks than its run. Seeds (data orders)
    # share a program only where every batch has one width or the base has no dropout.
    one_width = min(config.data.buckets) >= config.data.max_len
    if not one_width and base_dropout(config.model) > 0:
        shared["seed"] = config.seed
    if cfg.lora.dropout > 0:  # dropout masks are numbered by the adapted modules
        shared["targets"] = list(cfg.lora.targets)
    return json.dumps(shared, sort_keys=True, default=str)


def base_dropout(model: ml_collections.ConfigDict) -> float:
    """The largest dropout rate of the base model a config's `model` section names."""
    import transformers

    from lora_jax.interop import hub

    if model.name:  # a checkpoint directory or a GGUF file
        hf_config = hub.checkpoint_config(hub.checkpoint_path(model.name))
    else:
        fields = dict(model.random_init)
        hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    from lora_jax.models import family

    fields = family(hf_config.model_type).dropout_fields
    return max((float(getattr(hf_config, name, 0.0) or 0.0) for name in fields), default=0.0)


def groups(configs: Sequence[ml_collections.ConfigDict]) -> list[list[int]]:
    """The members' indices split into groups that can each train as one program (a config
    that can only run alone is a group of its own), in order of first appearance."""
    out: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        key = group_key(config)
        out.setdefault(f"alone {i}" if key is None else key, []).append(i)
    return list(out.values())


class MemberLrState(NamedTuple):
    lr: jax.Array


def scale_by_member_lr(lr: float) -> optax.GradientTransformation:
    """Multiplies updates by `lr`, held in the state so that stacked states carry one rate per
    member (after AdamW at rate 1 this is AdamW at rate `lr`, its weight decay included)."""

    def init(params):
        del params
        return MemberLrState(jnp.asarray(lr, jnp.float32))

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u: u * state.lr, updates), state

    return optax.GradientTransformation(init, update)


def _union_config(configs: Sequence[ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
    """The group's own config: member 0's, with every member's targets and the largest rank."""
    union = copy.deepcopy(configs[0])
    targets: list[str] = []
    for config in configs:
        targets += [t for t in config.method.lora.targets if t not in targets]
    with union.unlocked():
        union.method.lora.targets = tuple(targets)
        union.method.lora.rank = max(c.method.lora.rank for c in configs)
    return union


@dataclasses.dataclass
class MemberGroup:
    """N LoRA runs of one group (`groups`) as one program.

    Attributes:
      configs: the members' configs, in member order.
      run: the group's run (`setup.Run`): the union of the members' targets at the largest rank,
        the frozen tree shared by every member.
      members: each member's own run (its stack and unpadded trainable tree at step 0).
      task, total_steps, steps_per_epoch: the data and length every member shares.
      trainable, opt_state: stacked on a leading member axis, at step 0.
      frozen: the shared frozen tree plus the members' scales (`lora.SCALES`), stacked.
      step: step(trainable, opt_state, step) -> (trainable, opt_state, losses [N], finite [N]).
    """

    configs: list
    run: setup.Run
    members: list
    task: Any
    total_steps: int
    steps_per_epoch: int
    trainable: Any
    opt_state: Any
    frozen: Any
    _train_step: Any
    _shapes: dict
    _epochs: dict = dataclasses.field(default_factory=dict)
    _own_states: dict = dataclasses.field(default_factory=dict)  # index -> its run's tx state
    _eval_steps: dict = dataclasses.field(default_factory=dict)
    _schedules: dict = dataclasses.field(default_factory=dict)
    _keys: list = dataclasses.field(default_factory=list)

    @classmethod
    def build(cls, configs: Sequence[ml_collections.ConfigDict]) -> "MemberGroup":
        """The group of `configs`, each a full training config of one member.

        Raises:
          ConfigError: the configs cannot share one program (`groups` splits them first).
        """
        configs = list(configs)
        keys = {group_key(c) for c in configs}
        if None in keys or len(keys) != 1:
            raise ConfigError(
                "these configs cannot train as one program: they must all be plain LoRA and "
                f"differ only in {', '.join(MEMBER_FIELDS)} (members.groups splits a study)")
        union = _union_config(configs)
        # The checkpoint is read once; each member's seed draws its own fresh heads.
        loaded = setup.base(configs[0])
        bases = {c.seed: setup.reseeded(loaded, c) for c in configs[1:]}
        bases[configs[0].seed] = loaded
        run = setup.build(union, base_model=loaded)
        # Every member's frozen tree is the group's (they freeze the same leaves): one copy.
        members = [dataclasses.replace(setup.build(c, base_model=bases[c.seed]),
                                       frozen=run.frozen) for c in configs]
        training = setup.for_training(members[0])

        # The group's adapter layout (`methods.stacked_lora`): every union target at the
        # largest rank; each member's scale per union kernel, 0 where it has no adapter.
        shapes = {p: v.shape for p, v in
                  traverse_util.flatten_dict(run.trainable.get(LORA, {})).items()}
        own = [jax.device_get(m.trainable) for m in members]
        stacked = [{**tree, LORA: stacked_lora.padded(tree.get(LORA, {}), shapes)}
                   for tree in own]
        opt_states = [cls._optimizer(config, training.total_steps, tree).init(tree)
                      for config, tree in zip(configs, stacked)]
        kernels = [join(p[:-1] + ("kernel",)) for p in shapes if p[-1] == lora.LORA_A]
        scales = stacked_lora.stacked_scales([m.stack.methods[0].spec for m in members],
                                             [tree.get(LORA, {}) for tree in own], kernels)
        stack_leaves = lambda trees: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)
        frozen = dict(run.frozen)
        frozen[LORA] = {lora.SCALES: scales}
        tx = cls._optimizer(configs[0], training.total_steps, stacked[0])
        train_step = cls._build_step(run, training.task.kind, tx, frozen)
        return cls(configs, run, members, training.task, training.total_steps,
                   training.steps_per_epoch, stack_leaves(stacked), stack_leaves(opt_states),
                   frozen, train_step, shapes)

    @staticmethod
    def _optimizer(config: ml_collections.ConfigDict, total_steps: int, trainable: Any):
        """The trainer's AdamW at rate 1 (same schedule shape), then the member's rate."""
        unit = copy.deepcopy(config.optim)
        with unit.unlocked():
            unit.lr = 1.0
        tx, _ = setup.optimizer(unit, total_steps)
        return optax.chain(tx, scale_by_member_lr(config.optim.lr))

    @staticmethod
    def _build_step(run: setup.Run, kind: str, tx, frozen: dict):
        """The trainer's step (`steps.build_train_step`, unjitted), mapped over the members;
        the frozen weights are shared (not mapped), the members' scales are."""
        one = steps.build_train_step(run.forward, kind, tx, run.mesh,
                                     run.config.optim.label_smoothing, jit=False)
        frozen_axes = {k: (0 if k == LORA else None) for k in frozen}
        many = jax.vmap(one, in_axes=(frozen_axes, 0, 0, 0, 0))
        return jax.jit(many, donate_argnums=(1, 2))

    # --- Stepping --------------------------------------------------------------------------------

    def batch(self, step: int) -> tuple[dict, list[int]]:
        """The members' batches of `step`, each as its own run draws it (its seed's order), padded
        to the longest of them and stacked: [N, accum, micro, length] arrays placed on the mesh;
        and each member's count of real tokens."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch not in self._epochs:
            self._epochs.clear()
            self._epochs[epoch] = [self.task.train_batches(c.data.batch_size, c.seed, epoch)
                                   for c in self.configs]
        own = [epoch_batches[index] for epoch_batches in self._epochs[epoch]]
        width = max(b["input_ids"].shape[1] for b in own)
        pad_id = self.task.pad_id

        def widen(key: str, x: np.ndarray) -> np.ndarray:
            if x.ndim < 2 or x.shape[1] == width or key in ("labels", "index", "example_mask"):
                return x
            fill = pad_id if key == "input_ids" else 0
            return np.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                          constant_values=fill)

        accum = self.configs[0].optim.grad_accum

        def micro_batches(x: np.ndarray) -> np.ndarray:  # [batch, ...] -> [accum, micro, ...]
            return x.reshape(accum, x.shape[0] // accum, *x.shape[1:])

        host = {k: np.stack([micro_batches(widen(k, b[k])) for b in own]) for k in own[0]}
        batch_spec = sharding.batch_sharding(self.run.mesh).spec
        placed = NamedSharding(self.run.mesh, P(None, *batch_spec))
        return ({k: jax.make_array_from_callback(v.shape, placed, lambda i, v=v: v[i])
                 for k, v in host.items()}, [int(b["attention_mask"].sum()) for b in own])

    def rngs(self, step: int) -> jax.Array:
        """The members' step keys, each as its own run folds it."""
        if not self._keys:  # the members' training keys, derived once
            self._keys.extend(run_keys(c.seed)[2] for c in self.configs)
        return jnp.stack([jax.random.fold_in(key, step) for key in self._keys])

    def step(self, trainable, opt_state, batch: dict, step: int):
        """One optimizer step of every member: (trainable, opt_state, losses [N], finite [N])
        for `batch(step)`'s batch."""
        return self._train_step(self.frozen, trainable, opt_state, batch, self.rngs(step))

    # --- The loop's program (lora_jax.training.program) ------------------------------------------

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.run.mesh

    def describe(self) -> None:
        return None

    fetch = staticmethod(fetch_stacked)

    def member(self, trainable, opt_state, index: int) -> tuple[Any, Any]:
        """Member `index`'s (trainable, opt_state) as its own run holds them."""
        return self.member_trainable(trainable, index), self.member_opt_state(opt_state, index)

    def stack(self, index: int) -> MethodStack:
        """Member `index`'s methods (LoRA at its own rank and targets)."""
        return self.members[index].stack

    def evaluate(self, trainable, index: int) -> dict[str, float]:
        """Member `index`'s dev metrics, with its own stack and unpadded adapters."""
        member = self.members[index]
        if index not in self._eval_steps:  # jitted once per member
            self._eval_steps[index] = member.eval_step(self.task.kind)
        return evaluation.evaluate(self.task, self._eval_steps[index], member.frozen,
                                   self.member_trainable(trainable, index), member.mesh,
                                   self.configs[index].data.eval_batch_size)

    def export(self, directory, trainable, index: int, base_record: dict | None) -> None:
        """Writes member `index`'s trained adapters as its own run would."""
        member = self.members[index]
        exports.save(directory, member.stack, self.configs[index].method,
                     self.member_trainable(trainable, index), frozen=member.frozen,
                     base_record=base_record, **member.info)

    def learning_rate(self, index: int, step: int) -> float:
        """Member `index`'s learning rate at `step`, as its run logs it."""
        if index not in self._schedules:
            self._schedules[index] = optim.learning_rate_schedule(self.configs[index].optim,
                                                                  self.total_steps)
        return float(self._schedules[index](step))

    # --- Members' results ------------------------------------------------------------------------

    def member_trainable(self, trainable, index: int) -> dict:
        """Member `index`'s trainable tree as its own run holds it: its adapters only, at its
        own rank."""
        mine = jax.tree_util.tree_map(lambda x: np.asarray(x[index]), jax.device_get(trainable))
        own = jax.device_get(self.members[index].trainable)
        flat_own = traverse_util.flatten_dict(own.get(LORA, {}))
        flat = traverse_util.flatten_dict(mine.get(LORA, {}))
        cut = {p: flat[p][tuple(slice(0, n) for n in v.shape)] for p, v in flat_own.items()}
        out = dict(mine)
        out[LORA] = traverse_util.unflatten_dict(cut) if cut else {}
        return out

    def own_optimizer(self, index: int):
        """Member `index`'s optimizer as its own run builds it."""
        config = self.configs[index]
        tx, _ = setup.optimizer(config.optim, self.total_steps, None, self.members[index].stack)
        return tx

    def member_opt_state(self, opt_state, index: int):
        """Member `index`'s optimizer state as its own run holds it (its run's structure, its
        adapters' moments at its own rank), so that its checkpoint is its run's."""
        if index not in self._own_states:  # the structure only: built once per member
            self._own_states[index] = jax.device_get(
                self.own_optimizer(index).init(self.members[index].trainable))
        own = self._own_states[index]
        inner = {jax.tree_util.keystr(k): v for k, v in
                 jax.tree_util.tree_flatten_with_path(jax.device_get(opt_state[0]))[0]}
        mine = lambda k, t: np.asarray(inner[jax.tree_util.keystr(k)][index])[
            tuple(slice(0, n) for n in np.shape(t))]
        return jax.tree_util.tree_map_with_path(mine, own)

    def with_member(self, trainable, opt_state, index: int, own_trainable, own_opt_state):
        """The stacked trees with member `index`'s row replaced by its own run's state (laid out
        as the group's: padded, zeros where it has no adapter): a resumed member."""
        row = dict(jax.device_get(own_trainable))
        row[LORA] = stacked_lora.padded(row.get(LORA, {}), self._shapes)
        trainable = jax.tree_util.tree_map(lambda s, r: s.at[index].set(r), trainable, row)
        own = {jax.tree_util.keystr(k): v for k, v in
               jax.tree_util.tree_flatten_with_path(jax.device_get(own_opt_state))[0]}

        def put(key, stacked):
            value = own.get(jax.tree_util.keystr(key))
            if value is None:  # a moment of an adapter the member does not have
                value = jnp.zeros(stacked.shape[1:], stacked.dtype)
            elif np.ndim(value):  # padded to the group's rank
                value = jnp.pad(jnp.asarray(value), [(0, f - h) for f, h in
                                                     zip(stacked.shape[1:], np.shape(value))])
            return stacked.at[index].set(jnp.asarray(value, stacked.dtype))

        inner = jax.tree_util.tree_map_with_path(put, opt_state[0])
        return trainable, (inner,) + tuple(opt_state[1:])

    def padding(self, trainable, index: int) -> dict:
        """Member `index`'s LoRA leaves outside its own adapters (padding and untargeted
        kernels): each must stay exactly zero."""
        mine = traverse_util.flatten_dict(jax.tree_util.tree_map(
            lambda x: np.asarray(x[index]), jax.device_get(trainable)).get(LORA, {}))
        own = traverse_util.flatten_dict(jax.device_get(self.members[index].trainable)
                                         .get(LORA, {}))
        out = {}
        for path, leaf in mine.items():
            mask = np.ones(leaf.shape, bool)
            if path in own:
                mask[tuple(slice(0, n) for n in own[path].shape)] = False
            out[path] = leaf[mask]
        return out
