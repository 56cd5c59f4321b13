"""AdaLoRA's PEFT mapping: (AdaLoRA, trainable tree) <-> a PEFT AdaLoRA adapter directory, the
codec `lora_jax.exports` uses for AdaLoRA (its registration names it).

PEFT saves the kept triplets only, with the pattern that says which they were:

    base_model.model.transformer.h.0.attn.c_attn.lora_A   (k, d_in)     k = triplets kept
    base_model.model.transformer.h.0.attn.c_attn.lora_E   (k, 1)
    base_model.model.transformer.h.0.attn.c_attn.lora_B   (d_out, k)
    adapter_config.json: rank_pattern {"transformer.h.0.attn.c_attn.lora_E": [bool] * init_r}

A triplet is kept when its E is not zero, so the export computes exactly the trained function.
Read back, the removed triplets are zeros again at their places, so the tree has every module's
r0 triplets (and can train on).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax.errors import FileFormatError
from lora_jax.interop import hub
from lora_jax.interop import peft_adapters as pa
from lora_jax.methods import adalora
from lora_jax.methods.base import Method, Params, PeftCodec, modules_of

LEAVES = {adalora.LORA_A: "lora_A", adalora.LORA_E: "lora_E", adalora.LORA_B: "lora_B"}


class AdaloraPeft(PeftCodec):
    """AdaLoRA as a PEFT AdaLoRA adapter (see the module docstring)."""

    peft_types = ("ADALORA",)

    def save(self, directory: pathlib.Path, method: Method, trainable: Params,
             frozen: Params | None, *, model_type: str, task: str | None,
             base_model_name_or_path: str | None = None) -> pathlib.Path:
        """Writes a trained AdaLoRA that `PeftModel.from_pretrained` loads (the kept triplets
        and their rank_pattern)."""
        root = pa.hf_root(model_type, task)
        own = jax.device_get(trainable[method.name])
        tensors, pattern, targets = {}, {}, []
        for module, keep in adalora.kept(own).items():
            leaves = modules_of(own)[module]
            name = root + hub.hf_module_name("/".join(module))
            targets.append(name)
            pattern[f"{name}.{LEAVES[adalora.LORA_E]}"] = keep.tolist()
            a, e, b = (np.asarray(leaves[k], np.float32) for k in LEAVES)
            tensors[f"{pa.PREFIX}{name}.lora_A"] = a[keep]
            tensors[f"{pa.PREFIX}{name}.lora_E"] = e[keep][:, None]
            tensors[f"{pa.PREFIX}{name}.lora_B"] = b[:, keep]
        saved, full = pa.modules_to_save(trainable.get("params", {}), model_type, task)
        tensors.update(full)
        config = {
            **pa.config_fields("ADALORA", model_type, task, base_model_name_or_path, saved),
            "target_modules": sorted(targets),
            "init_r": method.init_rank, "target_r": method.target_rank, "r": method.target_rank,
            "lora_alpha": pa.json_number(method.alpha), "lora_dropout": method.dropout,
            "tinit": method.tinit, "tfinal": method.tfinal, "deltaT": method.delta_t,
            "beta1": method.beta1, "beta2": method.beta2, "orth_reg_weight": method.orth_reg_weight,
            "total_step": method.total_step or None, "rank_pattern": pattern,
            "init_lora_weights": True, "use_dora": False,
        }
        return pa.write_adapter_dir(pathlib.Path(directory), config, tensors,
                                    metadata={"format": "pt"})

    def load(self, directory: pathlib.Path, params: Params, family: Any,
             task: str | None) -> tuple[Method, dict]:
        """(AdaLoRA, trainable tree with every module's r0 triplets) for `params`; the method
        keeps the file's settings, its orthogonality penalty PEFT's ('code').

        Raises:
          FileNotFoundError: a file is missing.
          FileFormatError: a tensor's shape disagrees with init_r, the rank_pattern or the base.
          ValueError: a module `params` lacks, or an unsupported PEFT feature.
        """
        model_type = family.model_type
        config, tensors = pa.read_adapter(directory, peft_types=("ADALORA",))
        init_r = config.get("init_r")
        if not isinstance(init_r, int) or init_r < 1:
            raise FileFormatError(f"{directory / pa.CONFIG_NAME}: init_r = {init_r!r}, not a rank")
        found, full = pa.module_tensors(directory, tensors, params, model_type, task,
                                        {v: k for k, v in LEAVES.items()})
        root = pa.hf_root(model_type, task)
        patterns = config.get("rank_pattern") or {}
        flat = traverse_util.flatten_dict(params)
        added = {}
        for module in sorted({p[:-1] for p in found}):
            name = root + hub.hf_module_name("/".join(module))
            keep = np.asarray(patterns.get(f"{name}.lora_E", [True] * init_r), bool)
            d_in, d_out = flat[module + ("kernel",)].shape
            got = {k: found.get(module + (k,)) for k in LEAVES}
            k = int(keep.sum())
            want = {adalora.LORA_A: (k, d_in), adalora.LORA_E: (k, 1), adalora.LORA_B: (d_out, k)}
            wrong = {leaf: None if v is None else v.shape for leaf, v in got.items()
                     if v is None or v.shape != want[leaf]}
            if len(keep) != init_r or wrong:
                raise FileFormatError(
                    f"{directory / pa.WEIGHTS_NAME}: {name} has {wrong or 'its tensors'} where "
                    f"init_r={init_r} and its rank_pattern ({len(keep)} entries, {k} kept) need "
                    f"{want}")
            a, e, b = (np.zeros((init_r, d_in), np.float32), np.zeros((init_r,), np.float32),
                       np.zeros((d_out, init_r), np.float32))
            a[keep], e[keep], b[:, keep] = (got[adalora.LORA_A], got[adalora.LORA_E][:, 0],
                                            got[adalora.LORA_B])
            for leaf, value in ((adalora.LORA_A, a), (adalora.LORA_E, e), (adalora.LORA_B, b)):
                added[module + (leaf,)] = jnp.asarray(value)
        method = adalora.AdaLoRA(
            tuple(pa.exact_pattern(m + ("kernel",), "$") for m in sorted({p[:-1] for p in found})),
            init_rank=init_r, target_rank=int(config.get("target_r", init_r)),
            alpha=float(config.get("lora_alpha", 8)),
            dropout=float(config.get("lora_dropout") or 0.0), tinit=int(config.get("tinit", 0)),
            tfinal=int(config.get("tfinal", 0)), delta_t=int(config.get("deltaT", 1)),
            beta1=float(config.get("beta1", 0.85)), beta2=float(config.get("beta2", 0.85)),
            orth_reg_weight=float(config.get("orth_reg_weight", 0.5)), orth_form="code",
            total_step=int(config.get("total_step") or 0))
        return method, {"params": pa.float32_tree(full),
                        method.name: traverse_util.unflatten_dict(added)}


PEFT = AdaloraPeft()
