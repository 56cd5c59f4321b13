"""Every config field's allowed values, checked before a run touches its workdir.

`check_config` runs each field's rule from `RULES` (one entry per field of
`config.base_config()`, a test keeps them in step) and the rules that relate fields, and raises
one `ConfigError` listing every bad value with what would be allowed:

    config.train.eval_every = 0: must be an integer >= 1
    config.model.dtype = 'float16': must be one of 'float32', 'bfloat16'
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import ml_collections

from lora_jax.errors import ConfigError

Rule = Callable[[Any], str | None]
"""rule(value) -> None when the value is allowed, else what is allowed ('must be ...')."""


# --- Rules ------------------------------------------------------------------------------------

def integer(low: int | None = None, *, also: tuple = ()) -> Rule:
    """An int (not a bool) >= low; values in `also` (e.g. -1 for 'all') are allowed too."""

    def rule(value):
        if value in also and not isinstance(value, bool):
            return None
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            extra = "".join(f" or {a}" for a in also)
            return f"must be an integer >= {low}{extra}" if low is not None else "must be an integer"
        return None

    return rule


def number(low: float, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False, optional: bool = False) -> Rule:
    """A finite real number in the interval [low, high] (ends open as flagged)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    allowed = f"must be a finite number in {left}{low}, {high}{right}"

    def rule(value):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return allowed + (" or None" if optional else "")
        if value < low or (low_open and value == low) or value > high or (high_open and value == high):
            return allowed + (" or None" if optional else "")
        return None

    return rule


def one_of(*names: Any) -> Rule:
    def rule(value):
        return None if value in names else "must be one of " + ", ".join(map(repr, names))

    return rule


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def text(optional: bool = False) -> Rule:
    def rule(value):
        if isinstance(value, str) or (optional and value is None):
            return None
        return "must be a string" + (" or None" if optional else "")

    return rule


def _regex_error(pattern: Any) -> str | None:
    if not isinstance(pattern, str):
        return f"{pattern!r} is not a string"
    try:
        re.compile(pattern)
    except re.error as error:
        return f"{pattern!r} is not a valid regular expression ({error})"
    return None


def regexes(value) -> str | None:
    """A tuple of regular expressions that compile."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        return "must be a tuple of regular expressions"
    errors = [e for e in map(_regex_error, value) if e]
    return "; ".join(errors) or None


def pattern_table(value_rule: Rule) -> Rule:
    """{regular expression: value} with every key compiling and every value allowed."""

    def rule(value):
        if not isinstance(value, (dict, ml_collections.ConfigDict)):
            return "must be a mapping of regular expression -> value"
        errors = []
        for pattern, item in dict(value).items():
            errors.append(_regex_error(pattern))
            problem = value_rule(item)
            errors.append(problem and f"[{pattern!r}] = {item!r}: {problem}")
        return "; ".join(e for e in errors if e) or None

    return rule


def output_parts(value) -> str | None:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, bool) for v in value):
        return "must be a tuple of True/False, one per part of the fused output"
    return None if any(value) else "must adapt at least one part (a True)"


def buckets(value) -> str | None:
    ok = (isinstance(value, (tuple, list)) and value
          and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in value)
          and list(value) == sorted(set(value)))
    return None if ok else "must be a non-empty, strictly increasing tuple of integers >= 1"


def random_init(value) -> str | None:
    from lora_jax.hub import SUPPORTED_MODEL_TYPES  # deferred: hub imports the models

    fields = dict(value) if isinstance(value, (dict, ml_collections.ConfigDict)) else None
    if fields is None or fields.get("model_type") not in SUPPORTED_MODEL_TYPES:
        return ("must be Hugging Face config fields with model_type one of "
                + ", ".join(map(repr, SUPPORTED_MODEL_TYPES)))
    return None


def _tasks() -> tuple[str, ...]:
    from lora_jax.data.glue import TASKS

    return (*TASKS, "e2e")


def data_task(value) -> str | None:
    return one_of(*_tasks())(value)


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
    "model.remat": boolean,
    "model.attention_implementation": one_of(None, "cudnn"),
    "lora.targets": regexes,
    "lora.rank": integer(1),
    "lora.alpha": number(0, low_open=True),
    "lora.dropout": number(0, 1, high_open=True),
    "lora.init": one_of("gaussian", "kaiming"),
    "lora.rslora": boolean,
    "lora.rank_pattern": pattern_table(integer(1)),
    "lora.alpha_pattern": pattern_table(number(0, low_open=True)),
    "lora.split_outputs": pattern_table(output_parts),
    "lora.also_train": regexes,
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
    "train.checkpoint_every": integer(1),
    "train.keep_checkpoints": integer(0),  # 0: keep all, as 0 means 'all' elsewhere
    "mesh.data": integer(1, also=(-1,)),
    "mesh.fsdp": integer(1, also=(-1,)),
    # configs/e2e.py adds the decoding settings evaluate uses.
    "generate.beam_size": integer(1),
    "generate.length_penalty": number(-math.inf),
    "generate.no_repeat_ngram_size": integer(0),
    "generate.max_new_tokens": integer(1),
}
OPTIONAL_SECTIONS = ("generate",)


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """Dotted field name -> value; the pattern tables and random_init count as one field."""
    out = {}
    for name, value in config.items():
        dotted = prefix + name
        if isinstance(value, ml_collections.ConfigDict) and dotted not in RULES:
            out.update(_leaves(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _related(c: ml_collections.ConfigDict, device_count: int) -> list[str]:
    """Problems between fields (each field's own rule has passed)."""
    from lora_jax.data.glue import TASKS

    problems = []
    lm = c.data.task == "e2e"
    if lm and c.model.task is not None:
        problems.append(f"config.model.task = {c.model.task!r}: data.task 'e2e' trains GPT-2's "
                        "language model, which needs model.task None")
    if not lm and c.model.task != "classification":
        problems.append(f"config.model.task = {c.model.task!r}: GLUE task {c.data.task!r} needs "
                        "model.task 'classification'")
    if not lm and c.model.num_labels != TASKS[c.data.task].num_labels:
        problems.append(f"config.model.num_labels = {c.model.num_labels}: {c.data.task} has "
                        f"{TASKS[c.data.task].num_labels} (1 means regression)")
    if c.data.packing and not lm:
        problems.append(f"config.data.packing = True: packing applies to language-model tasks "
                        f"(e2e), not {c.data.task}")
    if c.data.max_len > max(c.data.buckets):
        problems.append(f"config.data.max_len = {c.data.max_len}: must be <= the largest of "
                        f"data.buckets {tuple(c.data.buckets)}")
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
    return problems


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
    leaves = _leaves(config)
    problems = []
    for name, value in leaves.items():
        rule = RULES.get(name)
        if rule is None:
            problems.append(f"config.{name}: no such field (known: see lora_jax/config.py)")
            continue
        problem = rule(value)
        if problem:
            problems.append(f"config.{name} = {value!r}: {problem}")
    missing = [n for n in RULES if n not in leaves and n.split(".")[0] not in OPTIONAL_SECTIONS]
    problems += [f"config.{n}: missing (every config starts from base_config())" for n in missing]
    if not problems:
        problems = _related(config, device_count)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
