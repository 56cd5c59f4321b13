"""Trained methods on disk: PEFT's format where PEFT has the method, lora_jax's own otherwise.

One method alone goes to PEFT's format when its registration names a PEFT codec
(`Registration.peft`) that can write it, and `peft.PeftModel.from_pretrained` loads it: LoRA and
LoRA+ (biases frozen) as a PEFT LoRA adapter, DoRA with its magnitudes, PiSSA converted to the
rank-2r LoRA on the original base, VeRA with its shared projections, AdaLoRA's kept triplets,
prefix-only PreEmbed as prompt tuning (each method's file, or the codec beside it, says how).
Every other stack is written as a directory of two files:

    method_config.json          {"format": "lora_jax.methods/1", "method": <config.method>,
                                 "model_type": ..., "task": ..., "base_model_name_or_path": ...}
    method_params.safetensors   the trainable tree, one float32 tensor per leaf, keyed by its
                                '/'-joined path ('params/bert/encoder/layer_0/.../bias',
                                'adapter_h/h_0/attn/resid_dropout/down/kernel', ...)

`load` reads either back for the base params it was trained on: a PEFT directory through the
codec that claims its config (one table, `peft_codecs`, from the registry), a lora_jax one by
building its recorded method config and checking every tensor's path and shape against a fresh
`split` of those params.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from lora_jax.errors import FileFormatError, OtherBase
from lora_jax.interop import peft_adapters
from lora_jax.interop.hub import read_safetensors
from lora_jax.json_files import read_json_object
from lora_jax.methods import METHODS, base, build

FORMAT = "lora_jax.methods/1"
CONFIG_NAME = "method_config.json"
WEIGHTS_NAME = "method_params.safetensors"


def peft_codecs() -> dict[str, list[base.PeftCodec]]:
    """PEFT type -> the codecs that read it, in registry order, from every registered method's
    `Registration.peft` (read at call time, so a method registered later is included)."""
    table: dict[str, list[base.PeftCodec]] = {}
    for registration in METHODS.values():
        codec = registration.peft() if registration.peft else None
        for peft_type in codec.peft_types if codec else ():
            if codec not in table.setdefault(peft_type, []):
                table[peft_type].append(codec)
    return table


def _writer(stack: base.MethodStack) -> tuple[base.Method | None, base.PeftCodec | None]:
    """The stack's one method and its registered PEFT codec (None, None for several methods)."""
    if len(stack.methods) != 1:
        return None, None
    method = stack.methods[0]
    registration = METHODS.get(method.name)
    return method, registration.peft() if registration and registration.peft else None


def save(directory: str | os.PathLike, stack: base.MethodStack, method_config: Any,
         trainable: dict, *, model_type: str, task: str | None,
         base_model_name_or_path: str | None = None, frozen: dict | None = None,
         base_record: dict | None = None) -> pathlib.Path:
    """Writes a trained stack (see the module docstring); replaces an earlier export there.

    Args:
      frozen: the stack's frozen tree; a codec that says so needs it (DoRA's base norms on split
        outputs, PiSSA's initial adapters, VeRA's shared projections).
      base_record: the fingerprint of the base the stack was trained on (a run's
        `inputs.json` 'base' entry: its checkpoint files' sizes and SHA-256), written beside
        the adapters as base_model.json, so that `load` can tell another base.

    Raises:
      FileExistsError: `directory` holds files an export does not write (nothing is changed).
      ValueError: `frozen` is needed and missing.
    """
    method, codec = _writer(stack)
    if codec is not None and codec.needs_frozen and frozen is None:
        raise ValueError(f"exporting {method.name} needs the stack's frozen tree (frozen=...)")
    if codec is not None and codec.writes(method, trainable):
        written = codec.save(pathlib.Path(directory), method, trainable, frozen,
                             model_type=model_type, task=task,
                             base_model_name_or_path=base_model_name_or_path)
        return _record_base(written, base_record)
    section = (method_config.to_dict() if isinstance(method_config, ml_collections.ConfigDict)
               else dict(method_config))
    record = {"format": FORMAT, "method": section, "model_type": model_type, "task": task,
              "base_model_name_or_path": base_model_name_or_path}
    tensors = {base.join(p): np.ascontiguousarray(np.asarray(v, np.float32))
               for p, v in traverse_util.flatten_dict(jax.device_get(trainable)).items()}
    written = peft_adapters.write_adapter_dir(pathlib.Path(directory), record, tensors,
                                              config_name=CONFIG_NAME, weights_name=WEIGHTS_NAME)
    return _record_base(written, base_record)


def _record_base(directory: pathlib.Path, record: dict | None) -> pathlib.Path:
    """Writes the base's fingerprint beside a fresh export (atomically: a reader sees the whole
    file or none; the export's directory was just swapped in, without an older record)."""
    if record is not None:
        path = directory / peft_adapters.BASE_RECORD_NAME
        staging = path.with_name(path.name + ".tmp")
        staging.write_text(json.dumps({"base": record}, indent=2, sort_keys=True) + "\n")
        staging.replace(path)
    return directory


def base_differences(recorded: dict, current: dict) -> list[str]:
    """What differs between two base fingerprints, a line each (empty: the same base). The same
    files in another directory are the same base."""
    lines = []
    if bool(recorded.get("random_init")) != bool(current.get("random_init")):
        kind = lambda r: "random weights" if r.get("random_init") else "a checkpoint"
        lines.append(f"trained on {kind(recorded)}, loaded on {kind(current)}")
    old, new = recorded.get("files", {}), current.get("files", {})
    for name in sorted(old.keys() | new.keys()):
        if old.get(name) != new.get(name):
            show = lambda e: "absent" if e is None else f"sha256 {e['sha256'][:12]}"
            lines.append(f"{name}: trained on {show(old.get(name))} in {recorded.get('dir')}, "
                         f"loaded on {show(new.get(name))} in {current.get('dir')}")
    return lines


def check_base(directory: pathlib.Path, current: dict | None, strict: bool) -> None:
    """Compares an export's recorded base with `current` (a fingerprint of the base it is
    loaded on): another base warns, or with `strict` raises. No record, or no `current`:
    nothing to compare (exports from before the record existed load as they did)."""
    path = directory / peft_adapters.BASE_RECORD_NAME
    if current is None or not path.is_file():
        return
    recorded = read_json_object(path, what="record of an export's base",
                                required=("base",))["base"]
    differences = base_differences(recorded, current)
    if differences:
        message = (f"{directory} holds adapters trained on another base than this one; its "
                   "outputs here would belong to neither:\n  " + "\n  ".join(differences))
        if strict:
            raise OtherBase(message)
        warnings.warn(message, stacklevel=3)


def load(directory: str | os.PathLike, params: dict, family: Any, task: str | None, *,
         base_record: dict | None = None,
         strict_base: bool = False) -> tuple[base.MethodStack, dict]:
    """(stack, trainable) of an export, for the base `params` it was trained on.

    `base_record`: the fingerprint of the base `params` come from (`save`'s); where the export
    records another base, a warning names both, or with `strict_base` an `OtherBase` error.

    A PEFT directory gives the method whose codec claims its config (LoRA, DoRA, PiSSA, VeRA,
    AdaLoRA, prompt tuning); a lora_jax one the stack its recorded method config builds. The
    frozen tree to run it with is `stack.frozen(params, trainable)`.

    Raises:
      FileNotFoundError: neither format's files are there.
      ValueError: a PEFT adapter no registered method reads.
      FileFormatError: a tensor missing, extra or of another shape than the stack has.
    """
    directory = pathlib.Path(directory)
    check_base(directory, base_record, strict_base)
    config = peft_adapters.adapter_config(directory)
    if config is not None:
        peft_type = config.get("peft_type")
        readers = [c for c in peft_codecs().get(peft_type, []) if c.claims(config)]
        readers = [c for c in readers if not c.fallback] or readers
        if not readers:
            raise ValueError(f"{directory} holds a {peft_type!r} adapter; here only peft_type "
                             f"{' or '.join(map(repr, peft_codecs()))} can be loaded")
        method, trainable = readers[0].load(directory, params, family, task)
        return base.MethodStack((method,)), trainable
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory} holds no trained method ({CONFIG_NAME} or "
                                f"{peft_adapters.CONFIG_NAME})")
    record = read_json_object(directory / CONFIG_NAME, what="lora_jax method export",
                              required=("format", "method"))
    if record["format"] != FORMAT:
        raise FileFormatError(f"{directory / CONFIG_NAME} has format {record['format']!r}; this "
                              f"version reads {FORMAT!r}")
    stack = build(ml_collections.ConfigDict(record["method"]), family)
    return stack, _read_tensors(directory / WEIGHTS_NAME, stack, params)


def _read_tensors(path: pathlib.Path, stack: base.MethodStack, params: dict) -> dict:
    """The trainable tree in `path`, each tensor checked against a fresh split of `params`."""
    expected = traverse_util.flatten_dict(
        jax.eval_shape(lambda: stack.split(params, jax.random.key(0))[1]))
    tensors = read_safetensors(path)
    paths = {base.join(p): p for p in expected}
    problems = [f"{k}: missing" for k in paths if k not in tensors]
    problems += [f"{k}: not a parameter of this stack" for k in tensors if k not in paths]
    problems += [f"{k}: {tensors[k].shape}, expected {expected[p].shape}" for k, p in paths.items()
                 if k in tensors and tensors[k].shape != expected[p].shape]
    if problems:
        raise FileFormatError(f"{path} does not fit {stack.describe()} on these params:\n  "
                              + "\n  ".join(problems[:20]))
    bad = sorted(k for k, v in tensors.items() if not np.isfinite(np.asarray(v, np.float32)).all())
    if bad:
        raise FileFormatError(f"{path} holds non-finite values in {bad}")
    return traverse_util.unflatten_dict(
        {p: jax.numpy.asarray(tensors[k], np.float32) for k, p in paths.items()})
