"""PiSSA (Meng et al. 2024, "Principal Singular values and Singular vectors Adaptation"): LoRA
whose adapters start as W0's principal part, trained against the residual.

With W0^T = U S V^T (torch orientation, (d_out, d_in)) and s the LoRA scale,

    B0 = U_r sqrt(S_r / s),   A0 = sqrt(S_r / s) V_r^T,   W_res = W0 - s (B0 A0)^T,

so W_res + s B0 A0 = W0 and the adapted model equals the base at step 0, while training moves the
r principal directions first. The frozen tree holds W_res (`base`); it is a pure function of
W0, so a resumed run derives the same residual. Dividing S_r by s before the square root is
PEFT's choice, which makes s B0 A0 the principal part for any alpha; the paper uses alpha = r
(s = 1), where the two agree. We use the exact SVD in float32 (the paper's and PEFT's
'pissa'); PEFT's randomised 'pissa_niter_k' draws from torch's generator and is not offered.

Saving: the trained W_res + s B A is, on the original base, the plain LoRA

    W0 + s' B' A',   A' = [A; A0],   B' = [B, -B0],   rank 2r,  s' = s  (alpha' = 2 alpha),

which is PEFT's conversion (`save_pretrained(path_initial_model_for_weight_conversion=...)`):
the export is that rank-2r LoRA adapter, so a user keeps the original base and loads it as any
LoRA (`lora_peft.export_peft`; `PissaPeft` below). A PEFT adapter saved without the conversion
(init_lora_weights 'pissa') is read as PiSSA, its residual re-derived from the base.

Split outputs (GPT-2's fused c_attn on q and v) take each adapted part's own SVD.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax.methods import lora, lora_peft
from lora_jax.methods.base import (RESIDUAL, Method, Params, Registration, SettingError, join,
                                   modules_of)
from lora_jax.quant import kernels as quant


def principal_factors(kernel: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """(A0 (r, d_in), B0 (d_out, r)) with s B0 A0 the rank-r principal part of a (d_in, d_out)
    kernel's W0^T, in float32."""
    w = jnp.asarray(kernel, jnp.float32).T
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(s[:rank] / scale)
    return root[:, None] * vt[:rank], u[:, :rank] * root[None, :]


@dataclasses.dataclass(frozen=True)
class PiSSA(lora.LoRA):
    """LoRA initialised from W0's principal singular triplets (see the module docstring)."""

    name = "pissa"
    mergeable = True

    def factors(self, kernel: jax.Array, rank: int, scale: float, path: str,
                part: tuple[int, int] = (0, 1)) -> tuple[jax.Array, jax.Array]:
        """(A0, B0) of one (d_in, d_out) kernel at `path` (for split outputs, part `part` =
        (index, count) of it): its principal part (`principal_factors`). Starts of the same
        kind (OLoRA, MiLoRA, CorDA, LoRA-GA) subclass PiSSA and override this alone."""
        return principal_factors(kernel, rank, scale)

    def init(self, params: Params, key: jax.Array) -> dict:
        flat = traverse_util.flatten_dict(params)
        adapters = {}
        for path in lora.target_kernels(self.spec, params):
            # Over a quantized base, the SVD of the dequantized kernel (its residual is then held
            # in the param dtype: W0 - s B0 A0 is not on the quantization grid).
            kernel = quant.value(flat[tuple(path.split("/"))])
            a_shape, _ = lora.adapter_shapes(self.spec, path, kernel.shape)
            rank, parts = a_shape[-2], self.spec.parts_for(path)
            scale = self.spec.scale(path, rank)
            columns = jnp.split(kernel, len(parts), axis=1)
            factors = [self.factors(columns[p], rank, scale, path, (p, len(parts)))
                       for p, _ in lora.adapted_slots(parts)]
            module = tuple(path.split("/")[:-1])
            if len(parts) == 1:
                a, b = factors[0]
            else:
                a, b = jnp.stack([f[0] for f in factors]), jnp.stack([f[1] for f in factors])
            adapters[module + (lora.LORA_A,)] = a
            adapters[module + (lora.LORA_B,)] = b
        return traverse_util.unflatten_dict(adapters)

    def base(self, params: Params, buffers: Params) -> dict:
        """W_res = W0 - s (B0 A0)^T in every adapted kernel (the rest unchanged).

        Raises:
          SettingError: an adapted kernel is trained in full (not in the frozen `params`).
        """
        flat = traverse_util.flatten_dict(params)
        trained = [join(m + ("kernel",)) for m in modules_of(buffers["initial"])
                   if m + ("kernel",) not in flat]
        if trained:
            raise SettingError("targets", f"{', '.join(trained)} are trained in full (by "
                               f"method.also_train or another method), but {self.name}'s "
                               "residual base needs them frozen")
        return lora.fold_adapters(self.spec, params, buffers["initial"], -1.0)

    def buffers(self, params: Params) -> dict:
        """The initial A0, B0 (from the original W0): the residual base is derived from them,
        and the conversion to LoRA needs them."""
        return {"initial": self.init(params, jax.random.key(0))}  # the key is unused

    def describe(self) -> str:
        return self.name + super().describe().removeprefix("lora")


def as_lora(spec: lora.LoraSpec, initial: Params, adapters: Params) -> tuple[lora.LoraSpec, dict]:
    """PEFT's conversion of trained PiSSA adapters into a rank-2r LoRA on the original base (see
    the module docstring): (spec, adapters) with W0 + s' B' A' the trained function. `initial`:
    A0 and B0, the method's buffers['initial'].

    Raises:
      ValueError: rank or alpha patterns with rslora (the scale would not carry over; PEFT
        refuses this too).
    """
    if spec.rslora and (spec.rank_pattern or spec.alpha_pattern):
        raise ValueError("PiSSA's conversion to LoRA does not support rank or alpha patterns "
                         "together with rslora")
    initial = modules_of(initial)
    flat = {}
    for module, ab in modules_of(adapters).items():
        a0, b0 = np.asarray(initial[module][lora.LORA_A]), np.asarray(initial[module][lora.LORA_B])
        a, b = np.asarray(ab[lora.LORA_A]), np.asarray(ab[lora.LORA_B])
        flat[module + (lora.LORA_A,)] = jnp.asarray(np.concatenate([a, a0], axis=-2))
        flat[module + (lora.LORA_B,)] = jnp.asarray(np.concatenate([b, -b0], axis=-1))
    # Doubling alpha with the rank keeps alpha / r; under rslora alpha / sqrt(r) needs sqrt(2).
    factor = np.sqrt(2.0) if spec.rslora else 2.0
    converted = dataclasses.replace(
        spec, rank=2 * spec.rank, alpha=spec.alpha * factor,
        rank_pattern={k: 2 * v for k, v in spec.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in spec.alpha_pattern.items()})
    return converted, traverse_util.unflatten_dict(flat)


def _related(c: Any) -> list[str]:
    """What `as_lora` would refuse when the trained run is exported, said before it starts."""
    if c.rslora and (c.rank_pattern or c.alpha_pattern):
        return ["rslora = True: the run is exported as a rank-2r LoRA, whose scale under rslora "
                "cannot follow rank_pattern or alpha_pattern; set rslora False or clear them"]
    return []


class PissaPeft(lora_peft.LoraPeft):
    """PiSSA in PEFT's LoRA format: saved converted (`as_lora`), so the export is a plain LoRA on
    the original base; read from an adapter saved unconverted (init_lora_weights 'pissa'), its
    residual base re-derived from the params by `MethodStack.frozen`. A start of the same kind
    subclasses it with its own `method_type` and `init_name` (None: PEFT has no such start, so
    no file is read as it)."""

    needs_frozen = True  # the initial adapters, for the conversion
    fallback = False
    method_type: type[PiSSA] = PiSSA
    init_name: str | None = "pissa"

    def claims(self, config: dict) -> bool:
        return (self.init_name is not None and not config.get("use_dora")
                and lora_peft.init_weights(config).startswith(self.init_name))

    def save(self, directory: pathlib.Path, method: Method, trainable: Params,
             frozen: Params | None, **info: Any) -> pathlib.Path:
        spec, adapters = as_lora(method.spec, jax.device_get(frozen[method.name]["initial"]),
                                 jax.device_get(trainable[method.name]))
        return lora_peft.write_lora(directory, spec, adapters, trainable.get("params", {}),
                                    **info)

    def load(self, directory: pathlib.Path, params: Params, family: Any,
             task: str | None) -> tuple[Method, dict]:
        """(`read_lora` refuses PEFT's randomised SVD, 'pissa_niter_k', whose residual cannot
        be re-derived here.)"""
        _, spec, adapters, full = lora_peft.read_lora(directory, params, family.model_type, task,
                                                      convert_olora=False)
        method = self.method_type(spec)
        return method, {"params": full, method.name: adapters}


def registration(codec: PissaPeft,
                 fields: Mapping[str, tuple[Any, Any]] | None = None) -> Registration:
    """The registry entry of PiSSA or a start of its kind (`codec.method_type`): LoRA's section
    without `init` (the start sets A and B) plus its own `fields` (name -> (default, rule)),
    trained against a residual base."""
    return lora.variant_registration(codec.method_type, fields or {}, lambda: codec,
                                     kernels=RESIDUAL, without=("init",), related=_related)


PEFT = PissaPeft()
REGISTRATION = registration(PEFT)
