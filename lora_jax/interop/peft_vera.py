"""PEFT VeRA adapters out and in: (VeRA, trainable tree, shared projections) <-> a PEFT directory.

PEFT's VeRA state dict, adapter name removed as `save_pretrained` writes it:

    base_model.vera_A                                           (r, d_in_max)   shared
    base_model.vera_B                                           (d_out_max, r)  shared
    base_model.model.transformer.h.0.attn.c_attn.vera_lambda_b  (d_out,)
    base_model.model.transformer.h.0.attn.c_attn.vera_lambda_d  (r,)
    base_model.model.classifier.out_proj.weight                 a `modules_to_save` tensor

PEFT can re-draw A and B from `projection_prng_key` with torch's generator; JAX cannot, so our
exports store them (`save_projection: true`, PEFT's default) and a PEFT adapter saved without
them is refused with that reason.
"""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax.errors import FileFormatError
from lora_jax.interop import hub
from lora_jax.interop import peft_adapters as pa
from lora_jax.methods import vera
from lora_jax.methods.base import modules_of

SHARED = {vera.SHARED_A: "base_model.vera_A", vera.SHARED_B: "base_model.vera_B"}
VECTORS = {vera.LAMBDA_B: "vera_lambda_b", vera.LAMBDA_D: "vera_lambda_d"}


def export_vera(directory: str | os.PathLike, method: vera.VeRA, trainable: dict,
                buffers: dict, *, model_type: str, task: str | None,
                base_model_name_or_path: str | None = None) -> pathlib.Path:
    """Writes a trained VeRA as a PEFT VeRA adapter that `PeftModel.from_pretrained` loads.

    Args:
      trainable: {'vera': per-module vectors, 'params': leaves trained in full}.
      buffers: the method's buffers (the shared A and B), from the frozen tree.
    """
    root = pa.hf_root(model_type, task)
    tensors = {key: np.asarray(jax.device_get(buffers[name]), np.float32)[
        (slice(0, method.rank), slice(None)) if name == vera.SHARED_A else
        (slice(None), slice(0, method.rank))] for name, key in SHARED.items()}
    targets = []
    for module, own in modules_of(trainable[method.name]).items():
        name = root + hub.hf_module_name("/".join(module))
        targets.append(name)
        for leaf, key in VECTORS.items():
            tensors[f"{pa._PREFIX}{name}.{key}"] = np.asarray(jax.device_get(own[leaf]),
                                                               np.float32)
    saved, full = pa.modules_to_save(trainable.get("params", {}), model_type, task)
    tensors.update(full)
    config = {
        **pa.config_fields("VERA", model_type, task, base_model_name_or_path, saved),
        "r": method.rank,
        "target_modules": sorted(targets), "projection_prng_key": method.projection_seed,
        "save_projection": True, "vera_dropout": method.dropout, "d_initial": method.d_initial,
        "init_weights": True,
    }
    return pa.write_adapter_dir(pathlib.Path(directory), config, tensors,
                                metadata={"format": "pt"})


def load_vera(directory: str | os.PathLike, params: dict, *, model_type: str,
              task: str | None = None) -> tuple[vera.VeRA, dict]:
    """(VeRA with the file's projections, trainable tree) of a PEFT VeRA directory for `params`.

    Raises:
      FileNotFoundError: a file is missing (as `peft_adapters.load_peft`).
      FileFormatError: no stored projections, or a tensor of the wrong shape (named).
      ValueError: a module `params` lacks, or an unsupported PEFT feature.
    """
    directory = pathlib.Path(directory)
    config, tensors = pa.read_adapter(directory, peft_types=("VERA",))
    if not config.get("save_projection", True) or SHARED[vera.SHARED_A] not in tensors:
        raise FileFormatError(
            f"{directory}: the VeRA projections are not stored (save_projection=false); PEFT "
            "re-draws them with torch's generator, which lora_jax cannot replay. Save the "
            "adapter from PEFT with save_projection=True")
    rank = config["r"]
    shared = {name: tensors.pop(key) for name, key in SHARED.items()}
    vectors, full = pa.module_tensors(directory, tensors, params, model_type, task,
                                      {v: k for k, v in VECTORS.items()})
    flat = traverse_util.flatten_dict(params)
    for path, value in vectors.items():
        d_out = flat[path[:-1] + ("kernel",)].shape[1]
        want = (d_out,) if path[-1] == vera.LAMBDA_B else (rank,)
        if value.shape != want:
            raise FileFormatError(f"{directory / pa.WEIGHTS_NAME}: {'/'.join(path)} is "
                                  f"{value.shape}, expected {want}")
    modules = sorted({p[:-1] for p in vectors})
    method = vera.VeRA(tuple(pa.exact_pattern(m + ("kernel",), "$") for m in modules), rank=rank,
                       d_initial=float(config.get("d_initial", 0.1)),
                       dropout=float(config.get("vera_dropout") or 0.0),
                       projection_seed=int(config.get("projection_prng_key", 0)),
                       projections=(shared[vera.SHARED_A], shared[vera.SHARED_B]))
    method.buffers(params)  # checks the projections fit every module
    trainable = {"params": pa.float32_tree(full), method.name: traverse_util.unflatten_dict(
        {p: jnp.asarray(v, jnp.float32) for p, v in vectors.items()})}
    return method, trainable
