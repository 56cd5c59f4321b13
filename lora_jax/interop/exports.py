"""Trained methods on disk: PEFT's format where PEFT has the method, lora_jax's own otherwise.

One method alone, biases frozen, goes to PEFT's format where PEFT has it, and
`peft.PeftModel.from_pretrained` loads it:
  - LoRA and LoRA+ (which differs in training only): a PEFT LoRA adapter
    (`peft_adapters.export_peft`);
  - DoRA: the same with `use_dora` and its magnitudes;
  - PiSSA: converted, as PEFT's `path_initial_model_for_weight_conversion` does, to the rank-2r
    LoRA on the original base (`pissa.as_lora`), so the user keeps the original weights;
  - VeRA: a PEFT VeRA adapter with its shared projections (`peft_vera.export_vera`);
  - AdaLoRA: a PEFT AdaLoRA adapter of the kept triplets (`peft_adalora.export_adalora`);
  - prefix-only PreEmbed: a PEFT prompt-tuning adapter (`peft_adapters.export_prompt_tuning`).
Every other stack is written as a directory of two files:

    method_config.json          {"format": "lora_jax.methods/1", "method": <config.method>,
                                 "model_type": ..., "task": ..., "base_model_name_or_path": ...}
    method_params.safetensors   the trainable tree, one float32 tensor per leaf, keyed by its
                                '/'-joined path ('params/bert/encoder/layer_0/.../bias',
                                'adapter_h/h_0/attn/resid_dropout/down/kernel', ...)

`load` reads either back for the base params it was trained on, checking every tensor's path and
shape against a fresh `split` of those params.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from lora_jax.interop import peft_adalora, peft_adapters, peft_vera
from lora_jax.errors import FileFormatError
from lora_jax.json_files import read_json_object
from lora_jax.methods import base, build
from lora_jax.methods import adalora, dora, lora, pissa
from lora_jax.methods.lora import LoRA
from lora_jax.methods.prefix import VirtualTokens
from lora_jax.methods.vera import VeRA

FORMAT = "lora_jax.methods/1"
CONFIG_NAME = "method_config.json"
WEIGHTS_NAME = "method_params.safetensors"


def peft_compatible(stack: base.MethodStack) -> bool:
    """Whether PEFT's LoRA format holds the stack: LoRA alone or one of its variants that PEFT
    has (LoRA+, DoRA, PiSSA), biases frozen."""
    return (len(stack.methods) == 1 and isinstance(stack.methods[0], LoRA)
            and stack.methods[0].bias == "none")


def _dora_magnitudes(method: dora.DoRA, adapters: dict, frozen: dict) -> dict:
    """Module path -> DoRA magnitude over all outputs; an un-adapted part of a split output gets
    ||W0|| of its columns, i.e. its factor is 1 (see `methods.dora`)."""
    flat = traverse_util.flatten_dict(frozen)
    out = {}
    for module, adapter in lora.adapter_modules({"lora": adapters}).items():
        parts = method.spec.parts_for(base.join(module + ("kernel",)))
        magnitude = np.asarray(adapter[dora.MAGNITUDE], np.float32)
        if len(parts) > 1:
            norms = np.split(np.asarray(dora.column_norms(jax.device_get(flat[module +
                                                                               ("kernel",)]))),
                             len(parts))
            for p, j in lora.adapted_slots(parts):
                norms[p] = magnitude[j]
            magnitude = np.concatenate(norms)
        out[module] = magnitude
    return out


def prompt_tuning(stack: base.MethodStack, trainable: dict) -> bool:
    """Whether the stack is PEFT's prompt tuning: PreEmbed alone, prefix only, nothing else
    trained."""
    method = stack.methods[0] if len(stack.methods) == 1 else None
    return (isinstance(method, VirtualTokens) and not method.layers and method.infix == 0
            and not jax.tree_util.tree_leaves(trainable.get("params", {})))


def save(directory: str | os.PathLike, stack: base.MethodStack, method_config: Any,
         trainable: dict, *, model_type: str, task: str | None,
         base_model_name_or_path: str | None = None, frozen: dict | None = None) -> pathlib.Path:
    """Writes a trained stack (see the module docstring); replaces an earlier export there.

    Args:
      frozen: the stack's frozen tree; DoRA on split outputs, PiSSA and VeRA need it (their
        base norms, initial adapters, shared projections).

    Raises:
      FileExistsError: `directory` holds files an export does not write (nothing is changed).
      ValueError: `frozen` is needed and missing.
    """
    method = stack.methods[0] if len(stack.methods) == 1 else None
    needs_frozen = isinstance(method, (dora.DoRA, pissa.PiSSA, VeRA))
    if needs_frozen and frozen is None:
        raise ValueError(f"exporting {method.name} needs the stack's frozen tree (frozen=...)")
    info = dict(model_type=model_type, task=task, base_model_name_or_path=base_model_name_or_path)
    if isinstance(method, VeRA):
        return peft_vera.export_vera(directory, method, trainable, frozen[method.name], **info)
    if isinstance(method, adalora.AdaLoRA):
        return peft_adalora.export_adalora(directory, method, trainable, **info)
    if peft_compatible(stack):
        adapters, spec, magnitudes = trainable[method.name], method.spec, None
        if isinstance(method, pissa.PiSSA):
            spec, adapters = pissa.as_lora(spec, jax.device_get(frozen[method.name]["initial"]),
                                           jax.device_get(adapters))
        elif isinstance(method, dora.DoRA):
            magnitudes = _dora_magnitudes(method, adapters, frozen)
        return peft_adapters.export_peft(
            directory, spec, {"lora": adapters, "params": trainable.get("params", {})},
            magnitudes=magnitudes, **info)
    if prompt_tuning(stack, trainable):
        return peft_adapters.export_prompt_tuning(
            directory, jax.device_get(trainable[stack.methods[0].name]["embeddings"]),
            model_type=model_type, task=task, base_model_name_or_path=base_model_name_or_path)
    method = (method_config.to_dict() if isinstance(method_config, ml_collections.ConfigDict)
              else dict(method_config))
    record = {"format": FORMAT, "method": method, "model_type": model_type, "task": task,
              "base_model_name_or_path": base_model_name_or_path}
    tensors = {base.join(p): np.ascontiguousarray(np.asarray(v, np.float32))
               for p, v in traverse_util.flatten_dict(jax.device_get(trainable)).items()}
    return peft_adapters.write_adapter_dir(pathlib.Path(directory), record, tensors,
                                           config_name=CONFIG_NAME, weights_name=WEIGHTS_NAME)


def load(directory: str | os.PathLike, params: dict, family: Any,
         task: str | None) -> tuple[base.MethodStack, dict]:
    """(stack, trainable) of an export, for the base `params` it was trained on.

    A PEFT directory gives the method PEFT's config describes (LoRA, DoRA, PiSSA, VeRA, AdaLoRA,
    prompt tuning); a lora_jax one the stack its recorded method config builds. The frozen tree to run
    it with is `stack.frozen(params, trainable)`.

    Raises:
      FileNotFoundError: neither format's files are there.
      FileFormatError: a tensor missing, extra or of another shape than the stack has.
    """
    directory = pathlib.Path(directory)
    if peft_adapters.peft_type(directory) == "PROMPT_TUNING":
        embeddings = peft_adapters.load_prompt_tuning(directory)
        if embeddings.shape[1] != family.hidden_size(params):
            raise FileFormatError(f"{directory}: prompt embeddings of width {embeddings.shape[1]}"
                                  f" for a model of width {family.hidden_size(params)}")
        method = VirtualTokens(name="preembed", prefix=embeddings.shape[0], infix=0,
                               family=family)
        return base.MethodStack((method,)), {"params": {},
                                             method.name: {"embeddings": jax.numpy.asarray(
                                                 embeddings)}}
    if peft_adapters.peft_type(directory) == "ADALORA":
        method, trainable = peft_adalora.load_adalora(directory, params,
                                                      model_type=family.model_type, task=task)
        return base.MethodStack((method,)), trainable
    if peft_adapters.peft_type(directory) == "VERA":
        method, trainable = peft_vera.load_vera(directory, params, model_type=family.model_type,
                                                task=task)
        return base.MethodStack((method,)), trainable
    if (directory / peft_adapters.CONFIG_NAME).is_file():
        method, trainable = peft_adapters.load_peft_method(
            directory, params, model_type=family.model_type, task=task)
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
    expected = traverse_util.flatten_dict(
        jax.eval_shape(lambda: stack.split(params, jax.random.key(0))[1]))
    from lora_jax.interop.hub import read_safetensors  # deferred: hub imports the models

    tensors = read_safetensors(directory / WEIGHTS_NAME)
    paths = {base.join(p): p for p in expected}
    problems = [f"{k}: missing" for k in paths if k not in tensors]
    problems += [f"{k}: not a parameter of this stack" for k in tensors if k not in paths]
    problems += [f"{k}: {tensors[k].shape}, expected {expected[p].shape}" for k, p in paths.items()
                 if k in tensors and tensors[k].shape != expected[p].shape]
    if problems:
        raise FileFormatError(f"{directory / WEIGHTS_NAME} does not fit {stack.describe()} on "
                              "these params:\n  " + "\n  ".join(problems[:20]))
    bad = sorted(k for k, v in tensors.items() if not np.isfinite(np.asarray(v, np.float32)).all())
    if bad:
        raise FileFormatError(f"{directory / WEIGHTS_NAME} holds non-finite values in {bad}")
    trainable = traverse_util.unflatten_dict(
        {p: jax.numpy.asarray(tensors[k], np.float32) for k, p in paths.items()})
    return stack, trainable
