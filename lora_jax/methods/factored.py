"""What LoHa and LoKr (the LyCORIS family) share: a method whose update of each targeted kernel is
a weight built from the module's own small factors, dW (d_out, d_in) = s * delta(factors), with
s = alpha / r.

The forward pass adds x dW^T to the Dense call's output (dW is rebuilt in every call: it is small
beside the activations and keeps the factors the only trained leaves), and `merge` folds dW^T
into the kernel. A subclass says which factors a kernel of a given shape gets, how they start,
and how they make dW; `FactoredPeft` maps the factors onto PEFT's tensors of the same names.

PEFT builds these adapters for torch Linear layers only: families whose Dense kernels are
Linear in transformers (BERT, RoBERTa, Llama) export to PEFT; GPT-2's Conv1D has no LoHa or
LoKr in PEFT, so its export is in PEFT's layout that only lora_jax reads. Fused projections are
adapted whole (no split outputs), as in PEFT.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax.errors import FileFormatError
from lora_jax.interop import hub
from lora_jax.interop import peft_adapters as pa
from lora_jax.methods import lora
from lora_jax.methods.base import (Method, Params, PeftCodec, fold_into_kernels, intercept_dense,
                                   modules_of)


def kaiming_uniform(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """torch's kaiming_uniform_(a=sqrt(5)) of a 2-D weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    fan_in = shape[1]."""
    bound = 1.0 / math.sqrt(shape[1])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


@dataclasses.dataclass(frozen=True)
class Factored(Method):
    """A per-kernel update built from factors (see the module docstring).

    Attributes:
      targets: patterns of the Dense kernels adapted (as LoRA's).
      rank, alpha: r and alpha; the update is scaled by alpha / r.
    """

    mergeable = True
    # The factor leaves a PEFT file may hold, in PEFT's names (ours are the same).
    leaves: ClassVar[tuple[str, ...]] = ()

    targets: tuple[str, ...]
    rank: int = 8
    alpha: float = 8.0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def kernels(self, params: Params) -> list[str]:
        return lora.matching_kernels(self.targets, params, self.name)

    def start(self, key: jax.Array, d_in: int, d_out: int, path: str) -> dict:
        """The factors of one (d_in, d_out) kernel at `path`, freshly drawn, float32."""
        raise NotImplementedError

    def delta(self, factors: dict) -> jax.Array:
        """dW / s, (d_out, d_in), from one module's factors."""
        raise NotImplementedError

    def init(self, params: Params, key: jax.Array) -> dict:
        flat = traverse_util.flatten_dict(params)
        paths = self.kernels(params)
        out = {}
        for path, k in zip(paths, jax.random.split(key, max(len(paths), 1))):
            d_in, d_out = flat[tuple(path.split("/"))].shape
            module = tuple(path.split("/")[:-1])
            for leaf, value in self.start(k, d_in, d_out, path).items():
                out[module + (leaf,)] = value
        return traverse_util.unflatten_dict(out)

    def _kernel_delta(self, factors: dict) -> jax.Array:
        return self.scale * self.delta(factors).T  # (d_in, d_out), as the kernel

    def intercept(self, added: Params, rng: jax.Array | None, buffers: Params | None = None):
        def output(call, factors, x, y, dropped):
            return y + x.astype(y.dtype) @ self._kernel_delta(factors).astype(y.dtype)

        return intercept_dense(modules_of(added), rng, 0.0, output, self.name)

    def merge(self, params: Params, added: Params, buffers: Params | None = None) -> dict:
        return fold_into_kernels(params, added, lambda module, factors, _:
                                 self._kernel_delta(factors))

    def describe(self) -> str:
        return f"{self.name}(r={self.rank}, alpha={self.alpha:g})"


class FactoredPeft(PeftCodec):
    """A `Factored` method as PEFT's adapter of `peft_type`: one tensor per factor,
    '<module>.<leaf>', r and alpha global. Subclasses name the method type and the extra config
    fields they write and read."""

    method_type: type[Factored] = Factored
    # PEFT options this codec cannot reproduce -> the value they must have.
    unsupported: dict[str, Any] = {"rank_dropout": 0.0, "module_dropout": 0.0,
                                   "rank_pattern": {}, "alpha_pattern": {}}

    def config(self, method: Factored) -> dict:
        """The method-specific fields of adapter_config.json."""
        return {}

    def from_config(self, config: dict, targets: tuple[str, ...]) -> Factored:
        return self.method_type(targets, rank=int(config["r"]), alpha=float(config["alpha"]))

    def save(self, directory: pathlib.Path, method: Method, trainable: Params,
             frozen: Params | None, *, model_type: str, task: str | None,
             base_model_name_or_path: str | None = None) -> pathlib.Path:
        root = pa.hf_root(model_type, task)
        tensors, targets = {}, []
        for module, factors in modules_of(trainable[method.name]).items():
            name = root + hub.hf_module_name("/".join(module))
            targets.append(name)
            for leaf, value in factors.items():
                tensors[f"{pa.PREFIX}{name}.{leaf}"] = np.asarray(jax.device_get(value),
                                                              np.float32)
        saved, full = pa.modules_to_save(trainable.get("params", {}), model_type, task)
        tensors.update(full)
        config = {**pa.config_fields(self.peft_types[0], model_type, task,
                                     base_model_name_or_path, saved),
                  "r": method.rank, "alpha": pa.json_number(method.alpha),
                  "target_modules": sorted(targets), "init_weights": True,
                  **self.unsupported, **self.config(method)}
        return pa.write_adapter_dir(pathlib.Path(directory), config, tensors,
                                    metadata={"format": "pt"})

    def load(self, directory: pathlib.Path, params: Params, family: Any,
             task: str | None) -> tuple[Method, dict]:
        """(the method, trainable tree) of a PEFT adapter of this type, for `params`.

        Raises:
          FileFormatError: a PEFT option set that lora_jax does not reproduce, or a module's
            factors other than a fresh start of the same settings would have (named).
          ValueError: a tensor names a module `params` lacks.
        """
        config, tensors = pa.read_adapter(directory, peft_types=self.peft_types)
        for field, value in self.unsupported.items():
            if config.get(field) not in (value, None):
                raise FileFormatError(f"{directory / pa.CONFIG_NAME}: {field} = "
                                      f"{config[field]!r} is not supported here (only {value!r})")
        found, full = pa.module_tensors(directory, tensors, params, family.model_type, task,
                                        {leaf: leaf for leaf in self.method_type.leaves})
        modules = sorted({p[:-1] for p in found})
        method = self.from_config(config, tuple(pa.exact_pattern(m + ("kernel",), "$")
                                                for m in modules))
        flat = traverse_util.flatten_dict(params)
        for module in modules:
            d_in, d_out = flat[module + ("kernel",)].shape
            want = {leaf: v.shape for leaf, v in jax.eval_shape(
                lambda: method.start(jax.random.key(0), d_in, d_out, "/".join(module))).items()}
            got = {p[-1]: v.shape for p, v in found.items() if p[:-1] == module}
            if got != want:
                raise FileFormatError(f"{directory / pa.WEIGHTS_NAME}: {'/'.join(module)} holds "
                                      f"{got}, expected {want} for r={method.rank}")
        trainable = {"params": pa.float32_tree(full), method.name: traverse_util.unflatten_dict(
            {p: jnp.asarray(v, jnp.float32) for p, v in found.items()})}
        return method, trainable
