"""MiLoRA (Wang et al. 2024, "MiLoRA: Harnessing Minor Singular Components for Parameter-
Efficient LLM Finetuning"): PiSSA's counterpart, started from W0's minor singular components.

With W0^T = U S V^T (torch orientation, singular values in decreasing order) and the last r
triplets (U_m, S_m, V_m),

    B0 = U_m sqrt(S_m / s),   A0 = sqrt(S_m / s) V_m^T,   W_res = W0 - s (B0 A0)^T,

so s B0 A0 is W0's minor part, the frozen W_res its principal part, and the model starts as the
base. The paper argues the principal directions hold the pretrained knowledge, so adapting the
minor ones forgets less. Dividing by s before the square root is PiSSA's convention (the
reference implementation is PEFT's PiSSA with the last r triplets); at alpha = r the two agree.

PEFT has no MiLoRA: the export is PiSSA's conversion, a rank-2r plain LoRA on the original base,
which PEFT loads as any LoRA; no PEFT file is read as MiLoRA.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lora_jax.methods import pissa


def minor_factors(kernel: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """(A0 (r, d_in), B0 (d_out, r)) with s B0 A0 the part of a (d_in, d_out) kernel's W0^T on
    its r smallest singular values, in float32."""
    u, s, vt = jnp.linalg.svd(jnp.asarray(kernel, jnp.float32).T, full_matrices=False)
    root = jnp.sqrt(s[-rank:] / scale)
    return root[:, None] * vt[-rank:], u[:, -rank:] * root[None, :]


@dataclasses.dataclass(frozen=True)
class MiLoRA(pissa.PiSSA):
    """LoRA started from W0's minor singular triplets (see the module docstring)."""

    name = "milora"

    def factors(self, kernel: jax.Array, rank: int, scale: float, path: str,
                part: tuple[int, int] = (0, 1)) -> tuple[jax.Array, jax.Array]:
        return minor_factors(kernel, rank, scale)


class MiLoraPeft(pissa.PissaPeft):
    """Saved as PiSSA is (converted to a plain LoRA); PEFT has no start to read as MiLoRA."""

    method_type = MiLoRA
    init_name = None


PEFT = MiLoraPeft()
REGISTRATION = pissa.registration(PEFT)
