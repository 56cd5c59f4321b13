"""CorDA (Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language
Models"): LoRA started from the SVD of W0 C, C the covariance of the layer's inputs over a few
batches of task data, trained against the residual.

With W0^T the weight (d_out, d_in), C the damped covariance and s the LoRA scale,

    W0^T C = U S V'^T,  V = C^-1 V',  so  U S V^T = W0^T;
    B0 = U_r sqrt(S_r / s),  A0 = sqrt(S_r / s) V_r^T,  W_res = W0 - s (B0 A0)^T,

with the r largest triplets in the instruction-previewed mode ('ipm': adapt what the task's
inputs excite most) and the r smallest in the knowledge-preserved mode ('kpm': adapt what they
excite least, so the rest of W0 is kept). The covariance is PEFT's `preprocess_corda` statistic
(`calibration.input_covariances`); it is damped as PEFT damps it: C + damp mean(diag C) I, damp
doubled from 0.01 until C C^-1 is within 0.05 of I (Frobenius). The start is computed in
float64, where PEFT computes it in float32 (`context_factors`).

Everything else is PiSSA's (`pissa`): the residual base, the export as a rank-2r LoRA on the
original base. A PEFT adapter trained from a CorDA start cannot be read back (its moved base
depends on data the file lacks: `lora_peft.REFUSED_INITS`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import config_rules as rules
from lora_jax.methods import calibration, pissa

MODES = ("ipm", "kpm")


def damped_inverse(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C + damp mean(diag C) I, its inverse) in float64, damp doubled from 0.01 until the
    product with the inverse is within 0.05 of the identity (PEFT's rule)."""
    c = np.asarray(covariance, np.float64)
    eye = np.eye(c.shape[0])
    damp = 0.01
    while True:
        fixed = c + eye * np.mean(np.diag(c)) * damp
        inverse = np.linalg.inv(fixed)
        if np.linalg.norm(fixed @ inverse - eye) < 0.05:
            return fixed, inverse
        damp *= 2


def _factors64(kernel: np.ndarray, covariance: np.ndarray, rank: int, scale: float,
               mode: str) -> tuple[np.ndarray, np.ndarray]:
    fixed, inverse = damped_inverse(covariance)
    u, s, vt = np.linalg.svd(np.asarray(kernel, np.float64).T @ fixed, full_matrices=False)
    v = (vt @ inverse).T
    chosen = slice(None, rank) if mode == "ipm" else slice(-rank, None)
    root = np.sqrt(s[chosen] / scale)
    return ((root[:, None] * v[:, chosen].T).astype(np.float32),
            (u[:, chosen] * root[None, :]).astype(np.float32))


def context_factors(kernel: jax.Array, covariance: Any, rank: int, scale: float,
                    mode: str) -> tuple[jax.Array, jax.Array]:
    """(A0 (r, d_in), B0 (d_out, r)) of a (d_in, d_out) kernel from its input covariance.

    Computed in float64 on the host (then float32): the smallest triplets that 'kpm' takes are
    ill-conditioned, and a float32 start (PEFT's) lies up to 3e-5 from this one on the tiny
    test models. A host callback, so that the start is also taken where the split is traced."""
    d_in, d_out = kernel.shape
    shapes = (jax.ShapeDtypeStruct((rank, d_in), jnp.float32),
              jax.ShapeDtypeStruct((d_out, rank), jnp.float32))
    return jax.pure_callback(
        lambda k: _factors64(np.asarray(k), covariance, rank, scale, mode), shapes,
        jnp.asarray(kernel, jnp.float32))


@dataclasses.dataclass(frozen=True)
class CorDA(calibration.CalibratedStart):
    """LoRA started from the covariance-oriented SVD of W0 (see the module docstring).

    Attributes:
      mode: 'ipm' (the r largest triplets) or 'kpm' (the r smallest).
      statistics: kernel path -> the covariance of its inputs.
    """

    name = "corda"
    statistic = "input covariance"

    mode: str = "ipm"

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"CorDA mode must be one of {MODES}, got {self.mode!r}")

    def take(self, data: calibration.Batches, kernel_paths) -> dict[str, np.ndarray]:
        return calibration.input_covariances(data, kernel_paths)

    def start(self, kernel: jax.Array, statistic: Any, rank: int, scale: float,
              part: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        # One input for every part of a split output: its covariance serves them all.
        return context_factors(kernel, statistic, rank, scale, self.mode)

    def describe(self) -> str:
        return super().describe()[:-1] + f", {self.mode})"


class CordaPeft(pissa.PissaPeft):
    """Saved as PiSSA is (converted to a plain LoRA on the original base); no PEFT file is read
    as CorDA (`lora_peft.REFUSED_INITS`)."""

    method_type = CorDA
    init_name = None


PEFT = CordaPeft()
REGISTRATION = pissa.registration(PEFT, {"mode": ("ipm", rules.one_of(*MODES)),
                                         "calibration_batches": (8, rules.integer(1))})
