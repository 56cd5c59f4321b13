"""LoRA-GA (Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation"): LoRA
started from the SVD of the full weight's gradient, so that its first steps move W as full
fine-tuning would; trained against the residual.

With G (d_out, d_in) the gradient of the training loss with respect to W0^T, averaged over the
run's first `calibration_batches`, G = U S V^T, and s the LoRA scale, the paper's default
('ArB2r') takes

    A0 = V_[1:r]^T,   B0 = U_[r+1:2r],   W_res = W0 - s (B0 A0)^T,

('A2rBr' swaps the halves, 'ArBr' alternates them), then rescales both by d_out^(1/4) / sqrt(gamma)
('stable', gamma = 16), or both by 1 / s ('gd'), or neither ('unit'). This is the paper's
reference code. PEFT's `lora_ga_init` differs: B0 carries the singular values, U_B S_B, and
'stable' rescales B0 alone; `form='peft'` does that (the parity tests use it). PEFT's randomised
SVD (torch.svd_lowrank) is exact where its 4r columns span the gradient, as on the tiny test
models; here the SVD is exact, in float64.

The statistic is `calibration.kernel_gradients`; the residual base, its re-derivation from the
kept start, and the export as a rank-2r LoRA on the original base are PiSSA's (`pissa`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import config_rules as rules
from lora_jax.methods import calibration, pissa
from lora_jax.methods.base import SettingError

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
SCALES = ("stable", "gd", "unit")
FORMS = ("paper", "peft")


def gradient_factors(gradient: np.ndarray, rank: int, scale: float, direction: str,
                     rescale: str, gamma: float, form: str) -> tuple[np.ndarray, np.ndarray]:
    """(A0 (r, d_in), B0 (d_out, r)) from a gradient G (d_out, d_in), in float64 on the host,
    returned as float32 (see the module docstring)."""
    u, s, vt = np.linalg.svd(np.asarray(gradient, np.float64), full_matrices=False)
    if direction == "ArB2r":
        a_rows, b_cols = np.arange(rank), np.arange(rank, 2 * rank)
    elif direction == "A2rBr":
        a_rows, b_cols = np.arange(rank, 2 * rank), np.arange(rank)
    else:  # ArBr: A the odd components, B the even ones
        a_rows, b_cols = np.arange(1, 2 * rank, 2), np.arange(0, 2 * rank, 2)
    a, b = vt[a_rows], u[:, b_cols]
    if form == "peft":
        b = b * s[b_cols][None, :]
    if rescale == "stable":
        factor = gradient.shape[0] ** 0.25 / gamma**0.5
        a, b = (a, b * factor) if form == "peft" else (a * factor, b * factor)
    elif rescale == "gd":
        a, b = a / scale, b / scale
    return a.astype(np.float32), b.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LoraGA(calibration.CalibratedStart):
    """LoRA started from the SVD of W0's gradient (see the module docstring).

    Attributes:
      direction: which singular vectors A0 and B0 take ('ArB2r', 'A2rBr', 'ArBr').
      scale: 'stable', 'gd' or 'unit'; gamma: the 'stable' rescaling's.
      form: 'paper' (the reference code) or 'peft' (PEFT's `lora_ga_init`).
      statistics: kernel path -> its gradient (d_in, d_out), averaged over the batches.
    """

    name = "lora_ga"
    statistic = "gradient"

    direction: str = "ArB2r"
    scale: str = "stable"
    gamma: float = 16.0
    form: str = "paper"

    def take(self, data: calibration.Batches, kernel_paths) -> dict[str, np.ndarray]:
        return calibration.kernel_gradients(data, kernel_paths)

    def check(self, kernel_shape: tuple[int, int], rank: int, path: str) -> None:
        if 2 * rank > min(kernel_shape):
            raise SettingError("rank", f"LoRA-GA takes 2r = {2 * rank} singular vectors of "
                               f"{path}'s gradient, which has {min(kernel_shape)}", self.name)

    def start(self, kernel: jax.Array, statistic: Any, rank: int, scale: float,
              part: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        d_in, d_out = kernel.shape
        index, count = part
        gradient = np.split(np.asarray(statistic), count, axis=1)[index].T  # (d_out, d_in)
        shapes = (jax.ShapeDtypeStruct((rank, d_in), jnp.float32),
                  jax.ShapeDtypeStruct((d_out, rank), jnp.float32))
        return jax.pure_callback(lambda: gradient_factors(
            gradient, rank, scale, self.direction, self.scale, self.gamma, self.form), shapes)

    def describe(self) -> str:
        return super().describe()[:-1] + f", {self.direction}, {self.scale})"


class LoraGaPeft(pissa.PissaPeft):
    """Saved as PiSSA is (converted to a plain LoRA on the original base); no PEFT file is read
    as LoRA-GA (`lora_peft.REFUSED_INITS`)."""

    method_type = LoraGA
    init_name = None


PEFT = LoraGaPeft()
REGISTRATION = pissa.registration(PEFT, {
    "direction": ("ArB2r", rules.one_of(*DIRECTIONS)), "scale": ("stable", rules.one_of(*SCALES)),
    "gamma": (16.0, rules.number(0, low_open=True)), "form": ("paper", rules.one_of(*FORMS)),
    "calibration_batches": (8, rules.integer(1))})
