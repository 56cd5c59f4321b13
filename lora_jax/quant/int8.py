"""Per-output-channel absmax int8, as bitsandbytes' LLM.int8 row-wise quantization stores it.

A weight W (torch layout, (d_out, d_in)) keeps, per row, its absmax (float32) and the int8 codes
round(W * 127 / absmax):

  {"codes": int8 (d_out, d_in), "scale": float32 (d_out,)}

Both equal `bitsandbytes.functional.int8_vectorwise_quant(W, threshold=0.0)` on CPU, and
`dequantize` returns `int8_vectorwise_dequant` bit for bit (tests/test_quant_numerics.py), which
needs bitsandbytes' float32 order: 127 / absmax is taken as reciprocal(absmax) * 127 (torch's
`scalar / tensor`), and dequantization is (codes * absmax) * float32(1/127), not a division.
A row of zeros stores codes 0 and scale 0, as bitsandbytes ends up with on CPU (its 0 * inf is
NaN, cast to int8 as 0).

bitsandbytes' `Linear8bitLt` casts the weight to float16 before quantizing it; this module
quantizes the float32 weight it is given (cast first to match that layer).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

_INV_127 = np.float32(1 / 127)  # bitsandbytes' constant 7.874015718698502e-3 is this float32


def quantize(w: np.ndarray) -> dict[str, np.ndarray]:
    """W (d_out, d_in), float -> {"codes": int8 (d_out, d_in), "scale": float32 (d_out,)}, on the
    host, equal to bitsandbytes' `int8_vectorwise_quant(W, threshold=0.0)`."""
    w = np.asarray(w)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"int8.quantize: weight of shape {w.shape} is not a non-empty "
                         "(d_out, d_in) matrix")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise ValueError(f"int8.quantize: weight of shape {w.shape} has non-finite values")
    scale = np.abs(w).max(axis=1)
    with np.errstate(divide="ignore"):
        # torch computes 127.0 / absmax as reciprocal(absmax) * 127, two float32 roundings.
        factor = (np.float32(1) / scale) * np.float32(127)
    with np.errstate(invalid="ignore"):
        scaled = w * factor[:, None]
    # Zero rows give 0 * inf = NaN, which bitsandbytes' cast turns into 0.
    codes = np.where(scale[:, None] > 0, np.rint(scaled), 0).astype(np.int8)
    return {"codes": codes, "scale": scale.astype(np.float32)}


def dequantize(parts: Mapping[str, jax.Array], shape: tuple[int, int]) -> jax.Array:
    """int8 parts -> W (d_out, d_in) in float32, in jnp (jittable), as bitsandbytes'
    `int8_vectorwise_dequant`: (codes * scale) * float32(1/127)."""
    if frozenset(parts) != {"codes", "scale"}:
        raise KeyError(f"int8.dequantize: parts {sorted(parts)} are not ['codes', 'scale']")
    codes, scale = jnp.asarray(parts["codes"]), jnp.asarray(parts["scale"], jnp.float32)
    if codes.shape != tuple(shape) or scale.shape != (shape[0],):
        raise ValueError(f"int8.dequantize: codes {codes.shape} and scale {scale.shape} do not "
                         f"hold a {tuple(shape)} weight")
    return (codes.astype(jnp.float32) * scale[:, None]) * _INV_127


def nbytes(parts: Mapping[str, jax.Array]) -> int:
    """Bytes the stored parts take."""
    return sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in parts.values())
