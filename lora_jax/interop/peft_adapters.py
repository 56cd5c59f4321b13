"""PEFT adapter directories, whatever the method: names, config fields, modules to save, reading
and writing. Each method's own mapping (which tensors, which config fields) is in its file under
`lora_jax/methods` (`Registration.peft`), built on these.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, whose keys
name the Hugging Face module each tensor belongs to (adapter name removed, as `save_pretrained`
writes them):

    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight   (r, d_in)    float32
    base_model.model.transformer.h.0.attn.c_attn.lora_B.weight   (d_out, r)
    base_model.model.classifier.out_proj.weight                  a `modules_to_save` tensor

Our module paths become HF module names by `hub.hf_module_name`, under the family's `peft_root`
(GPT-2's 'transformer.': our root is HF's `transformer`); encoder paths need no prefix (task
models already start with `roberta/` or `bert/`).
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

from lora_jax.errors import FileFormatError
from lora_jax.interop import hub
from lora_jax.json_files import read_json_object
from lora_jax.models import family as model_family

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."  # before every module's tensors
# PEFT features that change the adapted function beyond W0 + s B A; refused on load. Among them
# every LoRA variant of PEFT's (its LoraConfig fields marked `is_lora_variant`; KaSA also
# truncates the base weight) but DoRA, which a caller allows.
_UNSUPPORTED = ("use_dora", "lora_bias", "layer_replication", "target_parameters",
                "trainable_token_indices", "alora_invocation_tokens", "use_bdlora",
                "arrow_config", "kasa_config", "monteclora_config", "velora_config", "use_qalora")


def hf_root(model_type: str, task: str | None) -> str:
    """Prefix turning `hf_module_name` of our paths into names inside the HF model PEFT wraps."""
    family = model_family(model_type)
    family.check_task(task)
    return family.peft_root


def most_common(per_module: dict, default: Any) -> Any:
    """The value most modules share: the config's default, leaving the fewest pattern entries."""
    if not per_module:
        return default
    return collections.Counter(per_module.values()).most_common(1)[0][0]


def json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _saved_module(path: tuple[str, ...], model_type: str, task: str | None) -> tuple[str, ...]:
    """The module PEFT's `modules_to_save` must name for a fully-trained leaf."""
    if task == "classification" and path[0] != model_family(model_type).base_prefix:
        return path[:1]  # a head: PEFT's SEQ_CLS wraps the whole 'classifier' anyway
    return path[:-1]


def config_fields(peft_type: str, model_type: str, task: str | None,
                  base_model_name_or_path: str | None, saved: list) -> dict:
    """The adapter_config.json fields every PEFT adapter we write shares: type, task, base,
    kernel orientation, modules to save, and PEFT's options we never use."""
    family = model_family(model_type)
    return {"peft_type": peft_type, "task_type": family.peft_task_types[task],
            "base_model_name_or_path": base_model_name_or_path,
            "fan_in_fan_out": not family.transposed_kernels,  # GPT-2's Conv1D holds (d_in, d_out)
            "bias": "none", "modules_to_save": list(saved) or None,
            "layers_to_transform": None, "layers_pattern": None, "inference_mode": True}


def modules_to_save(trained: dict, model_type: str, task: str | None) -> tuple[list, dict]:
    """(PEFT's `modules_to_save`, their tensors by PEFT key) for the leaves trained in full.

    Raises:
      ValueError: GPT-2's tied `wte` trained in full (PEFT would untie it).
    """
    root, family = hf_root(model_type, task), model_family(model_type)
    saved, tensors = {}, {}  # an ordered set of modules
    for path, value in traverse_util.flatten_dict(trained).items():
        if path[0] == family.tied_embedding:
            raise ValueError(f"{model_type}'s {path[0]} is tied to the LM head, but a PEFT module "
                             "to save is not: the trained embedding cannot be exported as a PEFT "
                             "adapter")
        saved[root + hub.hf_module_name("/".join(_saved_module(path, model_type, task)))] = None
        value = np.asarray(value, np.float32)
        if path[-1] == "kernel" and family.transposed_kernels:
            value = value.T  # torch Linear stores (d_out, d_in); GPT-2's Conv1D does not
        module = root + hub.hf_module_name("/".join(path[:-1]))
        tensors[f"{PREFIX}{module}.{hub.LEAF_NAMES[path[-1]][0]}"] = value
    return list(saved), tensors


# What an export directory may hold from an earlier export (PEFT's files or lora_jax's own): it
# is replaced whole; anything else there is the user's and stops the export.
# Beside either format: the fingerprint of the base the adapters were trained on (lora_jax's;
# PEFT ignores files it does not know).
BASE_RECORD_NAME = "base_model.json"
EXPORT_NAMES = {CONFIG_NAME, WEIGHTS_NAME, "method_config.json", "method_params.safetensors",
                BASE_RECORD_NAME}


def write_adapter_dir(directory: pathlib.Path, config: dict, tensors: dict, *,
                      config_name: str = CONFIG_NAME, weights_name: str = WEIGHTS_NAME,
                      metadata: dict | None = None) -> pathlib.Path:
    """Writes `config` (JSON) and `tensors` (safetensors) as a new `directory`, atomically.

    Files go to a temporary sibling first and whole directories are swapped, so a reader never
    sees new weights with an old config, and a failed export leaves what was there.

    Raises:
      FileExistsError: `directory` holds files no export writes (nothing is changed).
    """
    if directory.exists():
        if not directory.is_dir():
            raise FileExistsError(f"{directory} exists and is not a directory")
        foreign = sorted(p.name for p in directory.iterdir()
                         if p.name not in EXPORT_NAMES or not p.is_file())
        if foreign:
            raise FileExistsError(
                f"{directory} exists and holds {foreign}, which an adapter export does not write; "
                "export to a new or empty directory (nothing was changed)"
            )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    old = staging.with_name(staging.name + ".old")
    try:
        tensors = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}
        safetensors.numpy.save_file(tensors, staging / weights_name, metadata=metadata)
        (staging / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            directory.rename(old)
        staging.rename(directory)
    except BaseException:
        if old.exists() and not directory.exists():
            old.rename(directory)  # put the earlier export back
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return directory


def adapter_config(directory: str | os.PathLike) -> dict | None:
    """A directory's adapter_config.json (None: no such file)."""
    path = pathlib.Path(directory) / CONFIG_NAME
    if not path.is_file():
        return None
    return read_json_object(path, what="PEFT adapter config")


def peft_type(directory: str | os.PathLike) -> str | None:
    """The peft_type a directory's adapter_config.json names (None: no such file)."""
    config = adapter_config(directory)
    return None if config is None else config.get("peft_type")


def read_adapter(directory: pathlib.Path, *, peft_types: tuple[str, ...] = ("LORA",),
                  allowed: tuple[str, ...] = ()) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, tensors as float32) of a PEFT adapter directory of one of `peft_types`, checked:
    both files there (a pickle refused, never opened), no PEFT feature we do not implement
    unless `allowed`, a rank and alpha that are numbers, every tensor finite.

    Raises:
      FileNotFoundError: the directory or a file is missing, or the weights are a pickle.
      ValueError: another peft_type, or an unsupported feature.
      FileFormatError: a field missing or of the wrong kind, or a non-finite tensor.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"PEFT adapter directory {directory} does not exist")
    if not (directory / WEIGHTS_NAME).is_file():
        if (directory / PICKLE_NAME).is_file():
            raise FileNotFoundError(
                f"{directory} has only {PICKLE_NAME}, a pickle; lora_jax reads safetensors only "
                "and did not unpickle it, since unpickling can run arbitrary code. Convert once "
                f"with PEFT: PeftModel.from_pretrained(base, '{directory}')"
                f".save_pretrained('{directory}', safe_serialization=True)"
            )
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}")
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}")
    config = read_json_object(directory / CONFIG_NAME, what="PEFT adapter config")
    if config.get("peft_type") not in peft_types:
        raise ValueError(f"{directory} holds a {config.get('peft_type')!r} adapter; here only "
                         f"peft_type {' or '.join(map(repr, peft_types))} can be loaded")
    used = [f for f in _UNSUPPORTED if config.get(f) and f not in allowed]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r}")
    if used:
        raise ValueError(f"{directory} uses PEFT features lora_jax does not implement: {used}")
    required = ("r", "lora_alpha") if config["peft_type"] == "LORA" else ("r",)
    missing = [key for key in required if key not in config]
    if missing:
        raise FileFormatError(f"{directory / CONFIG_NAME} lacks {', '.join(map(repr, missing))}, "
                              f"which a PEFT {config['peft_type']} adapter config must have")
    if isinstance(config["r"], bool) or not isinstance(config["r"], int) or config["r"] < 1:
        raise FileFormatError(f"{directory / CONFIG_NAME}: r = {config['r']!r}, not a rank >= 1")
    alpha = config.get("lora_alpha", 1)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise FileFormatError(f"{directory / CONFIG_NAME}: lora_alpha = {alpha!r}, not a number")
    tensors = {k: np.asarray(v, np.float32)
               for k, v in hub.read_safetensors(directory / WEIGHTS_NAME).items()}
    bad = sorted(k for k, v in tensors.items() if not np.isfinite(v).all())
    if bad:
        raise FileFormatError(f"{directory / WEIGHTS_NAME} holds non-finite values (NaN or inf) "
                              f"in {', '.join(bad)}: the adapter is unusable")
    return config, tensors


def _full_tensor(directory: pathlib.Path, key: str, value: np.ndarray, path: tuple[str, ...],
                 flat: dict, model_type: str) -> np.ndarray:
    """A `modules_to_save` tensor in our layout, checked against the base parameter.

    Raises:
      FileFormatError: another shape than the base's (both in the file's layout), e.g. a head
        trained for another number of labels.
    """
    # torch Linear stores (d_out, d_in); GPT-2's Conv1D stores the kernel as we do.
    transposed = path[-1] == "kernel" and model_family(model_type).transposed_kernels
    expected = tuple(flat[path].shape)[::-1] if transposed else tuple(flat[path].shape)
    if value.shape != expected:
        raise FileFormatError(
            f"{directory / WEIGHTS_NAME}: tensor {key!r} has shape {value.shape}, but this "
            f"{model_type} model's {'/'.join(path)} needs {expected} (an adapter saved on another "
            "base, or a head for another number of labels)")
    return value.T if transposed else value


def float32_tree(flat: dict) -> dict:
    return traverse_util.unflatten_dict({p: jnp.asarray(v, jnp.float32) for p, v in flat.items()})


def exact_pattern(path: tuple[str, ...], tail: str) -> str:
    return "^" + re.escape("/".join(path)) + tail


def sort_tensors(directory: pathlib.Path, tensors: dict, flat: dict, model_type: str,
                 root: str, module_key: re.Pattern | None = None) -> tuple[dict, dict, dict]:
    """Sorts the file's tensors into a method's per-module tensors and fully-trained leaves of
    `flat`.

    Args:
      module_key: matches a method's tensor name (after PREFIX) with groups 'module' (the HF
        module, one of `flat`'s Dense modules) and 'leaf' (the tensor's name in the module).

    Returns:
      (our module path -> {leaf: tensor}, our module path -> its name in the file,
       our leaf path -> a `modules_to_save` tensor in our layout).
    """
    leaves = {key: path for path in flat for key in hub.hf_keys(path, model_type)}
    dense = {k.removesuffix(".weight"): p[:-1] for k, p in leaves.items() if p[-1] == "kernel"}
    found, names, full = {}, {}, {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        match = module_key.match(name) if module_key else None
        if key != name and match and match["module"] in dense:
            module = dense[match["module"]]
            names[module] = match["module"]
            found.setdefault(module, {})[match["leaf"]] = value
        elif key != name and not match and name in leaves:
            full[leaves[name]] = _full_tensor(directory, key, value, leaves[name], flat,
                                              model_type)
        else:
            module = match["module"] if match else name.rpartition(".")[0]
            known = [root + hub.hf_module_name("/".join(p[:-1])) for p in flat if p[-1] == "kernel"]
            raise ValueError(
                f"{directory / WEIGHTS_NAME} has tensor {key!r}, but this {model_type} model "
                f"has no module {module!r} (PEFT names LoRA tensors "
                f"'{PREFIX}<module>.lora_A.weight'). Its Dense modules are:\n  "
                + "\n  ".join(known)
            )
    return found, names, full


def module_tensors(directory: pathlib.Path, tensors: dict, params: dict, model_type: str,
                   task: str | None, suffixes: dict[str, str]) -> tuple[dict, dict]:
    """Sorts a PEFT file's tensors by module, for methods whose tensors are named
    '<module>.<suffix>' (VeRA, AdaLoRA).

    Args:
      tensors: the file's tensors, shared ones (VeRA's projections) already taken out.
      suffixes: PEFT's tensor name within a module -> our leaf name ('vera_lambda_b' ->
        'lambda_b').

    Returns:
      ({our module path + (leaf,): tensor}, {our leaf path: a modules_to_save tensor}), the
      latter completed as PEFT restores a module to save: whole, missing leaves from `params`.

    Raises:
      ValueError: a tensor names a module `params` lacks.
    """
    root = hf_root(model_type, task)
    flat = traverse_util.flatten_dict(params)
    dense = {}
    for path in flat:
        if path[-1] == "kernel":
            dense[root + hub.hf_module_name("/".join(path[:-1]))] = path[:-1]
    found, rest = {}, {}
    for key, value in tensors.items():
        module, _, leaf = key.removeprefix(PREFIX).rpartition(".")
        if key.startswith(PREFIX) and leaf in suffixes:
            if module not in dense:
                raise ValueError(f"{directory / WEIGHTS_NAME} has tensor {key!r}, but this "
                                 f"{model_type} model has no Dense module {module!r}")
            found[dense[module] + (suffixes[leaf],)] = value
        else:
            rest[key] = value
    _, _, full = sort_tensors(directory, rest, flat, model_type, root)
    check_saved_modules(directory, tensors, flat, model_type)
    whole_modules(full, flat)
    return found, full


def check_saved_modules(directory: pathlib.Path, tensors: dict, flat: dict,
                        model_type: str) -> None:
    """Refuses an adapter whose config's `modules_to_save` names a module of this model that
    has no tensor in the file (a partial copy): the base's module, e.g. an untrained head, would
    stand in for the trained one. PEFT matches an entry to every module whose name ends with it;
    entries matching no module here (PEFT's own 'score' beside 'classifier' on SEQ_CLS) are
    ignored, as PEFT ignores them.

    Args:
      tensors: the file's tensors, by their keys in it.
      flat: the base params, flattened.

    Raises:
      FileFormatError: naming the weights file, the module and the entry that names it.
    """
    entries = (adapter_config(directory) or {}).get("modules_to_save") or []
    entries = [entries] if isinstance(entries, str) else [str(e) for e in entries]
    names = {key.removeprefix(PREFIX) for key in tensors}
    for module in sorted({path[:i] for path in flat for i in range(1, len(path))}):
        spellings = hub.hf_module_names(module, model_type)
        matched = [(e, s) for e in entries for s in spellings if s.endswith(e)]
        if matched and not any(n.startswith(s + ".") for s in spellings for n in names):
            entry, name = matched[0]
            raise FileFormatError(
                f"{directory / WEIGHTS_NAME} has no tensors of module {name!r}, which "
                f"{CONFIG_NAME} saves whole (modules_to_save {entry!r}): the file is incomplete, "
                "and the base's untrained module would stand in for it; copy the adapter again "
                "from where it was saved")


def whole_modules(full: dict, flat: dict) -> list[tuple[str, ...]]:
    """Completes `full` (leaf path -> a modules_to_save tensor) as PEFT restores a module to
    save: whole, the leaves absent from the file taken from the base `flat`; returns the
    modules."""
    owners = sorted({p[:-1] for p in full})
    for path in flat:
        if path[:-1] in owners and path not in full:
            full[path] = np.asarray(flat[path], np.float32)
    return owners


