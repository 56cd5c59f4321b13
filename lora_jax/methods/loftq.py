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

Parity target is PEFT's `peft.utils.loftq_utils.loftq_init` (0.22): 4 bits is bitsandbytes' NF4
in blocks of 64 without double quantization (`Params4bit(..., compress_statistics=False,
quant_type="nf4")`; `lora_jax.quant.nf4` reproduces it bit for bit), 8 bits is
bitsandbytes' row-wise int8 of the weight cast to float16 (`int8.quantize(W.astype(float16))`
here). The alternation is the paper's Algorithm 1 exactly. PEFT sets lora_A = A, lora_B = B and
replaces the base layer's weight by the dequantized Q_T (still a float tensor: the quantized
model is meant to be saved and reloaded in 4 bits; NF4 re-quantizes its own dequantized values to
the same codes, so nothing is lost). Since 0.22 PEFT runs it on the CPU too (before, on "cuda"
unconditionally), so tests/test_loftq_numerics.py and tests/test_loftq.py call it as it is.

Where this differs from PEFT: `scale`. The LoRA layer adds scale * B A (scale = alpha / r), but
the paper's algorithm has no scale and PEFT applies none (huggingface/peft#1982), so with
alpha != r PEFT's model starts from Q + scale * B A, not from ~W. Here the factors are divided
by sqrt(scale) each (as PEFT's PiSSA divides S by the scale), so Q + scale * B A ~ W for any
alpha; scale = 1 is PEFT's behaviour
exactly, and the alternation itself is unchanged by the scale.

As a method (`LoftQ`, next to PiSSA): LoRA whose targeted kernels are replaced in the frozen tree
by Q_T, held quantized in `bits` (4: nf4, 8: int8), and whose adapters start at A_T, B_T. It
needs each target's original W: a run with model.quantize other than 'none' loads LoftQ's targets
unquantized (`Registration.reads_original_kernels`) and LoftQ quantizes them itself, one kernel
at a time on the host, before anything is placed on the device (the other kernels follow
model.quantize). Q_T is a deterministic function of W, so a resumed run derives the same base.
Its trained adapters are saved in lora_jax's own format: on the original base W, Q_T + s B A is
not a LoRA (W - Q_T is not low-rank), so there is no PEFT LoRA adapter to write (PEFT's LoftQ
users save the quantized base with it; `lora_peft` refuses PEFT's 'loftq' adapters likewise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from lora_jax import config_rules as rules
from lora_jax.methods import lora
from lora_jax.methods.base import RESIDUAL, Params, Registration, SettingError
from lora_jax.quant import kernels as quant

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


FORMATS = {4: "nf4", 8: "int8"}


@dataclasses.dataclass(frozen=True)
class LoftQ(lora.LoRA):
    """LoRA over LoftQ's quantized base (see the module docstring)."""

    name = "loftq"
    mergeable = True
    bits: int = 4
    iterations: int = 1

    def _decompose(self, params: Params) -> dict[str, tuple[Any, np.ndarray, np.ndarray]]:
        """Kernel path -> (Q_T as a QuantizedKernel, A, B) for every targeted kernel."""
        flat = traverse_util.flatten_dict(params)
        fmt = quant.FORMATS[FORMATS[self.bits]]
        out = {}
        for path in lora.target_kernels(self.spec, params):
            kernel = flat[tuple(path.split("/"))]
            if quant.is_quantized(kernel):
                raise SettingError("targets", f"LoftQ needs the original weight of {path}, which "
                                   "was loaded quantized; load it unquantized (the trainer does)")
            if self.spec.parts_for(path) != (True,):
                raise SettingError("split_outputs", f"LoftQ quantizes whole kernels; {path} is "
                                   "split into parts")
            a_shape, b_shape = lora.adapter_shapes(self.spec, path, kernel.shape)
            if isinstance(kernel, jax.core.Tracer):
                # Under jax.eval_shape (the config checks) only the shapes matter.
                parts = fmt.quantize(np.zeros(kernel.shape[::-1], np.float32))
                a, b = np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)
            else:
                parts, a, b = loftq_factors(np.asarray(kernel, np.float32).T, a_shape[0],
                                            self.iterations, fmt.quantize, fmt.dequantize,
                                            self.spec.scale(path, a_shape[0]))
            stored = quant.QuantizedKernel({k: jnp.asarray(v) for k, v in parts.items()},
                                           FORMATS[self.bits], tuple(kernel.shape), kernel.dtype)
            out[path] = (stored, a, b)
        return out

    def init(self, params: Params, key: jax.Array) -> dict:
        adapters = {}
        for path, (_, a, b) in self._decompose(params).items():
            module = tuple(path.split("/")[:-1])
            adapters[module + (lora.LORA_A,)] = jnp.asarray(a)
            adapters[module + (lora.LORA_B,)] = jnp.asarray(b)
        return traverse_util.unflatten_dict(adapters)

    def base(self, params: Params, buffers: Params) -> dict:
        """Every targeted kernel replaced by its Q_T (the rest unchanged)."""
        flat = traverse_util.flatten_dict(params)
        for path, (stored, _, _) in self._decompose(params).items():
            flat[tuple(path.split("/"))] = stored
        return traverse_util.unflatten_dict(flat)

    def describe(self) -> str:
        return (f"loftq({self.bits}-bit, T={self.iterations})"
                + super().describe().removeprefix("lora"))


def _defaults() -> ml_collections.ConfigDict:
    c = lora.REGISTRATION.defaults()
    del c["init"]  # the alternation sets A and B
    c.bits = 4  # Q_T's format: 4 = nf4 (PEFT's and the paper's), 8 = int8
    c.iterations = 1  # T, the paper's alternating steps (PEFT's loftq_iter, default 1)
    return c


def _build(c: Any, family: Any) -> LoftQ:
    return LoftQ(lora.spec_from_config(c, init="kaiming"), bias=c.bias, bits=c.bits,
                 iterations=c.iterations)


REGISTRATION = Registration(
    _defaults,
    {**{k: v for k, v in lora.REGISTRATION.rules.items() if k != "init"},
     "bits": rules.one_of(*FORMATS), "iterations": rules.integer(1)},
    _build, extends=lora.LoRA.name, kernels=RESIDUAL, reads_original_kernels=True)
