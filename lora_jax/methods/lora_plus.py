"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): LoRA with a
larger learning rate for B than for A, eta_B = ratio * eta_A.

The adapters, their forward pass, merge and export are LoRA's; only the optimizer differs, as an
update multiplier on the trainable tree (`Method.update_scales`): every B's update is multiplied
by `lr_ratio`. For AdamW that is exactly a parameter group at lr * ratio (decoupled weight decay
is scaled with the lr, as in torch). The paper suggests ratios around 2^4 = 16.

The reference implementation, and PEFT's `create_loraplus_optimizer` that ports it, also put
every 1-D trainable leaf (biases, LayerNorm scales, a head's bias) in B's group, and give
LayerNorm and bias leaves no weight decay. The paper speaks of B only, so that is our default;
`peft_groups=True` scales the 1-D leaves too, as PEFT does (weight decay stays the optimizer's).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from lora_jax import config_rules as rules
from lora_jax.methods import lora
from lora_jax.methods.base import Params


@dataclasses.dataclass(frozen=True)
class LoraPlus(lora.LoRA):
    """LoRA whose B matrices learn `lr_ratio` times faster (see the module docstring)."""

    name = "lora_plus"
    lr_ratio: float = 16.0
    peft_groups: bool = False

    def update_scales(self, trainable: Params) -> Any:
        def scale(path, leaf):
            keys = [k.key for k in path]
            if keys[0] == self.name and keys[-1] == lora.LORA_B:
                return self.lr_ratio
            if self.peft_groups and leaf.ndim == 1:
                return self.lr_ratio
            return 1.0

        return jax.tree_util.tree_map_with_path(scale, trainable)

    def describe(self) -> str:
        return f"lora_plus(r={self.spec.rank}, ratio={self.lr_ratio:g})"


# Saved as LoRA (in PEFT's format): what was trained is a LoRA.
REGISTRATION = lora.variant_registration(
    LoraPlus, {"lr_ratio": (16.0, rules.number(0, low_open=True)),
               "peft_groups": (False, rules.boolean)})
