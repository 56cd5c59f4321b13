"""Methods that train base parameters in full and add nothing: the paper's FT, FT^Top2, BitFit.

    full        every weight (the paper's FT)
    top_layers  every weight of the last `count` blocks (FT^Top2 with count=2; on GPT-2 in the
                paper, here on any family)
    bitfit      every bias vector, LayerNorms' included (Ben Zaken et al. 2021, as the paper's
                BitFit on RoBERTa and GPT-3)

They merge trivially: the trained weights are plain weights.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from flax import traverse_util

from lora_jax.config_rules import integer
from lora_jax.methods.base import TRAINS, Method, Params, Path, Registration, SettingError


@dataclasses.dataclass(frozen=True)
class FullFineTuning(Method):
    """All base parameters trained (GPT-2's tied embedding included)."""

    name = "full"
    mergeable = True

    def trains(self, params: Params) -> set[Path]:
        return set(traverse_util.flatten_dict(params))


@dataclasses.dataclass(frozen=True)
class TopLayers(Method):
    """Every parameter of the last `count` Transformer blocks trained in full.

    Attributes:
      count: how many of the top blocks.
      layer_index: module path -> block index or None (the family's `layer_index`).
    """

    name = "top_layers"
    mergeable = True

    count: int = 2
    layer_index: object = None  # Callable[[str], int | None]

    def trains(self, params: Params) -> set[Path]:
        flat = traverse_util.flatten_dict(params)
        index = {p: self.layer_index("/".join(p[:-1])) for p in flat}
        blocks = sorted({i for i in index.values() if i is not None})
        if not 1 <= self.count <= len(blocks):
            raise SettingError("count", f"top_layers count={self.count}: must be in [1, "
                               f"{len(blocks)}], the model's blocks")
        top = set(blocks[-self.count:])
        return {p for p, i in index.items() if i in top}

    def describe(self) -> str:
        return f"top_layers({self.count})"


@dataclasses.dataclass(frozen=True)
class BitFit(Method):
    """Every bias trained: Dense and LayerNorm biases alike."""

    name = "bitfit"
    mergeable = True

    def trains(self, params: Params) -> set[Path]:
        return {p for p in traverse_util.flatten_dict(params) if p[-1] == "bias"}


def _no_fields() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict()


def _top_layers_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"count": 2})


FULL = Registration(_no_fields, {}, lambda c, family: FullFineTuning(), kernels=TRAINS)
TOP_LAYERS = Registration(_top_layers_defaults, {"count": integer(1)},
                          lambda c, family: TopLayers(c.count, family.layer_index),
                          kernels=TRAINS)
BITFIT = Registration(_no_fields, {}, lambda c, family: BitFit())
