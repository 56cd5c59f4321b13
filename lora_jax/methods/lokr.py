"""LoKr (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to
Model Evaluation"): the update is a Kronecker product,

    dW = s W1 (x) W2,    W1 (a, c),  W2 (b, d),  d_out = a b,  d_in = c d,  s = alpha / r,

with d_out and d_in each split into two factors (`factorization`: near the square root, or with
one factor `decompose_factor`). W2 is held as a rank-r product W2a W2b when r < max(b, d) / 2,
W1 likewise when `decompose_both` and r < max(a, c) / 2 (PEFT's rule, from LyCORIS). W1 (or W1a)
starts at zero, the rest kaiming-uniform, as PEFT's `LoKrConfig(init_weights=True)`.

PEFT's factorization falls back to other factors when `decompose_factor` does not divide a
dimension; here that is an error naming the kernel (a factor the user chose that silently does
not apply would be worse). PEFT's rank and module dropout are not offered (their defaults, 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lora_jax import config_rules as rules
from lora_jax.methods import loha
from lora_jax.methods.base import ADDS, Registration, SettingError
from lora_jax.methods.factored import Factored, FactoredPeft, kaiming_uniform

W1, W1A, W1B = "lokr_w1", "lokr_w1_a", "lokr_w1_b"  # PEFT's names
W2, W2A, W2B = "lokr_w2", "lokr_w2_a", "lokr_w2_b"


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m n = dimension: with `factor` > 0 dividing it, (factor, dimension / factor);
    with -1, the divisor pair closest to the square root, m <= n (LyCORIS's and PEFT's rule)."""
    if factor > 0:
        return factor, dimension // factor
    m, n = 1, dimension
    for candidate in range(2, dimension + 1):
        if candidate > dimension // candidate:
            break
        if dimension % candidate == 0:
            m, n = candidate, dimension // candidate  # m + n only shrinks as m nears sqrt
    return m, n


@dataclasses.dataclass(frozen=True)
class LoKr(Factored):
    """The Kronecker product of two factors (see the module docstring).

    Attributes:
      decompose_both: W1 too is a rank-r product where r is small enough.
      decompose_factor: one of the two factors of d_in and d_out (-1: near the square root).
    """

    name = "lokr"
    leaves = (W1, W1A, W1B, W2, W2A, W2B)
    low_rank_leaves = leaves

    decompose_both: bool = False
    decompose_factor: int = -1

    def shapes(self, d_in: int, d_out: int, path: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """((a, b), (c, d)): d_out = a b, d_in = c d.

        Raises:
          SettingError: decompose_factor does not divide d_in or d_out.
        """
        f = self.decompose_factor
        if f > 0 and (d_in % f or d_out % f):
            raise SettingError("decompose_factor", f"decompose_factor {f} does not divide the "
                               f"kernel {path} (d_in {d_in}, d_out {d_out})", self.name)
        return factorization(d_out, f), factorization(d_in, f)

    def start(self, key: jax.Array, d_in: int, d_out: int, path: str) -> dict:
        (a, b), (c, d) = self.shapes(d_in, d_out, path)
        r = self.rank
        k1, k2, k3 = jax.random.split(key, 3)
        out = {}
        if self.decompose_both and r < max(a, c) / 2:
            out[W1A] = jnp.zeros((a, r), jnp.float32)
            out[W1B] = kaiming_uniform(k1, (r, c))
        else:
            out[W1] = jnp.zeros((a, c), jnp.float32)
        if r < max(b, d) / 2:
            out[W2A] = kaiming_uniform(k2, (b, r))
            out[W2B] = kaiming_uniform(k3, (r, d))
        else:
            out[W2] = kaiming_uniform(k2, (b, d))
        return out

    def delta(self, factors: dict) -> jax.Array:
        w1 = factors[W1] if W1 in factors else factors[W1A] @ factors[W1B]
        w2 = factors[W2] if W2 in factors else factors[W2A] @ factors[W2B]
        return jnp.kron(w1, w2)

    def describe(self) -> str:
        return super().describe()[:-1] + (f", factor={self.decompose_factor})"
                                          if self.decompose_factor > 0 else ")")


class LoKrPeft(FactoredPeft):
    peft_types = ("LOKR",)
    method_type = LoKr
    unsupported = {**FactoredPeft.unsupported, "use_effective_conv2d": False}

    def config(self, method: LoKr) -> dict:
        return {"decompose_both": method.decompose_both,
                "decompose_factor": method.decompose_factor, "rank_dropout_scale": False}

    def from_config(self, config: dict, targets: tuple[str, ...]) -> LoKr:
        return LoKr(targets, rank=int(config["r"]), alpha=float(config["alpha"]),
                    decompose_both=bool(config.get("decompose_both", False)),
                    decompose_factor=int(config.get("decompose_factor", -1)))


def _defaults() -> ml_collections.ConfigDict:
    c = loha.REGISTRATION.defaults()
    c.decompose_both = False
    c.decompose_factor = -1
    return c


def _factor(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
        return "must be -1 (near the square root) or a positive integer"
    return None


def _build(c: Any, family: Any) -> LoKr:
    return LoKr(tuple(c.targets), rank=c.rank, alpha=c.alpha, decompose_both=c.decompose_both,
                decompose_factor=c.decompose_factor)


PEFT = LoKrPeft()
REGISTRATION = Registration(
    _defaults, {**loha.RULES, "decompose_both": rules.boolean, "decompose_factor": _factor},
    _build, peft=lambda: PEFT, kernels=ADDS)
