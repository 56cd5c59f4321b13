"""OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models"):
LoRA started from the QR decomposition of W0, trained against the residual.

With W0^T = Q R (torch orientation, (d_out, d_in); Q orthonormal) and s the LoRA scale,

    B0 = Q_r (d_out, r),   A0 = R_r (r, d_in),   W_res = W0 - s (B0 A0)^T,

so the adapted model equals the base at step 0 and B starts orthonormal. Unlike PiSSA's, the
factors are not divided by s (the paper's and PEFT's `olora_init`). Everything else (the residual
base, its re-derivation on resume, the export as a rank-2r LoRA on the original base) is PiSSA's:
OLoRA is `pissa.PiSSA` with another `factors`.

PEFT factors W0^T too, and its adapters load as OLoRA (`OLoraPeft`). Before PEFT 0.22 it factored
the weight as torch stores it: W0^T for a Linear, but the kernel itself for GPT-2's Conv1D, where
its model then differed from the base at step 0 (and only square kernels fit A's shape). Such a
file (told by its `peft_version`) is read by LoRA's codec as the rank-2r LoRA that reproduces the
function it was trained on (`lora_peft.olora_start`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lora_jax.methods import lora_peft, pissa


@dataclasses.dataclass(frozen=True)
class OLoRA(pissa.PiSSA):
    """LoRA started from W0's QR decomposition (see the module docstring)."""

    name = "olora"

    def factors(self, kernel: jax.Array, rank: int, scale: float, path: str,
                part: tuple[int, int] = (0, 1)) -> tuple[jax.Array, jax.Array]:
        q, r = jnp.linalg.qr(jnp.asarray(kernel, jnp.float32).T)  # reduced: (d_out, k), (k, d_in)
        return r[:rank], q[:, :rank]


class OLoraPeft(pissa.PissaPeft):
    """OLoRA's adapters in PEFT's LoRA format (init_lora_weights 'olora'), where PEFT factored
    W0^T: Linear layers, and GPT-2's Conv1D from PEFT 0.22."""

    method_type = OLoRA
    init_name = "olora"

    def claims(self, config: dict) -> bool:
        # fan_in_fan_out (GPT-2's Conv1D): before PEFT 0.22, the stored kernel was factored, not
        # W0^T (docstring); LoRA's codec reads those.
        as_linear = lora_peft.olora_as_linear(config, not config.get("fan_in_fan_out"))
        return (lora_peft.init_weights(config) == self.init_name and not config.get("use_dora")
                and bool(as_linear))


PEFT = OLoraPeft()
REGISTRATION = pissa.registration(PEFT)
