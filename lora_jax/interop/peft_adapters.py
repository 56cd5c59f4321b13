"""PEFT LoRA adapters out and in: (LoraSpec, trainable tree) <-> a PEFT adapter directory.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, whose keys
name the Hugging Face module each tensor belongs to (adapter name removed, as `save_pretrained`
writes them):

    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight   (r, d_in)    float32
    base_model.model.transformer.h.0.attn.c_attn.lora_B.weight   (d_out, r)
    base_model.model.classifier.out_proj.weight                  a `modules_to_save` tensor

Our module paths become HF module names by `hub.hf_module_name`, under 'transformer.' for GPT-2 (our
root is HF's `transformer`); encoder paths need no prefix (task models already start with `roberta/`
or `bert/`). A and B have PEFT's orientation already, so they are written as they are.

Example:
    export_peft("out/sst2", spec, trainable, model_type="roberta", task="classification")
    spec, trainable = load_peft("out/sst2", params, model_type="roberta", task="classification")
    logits = lora.adapt(model.apply, spec)(params, trainable, ids, attention_mask=mask).logits
"""

from __future__ import annotations

import collections
import json
import math
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

from lora_jax.interop import hub
from lora_jax.methods import lora
from lora_jax.methods.dora import MAGNITUDE, DoRA
from lora_jax.methods.pissa import PiSSA
from lora_jax.errors import FileFormatError
from lora_jax.json_files import read_json_object
from lora_jax.models import family as model_family

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PROMPT_KEY = "prompt_embeddings"  # PEFT's key for prompt tuning's virtual-token embeddings
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<which>[AB])\.weight|"
                       r"(?P<magnitude>lora_magnitude_vector))$")
MAGNITUDE_KEY = "lora_magnitude_vector"  # DoRA's magnitude, one per output unit
# PEFT features that change the adapted function beyond W0 + s B A; refused on load.
_UNSUPPORTED = ("use_dora", "lora_bias", "layer_replication", "target_parameters",
                "trainable_token_indices", "alora_invocation_tokens", "use_bdlora")


def hf_root(model_type: str, task: str | None) -> str:
    """Prefix turning `hf_module_name` of our paths into names inside the HF model PEFT wraps."""
    family = model_family(model_type)
    family.check_task(task)
    return family.peft_root


def _most_common(per_module: dict, default: Any) -> Any:
    """The value most modules share: the config's default, leaving the fewest pattern entries."""
    if not per_module:
        return default
    return collections.Counter(per_module.values()).most_common(1)[0][0]


def json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _fused(a: np.ndarray, b: np.ndarray, parts: tuple[bool, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Split-output adapters (n, r, d_in), (n, d_part, r) as one rank-n*r adapter on the whole
    output: A stacks the parts' A; B puts part j's B in its rows and in A's j-th block of columns,
    with zeros elsewhere (all-zero rows for an un-adapted part)."""
    n, rank, d_in = a.shape
    d_part = b.shape[1]
    b_full = np.zeros((len(parts) * d_part, n * rank), np.float32)
    for p, j in lora.adapted_slots(parts):
        b_full[p * d_part:(p + 1) * d_part, j * rank:(j + 1) * rank] = b[j]
    return a.reshape(n * rank, d_in), b_full


def _saved_module(path: tuple[str, ...], model_type: str, task: str | None) -> tuple[str, ...]:
    """The module PEFT's `modules_to_save` must name for a fully-trained leaf."""
    if task == "classification" and path[0] != model_family(model_type).base_prefix:
        return path[:1]  # a head: PEFT's SEQ_CLS wraps the whole 'classifier' anyway
    return path[:-1]


def export_peft(
    directory: str | os.PathLike,
    spec: lora.LoraSpec,
    trainable: dict,
    *,
    model_type: str,
    task: str | None,
    base_model_name_or_path: str | None = None,
    magnitudes: dict | None = None,
) -> pathlib.Path:
    """Writes `trainable` as a PEFT LoRA adapter that `PeftModel.from_pretrained` loads as is.

    `target_modules` lists the full HF names of exactly the adapted modules. The `r` and
    `lora_alpha` of most modules become the defaults; the others go to `rank_pattern` /
    `alpha_pattern` under their full names. Fully-trained leaves (`trainable['params']`) are saved
    under `modules_to_save`: 'classifier' for a classification head (PEFT restores it whole; a head
    leaf not in the file keeps the base checkpoint's value), else the module owning the leaf.

    Split outputs (e.g. GPT-2's fused c_attn adapted on q and v only) have no PEFT equivalent, so
    they are written, exactly, as one adapter of rank n*r on the fused module: A_full (n*r, d_in)
    stacks the n adapted parts' A; B_full (d_out, n*r) holds part j's B in the rows of its output
    slice and columns j*r..(j+1)*r, zeros elsewhere (k's rows are all zero). Then
    B_full A_full = [B_q A_q; 0; B_v A_v], and alpha_full = n * alpha (rslora: sqrt(n) * alpha)
    keeps the scale alpha / r. `load_peft` reads it back as that plain rank-n*r adapter.

    Args:
      directory: created if absent; an existing directory must be empty or hold only an earlier
        export (its two files), which is replaced. Files go to a temporary sibling first, so a
        failed export leaves what was there.
      spec: the spec `trainable` was made with.
      trainable: {'lora': adapters, 'params': fully-trained leaves}, as from `lora.split`.
      model_type: 'gpt2', 'bert' or 'roberta'.
      task: None (GPT-2 LM, bare encoder) or 'classification' (task_type SEQ_CLS).
      base_model_name_or_path: recorded in the config for PEFT's `AutoPeftModel`.
      magnitudes: DoRA: our module path -> its magnitude over all d_out outputs; written as
        PEFT's `lora_magnitude_vector` with `use_dora` (see `methods.dora`).

    Returns:
      The directory written.

    Raises:
      FileExistsError: `directory` holds other files (they are left untouched).
      ValueError: adapters that do not fit `spec`'s split_outputs; a module both LoRA-adapted and
        trained in full; GPT-2's tied `wte` trained in full (PEFT would untie it).
    """
    root = hf_root(model_type, task)
    tensors, ranks, alphas = _lora_tensors(spec, trainable, root)
    for module, magnitude in (magnitudes or {}).items():
        name = root + hub.hf_module_name("/".join(module))
        tensors[f"{_PREFIX}{name}.{MAGNITUDE_KEY}"] = np.asarray(magnitude, np.float32)
    saved, full = modules_to_save(trainable.get("params", {}), model_type, task)
    tensors.update(full)
    for name in ranks:
        if any(name == m or name.startswith(m + ".") for m in saved):
            raise ValueError(f"{name} is both LoRA-adapted and trained in full; PEFT cannot save "
                             "a module inside `modules_to_save` as a LoRA adapter")

    r, alpha = _most_common(ranks, spec.rank), _most_common(alphas, spec.alpha)
    config = {
        **config_fields("LORA", model_type, task, base_model_name_or_path, saved),
        "r": r,
        "lora_alpha": json_number(alpha),
        "lora_dropout": spec.dropout,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: json_number(x) for m, x in alphas.items() if x != alpha},
        "use_rslora": spec.rslora,
        "init_lora_weights": True,
        "use_dora": bool(magnitudes),
    }
    return write_adapter_dir(pathlib.Path(directory), config, tensors, metadata={"format": "pt"})


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
        tensors[f"{_PREFIX}{module}.{hub.LEAF_NAMES[path[-1]][0]}"] = value
    return list(saved), tensors


def _lora_tensors(spec: lora.LoraSpec, trainable: dict, root: str) -> tuple[dict, dict, dict]:
    """(PEFT key -> tensor, HF module -> rank, HF module -> alpha) for every adapter."""
    tensors, ranks, alphas = {}, {}, {}
    for module, ab in lora.adapter_modules(trainable).items():
        ab = {k: v for k, v in ab.items() if k in (lora.LORA_A, lora.LORA_B)}
        path = "/".join(module + ("kernel",))
        name = root + hub.hf_module_name("/".join(module))
        a, b = np.asarray(ab[lora.LORA_A], np.float32), np.asarray(ab[lora.LORA_B], np.float32)
        parts = spec.parts_for(path)
        n, ndim = sum(parts), (3 if len(parts) > 1 else 2)
        if a.ndim != ndim or b.ndim != ndim or (ndim == 3 and len(a) != n):
            raise ValueError(f"adapter for {path!r} has A {a.shape} and B {b.shape}, which do not "
                             f"fit the spec's split_outputs {parts}")
        if len(parts) > 1:
            a, b = _fused(a, b, parts)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b
        ranks[name] = a.shape[0]
        # alpha_full / (n r) = alpha / r; under rslora alpha_full / sqrt(n r) = alpha / sqrt(r).
        alphas[name] = spec.alpha_for(path) * (math.sqrt(n) if spec.rslora else n)
    return tensors, ranks, alphas


# What an export directory may hold from an earlier export (PEFT's files or lora_jax's own): it
# is replaced whole; anything else there is the user's and stops the export.
EXPORT_NAMES = {CONFIG_NAME, WEIGHTS_NAME, "method_config.json", "method_params.safetensors"}


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


def export_prompt_tuning(directory: str | os.PathLike, embeddings: np.ndarray, *,
                         model_type: str, task: str | None,
                         base_model_name_or_path: str | None = None) -> pathlib.Path:
    """Writes prefix-only virtual-token embeddings (n, d) as a PEFT prompt-tuning adapter, which
    `peft.PeftModel.from_pretrained` loads (`PeftModel` prepends them to the input embeddings)."""
    family = model_family(model_type)
    family.check_task(task)
    embeddings = np.asarray(embeddings, np.float32)
    config = {"peft_type": "PROMPT_TUNING", "task_type": family.peft_task_types[task],
              "num_virtual_tokens": int(embeddings.shape[0]), "token_dim": int(embeddings.shape[1]),
              "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM",
              "base_model_name_or_path": base_model_name_or_path, "inference_mode": True}
    return write_adapter_dir(pathlib.Path(directory), config, {PROMPT_KEY: embeddings},
                             metadata={"format": "pt"})


def load_prompt_tuning(directory: str | os.PathLike) -> np.ndarray:
    """The (num_virtual_tokens, token_dim) embeddings of a PEFT prompt-tuning adapter.

    Raises:
      FileFormatError: not a prompt-tuning adapter, or its tensor disagrees with its config.
    """
    directory = pathlib.Path(directory)
    config = read_json_object(directory / CONFIG_NAME, what="PEFT adapter config",
                              required=("peft_type", "num_virtual_tokens"))
    if config["peft_type"] != "PROMPT_TUNING":
        raise FileFormatError(f"{directory / CONFIG_NAME}: peft_type {config['peft_type']!r}, "
                              "not 'PROMPT_TUNING'")
    tensors = hub.read_safetensors(directory / WEIGHTS_NAME)
    if set(tensors) != {PROMPT_KEY}:
        raise FileFormatError(f"{directory / WEIGHTS_NAME} holds {sorted(tensors)}; a prompt-"
                              f"tuning adapter holds {PROMPT_KEY!r} alone")
    embeddings = np.asarray(tensors[PROMPT_KEY], np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != config["num_virtual_tokens"]:
        raise FileFormatError(f"{directory / WEIGHTS_NAME}: {PROMPT_KEY} is {embeddings.shape}, "
                              f"but the config has {config['num_virtual_tokens']} virtual tokens")
    if not np.isfinite(embeddings).all():
        raise FileFormatError(f"{directory / WEIGHTS_NAME} holds non-finite values")
    return embeddings


def peft_type(directory: str | os.PathLike) -> str | None:
    """The peft_type a directory's adapter_config.json names (None: no such file)."""
    path = pathlib.Path(directory) / CONFIG_NAME
    if not path.is_file():
        return None
    return read_json_object(path, what="PEFT adapter config").get("peft_type")


def read_adapter(directory: pathlib.Path, *, peft_types: tuple[str, ...] = ("LORA",),
                  allowed: tuple[str, ...] = ()) -> tuple[dict, dict[str, np.ndarray]]:
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


def _pattern_value(patterns: dict, name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching a suffix of `name`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _full_tensor(key: str, value: np.ndarray, path: tuple[str, ...], flat: dict,
                 model_type: str) -> np.ndarray:
    """A `modules_to_save` tensor in our layout, checked against the base parameter."""
    if path[-1] == "kernel" and model_family(model_type).transposed_kernels:
        value = value.T  # torch Linear stores (d_out, d_in); GPT-2's Conv1D does not
    if value.shape != tuple(flat[path].shape):
        raise ValueError(f"adapter tensor {key!r} has shape {value.shape} (after transposing "
                         f"Linear weights) but {'/'.join(path)} in params has "
                         f"{tuple(flat[path].shape)}")
    return value


def float32_tree(flat: dict) -> dict:
    return traverse_util.unflatten_dict({p: jnp.asarray(v, jnp.float32) for p, v in flat.items()})


def exact_pattern(path: tuple[str, ...], tail: str) -> str:
    return "^" + re.escape("/".join(path)) + tail


def _sort_tensors(directory: pathlib.Path, tensors: dict, flat: dict, model_type: str,
                  root: str) -> tuple[dict, dict, dict]:
    """Sorts the file's tensors into LoRA pairs and fully-trained leaves of `flat`.

    Returns:
      (our module path -> {'A': lora_A, 'B': lora_B}, our module path -> its name in the file,
       our leaf path -> a `modules_to_save` tensor in our layout).
    """
    leaves = {key: path for path in flat for key in hub.hf_keys(path, model_type)}
    dense = {k.removesuffix(".weight"): p[:-1] for k, p in leaves.items() if p[-1] == "kernel"}
    found, names, full = {}, {}, {}
    for key, value in tensors.items():
        name = key.removeprefix(_PREFIX)
        match = _LORA_KEY.match(name)
        if key != name and match and match["module"] in dense:
            module = dense[match["module"]]
            names[module] = match["module"]
            found.setdefault(module, {})[match["which"] or "M"] = value
        elif key != name and not match and name in leaves:
            full[leaves[name]] = _full_tensor(key, value, leaves[name], flat, model_type)
        else:
            module = match["module"] if match else name.rpartition(".")[0]
            known = [root + hub.hf_module_name("/".join(p[:-1])) for p in flat if p[-1] == "kernel"]
            raise ValueError(
                f"{directory / WEIGHTS_NAME} has tensor {key!r}, but this {model_type} model "
                f"has no module {module!r} (PEFT names LoRA tensors "
                f"'{_PREFIX}<module>.lora_A.weight'). Its Dense modules are:\n  "
                + "\n  ".join(known)
            )
    return found, names, full


def load_peft(
    directory: str | os.PathLike,
    params: dict,
    *,
    model_type: str,
    task: str | None = None,
) -> tuple[lora.LoraSpec, dict]:
    """Reads a PEFT LoRA adapter directory as a LoraSpec and a trainable tree for `params`.

    Module names are matched as `hub.load_pretrained` matches checkpoint keys, so an adapter
    saved on HF's task model also fits our bare encoder and vice versa. Every module is an exact
    target with its rank read from its tensors and its alpha from PEFT's `alpha_pattern` rules.
    Other tensors (`modules_to_save`, e.g. the classifier head) go to `trainable['params']`, each
    module whole: a leaf missing from the file keeps its value in `params`, as in PEFT.

    Args:
      directory: holds adapter_config.json and adapter_model.safetensors (pickles are refused).
      params: the base model's params, e.g. from `hub.load_pretrained`.
      model_type: 'gpt2', 'bert' or 'roberta'.
      task: None or 'classification', as `params`' model.

    Returns:
      (spec, trainable). `params` can serve as the frozen tree: `lora.adapt` overlays
      `trainable['params']` on it.

    Raises:
      FileNotFoundError: the directory or a file is missing, or the weights are a pickle.
      ValueError: peft_type is not 'LORA'; an unsupported PEFT feature; a tensor whose module is not
        in `params` (named); a shape that does not fit the base (parameter and both shapes named).
    """
    directory = pathlib.Path(directory)
    config, spec, trainable = _load_lora(directory, params, model_type, task, allowed=())
    if str(config.get("init_lora_weights")).lower().startswith("pissa"):
        raise ValueError(f"{directory} is a PiSSA adapter (init_lora_weights "
                         f"{config['init_lora_weights']!r}): it is trained against a residual "
                         "base, so it is not a plain LoRA on these params; read it with "
                         "`load_peft_method` (or `interop.exports.load`)")
    return spec, trainable


def _load_lora(directory: pathlib.Path, params: dict, model_type: str, task: str | None,
               allowed: tuple[str, ...]) -> tuple[dict, lora.LoraSpec, dict]:
    """(config, spec, trainable) of a PEFT LoRA directory; DoRA's magnitudes, if `allowed`, are
    in each module's adapter as 'magnitude'."""
    root = hf_root(model_type, task)
    config, tensors = read_adapter(directory, allowed=allowed)
    flat = traverse_util.flatten_dict(params)
    found, names, full = _sort_tensors(directory, tensors, flat, model_type, root)

    adapters, ranks, alphas = {}, {}, {}
    order = {path[:-1]: i for i, path in enumerate(flat)}
    dora = bool(config.get("use_dora"))
    for module, ab in sorted(found.items(), key=lambda item: order[item[0]]):
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            shapes = {k: v.shape for k, v in ab.items()}
            raise ValueError(f"{directory / WEIGHTS_NAME}: {names[module]} needs lora_A (r, d_in) "
                             f"and lora_B (d_out, r), but has {shapes}")
        adapters[module + (lora.LORA_A,)], adapters[module + (lora.LORA_B,)] = a, b
        if dora != ("M" in ab) or (dora and ab["M"].shape != (b.shape[0],)):
            got = ab["M"].shape if "M" in ab else "none"
            raise FileFormatError(
                f"{directory / WEIGHTS_NAME}: {names[module]} has magnitude {got}, but the "
                f"config has use_dora={dora} (DoRA needs one of ({b.shape[0]},) per module)")
        if dora:
            adapters[module + (MAGNITUDE,)] = ab["M"]
        ranks[module] = a.shape[0]
        alphas[module] = _pattern_value(config.get("alpha_pattern") or {}, names[module],
                                        config["lora_alpha"])
    owners = whole_modules(full, flat)

    rank, alpha = _most_common(ranks, config["r"]), _most_common(alphas, config["lora_alpha"])
    kernel = {m: exact_pattern(m + ("kernel",), "$") for m in ranks}
    spec = lora.LoraSpec(
        targets=tuple(kernel.values()),
        rank=rank,
        alpha=float(alpha),
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=bool(config.get("use_rslora")),
        rank_pattern={kernel[m]: k for m, k in ranks.items() if k != rank},
        alpha_pattern={kernel[m]: float(x) for m, x in alphas.items() if x != alpha},
        also_train=tuple(exact_pattern(m, "/") for m in owners),
    )
    trainable = {"lora": float32_tree(adapters), "params": float32_tree(full)}
    try:
        lora.check_compatible(spec, params, trainable)
    except ValueError as error:
        raise ValueError(f"PEFT adapter {directory} does not fit these params: {error}") from None
    return config, spec, trainable


def module_tensors(directory: pathlib.Path, tensors: dict, params: dict, model_type: str,
                   task: str | None, suffixes: dict[str, str]) -> tuple[dict, dict]:
    """Sorts a PEFT file's tensors for methods other than LoRA (VeRA, AdaLoRA).

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
        module, _, leaf = key.removeprefix(_PREFIX).rpartition(".")
        if key.startswith(_PREFIX) and leaf in suffixes:
            if module not in dense:
                raise ValueError(f"{directory / WEIGHTS_NAME} has tensor {key!r}, but this "
                                 f"{model_type} model has no Dense module {module!r}")
            found[dense[module] + (suffixes[leaf],)] = value
        else:
            rest[key] = value
    _, _, full = _sort_tensors(directory, rest, flat, model_type, root)
    whole_modules(full, flat)
    return found, full


def whole_modules(full: dict, flat: dict) -> list[tuple[str, ...]]:
    """Completes `full` (leaf path -> a modules_to_save tensor) as PEFT restores a module to
    save: whole, the leaves absent from the file taken from the base `flat`; returns the
    modules."""
    owners = sorted({p[:-1] for p in full})
    for path in flat:
        if path[:-1] in owners and path not in full:
            full[path] = np.asarray(flat[path], np.float32)
    return owners


def load_peft_method(directory: str | os.PathLike, params: dict, *, model_type: str,
                     task: str | None = None) -> tuple[lora.LoRA, dict]:
    """A PEFT LoRA directory as the method it holds, with its trainable tree: DoRA
    (`use_dora`), PiSSA (init_lora_weights 'pissa': its residual base is re-derived from
    `params` by `MethodStack.frozen`), else LoRA. Arguments and errors as `load_peft`'s.

    Raises:
      ValueError: also a PiSSA adapter made with PEFT's randomised SVD ('pissa_niter_k'), whose
        residual cannot be re-derived here.
    """
    directory = pathlib.Path(directory)
    config, spec, trainable = _load_lora(directory, params, model_type, task,
                                         allowed=("use_dora",))
    init = str(config.get("init_lora_weights")).lower()
    if init.startswith("pissa_niter"):
        raise ValueError(f"{directory}: PiSSA with PEFT's randomised SVD ({init!r}) draws from "
                         "torch's generator, so its residual base cannot be re-derived; save it "
                         "from PEFT with path_initial_model_for_weight_conversion (a plain LoRA)")
    if config.get("use_dora") and init.startswith("pissa"):
        raise ValueError(f"{directory}: DoRA with PiSSA initialisation is not supported")
    method = (DoRA(spec) if config.get("use_dora") else PiSSA(spec) if init == "pissa"
              else lora.LoRA(spec))
    return method, {"params": trainable["params"], method.name: trainable["lora"]}
