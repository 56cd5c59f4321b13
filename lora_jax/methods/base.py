"""The protocol every parameter-efficient method follows, and `MethodStack`, which composes them.

A method says
  - which base parameters it trains in full (`trains`: BitFit's biases, FT's everything),
  - which parameters it adds, freshly initialised (`init`: LoRA's A and B, an adapter's
    projections, prefix embeddings), so that the adapted model equals the base at step 0
    wherever the method allows it (B = 0, zero up-projections),
  - what it adds to the forward pass, through Flax method interception (`intercept`), so that
    model code stays unaware of it,
  - how it changes the input, if it does (`prepare_example`, `prepare_prompt`: PreEmbed inserts
    its virtual tokens),
  - whether and how it folds into plain weights (`merge`; `NotMergeable` otherwise),
  - optionally: the base it trains against (`base`: PiSSA moves W0's principal part into its
    adapters), fixed arrays it derives and never trains (`buffers`: VeRA's shared random
    projections), per-leaf learning-rate multipliers (`update_scales`: LoRA+), a term added to
    the training loss (`regularizer`) and a wrapper of the optimizer (`optimizer`: AdaLoRA's
    rank allocation, which edits the trained values between steps).
Its exact parameter count is the size of what it adds plus what it trains in full.

`MethodStack` runs one or several methods together (LoRA + PreEmbed, as the paper's Appendix E).
The trainable tree it builds is

    {"params": base leaves trained in full (float32), <method name>: what that method adds, ...}

and the frozen tree is every other base leaf, in the dtype it came in (as each method's `base`
leaves it), plus {<method name>: its buffers} for methods that have any. The two share no leaf,
so an optimizer over the trainable tree keeps state for what is trained only, and gradients
are taken for those leaves alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from lora_jax.models import scan
from lora_jax.quant import kernels as quant

Params = Mapping[str, Any]
Path = tuple[str, ...]


class NotMergeable(ValueError):
    """The method adds computation that no plain weight matrix can hold (adapters, prefixes)."""


class SettingError(ValueError):
    """A method's setting that the model it runs on does not allow (a target matching none of
    its kernels, a rank over a kernel's size, more blocks dropped than it has).

    Attributes:
      field: the setting's field in the method's config section ('targets', 'rank', ...), so the
        config checks can name `config.method.<name>.<field>` (`config_checks.check_against_base`).
      method: the registered method, where the raiser knows it and the catcher may not.
    """

    def __init__(self, field: str, message: str, method: str | None = None):
        super().__init__(message)
        self.field = field
        self.method = method


class MergedParams(dict):
    """Params with trained methods merged into them, naming what is merged (`merged`: the
    stack's description, or an adapter set's adapter names), so that merging again into them,
    or taking out what is not in them, raises. Otherwise the params dict itself:
    `model.apply({"params": merged}, ...)` takes it and JAX maps over it (a pytree whose record
    travels with it, e.g. through `jax.device_put` or `jax.jit`; being part of the tree's
    structure, it must match for `tree_map` over two merged models: `dict(merged)` drops it).
    `AdapterSet.merge` returns it; `MethodStack.merge` refuses to merge into it."""

    def __init__(self, params: Params, merged: Sequence[str] = ()):
        super().__init__(params)
        self.merged = tuple(merged)

    def __repr__(self) -> str:
        return f"MergedParams(merged={list(self.merged)}, keys={list(self)})"


jax.tree_util.register_pytree_with_keys(
    MergedParams,
    lambda m: ([(jax.tree_util.DictKey(k), m[k]) for k in sorted(m)], (tuple(sorted(m)),
                                                                        m.merged)),
    lambda aux, values: MergedParams(dict(zip(aux[0], values)), aux[1]),
    lambda m: ([m[k] for k in sorted(m)], (tuple(sorted(m)), m.merged)))


def join(path: Path) -> str:
    return "/".join(path)


def listing(paths: Sequence[str]) -> str:
    """'/'-joined paths in one line, each block's copy once (block indices starred: 'h_*/attn'),
    so that a message lists what exists however deep the model is."""
    return ", ".join(dict.fromkeys(re.sub(r"_\d+(?=/)", "_*", p) for p in paths)) or "(none)"


def matching(params: Params, pattern: str, what: str) -> set[Path]:
    """The leaf paths of `params` that `pattern` finds (re.search on '/'-joined paths).

    Raises:
      SettingError: nothing matches (field `what`); the message lists the modules that exist.
    """
    flat = traverse_util.flatten_dict(params)
    hits = {p for p in flat if re.search(pattern, join(p))}
    if not hits:
        raise SettingError(what, f"{what} pattern {pattern!r} matches no parameter; the modules "
                           f"are {listing(sorted({join(p[:-1]) for p in flat}))}")
    return hits


class Method:
    """A parameter-efficient method; subclasses are frozen dataclasses (see the module docstring).

    Class attributes:
      name: the registry name, also the key of the method's added parameters in `trainable`.
      mergeable: whether `merge` folds the method into plain weights.
      low_rank_leaves: names of its low-rank factor leaves (counted by `low_rank_params`).
    """

    name: ClassVar[str] = "method"
    mergeable: ClassVar[bool] = False
    # The leaves of its added tree that are low-rank factors (LoRA's A and B), which results
    # tables count apart from everything trained (`MethodStack.low_rank_params`).
    low_rank_leaves: ClassVar[tuple[str, ...]] = ()
    # Its calibration reads the layers inside the blocks (their inputs or weight gradients by
    # unrolled path), which scanned blocks do not expose; False where it reads the model's
    # hidden states only (PreLayer's start), which a scanned model returns too.
    calibration_reads_inside_blocks: ClassVar[bool] = True

    def trains(self, params: Params) -> set[Path]:
        """Base leaves trained in full (they leave the frozen tree)."""
        return set()

    def init(self, params: Params, key: jax.Array) -> dict:
        """The parameters the method adds, freshly initialised, float32 ({} for none)."""
        return {}

    def base(self, params: Params, buffers: Params) -> dict:
        """The base weights the method trains against, from the pretrained ones and the
        method's `buffers` (unchanged by default). A pure function of them, so a resumed run
        derives the same base."""
        return dict(params)

    def buffers(self, params: Params) -> dict:
        """Fixed arrays the method uses and never trains, derived from `params` and the method's
        settings (none by default); held in the frozen tree under the method's name."""
        return {}

    def update_scales(self, trainable: Params) -> Any | None:
        """Multipliers of the optimizer's update, a tree like the stack's whole `trainable`
        (None: all 1). A method may scale leaves beyond its own (LoRA+'s PEFT grouping)."""
        return None

    def calibration(self) -> int:
        """Training batches the method's start still needs before step 1 (0: none, or taken):
        the data-driven starts (CorDA, LoRA-GA, EVA, PreLayer's)."""
        return 0

    def calibrated(self, data: Any) -> "Method":
        """The method with what it takes from the run's first training batches
        (`methods.calibration.Batches`: the base model, its params, the batches, the loss)."""
        return self

    def calibration_state(self) -> dict[str, Any]:
        """What `calibrated` took, as named arrays (kept in the run's workdir, so that a resumed
        run does not take it again)."""
        return {}

    def with_calibration(self, state: Mapping[str, Any]) -> "Method":
        """The method with a `calibration_state` it took before."""
        return self

    def regularizer(self, added: Params) -> jax.Array | float:
        """A term added to the training loss (0 by default; AdaLoRA's orthogonality)."""
        return 0.0

    def optimizer(self, tx: Any, total_steps: int) -> Any:
        """The run's optax transformation as this method trains with it (unchanged by default).
        The wrapper sees the whole trainable tree; the method's own part is under its name."""
        return tx

    @contextlib.contextmanager
    def intercept(self, added: Params, rng: jax.Array | None,
                  buffers: Params | None = None) -> Iterator[None]:
        """A context in which the model's forward pass includes the method (none by default).
        `rng` drives the method's own dropout; None in evaluation. `buffers`: from `buffers`.
        A hook at a module inside the blocks computes through `models.scan.per_block`, so that
        it runs in scanned blocks too (`intercept_dense` does, for nn.Dense outputs)."""
        yield

    def prepare_example(self, example: dict, max_len: int, vocab_size: int) -> dict:
        """An encoded training or evaluation example as the method feeds it (unchanged here);
        the result has at most `max_len` tokens. `vocab_size`: the model's embedding rows."""
        return example

    def prepare_prompt(self, ids: Sequence[int], vocab_size: int) -> list[int]:
        """A generation prompt's token ids as the method feeds them (unchanged here)."""
        return list(ids)

    def merge(self, params: Params, added: Params, buffers: Params | None = None) -> dict:
        """Plain params computing the adapted function. Methods that add nothing merge trivially.

        Raises:
          NotMergeable: the method adds computation no weight matrix holds.
        """
        if jax.tree_util.tree_leaves(added):
            raise NotMergeable(f"{self.name} adds computation to the forward pass that no weight "
                               "matrix holds: it cannot be merged (run it kept apart)")
        return dict(params)

    def describe(self) -> str:
        """A short name with the settings, for logs and results tables."""
        return self.name


def modules_of(added: Params) -> dict[Path, dict]:
    """Module path -> its leaves, for a tree of per-module leaves (adapters, vectors)."""
    modules: dict[Path, dict] = {}
    for path, leaf in traverse_util.flatten_dict(added).items():
        modules.setdefault(path[:-1], {})[path[-1]] = leaf
    return modules


def fold_into_kernels(params: Params, added: Params,
                      delta: Callable[[Path, dict, jax.Array], jax.Array]) -> dict:
    """`params` with delta(module, its leaves in `added`, its kernel) added to the kernel of every
    module `added` has, in float32, stored back in the kernel's dtype (the merges). A kernel held
    quantized is dequantized first: the merged kernel is a plain array (W0 + dW is not on the
    quantization grid)."""
    flat = traverse_util.flatten_dict(params)
    for module, leaves in modules_of(added).items():
        key = module + ("kernel",)
        w = quant.value(flat[key])
        flat[key] = (w.astype(jnp.float32) + delta(module, leaves, w)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


class DenseCall(NamedTuple):
    """The nn.Dense call a method's `output` adapts: the module's path, its variables (W0 and
    the bias, read before the method runs) and whether it has a bias."""

    path: Path
    variables: Mapping[str, Any]
    use_bias: bool


@contextlib.contextmanager
def intercept_dense(adapters: Mapping[Path, Any], rng: jax.Array | None, dropout: float,
                    output: Callable[..., jax.Array], what: str, strict: bool = True,
                    hint: str = "run the whole model") -> Iterator[None]:
    """A context in which every call of an `nn.Dense` whose path has an entry in `adapters`
    returns output(call, entry, x, y, dropped) instead of y = W0 x + b.

    x is the call's input after `dropout` (one independent mask per module, folded from `rng`;
    none when `rng` is None), `dropped` whether it was applied, `call` the `DenseCall`. Inside
    scanned blocks (`models.scan`) the call runs as the running block's module, with its entry.

    Raises:
      ValueError: with `strict`, an entry no call reached (an adapter silently doing nothing
        would be worse): its kernel is not an nn.Dense kernel that this call ran.
    """
    # Arrays, not ints: in scanned blocks each block's number is then data, not a constant.
    order = {module: jnp.uint32(i) for i, module in enumerate(adapters)}
    used: set[Path] = set()

    def adapted(path, x, y, *, variables, use_bias):
        entry = adapters.get(path)
        if entry is None:
            return y
        dropped = rng is not None and dropout > 0
        if dropped:
            keep = jax.random.bernoulli(jax.random.fold_in(rng, order[path]), 1.0 - dropout,
                                        x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
        return output(DenseCall(path, variables, use_bias), entry, x, y, dropped)

    def hook(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        reached = [p for p in scan.block_paths(path) or (path,) if p in adapters]
        if not reached:
            return next_fun(*args, **kwargs)
        used.update(reached)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        call = functools.partial(adapted, variables=dict(module.variables),
                                 use_bias=module.use_bias)
        return scan.per_block(path, call, x, y)

    with nn.intercept_methods(hook):
        yield
    unused = [join(m + ("kernel",)) for m in adapters if m not in used]
    if strict and unused:
        raise ValueError(f"{what} adapters were never applied (their kernels are not nn.Dense "
                         f"kernels that this call ran): {unused}. Target plain nn.Dense layers, "
                         f"or {hint}.")


@dataclasses.dataclass(frozen=True)
class MethodStack:
    """One or several methods applied together, plus the leaves every method trains in full.

    Attributes:
      methods: applied in order (their interceptions nest, the first outermost).
      also_train: patterns of base parameters trained in full next to any method, e.g. a fresh
        classification head (PEFT's `modules_to_save`).
    """

    methods: tuple[Method, ...]
    also_train: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "also_train", tuple(self.also_train))
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names) or "params" in names:
            raise ValueError(f"methods must have distinct names other than 'params', got {names}")

    def trained_in_full(self, params: Params) -> set[Path]:
        chosen = set()
        for pattern in self.also_train:
            chosen |= matching(params, pattern, "also_train")
        for method in self.methods:
            chosen |= method.trains(params)
        return chosen

    def split(self, params: Params, key: jax.Array) -> tuple[dict, dict]:
        """(frozen, trainable) for `params` (see the module docstring)."""
        flat = traverse_util.flatten_dict(params)
        full = self.trained_in_full(params)
        # Trained leaves live in float32 even when W0 is held in bf16: small updates would vanish.
        trained = {p: jnp.asarray(flat[p], jnp.float32) for p in full}
        trainable = {"params": traverse_util.unflatten_dict(trained) if trained else {}}
        # One method takes the key itself, so a LoRA run draws the adapters `lora.split` draws.
        keys = [key] if len(self.methods) == 1 else jax.random.split(key, len(self.methods))
        for method, k in zip(self.methods, keys):
            added = method.init(params, k)
            if added:
                trainable[method.name] = added
        return self.frozen(params, trainable), trainable

    def frozen(self, params: Params, trainable: Params) -> dict:
        """The frozen tree for pretrained `params` and a trainable tree of this stack (a fresh or
        a loaded one): the leaves not trained in full, as the methods' `base` leaves them, and
        the methods' buffers."""
        frozen = frozen_part(params, trainable)
        buffers = {method.name: method.buffers(params) for method in self.methods}
        for method in self.methods:
            frozen = method.base(frozen, buffers[method.name])
        for name, own in buffers.items():
            if own:
                if name in frozen:
                    raise ValueError(f"method {name!r} shares its name with a top-level module "
                                     "of the model")
                frozen[name] = own
        return frozen

    def _base_and_buffers(self, frozen: Params) -> tuple[dict, dict]:
        names = {m.name for m in self.methods}
        return ({k: v for k, v in frozen.items() if k not in names},
                {k: v for k, v in frozen.items() if k in names})

    def update_scales(self, trainable: Params) -> Any | None:
        """Multipliers of the optimizer's update, one per trainable leaf (None: all 1)."""
        scales = None
        for method in self.methods:
            own = method.update_scales(trainable)
            if own is not None:
                scales = own if scales is None else jax.tree_util.tree_map(
                    lambda a, b: a * b, scales, own)
        return scales

    def calibration(self) -> int:
        """Training batches the stack's starts need before step 1 (`Method.calibration`)."""
        return max((m.calibration() for m in self.methods), default=0)

    def calibrated(self, data: Any) -> "MethodStack":
        """The stack with every method that needs batches calibrated on (its first) batches of
        `data` (`methods.calibration.Batches`)."""
        return dataclasses.replace(self, methods=tuple(
            m.calibrated(data.first(m.calibration())) if m.calibration() else m
            for m in self.methods))

    def calibration_state(self) -> dict[str, Any]:
        """Every method's `calibration_state`, its keys prefixed by '<method>/'."""
        return {f"{m.name}/{k}": v for m in self.methods
                for k, v in m.calibration_state().items()}

    def with_calibration(self, state: Mapping[str, Any]) -> "MethodStack":
        """The stack with a `calibration_state` it took before."""
        return dataclasses.replace(self, methods=tuple(
            m.with_calibration({k.removeprefix(m.name + "/"): v for k, v in state.items()
                                if k.startswith(m.name + "/")}) if m.calibration() else m
            for m in self.methods))

    def low_rank_params(self, trainable: Params) -> int:
        """Scalars of `trainable` in the methods' low-rank factors (`Method.low_rank_leaves`:
        LoRA's A and B), the count results tables give apart from all trained parameters."""
        total = 0
        for method in self.methods:
            own = traverse_util.flatten_dict(trainable.get(method.name, {}))
            total += sum(int(v.size) for k, v in own.items() if k[-1] in method.low_rank_leaves)
        return total

    def regularizer(self, trainable: Params) -> jax.Array | float:
        """The methods' terms added to the training loss."""
        return sum((m.regularizer(trainable.get(m.name, {})) for m in self.methods), 0.0)

    def optimizer(self, tx: Any, total_steps: int) -> Any:
        """`tx` wrapped by every method that trains through its own optimizer rule."""
        for method in self.methods:
            tx = method.optimizer(tx, total_steps)
        return tx

    def adapt(self, apply_fn: Callable, collection: str = "params") -> Callable:
        """Wraps a Flax apply function so it runs the adapted model.

        Returns:
          adapted(frozen, trainable, *args, method_rng=None, **kwargs). `method_rng` drives the
          methods' own dropout (None in evaluation); other kwargs pass through to `apply_fn`.
        """

        def adapted(frozen: Params, trainable: Params, *args,
                    method_rng: jax.Array | None = None, **kwargs):
            frozen, buffers = self._base_and_buffers(frozen)
            variables = {collection: combine(frozen, trainable)}
            rngs = (jax.random.split(method_rng, len(self.methods)) if method_rng is not None
                    else [None] * len(self.methods))
            with contextlib.ExitStack() as stack:
                for method, rng in zip(self.methods, rngs):
                    stack.enter_context(method.intercept(trainable.get(method.name, {}), rng,
                                                         buffers.get(method.name, {})))
                return apply_fn(variables, *args, **kwargs)

        return adapted

    @property
    def mergeable(self) -> bool:
        return all(m.mergeable for m in self.methods)

    def merge(self, frozen: Params, trainable: Params) -> dict:
        """Plain params computing the adapted function with the unchanged model (to 1e-5 in
        float32 for every pair of mergeable methods that the config checks let compose: the
        pairs in `CONFLICTS` would merge into another function, so configs refuse them).

        Raises:
          NotMergeable: a method that cannot merge (named).
          ValueError: `frozen` already has methods merged in (`MergedParams`, as
            `AdapterSet.merge` returns): merging into them would add the updates twice.
        """
        if isinstance(frozen, MergedParams) and frozen.merged:
            raise ValueError(f"these params already have {list(frozen.merged)} merged in them: "
                             "merging into them would add the updates again; merge into the "
                             "frozen base (or unmerge first)")
        frozen, buffers = self._base_and_buffers(frozen)
        params = combine(frozen, trainable)
        for method in self.methods:
            params = method.merge(params, trainable.get(method.name, {}),
                                  buffers.get(method.name, {}))
        return params

    def prepare_example(self, example: dict, max_len: int, vocab_size: int) -> dict:
        for method in self.methods:
            example = method.prepare_example(example, max_len, vocab_size)
        return example

    def prepare_prompt(self, ids: Sequence[int], vocab_size: int) -> list[int]:
        for method in self.methods:
            ids = method.prepare_prompt(ids, vocab_size)
        return list(ids)

    def describe(self) -> str:
        return " + ".join(m.describe() for m in self.methods) or "none"


def combine(frozen: Params, trainable: Params) -> dict:
    """The full parameter tree: frozen leaves overlaid with the fully-trained ones."""
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable.get("params", {})))
    return traverse_util.unflatten_dict(flat)


def frozen_part(params: Params, trainable: Params) -> dict:
    """`params` without the leaves `trainable['params']` trains in full (what `split` froze)."""
    trained = set(traverse_util.flatten_dict(trainable.get("params", {})))
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in trained})


def count_params(tree: Params) -> int:
    """Number of scalars in a pytree (of arrays or ShapeDtypeStructs); a quantized kernel counts
    the weights it holds, not its stored parts."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree, is_leaf=quant.is_quantized))


class PeftCodec:
    """A method's mapping onto PEFT's adapter directories, which `lora_jax.exports` uses for a
    stack of that method alone (its `Registration.peft` names it).

    Class attributes:
      peft_types: the `peft_type`s of adapter_config.json it reads ('LORA', 'VERA', ...).
      needs_frozen: `save` needs the stack's frozen tree (base norms, buffers).
      fallback: it reads what it claims only where no other codec of the type claims it (LoRA's
        reads every LoRA config; a start of PiSSA's kind claims its own among them).
    """

    peft_types: ClassVar[tuple[str, ...]] = ()
    needs_frozen: ClassVar[bool] = False
    fallback: ClassVar[bool] = False

    def claims(self, config: Mapping[str, Any]) -> bool:
        """Whether it reads an adapter config of one of its `peft_types` (several methods may
        share a type: PEFT's LoRA config holds DoRA and PiSSA too)."""
        return True

    def writes(self, method: Method, trainable: Params) -> bool:
        """Whether PEFT's format holds `method` with this trainable tree (else lora_jax's own
        format is written)."""
        return True

    def save(self, directory: pathlib.Path, method: Method, trainable: Params,
             frozen: Params | None, *, model_type: str, task: str | None,
             base_model_name_or_path: str | None) -> pathlib.Path:
        """Writes the trained `method` as a PEFT adapter directory; returns it."""
        raise NotImplementedError

    def load(self, directory: pathlib.Path, params: Params, family: Any,
             task: str | None) -> tuple[Method, dict]:
        """(method, trainable tree) of a PEFT adapter directory, for the base `params`."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Registration:
    """How a config builds a method: its config section, each field's rule, the builder, and
    what the rest of the package may ask of the method without building it.

    Attributes:
      defaults: () -> the section `config.method.<name>` (every field, with its default).
      rules: field -> rule (`lora_jax.config_rules`), checked before a run starts.
      build: (section, model family) -> the Method.
      peft: () -> its `PeftCodec` (None: saved in lora_jax's own format). A function, so that
        a codec in a file beside the method's may import that file.
      extends: the registered method whose section's fields this one's section repeats (a LoRA
        variant's targets, rank, ...): `config.share_settings` copies them across.
      inserts_tokens: it inserts tokens into language-model examples (needs an LM task).
      kernels: how it changes the base's Dense kernels (`ADDS`, `RESCALES`, `RESIDUAL`,
        `TRAINS`; None: not at all), which decides what it composes with (`CONFLICTS`).
      related: section -> problems between its own fields ('field = value: what is allowed'),
        checked with the config once each field's rule has passed (AdaLoRA's target_rank <=
        init_rank), so that its builder meets no value it refuses.
      reads_original_kernels: it reads the original weights of its targets (section's
        `targets`) and holds them in its own form (LoftQ quantizes them itself): a run loads
        them unquantized whatever model.quantize says.
    """

    defaults: Callable[[], Any]
    rules: Mapping[str, Callable[[Any], str | None]]
    build: Callable[[Any, Any], Method]
    peft: Callable[[], PeftCodec] | None = None
    extends: str | None = None
    inserts_tokens: bool = False
    kernels: str | None = None
    related: Callable[[Any], list[str]] | None = None
    reads_original_kernels: bool = False


# How a method changes the Dense kernels it targets (`Registration.kernels`). A stack must merge
# into the function it trains; `CONFLICTS` lists the pairs for which it would not.
ADDS = "adds"  # a term added to the layer's output, whatever its kernel (LoRA): terms commute
RESCALES = "rescales"  # a term that depends on the kernel (DoRA scales W0 + B A by its norm)
RESIDUAL = "residual"  # adds, and trains against a residual of the kernel it derives (PiSSA)
TRAINS = "trains"  # trains the kernels themselves in full (FT)

# (effect, effect of another method in the stack) -> why the two cannot run together.
CONFLICTS = {
    (RESCALES, effect): "{first} scales each kernel it adapts by the norm of W0 plus its own "
                        "update; {second}'s update of a kernel both adapt would be outside that "
                        "norm in training and inside it once merged, so the merged model would "
                        "compute another function than the one trained"
    for effect in (ADDS, RESCALES, RESIDUAL)
} | {
    (RESIDUAL, TRAINS): "{first} trains against a residual it derives from the kernels it "
                        "adapts, which must stay frozen, and {second} trains them in full",
}
