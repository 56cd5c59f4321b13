"""LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models"):
quantize the frozen weight and initialise the LoRA adapters together, so that the quantized model
with its adapters starts close to the full-precision one.

QLoRA quantizes W and starts B at zero, so fine-tuning begins from Q = q(W), which differs from W
by the whole quantization error. LoftQ instead alternates, from B0 A0 = 0, for t = 1..T:

    Q_t = q(W - B_{t-1} A_{t-1})                    (quantize what the adapters do not carry)
    B_t A_t = the rank-r truncated SVD of W - Q_t    (the adapters carry the quantization error)

and keeps Q_T as the frozen (quantized) weight and A_T, B_T as the adapters' starting values.
With W - Q_t = U S V^T, the factors share the singular values evenly:

    B = U_r sqrt(S_r)  (d_out, r),   A = sqrt(S_r) V_r^T  (r, d_in),

the paper's split and PEFT's `_low_rank_decomposition`. Everything is in torch layout (W is
(d_out, d_in)); a Flax kernel is W^T.

Parity target is PEFT's `peft.utils.loftq_utils.loftq_init` (0.21): 4 bits is bitsandbytes' NF4
in blocks of 64 without double quantization (`Params4bit(..., compress_statistics=False,
quant_type="nf4")`; `lora_jax.quant.nf4` reproduces it bit for bit), 8 bits is
bitsandbytes' row-wise int8 of the weight cast to float16 (`int8.quantize(W.astype(float16))`
here). The alternation is the paper's Algorithm 1 exactly. PEFT sets lora_A = A, lora_B = B and
replaces the base layer's weight by the dequantized Q_T (still a float tensor: the quantized
model is meant to be saved and reloaded in 4 bits; NF4 re-quantizes its own dequantized values to
the same codes, so nothing is lost). PEFT 0.21 runs it on "cuda" (or "xpu") unconditionally, so it
cannot run on a CPU-only machine; tests/test_loftq_numerics.py compares with its loop run on CPU.

Where this differs from PEFT: `scale`. The LoRA layer adds scale * B A (scale = alpha / r), but
the paper's algorithm has no scale and PEFT applies none (huggingface/peft#1982), so with alpha != r PEFT's model starts from
Q + scale * B A, not from ~W. Here the factors are divided by sqrt(scale) each (as PEFT's PiSSA
divides S by the scale), so Q + scale * B A ~ W for any alpha; scale = 1 is PEFT's behaviour
exactly, and the alternation itself is unchanged by the scale.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

Quantize = Callable[[np.ndarray], dict[str, np.ndarray]]
Dequantize = Callable[[Mapping[str, Any], tuple[int, int]], Any]


def low_rank_factors(residual: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(B (d_out, r), A (r, d_in)) with B A the rank-r truncated SVD of `residual`, sqrt of the
    singular values on each side (PEFT's `_low_rank_decomposition`: L = B, R = A), in float32."""
    u, s, vt = np.linalg.svd(np.asarray(residual, np.float32), full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


def _check_args(w: np.ndarray, rank: int, iterations: int, scale: float) -> None:
    """Refuse arguments LoftQ has no meaning for, naming the one that is wrong."""
    if w.ndim != 2:
        raise ValueError(f"loftq: weight of shape {w.shape} is not a (d_out, d_in) matrix")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"loftq: rank {rank} is not in [1, {min(w.shape)}] for a weight of "
                         f"shape {w.shape}")
    if iterations < 1:
        raise ValueError(f"loftq: iterations must be at least 1, got {iterations}")
    if not scale > 0:
        raise ValueError(f"loftq: the LoRA scale must be positive, got {scale}")


def loftq_factors(w: np.ndarray, rank: int, iterations: int, quantize: Quantize,
                  dequantize: Dequantize, scale: float = 1.0
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """LoftQ's alternation on one weight W (d_out, d_in): (parts of Q_T, A (r, d_in), B (d_out, r))
    with dequantize(Q_T) + scale * B A ~ W, all float32 numpy on the host.

    `quantize` / `dequantize` are a format's pair, e.g. `nf4.quantize` / `nf4.dequantize` for
    4 bits (PEFT's choice). Step t quantizes W - scale * B_{t-1} A_{t-1} and takes B_t, A_t from
    the SVD of W - Q_t (module docstring); with scale = 1 this is PEFT's `loftq_init(W, num_bits,
    reduced_rank=rank, num_iter=iterations)` step for step, its (qweight, lora_A, lora_B) being
    (dequantize(parts), A, B).
    """
    w = np.asarray(w, np.float32)
    _check_args(w, rank, iterations, scale)
    target = w
    for step in range(iterations):
        parts = quantize(target)
        q = np.asarray(dequantize(parts, w.shape), np.float32)
        left, right = low_rank_factors(w - q, rank)
        if step + 1 < iterations:  # PEFT skips this after the last step
            target = w - left @ right
    root = np.float32(np.sqrt(scale))
    return parts, right / root, left / root
