"""Several LoRA adapters over one frozen base: mixed-adapter batches, merging and switching.

    adapters = AdapterSet.load({"sst2": "runs/sst2/adapter", "mrpc": "runs/mrpc/adapter"},
                               params, family, task="classification")
    logits = adapters.apply(model.apply, frozen, input_ids, adapter_ids=[0, 1, 1, 0],
                            attention_mask=mask)          # each row through its own adapter
    merged = adapters.merge(params, "sst2")             # W0 + s B A, for plain inference
    merged = adapters.switch(merged, "sst2", "mrpc")    # - s B A + s' B' A' (PEFT's seed idea)
    merged.merged                                       # ('mrpc',): what the params hold

A mixed batch is PEFT's `adapter_names`: every example names its adapter, and gets exactly what
that adapter gives alone. The adapters may differ in rank, alpha, targets and trained heads
(`also_train`, e.g. each task's classifier): they are stacked on an adapter axis, zero-padded to
the largest rank and zero where an adapter has no matrix (exact, as in
`lora_jax.training.members`), and each nn.Dense call gathers its rows' adapters. Only plain LoRA
adapters (no DoRA, PiSSA, VeRA: those change W0 or the output's form) and trained Dense heads
are supported; anything else is refused when the set is built.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify
import numpy as np
from flax import traverse_util

from lora_jax import losses, merging
from lora_jax.errors import FileFormatError
from lora_jax.methods import lora, stacked_lora
from lora_jax.methods.base import MergedParams, MethodStack, combine, join, modules_of
from lora_jax.training.steps import model_inputs

LORA = lora.LoRA.name  # LoRA's key in a trainable tree (and its config section's)

Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """Named LoRA adapters trained on one base.

    Attributes:
      names: the adapters' names, in order (an example's adapter id indexes them).
      stacks: each adapter's method stack (one LoRA method).
      trainables: each adapter's trainable tree, as its run holds it.
    """

    names: tuple[str, ...]
    stacks: tuple[MethodStack, ...]
    trainables: tuple[dict, ...]
    # evaluate_all's compiled steps, by (apply_fn, kind of task): traced once per set.
    _eval_steps: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if not self.names:
            raise ValueError("an adapter set needs at least one adapter")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"adapter names repeat: {self.names}")
        for name, stack, trainable in zip(self.names, self.stacks, self.trainables):
            if len(stack.methods) != 1 or type(stack.methods[0]) is not lora.LoRA:
                raise ValueError(f"adapter {name!r} is {stack.describe()}: an adapter set holds "
                                 "plain LoRA adapters")
            for path in traverse_util.flatten_dict(trainable.get("params", {})):
                if path[-1] not in ("kernel", "bias"):
                    raise ValueError(f"adapter {name!r} trains {join(path)} in full; only Dense "
                                     "modules (kernel, bias) can be switched per example")
        parts = {}
        for stack, trainable in zip(self.stacks, self.trainables):
            spec = stack.methods[0].spec
            for module in lora.adapter_modules(trainable):
                kernel = join(module + ("kernel",))
                if parts.setdefault(kernel, spec.parts_for(kernel)) != spec.parts_for(kernel):
                    raise ValueError(f"the adapters split {kernel} into other output parts")

    @classmethod
    def load(cls, directories: Mapping[str, str | os.PathLike], params: Params, family: Any,
             task: str | None, base_record: dict | None = None) -> "AdapterSet":
        """The adapters exported in `directories` (name -> a run's workdir, which holds its
        export in adapter/, or an export or PEFT directory), all trained on the base `params`
        (`base_record`: its fingerprint; an export recording another base warns, naming both)."""
        import pathlib

        from lora_jax import exports

        stacks, trainables = [], []
        for name, directory in directories.items():
            directory = pathlib.Path(directory)
            if (directory / "adapter").is_dir():  # a run's workdir: its final export
                directory = directory / "adapter"
            try:
                stack, trainable = exports.load(directory, params, family, task,
                                                base_record=base_record)
            except (ValueError, FileFormatError) as error:
                raise type(error)(f"adapter {name!r} ({directory}) does not fit this base: "
                                  f"{error}") from None
            stacks.append(stack)
            trainables.append(jax.device_get(trainable))
        return cls(tuple(directories), tuple(stacks), tuple(trainables))

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"no adapter {name!r}; the set holds {list(self.names)}")
        return self.names.index(name)

    # --- One adapter at a time -------------------------------------------------------------------

    def frozen(self, params: Params) -> dict:
        """The base without what any adapter trains in full (their heads): what `apply` runs on."""
        trained = set()
        for trainable in self.trainables:
            trained |= set(traverse_util.flatten_dict(trainable.get("params", {})))
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in trained})

    def merge(self, params: Params, name: str) -> "MergedParams":
        """`params` (the base, heads included or not) with adapter `name` folded in and its
        heads in place: a plain model that runs as the adapted one, recording what it holds.

        Raises:
          ValueError: `params` already hold a merged adapter (merging again would add an
            update twice; `switch` moves from one adapter to another).
        """
        if isinstance(params, MergedParams) and params.merged:
            raise ValueError(f"these params already hold adapter(s) {list(params.merged)} merged: "
                             f"merging {name!r} on top would add to them; use switch(params, "
                             f"{params.merged[-1]!r}, {name!r}) or unmerge first")
        i = self.index(name)
        stack, trainable = self.stacks[i], self.trainables[i]
        return MergedParams(stack.merge(stack.frozen(params, trainable), trainable), (name,))

    def unmerge(self, merged: "MergedParams", name: str) -> dict:
        """`merged` with adapter `name`'s low-rank update taken out again (its heads stay).

        Raises:
          ValueError: `merged` does not hold `name` (or carries no record of what it holds).
        """
        self._check_holds(merged, name)
        i = self.index(name)
        spec = self.stacks[i].methods[0].spec
        return lora.apply_deltas(spec, merged, self.trainables[i], -1.0)

    def switch(self, merged: "MergedParams", current: str, new: str) -> "MergedParams":
        """A model merged with `current` turned into one merged with `new`: subtract s B A, add
        s' B' A', and put `new`'s heads in place.

        Raises:
          ValueError: `merged` does not hold `current`.
        """
        base = self.unmerge(merged, current)
        j = self.index(new)
        spec = self.stacks[j].methods[0].spec
        flat = traverse_util.flatten_dict(lora.apply_deltas(spec, base, self.trainables[j], +1.0))
        for path, value in traverse_util.flatten_dict(self.trainables[j].get("params", {})).items():
            flat[path] = jnp.asarray(value, flat[path].dtype)
        return MergedParams(traverse_util.unflatten_dict(flat), (new,))

    def _check_holds(self, merged: Params, name: str) -> None:
        if not isinstance(merged, MergedParams):
            raise ValueError(f"these params carry no record of what is merged in them; pass "
                             f"merge's result, or declare it: MergedParams(params, ({name!r},))")
        if name not in merged.merged:
            raise ValueError(f"adapter {name!r} is not merged into these params (they hold "
                             f"{list(merged.merged) or 'none'}): taking it out would give "
                             "another model")

    # --- Weighted combinations -------------------------------------------------------------------

    def weighted(self, names: Sequence[str], weights: Sequence[float], new_name: str,
                 combination: str = "svd", svd_rank: int | None = None,
                 density: float | None = None, majority_sign_method: merging.SignMethod = "total",
                 key: jax.Array | None = None) -> "AdapterSet":
        """This set plus a new adapter `new_name` combining the named adapters' updates
        s_i B_i A_i with weights w_i, as PEFT's `add_weighted_adapter`:

          - 'cat': A = [w_i s_i A_i] stacked on the rank axis and B = [B_i] side by side, rank
            the sum of the ranks (modules that fewer adapters target keep zero rows): exact;
          - 'svd': the top `svd_rank` (default: the largest rank) singular triplets of
            sum_i w_i s_i B_i A_i, B = U S and A = V^T: the best approximation of that rank;
          - 'ties_svd', 'dare_linear_svd', 'dare_ties_svd', 'magnitude_prune_svd': the papers'
            merges (`lora_jax.merging`) of the task vectors dW_i = s_i B_i A_i with weights w_i,
            then as 'svd';
          - 'linear', 'ties', 'dare_linear', 'dare_ties', 'magnitude_prune': PEFT's cheaper
            variants, which merge the factors instead (the A_i with weights sign(w_i) sqrt(|w_i
            s_i|), the B_i with sqrt(|w_i s_i|)); they need adapters of one rank, and are not
            the papers' merges of updates (B A of merged factors is not the merged B A).
        `density`: the fraction each task tensor keeps; `majority_sign_method`: 'total' or
        'frequency', TIES' sign election; `key`: DARE's masks, folded with the module's number,
        0 (A), 1 (B) or 2 (dW), then the adapter's number among those adapting the module.

        The new adapter's alpha is its rank (scale 1), as PEFT sets it. It keeps the one trained
        head among the named adapters (PEFT too refuses to combine heads of several).

        Raises:
          ValueError: an unknown combination or bad settings, weights of another length, a new
            name in use, heads trained by several adapters, split outputs, a factor-wise merge
            of several ranks.
        """
        if len(weights) != len(names):
            raise ValueError(f"{len(weights)} weights for {len(names)} adapters")
        if new_name in self.names:
            raise ValueError(f"an adapter {new_name!r} exists")
        method, factorwise = _merge_method(combination, density, key)
        chosen = [self.index(n) for n in names]
        with_heads = [self.names[i] for i in chosen if self.trainables[i].get("params")]
        if len(with_heads) > 1:
            raise ValueError(f"adapters {with_heads} each train heads in full: heads cannot be "
                             "combined (PEFT refuses the same)")
        ranks, own_rank = _adapting(self.trainables, chosen)
        if factorwise and len(set(own_rank)) > 1:
            raise ValueError(f"{combination} merges the adapters' factors, which needs one rank; "
                             f"these have ranks {own_rank}: use "
                             f"{'svd' if combination == 'linear' else combination + '_svd'}")
        rank = (sum(own_rank) if combination == "cat" else own_rank[0]
                if factorwise else (svd_rank or max(own_rank)))
        adapters = {}
        for number, (module, members) in enumerate(ranks.items()):
            kernel = join(module + ("kernel",))
            terms = []
            for i in members:
                ab = lora.adapter_modules(self.trainables[i])[module]
                s = self.stacks[i].methods[0].spec.scale(kernel, ab[lora.LORA_A].shape[0])
                w = weights[chosen.index(i)]
                terms.append((w, s, np.asarray(ab[lora.LORA_A], np.float32),
                              np.asarray(ab[lora.LORA_B], np.float32)))
            keys = (None if key is None else
                    [jax.random.fold_in(jax.random.fold_in(key, number), part)
                     for part in range(3)])
            a, b = _combined_factors(combination, method, terms, rank, keys, density,
                                     majority_sign_method)
            adapters[module + (lora.LORA_A,)] = jnp.asarray(a)
            adapters[module + (lora.LORA_B,)] = jnp.asarray(b)
        targets = tuple(dict.fromkeys(
            "^" + join(module + ("kernel",)) + "$" for module in ranks))
        head = next((self.trainables[i]["params"] for i in chosen
                     if self.trainables[i].get("params")), {})
        first = self.stacks[chosen[0]]
        spec = dataclasses.replace(first.methods[0].spec, targets=targets, rank=rank,
                                   alpha=float(rank), rslora=False, rank_pattern={},
                                   alpha_pattern={})
        stack = MethodStack((dataclasses.replace(first.methods[0], spec=spec),),
                            also_train=tuple("^" + join(p) + "$" for p in
                                             traverse_util.flatten_dict(head)))
        trainable = {"params": jax.device_get(head),
                     LORA: traverse_util.unflatten_dict(adapters)}
        return AdapterSet(self.names + (new_name,), self.stacks + (stack,),
                          self.trainables + (trainable,))

    # --- Mixed batches ---------------------------------------------------------------------------

    def stacked(self) -> dict:
        """The adapters on a leading adapter axis (`methods.stacked_lora`): {'lora': {module:
        {lora_a, lora_b}}, padded; 'scale': {kernel path: [N]}; 'dense': {module: {kernel,
        bias}} of the trained heads}."""
        adapters = [t.get(LORA, {}) for t in self.trainables]
        low_rank = modules_of(stacked_lora.stack(adapters, stacked_lora.union_shapes(adapters)))
        low_rank = {m: low_rank[m] for m in sorted(low_rank)}
        scales = stacked_lora.stacked_scales([s.methods[0].spec for s in self.stacks], adapters,
                                             [join(m + ("kernel",)) for m in low_rank])
        heads = sorted({p[:-1] for t in self.trainables
                        for p in traverse_util.flatten_dict(t.get("params", {}))})
        dense = {}
        for module in heads:
            leaves = {}
            for leaf in ("kernel", "bias"):
                values = [traverse_util.flatten_dict(t.get("params", {})).get(module + (leaf,))
                          for t in self.trainables]
                if any(v is None for v in values):
                    missing = [n for n, v in zip(self.names, values) if v is None]
                    raise ValueError(f"adapters {missing} do not train {join(module + (leaf,))}, "
                                     "which others do: their heads cannot be mixed")
                leaves[leaf] = jnp.asarray(np.stack([np.asarray(v) for v in values]))
            dense[module] = leaves
        return {LORA: low_rank, "scale": scales, "dense": dense}

    def checked_ids(self, adapter_ids: Any, check_traced: bool = False) -> jax.Array:
        """`adapter_ids` as int32, each checked to index an adapter: concrete ids at once (a
        ValueError); traced ids, with `check_traced`, by a `checkify` check (run the caller
        under `checked`: a plain jit cannot hold one)."""
        n = len(self.names)
        if isinstance(adapter_ids, jax.core.Tracer):
            ids = jnp.asarray(adapter_ids, jnp.int32)
            if check_traced:
                checkify.check(jnp.all((ids >= 0) & (ids < n)),
                               f"adapter ids must be in [0, {n}) for a set of {n} adapters")
            return ids
        host = np.asarray(adapter_ids)
        if host.size and not np.issubdtype(host.dtype, np.integer):
            raise ValueError(f"adapter ids must be integers, got {host.dtype}")
        bad = sorted({int(i) for i in host.ravel() if not 0 <= i < n})
        if bad:
            raise ValueError(f"adapter ids {bad} are out of range: the set holds {n} adapters "
                             f"{list(self.names)}, ids 0..{n - 1}")
        return jnp.asarray(host, jnp.int32)

    def apply(self, apply_fn: Callable, frozen: Params, *args, adapter_ids: Any,
              collection: str = "params", stacked: dict | None = None, check_ids: bool = False,
              **kwargs):
        """apply_fn run on a batch whose row b goes through adapter adapter_ids[b].

        Args:
          apply_fn: e.g. `model.apply`, called as apply_fn({collection: params}, *args, **kwargs).
          frozen: `frozen(params)` (or the base params whole).
          adapter_ids: [batch] ints, indexes into `names`. Concrete ids are checked. Traced ids
            (inside the caller's `jax.jit`) are not by default, and an out-of-range one is
            clamped, as any gather under jit clamps: pass `check_ids=True` and run the
            function under `checked` to have them raise instead.
          stacked: `stacked()`, if the caller keeps it (it is rebuilt otherwise).

        Raises:
          ValueError: a concrete adapter id outside [0, len(names)).
        """
        ids = self.checked_ids(adapter_ids, check_ids)
        stacked = self.stacked() if stacked is None else stacked
        # The heads' modules must exist for the call: adapter 0's stand in, and are replaced.
        variables = {collection: combine(frozen, {"params": self.trainables[0].get("params", {})})}
        parts = {}
        for stack in self.stacks:
            spec = stack.methods[0].spec
            for module in stacked[LORA]:
                parts.setdefault(module, spec.parts_for(join(module + ("kernel",))))
        with stacked_lora.per_example(stacked[LORA], stacked["scale"], parts, ids,
                                      stacked["dense"]):
            return apply_fn(variables, *args, **kwargs)


def checked(fn: Callable) -> Callable:
    """`fn` (e.g. a jitted function calling `AdapterSet.apply(..., check_ids=True)` with traced
    ids) run under `checkify`, so that an out-of-range adapter id raises (a JaxRuntimeError
    naming the set's size) instead of being clamped; one comparison per row.

        run = checked(jax.jit(lambda ids: adapters.apply(
            model.apply, frozen, x, adapter_ids=ids, check_ids=True).logits))
    """

    def run(*args, **kwargs):
        error, out = checkify.checkify(fn)(*args, **kwargs)
        error.throw()
        return out

    return run


def decoding_apply(adapters: AdapterSet, apply_fn: Callable) -> Callable:
    """An `apply_fn` for `lora_jax.generate`'s searches that runs every prompt through its own
    adapter: call them with params (frozen, adapters.stacked(), adapter id per prompt) and
    batch_size=None (all prompts in one batch), e.g.

        run = decoding_apply(adapters, model.apply)        # once: the searches jit on it
        ids = beam_search(run, (frozen, stacked, [0, 2, 1]), prompts, num_beams=4, ...)

    The searches keep each prompt's rows (its beams) together, prompt by prompt, so row r of a
    batch of R rows for P prompts belongs to prompt r // (R / P)."""

    def run(params, input_ids, **kwargs):
        frozen, stacked, prompt_ids = params
        rows = jnp.repeat(jnp.asarray(prompt_ids), input_ids.shape[0] // len(prompt_ids))
        return adapters.apply(apply_fn, frozen, input_ids, adapter_ids=rows, stacked=stacked,
                              **kwargs)

    return run


def evaluate_all(adapters: AdapterSet, task: Any, apply_fn: Callable, frozen: Params,
                 batch_size: int) -> dict[str, dict[str, float]]:
    """Every adapter's dev metrics on `task` in one pass over its dev set: each batch of
    examples runs once per adapter, as one mixed batch (`AdapterSet.apply`), so N adapters cost
    one program and one walk over the data. Equal to evaluating each alone.

    Args:
      task: a classification or regression `data.tasks.Task` (its eval examples, metrics).
      apply_fn: the model's apply (`model.apply`).
      frozen: `adapters.frozen(params)`.
      batch_size: examples per batch (each batch holds N times as many rows).
    """
    n = len(adapters.names)
    run = _mixed_eval_step(adapters, apply_fn, task.kind)
    stacked = adapters.stacked()
    totals, weights = np.zeros(n), np.zeros(n)
    preds: list[list[np.ndarray]] = [[] for _ in range(n)]
    labels = []
    for host in task.eval_batches(batch_size):
        rows = len(host["input_ids"])
        tiled = {k: np.concatenate([v] * n) for k, v in host.items()}
        ids = np.repeat(np.arange(n, dtype=np.int32), rows)
        per_row, p = jax.device_get(run(frozen, stacked, tiled, ids))
        real = host["example_mask"].astype(bool)
        for i in range(n):
            mine = slice(i * rows, (i + 1) * rows)
            totals[i] += float(per_row[mine][real].sum())
            weights[i] += float(real.sum())
            preds[i].append(p[mine][real])
        labels.append(host["labels"][real])
    labels = np.concatenate(labels)
    return {name: task.metrics(np.concatenate(preds[i]), labels, totals[i] / max(weights[i], 1))
            for i, name in enumerate(adapters.names)}


def _mixed_eval_step(adapters: AdapterSet, apply_fn: Callable, kind: str) -> Callable:
    """run(frozen, stacked, batch, ids) -> (each row's loss, predictions), jitted once per
    set, model and kind of task (later calls reuse the compiled program)."""
    key = (id(apply_fn), kind)
    if key not in adapters._eval_steps:
        @jax.jit
        def run(frozen, stacked, batch, ids):
            logits = adapters.apply(apply_fn, frozen, batch["input_ids"], adapter_ids=ids,
                                    stacked=stacked, deterministic=True,
                                    **model_inputs(batch)).logits
            per_row, _ = losses.losses_and_weights(kind, logits, batch)
            return per_row, losses.predictions(kind, logits)

        adapters._eval_steps[key] = (apply_fn, run)  # apply_fn kept: its id stays its own
    return adapters._eval_steps[key][1]


def _combined_factors(combination: str, method: str, terms: list, rank: int,
                      keys: list | None, density: float | None,
                      majority_sign_method: merging.SignMethod) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of one module of `AdapterSet.weighted`'s new adapter; `terms`: (w_i, s_i, A_i,
    B_i) of the adapters adapting it, `keys`: DARE's keys for A, B and dW (None: no DARE)."""

    def merge(tensors, part_weights, part):
        return merging.combine(method, tensors, part_weights, density=density,
                               majority_sign_method=majority_sign_method,
                               key=None if keys is None else keys[part])

    if combination == "cat":
        a = np.concatenate([w * s * a for w, s, a, _ in terms])
        b = np.concatenate([b for *_, b in terms], axis=1)
        return (np.pad(a, [(0, rank - a.shape[0]), (0, 0)]),
                np.pad(b, [(0, 0), (0, rank - b.shape[1])]))
    if not combination.endswith("svd"):  # PEFT's factor-wise merges
        roots = [np.sqrt(abs(w * s)) for w, s, _, _ in terms]
        signs = [1.0 if w * s >= 0 else -1.0 for w, s, _, _ in terms]
        return (merge([a for *_, a, _ in terms], [r * g for r, g in zip(roots, signs)], 0),
                merge([b for *_, b in terms], roots, 1))
    delta = merge([s * (b @ a) for _, s, a, b in terms], [w for w, *_ in terms], 2)
    u, sv, vh = np.linalg.svd(delta, full_matrices=False)  # delta: [d_out, d_in]
    return vh[:rank], u[:, :rank] * sv[:rank]


def _merge_method(combination: str, density: float | None,
                  key: jax.Array | None) -> tuple[str, bool]:
    """(the `merging` method a combination of `AdapterSet.weighted` applies, whether it merges
    factors), its settings checked."""
    factorwise = ("linear",) + merging.DENSITY_METHODS
    known = ("cat", "svd") + tuple(f"{m}_svd" for m in merging.DENSITY_METHODS) + factorwise
    if combination not in known:
        raise ValueError(f"combination must be one of {known}, got {combination!r}")
    method = combination.removesuffix("_svd") if combination != "svd" else "linear"
    if method in merging.DENSITY_METHODS:
        merging.check_density(density)
    if method.startswith("dare") and key is None:
        raise ValueError(f"{combination} drops entries at random: give key")
    return method, combination in factorwise


def _adapting(trainables: Sequence[dict], chosen: Sequence[int]) -> tuple[dict, list[int]]:
    """({module: the chosen adapters adapting it}, each chosen adapter's largest rank).

    Raises:
      ValueError: an adapter on split outputs (weighted combinations take whole kernels).
    """
    ranks: dict = {}
    for i in chosen:
        for module, ab in lora.adapter_modules(trainables[i]).items():
            if ab[lora.LORA_A].ndim != 2:
                raise ValueError(f"{join(module)} is adapted in split output parts: weighted "
                                 "combinations take adapters of whole kernels")
            ranks.setdefault(module, []).append(i)
    own_rank = [max(ab[lora.LORA_A].shape[0] for ab in
                    lora.adapter_modules(trainables[i]).values()) for i in chosen]
    return ranks, own_rank
