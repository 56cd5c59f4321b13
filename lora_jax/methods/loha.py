"""LoHa (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning"; LyCORIS): the update is the Hadamard product of two rank-r products,

    dW = s (W1a W1b) * (W2a W2b),    W1a, W2a (d_out, r),  W1b, W2b (r, d_in),  s = alpha / r,

whose rank can reach r^2 with 2 r (d_in + d_out) parameters. W2b starts at zero (the model starts
as the base) and the others kaiming-uniform, as PEFT's `LoHaConfig(init_weights=True)`. PEFT's
rank and module dropout are not offered (their defaults, 0). The rest is `factored`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lora_jax import config_rules as rules
from lora_jax.methods.base import ADDS, Registration
from lora_jax.methods.factored import Factored, FactoredPeft, kaiming_uniform

W1A, W1B, W2A, W2B = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"  # PEFT's names


@dataclasses.dataclass(frozen=True)
class LoHa(Factored):
    """The Hadamard product of two low-rank products (see the module docstring)."""

    name = "loha"
    leaves = (W1A, W1B, W2A, W2B)
    low_rank_leaves = leaves

    def start(self, key: jax.Array, d_in: int, d_out: int, path: str) -> dict:
        k1, k2, k3 = jax.random.split(key, 3)
        r = self.rank
        return {W1A: kaiming_uniform(k1, (d_out, r)), W1B: kaiming_uniform(k2, (r, d_in)),
                W2A: kaiming_uniform(k3, (d_out, r)), W2B: jnp.zeros((r, d_in), jnp.float32)}

    def delta(self, factors: dict) -> jax.Array:
        return (factors[W1A] @ factors[W1B]) * (factors[W2A] @ factors[W2B])


class LoHaPeft(FactoredPeft):
    peft_types = ("LOHA",)
    method_type = LoHa


def _defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.targets = (r"/query/kernel", r"/value/kernel")
    c.rank = 8
    c.alpha = 8.0
    return c


def _build(c: Any, family: Any) -> LoHa:
    return LoHa(tuple(c.targets), rank=c.rank, alpha=c.alpha)


RULES = {"targets": rules.regexes, "rank": rules.integer(1),
         "alpha": rules.number(0, low_open=True)}
PEFT = LoHaPeft()
REGISTRATION = Registration(_defaults, RULES, _build, peft=lambda: PEFT, kernels=ADDS)
