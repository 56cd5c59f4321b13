"""LoRA as a functional transform over a Flax parameter pytree.

A `LoraSpec` names which kernels to adapt. `split` turns a model's params into
two pytrees: the frozen base weights W0 and the trainable tree (low-rank
adapters A, B and, optionally, parameters trained in full such as a classifier
head). `adapt` wraps any Flax `apply` function so that every targeted
`nn.Dense` computes

    y = W0 x + b + s * B (A dropout(x)),     s = alpha / r  (or alpha / sqrt(r))

without ever building W0 + BA: the model code is untouched (the low-rank path is
added by intercepting `nn.Dense.__call__`), and since gradients are taken only
with respect to the trainable tree, XLA never computes a gradient for W0.

Orientation follows the paper and PEFT: A is (r, d_in), B is (d_out, r), while
Flax kernels are (d_in, d_out), so the merged kernel is W0 + s * (B A)^T.

Example:
    spec = LoraSpec(targets=(r"attn/c_attn",), rank=4, alpha=32,
                    split_outputs={r"attn/c_attn": (True, False, True)})
    frozen, trainable = split(spec, params, jax.random.key(0))
    apply = adapt(model.apply, spec)
    logits = apply(frozen, trainable, input_ids)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from lora_jax import config_rules as rules
from lora_jax.methods.base import (ADDS, Method, MethodStack, PeftCodec, Registration,
                                   SettingError, combine, count_params, fold_into_kernels,
                                   intercept_dense, join, listing, matching, modules_of)

Params = Mapping[str, Any]
Path = tuple[str, ...]
__all__ = ["LoraSpec", "LoRA", "split", "adapt", "merge", "unmerge", "combine", "count_params",
           "init", "adapter_modules", "check_compatible", "target_kernels", "low_rank_update"]

LORA_A = "lora_a"
LORA_B = "lora_b"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how.

    Patterns are regular expressions searched (`re.search`) in '/'-joined
    parameter paths such as 'h_0/attn/c_attn/kernel'. The first matching entry
    of `rank_pattern`, `alpha_pattern` and `split_outputs` wins.

    Attributes:
      targets: patterns selecting the Dense kernels that get an adapter.
      rank: default rank r.
      alpha: default alpha; the low-rank update is scaled by alpha / r.
      dropout: LoRA dropout rate on the adapter's input (never on W0 x).
      init: 'gaussian' (A ~ N(0, 1/r^2), as the paper and PEFT's "gaussian") or
        'kaiming' (kaiming-uniform with a = sqrt(5), as loralib and PEFT's
        default). B is always zero, so the adapted model starts as the base.
      rslora: scale by alpha / sqrt(r) (rank-stabilized LoRA) instead.
      rank_pattern: per-pattern rank overrides.
      alpha_pattern: per-pattern alpha overrides.
      split_outputs: for fused projections, pattern -> one flag per equal part
        of the output dimension; each flagged part gets its own rank-r
        adapter. GPT-2's c_attn with (True, False, True) adapts q and v and
        leaves k alone (loralib's MergedLinear, the paper's setup).
      also_train: patterns of parameters trained in full next to the adapters
        (e.g. a classifier head; PEFT's `modules_to_save`).
    """

    targets: tuple[str, ...]
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    init: Literal["gaussian", "kaiming"] = "kaiming"
    rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    split_outputs: Mapping[str, tuple[bool, ...]] = dataclasses.field(default_factory=dict)
    also_train: tuple[str, ...] = ()

    def __post_init__(self):
        # Accept lists from configs but keep the spec hashable and immutable.
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "also_train", tuple(self.also_train))
        if self.init not in ("gaussian", "kaiming"):
            raise ValueError(f"LoraSpec.init must be 'gaussian' or 'kaiming', got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout}")
        for pattern, parts in self.split_outputs.items():
            if not any(parts):
                raise ValueError(f"split_outputs[{pattern!r}] = {parts} adapts no part")

    def rank_for(self, path: str) -> int:
        return _first_match(self.rank_pattern, path, self.rank)

    def alpha_for(self, path: str) -> float:
        return _first_match(self.alpha_pattern, path, self.alpha)

    def parts_for(self, path: str) -> tuple[bool, ...]:
        return tuple(_first_match(self.split_outputs, path, (True,)))

    def scale(self, path: str, rank: int) -> float:
        """The factor s multiplying B A for the kernel at `path`."""
        alpha = self.alpha_for(path)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def _first_match(table: Mapping[str, Any], path: str, default: Any) -> Any:
    for pattern, value in table.items():
        if re.search(pattern, path):
            return value
    return default


def _kernel_paths(params: Params) -> list[str]:
    flat = traverse_util.flatten_dict(params)
    return [join(p) for p, leaf in flat.items() if p[-1] == "kernel" and len(leaf.shape) == 2]


def target_kernels(spec: LoraSpec, params: Params) -> list[str]:
    """The '/'-joined paths of the kernels `spec` adapts, in tree order.

    Raises:
      SettingError: a target pattern matches no 2-D kernel; the message lists
        the kernel paths that exist.
    """
    return matching_kernels(spec.targets, params, "LoRA")


def matching_kernels(patterns: Sequence[str], params: Params, what: str) -> list[str]:
    """The '/'-joined paths of the 2-D kernels any of `patterns` finds, in tree order.

    Raises:
      SettingError: a pattern matches no kernel (named, with the kernel paths that exist).
    """
    kernels = _kernel_paths(params)
    for pattern in patterns:
        if not any(re.search(pattern, k) for k in kernels):
            raise SettingError("targets", f"{what} target pattern {pattern!r} matches no kernel; "
                               f"the kernels are {listing(kernels)}")
    return [k for k in kernels if any(re.search(p, k) for p in patterns)]


def adapter_shapes(spec: LoraSpec, path: str, kernel_shape: tuple[int, int]):
    """Shapes of A and B for one kernel; slices are stacked on a leading axis.

    Raises:
      SettingError: the rank exceeds the kernel's (part's) size, or the split does not divide it.
    """
    d_in, d_out = kernel_shape
    parts = spec.parts_for(path)
    if d_out % len(parts):
        raise SettingError(
            "split_outputs", f"split_outputs gives {len(parts)} parts for {path!r}, "
            f"but its output size {d_out} is not divisible by {len(parts)}"
        )
    d_part = d_out // len(parts)
    rank = spec.rank_for(path)
    if not 0 < rank <= min(d_in, d_part):
        patterned = _first_match(spec.rank_pattern, path, None) is not None
        raise SettingError(
            "rank_pattern" if patterned else "rank",
            f"LoRA rank {rank} for {path!r} must be in [1, min(d_in, d_out)] = "
            f"[1, {min(d_in, d_part)}] (kernel {kernel_shape}, {len(parts)} output parts)"
        )
    n = sum(parts)
    if len(parts) == 1:
        return (rank, d_in), (d_part, rank)
    return (n, rank, d_in), (n, d_part, rank)


def _init_a(spec: LoraSpec, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    rank, d_in = shape[-2:]
    if spec.init == "gaussian":
        return jax.random.normal(key, shape, jnp.float32) / rank
    # kaiming_uniform(a=sqrt(5)) on a (r, d_in) weight: bound = 1 / sqrt(d_in).
    bound = 1.0 / math.sqrt(d_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init(spec: LoraSpec, params: Params, key: jax.Array) -> dict:
    """Fresh adapters for every targeted kernel: A random, B zero, in float32.

    Returns a nested dict mirroring the module paths of `params`, e.g.
    {'h_0': {'attn': {'c_attn': {'lora_a': A, 'lora_b': B}}}}.
    """
    flat = traverse_util.flatten_dict(params)
    adapters = {}
    paths = target_kernels(spec, params)
    for path, k in zip(paths, jax.random.split(key, max(len(paths), 1))):
        a_shape, b_shape = adapter_shapes(spec, path, flat[tuple(path.split("/"))].shape)
        module = tuple(path.split("/")[:-1])
        adapters[module + (LORA_A,)] = _init_a(spec, k, a_shape)
        adapters[module + (LORA_B,)] = jnp.zeros(b_shape, jnp.float32)
    return traverse_util.unflatten_dict(adapters)


def _also_trained(spec: LoraSpec, params: Params) -> set[Path]:
    chosen = set()
    for pattern in spec.also_train:
        chosen |= matching(params, pattern, "also_train")
    return chosen


def split(spec: LoraSpec, params: Params, key: jax.Array) -> tuple[dict, dict]:
    """Splits `params` into (frozen, trainable): those of the one-method `MethodStack` of
    `LoRA(spec)`, which a training run with LoRA alone makes too.

    frozen holds W0 and everything not trained, in the dtype it came in (bf16 is
    fine); trainable is {'lora': adapters from `init` (none: no key), 'params': the
    `also_train` parameters}, always float32.
    The two trees share no leaf, so an optimizer over `trainable` keeps state
    only for what is trained.
    """
    return MethodStack((LoRA(spec),)).split(params, key)


def adapter_modules(trainable: Params) -> dict[Path, dict]:
    """Module path -> {'lora_a', 'lora_b'}, for a trainable tree of LoRA alone."""
    return modules_of(trainable.get(LoRA.name, {}))


def check_compatible(spec: LoraSpec, frozen: Params, trainable: Params) -> None:
    """Raises ValueError if the adapters do not fit the base's kernels.

    The message names the parameter and both shapes, e.g. adapters trained on
    GPT-2 small applied to GPT-2 medium.
    """
    check_adapters(spec, frozen, trainable.get(LoRA.name, {}))


def check_adapters(spec: LoraSpec, frozen: Params, adapters: Params) -> None:
    """`check_compatible` for a method's own adapters (`trainable[method.name]`)."""
    flat = traverse_util.flatten_dict(frozen)
    for module, ab in modules_of(adapters).items():
        path = join(module + ("kernel",))
        kernel = flat.get(module + ("kernel",))
        if kernel is None:
            raise ValueError(f"adapter for {path!r} has no kernel in the base parameters")
        a, b = ab[LORA_A], ab[LORA_B]
        if a.shape[-2] != b.shape[-1]:
            raise ValueError(f"adapter for {path!r}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                             f"disagree on the rank ({a.shape[-2]} vs {b.shape[-1]})")
        parts = spec.parts_for(path)
        expected = (a.shape[-1], b.shape[-2] * len(parts))
        if tuple(kernel.shape) != expected:
            raise ValueError(
                f"adapter for {path!r} expects a kernel of shape {expected} "
                f"but the base has {tuple(kernel.shape)}"
            )


def adapted_slots(parts: Sequence[bool]) -> list[tuple[int, int]]:
    """The layout of a split output: (output part p, adapter index j) for each adapted part, in
    order. Part p occupies output columns p * d_part .. (p + 1) * d_part; adapter j is the j-th
    slice of the stacked A (n, r, d_in) and B (n, d_part, r)."""
    return [(p, j) for j, p in enumerate(p for p, adapted in enumerate(parts) if adapted)]


def assemble_parts(blocks: Sequence[Any], parts: Sequence[bool], axis: int = -1):
    """The adapted parts' blocks laid out over all parts of a fused output along `axis`, zeros
    where a part is not adapted (numpy or jax arrays alike)."""
    xp = np if isinstance(blocks[0], np.ndarray) else jnp
    pieces = [xp.zeros_like(blocks[0])] * len(parts)
    for p, j in adapted_slots(parts):
        pieces[p] = blocks[j]
    return xp.concatenate(pieces, axis=axis)


def low_rank_update(x: jax.Array, a: jax.Array, b: jax.Array, scale: float,
                    parts: tuple[bool, ...]) -> jax.Array:
    """s * B (A x) for a batch of inputs x (..., d_in), in x's dtype.

    For split outputs, a is (n, r, d_in) and b is (n, d_part, r); the result is
    laid out over all parts of the output, with zeros where a part is not adapted.
    """
    a, b = a.astype(x.dtype), b.astype(x.dtype)
    if len(parts) == 1:
        return scale * ((x @ a.T) @ b.T)
    h = jnp.einsum("...i,nri->...nr", x, a)
    y = jnp.einsum("...nr,nor->...no", h, b)
    return scale * assemble_parts([y[..., j, :] for j in range(y.shape[-2])], parts)


def kernel_path(module) -> str:
    """The '/'-joined path of a bound nn.Dense's kernel, as specs' patterns see it."""
    return join(tuple(module.path) + ("kernel",))


def _low_rank_output(spec: LoraSpec, module, ab: dict, x: jax.Array, y: jax.Array,
                     dropped: bool) -> jax.Array:
    """An adapted Dense call's output: y + s B A x (`intercept_dense`'s `output`)."""
    path = kernel_path(module)
    a, b = ab[LORA_A], ab[LORA_B]
    return y + low_rank_update(x.astype(y.dtype), a, b, spec.scale(path, a.shape[-2]),
                               spec.parts_for(path))


# A buffer a study's members add (`lora_jax.training.members`): kernel path -> the scale s of
# that member's adapter, an array, where the spec's static alpha / r cannot differ per member
# (their ranks are padded to one, and vmap traces one program for all).
SCALES = "scale"


def _scaled_output(spec: LoraSpec, scales: Mapping[str, jax.Array], module, ab: dict,
                   x: jax.Array, y: jax.Array, dropped: bool) -> jax.Array:
    """`_low_rank_output` with the scale read from `scales` instead of the spec."""
    path = kernel_path(module)
    return y + low_rank_update(x.astype(y.dtype), ab[LORA_A], ab[LORA_B],
                               scales[path].astype(y.dtype), spec.parts_for(path))


def adapt(apply_fn: Callable, spec: LoraSpec, collection: str = "params",
          strict: bool = True) -> Callable:
    """Wraps a Flax apply function so it runs the LoRA-adapted model.

    Args:
      apply_fn: e.g. `model.apply`, called as apply_fn({collection: params}, *args, **kwargs).
      spec: the spec the trainable tree was made with.
      collection: the variable collection that holds the parameters.
      strict: raise if an adapter was never applied, i.e. its kernel does not belong to an
        `nn.Dense` that the call ran (an adapter silently doing nothing would be worse). Turn
        off to call a method that runs only part of the model.

    Returns:
      adapted(frozen, trainable, *args, lora_rng=None, **kwargs). `lora_rng`
      drives LoRA dropout; None (evaluation) disables it. Other kwargs, such as
      `rngs` for the model's own dropout, pass through.
    """

    def adapted(frozen: Params, trainable: Params, *args, lora_rng: jax.Array | None = None,
                **kwargs):
        check_compatible(spec, frozen, trainable)
        variables = {collection: combine(frozen, trainable)}
        with intercept_dense(adapter_modules(trainable), lora_rng, spec.dropout,
                             functools.partial(_low_rank_output, spec), "LoRA", strict,
                             "pass strict=False to run part of the model"):
            return apply_fn(variables, *args, **kwargs)

    return adapted


def merged_delta(spec: LoraSpec, path: str, ab: dict, dtype) -> jax.Array:
    """s * (B A)^T in kernel orientation (d_in, d_out), computed in float32."""
    a, b = ab[LORA_A].astype(jnp.float32), ab[LORA_B].astype(jnp.float32)
    parts = spec.parts_for(path)
    scale = spec.scale(path, a.shape[-2])
    if len(parts) == 1:
        return (scale * (b @ a).T).astype(dtype)
    blocks = scale * jnp.einsum("nor,nri->nio", b, a)
    return assemble_parts(list(blocks), parts).astype(dtype)


def apply_deltas(spec: LoraSpec, params: Params, trainable: Params, sign: float) -> dict:
    """`params` with sign * s (B A)^T added to every adapted kernel of LoRA's `trainable`."""
    return fold_adapters(spec, params, trainable.get(LoRA.name, {}), sign)


def fold_adapters(spec: LoraSpec, params: Params, adapters: Params, sign: float) -> dict:
    """`params` with sign * s (B A)^T added to the kernel of every module in `adapters` (a
    method's own tree: {module: {'lora_a', 'lora_b', ...}})."""
    return fold_into_kernels(
        params, adapters,
        lambda module, ab, _: sign * merged_delta(spec, join(module + ("kernel",)), ab,
                                                  jnp.float32))


def merge(spec: LoraSpec, frozen: Params, trainable: Params) -> dict:
    """Plain params with W = W0 + s B A folded in: the base model, unchanged,
    then computes the adapted function with no added latency (the one-method stack's
    `merge`)."""
    check_compatible(spec, frozen, trainable)
    return MethodStack((LoRA(spec),)).merge(frozen, trainable)


def unmerge(spec: LoraSpec, merged: Params, trainable: Params) -> dict:
    """Inverse of `merge`: subtracts s B A and drops the fully-trained leaves,
    returning the frozen tree (to switch tasks: unmerge, then merge another)."""
    base = apply_deltas(spec, merged, trainable, -1.0)
    extra = traverse_util.flatten_dict(trainable.get("params", {}))
    flat = traverse_util.flatten_dict(base)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in extra})



BIAS_OPTIONS = ("none", "all", "lora_only")


@dataclasses.dataclass(frozen=True)
class LoRA(Method):
    """LoRA as a method of a `MethodStack`: the adapters of `spec` (its `also_train` aside: the
    stack's own `also_train` holds what every method trains in full).

    Attributes:
      spec: targets, rank, alpha, dropout, init, per-pattern overrides, split outputs.
      bias: loralib's option: 'none' (biases frozen), 'all' (every bias trained, LayerNorms'
        included, as loralib's and PEFT's bias='all'), 'lora_only' (the biases of the adapted
        modules).
      strict: an adapter that no call reaches is an error (see `adapt`).
    """

    name = "lora"
    mergeable = True
    low_rank_leaves = (LORA_A, LORA_B)

    spec: LoraSpec
    bias: str = "none"
    strict: bool = True

    def __post_init__(self):
        if self.bias not in BIAS_OPTIONS:
            raise ValueError(f"LoRA bias must be one of {BIAS_OPTIONS}, got {self.bias!r}")

    def trains(self, params: Params) -> set[Path]:
        chosen = _also_trained(self.spec, params)
        flat = traverse_util.flatten_dict(params)
        if self.bias == "all":
            chosen |= {p for p in flat if p[-1] == "bias"}
        elif self.bias == "lora_only":
            adapted = {tuple(k.split("/")[:-1]) for k in target_kernels(self.spec, params)}
            chosen |= {p for p in flat if p[-1] == "bias" and p[:-1] in adapted}
        return chosen

    def init(self, params: Params, key: jax.Array) -> dict:
        return init(self.spec, params, key) if self.spec.targets else {}

    def output(self, module, adapter: dict, x: jax.Array, y: jax.Array,
               dropped: bool) -> jax.Array:
        """An adapted Dense call's output from the base one y = W0 x + b (x after LoRA
        dropout): y + s B A x. Variants of LoRA (DoRA) override this, and `init` and `merge`,
        and inherit the rest."""
        return _low_rank_output(self.spec, module, adapter, x, y, dropped)

    def intercept(self, added: Params, rng: jax.Array | None, buffers: Params | None = None):
        scales = (buffers or {}).get(SCALES)
        output = self.output if scales is None else functools.partial(_scaled_output, self.spec,
                                                                      scales)
        return intercept_dense(modules_of(added), rng, self.spec.dropout, output, self.name,
                               self.strict)

    def merge(self, params: Params, added: Params, buffers: Params | None = None) -> dict:
        return fold_adapters(self.spec, params, added, +1.0)

    def describe(self) -> str:
        bias = "" if self.bias == "none" else f", bias={self.bias}"
        return f"lora(r={self.spec.rank}{bias})"


# --- As a config section (config.method.lora) -----------------------------------------------------

def _defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.targets = (r"/query/kernel", r"/value/kernel")
    c.rank = 8
    c.alpha = 8.0
    c.dropout = 0.0
    c.init = "kaiming"
    c.rslora = False
    c.rank_pattern = ml_collections.ConfigDict()
    c.alpha_pattern = ml_collections.ConfigDict()
    c.split_outputs = ml_collections.ConfigDict()
    c.bias = "none"
    return c


def spec_from_config(c: Any, init: str | None = None) -> LoraSpec:
    """The LoraSpec a `config.method.lora` section describes (read, never changed). `init`: A's
    initialisation, for a variant's section that has no such field (PiSSA's SVD sets A and B)."""
    return LoraSpec(
        targets=tuple(c.targets), rank=c.rank, alpha=c.alpha, dropout=c.dropout,
        init=c.init if init is None else init,
        rslora=c.rslora, rank_pattern=dict(c.rank_pattern), alpha_pattern=dict(c.alpha_pattern),
        split_outputs={k: tuple(v) for k, v in c.split_outputs.items()})


def _output_parts(value) -> str | None:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, bool) for v in value):
        return "must be a tuple of True/False, one per part of the fused output"
    return None if any(value) else "must adapt at least one part (a True)"


def peft_codec() -> PeftCodec:
    """LoRA's PEFT mapping (`lora_peft`, beside this file, which builds on it)."""
    from lora_jax.methods import lora_peft  # deferred: lora_peft imports this module

    return lora_peft.PEFT


def variant_registration(method_type: type[LoRA], fields: Mapping[str, tuple[Any, Any]],
                         peft: Callable[[], PeftCodec] | None = None, *, kernels: str = ADDS,
                         without: tuple[str, ...] = (),
                         related: Callable[[Any], list[str]] | None = None) -> Registration:
    """The registry entry of a LoRA variant whose section is LoRA's, less the fields `without`
    (a start that sets A itself has no `init`), plus `fields` (name -> (default, rule)), each
    handed to `method_type` by name (LoRA+'s lr_ratio, LoRA-FA's a_seed); saved as `peft` says
    (default: as LoRA)."""

    def defaults() -> ml_collections.ConfigDict:
        c = _defaults()
        for name in without:
            del c[name]
        for name, (default, _) in fields.items():
            c[name] = default
        return c

    def build(c: Any, family: Any) -> LoRA:
        # A section without `init` never uses the spec's (the start sets A and B).
        spec = spec_from_config(c, init=None if "init" in c else "kaiming")
        return method_type(spec, bias=c.bias, **{k: c[k] for k in fields})

    rules_ = {k: v for k, v in REGISTRATION.rules.items() if k not in without}
    return Registration(defaults, {**rules_, **{k: r for k, (_, r) in fields.items()}}, build,
                        peft=peft or peft_codec, extends=LoRA.name, kernels=kernels,
                        related=related)


REGISTRATION = Registration(
    _defaults,
    {"targets": rules.regexes, "rank": rules.integer(1), "alpha": rules.number(0, low_open=True),
     "dropout": rules.number(0, 1, high_open=True), "init": rules.one_of("gaussian", "kaiming"),
     "rslora": rules.boolean, "rank_pattern": rules.pattern_table(rules.integer(1)),
     "alpha_pattern": rules.pattern_table(rules.number(0, low_open=True)),
     "split_outputs": rules.pattern_table(_output_parts), "bias": rules.one_of(*BIAS_OPTIONS)},
    lambda c, family: LoRA(spec_from_config(c), bias=c.bias), peft=peft_codec, kernels=ADDS)
