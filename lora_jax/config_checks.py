"""Every config field's allowed values, checked before a run touches its workdir.

`check_config` runs each field's rule from `rules()` (one entry per field of
`config.base_config()`, a test keeps them in step) and the rules that relate fields, and raises
one `ConfigError` listing every bad value with what would be allowed:

    config.train.eval_every = 0: must be an integer >= 1
    config.model.dtype = 'float16': must be one of 'float32', 'bfloat16'

What only the model can judge (a method's targets against its kernels, ranks against their
sizes) `check_against_base` checks once the base is built, still before anything is written.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from lora_jax.config_rules import (Rule, boolean, buckets, integer, number, one_of, regexes,
                                   text)
from lora_jax.errors import ConfigError
from lora_jax.methods import METHODS, MethodStack
from lora_jax.methods.base import CONFLICTS, SettingError
from lora_jax.quant.kernels import QUANTIZE_OPTIONS


# --- Rules of this config's own fields --------------------------------------------------------

def random_init(value) -> str | None:
    from lora_jax.models import FAMILIES  # deferred: importing the models costs a second

    fields = dict(value) if isinstance(value, (dict, ml_collections.ConfigDict)) else None
    if fields is None or fields.get("model_type") not in FAMILIES:
        return ("must be Hugging Face config fields with model_type one of "
                + ", ".join(map(repr, FAMILIES)))
    return None


def _tasks() -> tuple[str, ...]:
    from lora_jax.data.tasks import TASKS  # deferred: the data readers cost an import

    return tuple(TASKS)


def data_task(value) -> str | None:
    return one_of(*_tasks())(value)


def method_names(value) -> str | None:
    if (isinstance(value, str) or not isinstance(value, (tuple, list)) or not value
            or any(name not in METHODS for name in value) or len(set(value)) != len(value)):
        return ("must be a non-empty tuple of distinct method names from "
                + ", ".join(map(repr, METHODS)))
    return None


# --- The table --------------------------------------------------------------------------------

DTYPE_NAMES = ("float32", "bfloat16")

RULES: dict[str, Rule] = {
    "seed": integer(0),
    "model.name": text(),
    "model.random_init": random_init,
    "model.task": one_of(None, "classification"),
    "model.num_labels": integer(1),
    "model.tokenizer": text(optional=True),
    "model.dtype": one_of(*DTYPE_NAMES),
    "model.param_dtype": one_of(*DTYPE_NAMES),
    "model.quantize": one_of(*QUANTIZE_OPTIONS),
    "model.double_quant": boolean,
    "model.remat": boolean,
    "model.scan_layers": boolean,
    "model.attention_implementation": one_of(None, "cudnn"),
    "method.use": method_names,
    "method.also_train": regexes,
    "data.task": data_task,
    "data.source": one_of("files", "hub"),
    "data.data_dir": text(optional=True),
    "data.max_len": integer(1),
    "data.buckets": buckets,
    "data.batch_size": integer(1),
    "data.eval_batch_size": integer(1),
    "data.max_train_examples": integer(0),
    "data.max_eval_examples": integer(0),
    "data.on_malformed": one_of("error", "skip"),
    "data.packing": boolean,
    "data.path": text(optional=True),
    "data.eval_path": text(optional=True),
    "data.eval_fraction": number(0, 1, low_open=True, high_open=True),
    "data.template": one_of("auto", "alpaca", "chat"),
    "optim.lr": number(0),
    "optim.warmup_ratio": number(0, 1),
    "optim.warmup_steps": integer(0),
    "optim.weight_decay": number(0),
    "optim.b1": number(0, 1, high_open=True),
    "optim.b2": number(0, 1, high_open=True),
    "optim.eps": number(0, low_open=True),
    "optim.clip_norm": number(0, low_open=True, optional=True),
    "optim.label_smoothing": number(0, 1, high_open=True),
    "optim.grad_accum": integer(1),
    "train.epochs": integer(0),
    "train.max_steps": integer(0),
    "train.log_every": integer(1),
    "train.eval_every": integer(1),
    "train.eval_at_start": boolean,
    "train.checkpoint_every": integer(1),
    "train.keep_checkpoints": integer(0),
    "train.compilation_cache": text(),  # 0: keep all, as 0 means 'all' elsewhere
    "mesh.data": integer(1, also=(-1,)),
    "mesh.fsdp": integer(1, also=(-1,)),
    # configs/e2e.py adds the decoding settings evaluate uses.
    "generate.beam_size": integer(1),
    "generate.length_penalty": number(-math.inf),
    "generate.no_repeat_ngram_size": integer(0),
    "generate.max_new_tokens": integer(1),
}
OPTIONAL_SECTIONS = ("generate",)


def method_rules() -> dict[str, Rule]:
    """Each method's section, config.method.<name>.<field>, with the rules its file declares,
    for the methods registered now (read at call time, like `config.base_config()`)."""
    return {f"method.{name}.{field}": rule for name, registration in METHODS.items()
            for field, rule in registration.rules.items()}


def rules() -> dict[str, Rule]:
    """Every field's rule: `RULES` (the config's own fields) and the sections of the methods
    registered now (not when this module was imported: a test registers one for a while)."""
    return {**RULES, **method_rules()}


def _leaves(config: ml_collections.ConfigDict, prefix: str = "",
            known: dict[str, Rule] | None = None) -> dict[str, Any]:
    """Dotted field name -> value; the pattern tables and random_init count as one field."""
    known = rules() if known is None else known
    out = {}
    for name, value in config.items():
        dotted = prefix + name
        if isinstance(value, ml_collections.ConfigDict) and dotted not in known:
            out.update(_leaves(value, dotted + ".", known))
        else:
            out[dotted] = value
    return out


def _quantize_problems(model: ml_collections.ConfigDict) -> list[str]:
    """What `model.quantize` and `model.double_quant` do not allow with the other model fields."""
    problems = []
    quantize = model.get("quantize", "none")  # .get: configs saved before the field existed
    if quantize != "none" and not model.name:
        problems.append(f"config.model.quantize = {quantize!r}: quantization applies to a loaded "
                        "checkpoint, and model.name is '' (random weights)")
    elif quantize == "gguf" and not _names_gguf(model.name):
        problems.append(f"config.model.quantize = 'gguf': it keeps a GGUF file's own blocks, and "
                        f"model.name {model.name!r} is not a GGUF file (use 'nf4' or 'int8')")
    if model.get("double_quant", False) and quantize != "nf4":
        problems.append(f"config.model.double_quant = True: it quantizes nf4's block scales, and "
                        f"model.quantize is {quantize!r}")
    return problems


def _scan_problems(model: ml_collections.ConfigDict) -> list[str]:
    """model.scan_layers for random weights of a family that does not scan its blocks (a
    checkpoint's family is known once it is read: loading refuses it then, before any step)."""
    from lora_jax.interop import hub  # deferred: config checks stay light to import

    model_type = dict(model.random_init).get("model_type")
    if not model.get("scan_layers", False) or model.name or model_type is None:
        return []
    scanning = hub.scanning_families()
    if model_type in scanning:
        return []
    return [f"config.model.scan_layers = True: it is implemented for {', '.join(scanning)}, "
            f"and model.random_init's model_type is {model_type!r}"]


def _names_gguf(name: str) -> bool:
    """Whether a model name is a GGUF file, directly or as a packaged short name."""
    from lora_jax.interop import hub  # deferred: config checks stay light to import

    try:
        return hub.is_gguf(hub.checkpoint_path(name))
    except FileNotFoundError:  # a packaged checkpoint not installed: loading says so
        return hub.is_gguf(name)


def _related(c: ml_collections.ConfigDict, device_count: int) -> list[str]:
    """Problems between fields (each field's own rule has passed)."""
    from lora_jax.data.tasks import TASKS

    problems = []
    entry = TASKS[c.data.task]
    lm = entry.model_task is None
    if lm and c.model.task is not None:
        problems.append(f"config.model.task = {c.model.task!r}: data.task {c.data.task!r} trains "
                        "a language model, which needs model.task None")
    for field, holds in entry.required.items():
        if not c.data[field]:
            problems.append(f"config.data.{field} = {c.data[field]!r}: data.task "
                            f"{c.data.task!r} reads its records from data.{field}, {holds}")
    if not lm and c.model.task != entry.model_task:
        problems.append(f"config.model.task = {c.model.task!r}: data.task {c.data.task!r} trains "
                        f"a {entry.kind} head, which needs model.task {entry.model_task!r}")
    if not lm and c.model.num_labels != entry.num_labels:
        problems.append(f"config.model.num_labels = {c.model.num_labels}: {c.data.task} has "
                        f"{entry.num_labels} (1 means regression)")
    inserting = [name for name in c.method.use if METHODS[name].inserts_tokens]
    if inserting and not lm:
        problems.append(f"config.method.use = {tuple(c.method.use)!r}: {', '.join(inserting)} "
                        "insert tokens into language-model examples (data.task 'e2e' or "
                        "'instruct'), not "
                        f"{c.data.task}")
    if c.data.packing and not lm:
        lm_tasks = ", ".join(name for name, e in TASKS.items() if e.model_task is None)
        problems.append(f"config.data.packing = True: packing applies to language-model tasks "
                        f"({lm_tasks}), not {c.data.task}")
    if c.data.max_len > max(c.data.buckets):
        problems.append(f"config.data.max_len = {c.data.max_len}: must be <= the largest of "
                        f"data.buckets {tuple(c.data.buckets)}")
    problems += _quantize_problems(c.model)
    problems += _scan_problems(c.model)
    if not c.model.name and c.model.tokenizer is None:
        problems.append("config.model.tokenizer = None: a randomly initialised model "
                        "(model.name '') needs a tokenizer name")
    if c.train.max_steps == 0 and c.train.epochs == 0:
        problems.append("config.train.epochs = 0: with train.max_steps 0 the run would train no "
                        "step; set one of them >= 1")
    if c.data.batch_size % c.optim.grad_accum:
        problems.append(f"config.optim.grad_accum = {c.optim.grad_accum}: must divide "
                        f"data.batch_size {c.data.batch_size}")
    elif (c.data.batch_size // c.optim.grad_accum) % device_count:
        problems.append(f"config.data.batch_size = {c.data.batch_size}: each micro-batch "
                        f"(batch_size / grad_accum) must split evenly over the {device_count} "
                        "devices")
    if c.data.eval_batch_size % device_count:
        problems.append(f"config.data.eval_batch_size = {c.data.eval_batch_size}: must split "
                        f"evenly over the {device_count} devices")
    if c.mesh.data == -1 and c.mesh.fsdp == -1:
        problems.append("config.mesh.data = -1 and config.mesh.fsdp = -1: give one a size")
    for axis in ("data", "fsdp"):
        if c.mesh[axis] != -1 and device_count % c.mesh[axis]:
            problems.append(f"config.mesh.{axis} = {c.mesh[axis]}: must divide the "
                            f"{device_count} devices")
    return problems + _methods_together(c.method)


def _methods_together(c: ml_collections.ConfigDict) -> list[str]:
    """Problems between the fields of each used method's section (`Registration.related`) and
    between the methods of the stack (`base.CONFLICTS`: pairs that would merge into another
    function than the one they train)."""
    use = tuple(c.use)
    problems = []
    for name in use:
        if METHODS[name].related is not None:
            problems += [f"config.method.{name}.{p}" for p in METHODS[name].related(c[name])]
    for i, first in enumerate(use):
        for second in use[i + 1:]:
            for a, b in ((first, second), (second, first)):
                why = CONFLICTS.get((METHODS[a].kernels, METHODS[b].kernels))
                if why:
                    problems.append(f"config.method.use = {use!r}: {a} and {b} cannot run "
                                    f"together: {why.format(first=a, second=b)}")
                    break
    return problems


def _shown(value: Any) -> Any:
    """A config value as one line shows it (a pattern table as a dict)."""
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def refusal(config: ml_collections.ConfigDict, error: SettingError) -> ConfigError:
    """The ConfigError naming config.method.<error.method>.<error.field>, the field behind a
    method's `SettingError`, in `check_config`'s form."""
    return _invalid([_setting_line(config, error.method, error)])


def _setting_line(config: ml_collections.ConfigDict, method: str | None,
                  error: SettingError) -> str:
    """'config.method.<method>.<field> = value: message' (method None: a field of
    config.method itself, such as also_train)."""
    section = config.method if method is None else config.method[method]
    dotted = "method." + ("" if method is None else f"{method}.") + error.field
    if error.field not in section:  # a method's own name for what its section sets otherwise
        return f"config.{dotted}: {error}"
    return f"config.{dotted} = {_shown(section[error.field])!r}: {error}"


def _invalid(problems: list[str]) -> ConfigError:
    return ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _trained_quantized(config: ml_collections.ConfigDict, params: Any, family: Any) -> list[str]:
    """A line per method that would train in full a leaf of a module whose kernel is held
    quantized (full fine-tuning, FT^TopK, BitFit's biases): a quantized kernel cannot take an
    update, and QLoRA's recipe keeps those modules frozen whole."""
    from flax import traverse_util

    from lora_jax.quant.kernels import is_quantized

    flat = traverse_util.flatten_dict(params)
    quantized = {p[:-1] for p, leaf in flat.items() if is_quantized(leaf)}
    if not quantized:
        return []
    problems = []
    for name in config.method.use:
        try:
            method = METHODS[name].build(config.method[name], family)
            trained = MethodStack((method,)).trained_in_full(params)
        except SettingError:
            continue  # reported by the check of the method's own settings
        hit = sorted("/".join(p) for p in trained if p[:-1] in quantized)
        if hit:
            problems.append(
                f"config.model.quantize = {config.model.quantize!r}: method {name!r} trains "
                f"{len(hit)} leaves of quantized modules in full (e.g. {hit[0]}); quantized "
                "kernels stay frozen: use model.quantize 'none', or a method that adds to the "
                "frozen weights (lora, dora, adapters, ...)")
    return problems


def check_against_base(config: ml_collections.ConfigDict, params: Any, family: Any) -> None:
    """Raises a `ConfigError` naming each method setting the base model does not allow: what
    `check_config` cannot judge before the model is loaded (a target matching none of its
    kernels, a rank over a kernel's size, AdapterDrop dropping every block). The trainer calls
    it once the base is built, before anything is written.

    Each method is built and splits `params` in shapes only (`jax.eval_shape`, nothing
    computed), so the methods' own checks decide: each raises a `SettingError` naming its field.

    Args:
      config: a training config that `check_config` passed.
      params: the base model's parameters (arrays or ShapeDtypeStructs).
      family: its model family.
    """
    import jax  # deferred, as in check_config

    problems = _trained_quantized(config, params, family)
    if problems:  # before the methods split a quantized kernel they cannot hold
        raise _invalid(problems)
    also_train = tuple(config.method.also_train)
    try:
        MethodStack((), also_train).trained_in_full(params)
    except SettingError as error:
        problems.append(_setting_line(config, None, error))
        also_train = ()
    for name in config.method.use:
        try:
            stack = MethodStack((METHODS[name].build(config.method[name], family),), also_train)
            jax.eval_shape(stack.split, params, jax.random.key(0))
        except SettingError as error:
            problems.append(_setting_line(config, name, error))
    if problems:
        raise _invalid(problems)


def check_config(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raises a `ConfigError` naming every field whose value is not allowed.

    Args:
      config: a training config (`config.base_config()` with values set).
      device_count: the devices the batch is split over; default `jax.device_count()`.

    Raises:
      ConfigError: one line per bad value: field, value, what is allowed. A field the rules do
        not know (or a missing one) is an error too, so a new field cannot go unchecked.
    """
    if device_count is None:
        import jax

        device_count = jax.device_count()
    known = rules()
    leaves = _leaves(config, known=known)
    problems = []
    for name, value in leaves.items():
        rule = known.get(name)
        if rule is None:
            problems.append(f"config.{name}: no such field (known: see lora_jax/config.py)")
            continue
        problem = rule(value)
        if problem:
            problems.append(f"config.{name} = {value!r}: {problem}")
    missing = [n for n in known if n not in leaves and n.split(".")[0] not in OPTIONAL_SECTIONS]
    problems += [f"config.{n}: missing (every config starts from base_config())" for n in missing]
    if not problems:
        problems = _related(config, device_count)
    if problems:
        raise _invalid(problems)
