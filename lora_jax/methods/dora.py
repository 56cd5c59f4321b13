"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): LoRA on the direction of W,
with the magnitude trained apart.

Each adapted kernel W0 is decomposed into a magnitude m (one per output unit) and a direction,
and only the direction gets the low-rank update:

    W' = m * (W0 + s B A) / ||W0 + s B A||,       m initialised to ||W0||   (so W' = W0 at step 0)

where the norm is taken over the inputs, per output unit. Section 4.3 of the paper treats the
norm as a constant in the backward pass (it is detached), which saves memory and, the authors
report, costs no accuracy; the official code (NVlabs/DoRA) and PEFT do the same, and so do we.
The forward pass never builds W': with y = W0 x + b and g = m / ||W0 + s B A||,

    y' = y + (g - 1) (W0 x) + g s B A x.

Notation: the paper writes W in R^{d x k} and "column-wise" norms. The official code and PEFT
normalise torch's (d_out, d_in) weight over its input axis, one norm per output unit; that is what
the paper's Eq. (2)-(5) mean for h = W x, and what we do (Flax kernels are (d_in, d_out): the norm
runs over axis 0). With LoRA dropout the input of both the low-rank path and the (g - 1) W0 x
term is the dropped-out x, as in PEFT (the paper is silent).

Split outputs (GPT-2's fused c_attn adapted on q and v only) get magnitudes for the adapted parts
alone; an un-adapted part keeps g = 1, i.e. stays W0 exactly. Exported to PEFT (which knows no
split), such a part's magnitude is written as ||W0|| of its columns, which gives g = 1 there too.

Trainable tree: {'dora': {module: {'lora_a', 'lora_b', 'magnitude'}}}; magnitude is (d_out,) or,
for split outputs, (n, d_part). Merging gives the plain kernel g * (W0 + s (B A)^T).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax.methods import lora, lora_peft
from lora_jax.methods.base import (RESCALES, Method, Params, Registration, fold_into_kernels,
                                   join, modules_of)
from lora_jax.quant import kernels as quant

MAGNITUDE = "magnitude"


def _parts_of(kernel_columns: jax.Array, parts: tuple[bool, ...]) -> jax.Array:
    """The adapted parts' slices of a per-output-unit vector (d_out,): (d_out,) unsplit, else
    (n, d_part) in adapter order."""
    if len(parts) == 1:
        return kernel_columns
    pieces = jnp.split(kernel_columns, len(parts), axis=-1)
    return jnp.stack([pieces[p] for p, _ in lora.adapted_slots(parts)])


def _over_parts(per_part: jax.Array, parts: tuple[bool, ...]) -> jax.Array:
    """(n, d_part) laid out over all d_out outputs, zeros where a part is not adapted."""
    if len(parts) == 1:
        return per_part
    return lora.assemble_parts(list(per_part), parts)


def column_norms(kernel: jax.Array, delta: jax.Array | None = None) -> jax.Array:
    """||W0 + delta|| per output unit of a (d_in, d_out) kernel, in float32."""
    w = kernel.astype(jnp.float32)
    if delta is not None:
        w = w + delta.astype(jnp.float32)
    return jnp.linalg.norm(w, axis=0)


@dataclasses.dataclass(frozen=True)
class DoRA(lora.LoRA):
    """LoRA with a trained magnitude per output unit (see the module docstring)."""

    name = "dora"
    mergeable = True

    def init(self, params: Params, key: jax.Array) -> dict:
        """LoRA's A and B, and each module's magnitude at ||W0|| (its adapted parts')."""
        flat = traverse_util.flatten_dict(params)
        added = traverse_util.flatten_dict(super().init(params, key))
        for module in dict.fromkeys(path[:-1] for path in added):
            key_path = module + ("kernel",)
            added[module + (MAGNITUDE,)] = _parts_of(column_norms(quant.value(flat[key_path])),
                                                     self.spec.parts_for(join(key_path)))
        return traverse_util.unflatten_dict(added)

    def _factor_minus_one(self, path: str, adapter: dict, kernel: jax.Array) -> jax.Array:
        """g - 1 over all outputs (0 on un-adapted parts); the norm carries no gradient."""
        delta = lora.merged_delta(self.spec, path, adapter, jnp.float32)
        parts = self.spec.parts_for(path)
        norm = jax.lax.stop_gradient(_parts_of(column_norms(kernel, delta), parts))
        return _over_parts(adapter[MAGNITUDE] / norm - 1.0, parts)

    def output(self, module, adapter: dict, x: jax.Array, y: jax.Array,
               dropped: bool) -> jax.Array:
        path = lora.kernel_path(module)
        # W0 itself (its norm, and W0 x under dropout): dequantized here if held quantized.
        kernel = quant.value(module.variables["params"]["kernel"])
        g1 = self._factor_minus_one(path, adapter, kernel).astype(y.dtype)
        if dropped or not module.use_bias:
            base = x.astype(y.dtype) @ kernel.astype(y.dtype)  # W0 x of the dropped-out input
        else:
            base = y - module.variables["params"]["bias"].astype(y.dtype)
        delta = lora.low_rank_update(x.astype(y.dtype), adapter[lora.LORA_A],
                                     adapter[lora.LORA_B],
                                     self.spec.scale(path, adapter[lora.LORA_A].shape[-2]),
                                     self.spec.parts_for(path))
        return y + g1 * base + (g1 + 1.0) * delta

    def merge(self, params: Params, added: Params, buffers: Params | None = None) -> dict:
        """Kernels g (W0 + s (B A)^T), written as W0 plus (g - 1) W0 + g s (B A)^T."""
        def delta(module, adapter, w):
            path = join(module + ("kernel",))
            g1 = self._factor_minus_one(path, adapter, w)
            return g1 * w.astype(jnp.float32) + (g1 + 1.0) * lora.merged_delta(
                self.spec, path, adapter, jnp.float32)

        return fold_into_kernels(params, added, delta)

    def describe(self) -> str:
        return "dora" + super().describe().removeprefix("lora")


def _build(c: Any, family: Any) -> DoRA:
    return DoRA(lora.spec_from_config(c), bias=c.bias)


# --- In PEFT's format: a LoRA adapter with `use_dora` and the magnitudes ----------------------

def peft_magnitudes(method: DoRA, adapters: Params, frozen: Params) -> dict:
    """Module path -> DoRA magnitude over all outputs; an un-adapted part of a split output gets
    ||W0|| of its columns, i.e. its factor is 1 (see the module docstring)."""
    flat = traverse_util.flatten_dict(frozen)
    out = {}
    for module, adapter in modules_of(adapters).items():
        parts = method.spec.parts_for(join(module + ("kernel",)))
        magnitude = np.asarray(adapter[MAGNITUDE], np.float32)
        if len(parts) > 1:
            kernel = jax.device_get(flat[module + ("kernel",)])
            norms = np.split(np.asarray(column_norms(kernel)), len(parts))
            for p, j in lora.adapted_slots(parts):
                norms[p] = magnitude[j]
            magnitude = np.concatenate(norms)
        out[module] = magnitude
    return out


class DoraPeft(lora_peft.LoraPeft):
    """DoRA as PEFT keeps it: a LoRA adapter with `use_dora` and each module's magnitude."""

    needs_frozen = True  # the base norms of split outputs' un-adapted parts
    fallback = False

    def claims(self, config: dict) -> bool:
        return bool(config.get("use_dora"))

    def save(self, directory: pathlib.Path, method: Method, trainable: Params,
             frozen: Params | None, **info: Any) -> pathlib.Path:
        adapters = trainable[method.name]
        return lora_peft.write_lora(directory, method.spec, adapters, trainable.get("params", {}),
                                    magnitudes=peft_magnitudes(method, adapters, frozen), **info)

    def load(self, directory: pathlib.Path, params: Params, family: Any,
             task: str | None) -> tuple[Method, dict]:
        config, spec, adapters, full = lora_peft.read_lora(directory, params, family.model_type,
                                                           task, magnitude=MAGNITUDE)
        if lora_peft.init_weights(config).startswith("pissa"):
            raise ValueError(f"{directory}: DoRA with PiSSA initialisation is not supported")
        method = DoRA(spec)
        return method, {"params": full, method.name: adapters}


PEFT = DoraPeft()
REGISTRATION = Registration(lora.REGISTRATION.defaults, lora.REGISTRATION.rules, _build,
                            peft=lambda: PEFT, extends=lora.LoRA.name, kernels=RESCALES)
