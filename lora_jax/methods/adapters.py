"""Bottleneck adapter layers, the LoRA paper's adapter baselines (its Section 5.1, Tables 1-3).

An adapter maps a sublayer's output h to

    h + up(act(down(h)))          (Adapter^L first normalises: h + up(act(down(LN(h)))))

with `down` (d -> r) and `up` (r -> d) biased fully connected layers and its own skip
connection; `up` starts at zero, so the adapted model equals the base at step 0 (Houlsby et al.'s
near-identity initialisation, made exact). It is inserted, through Flax method interception,
at the output of named modules of every block (the model family says where: `sublayers`):

    adapter_h  Houlsby et al. 2019: after the attention output projection and after the
               feed-forward block, before each residual add (two per block); the model's
               LayerNorms are trained too; GELU.
    adapter_l  Lin et al. 2020: one per block, on the block's output, with a LayerNorm of its own
               before the down-projection; ReLU.
    adapter_p  Pfeiffer et al. 2021: one per block, after the feed-forward block (before its
               residual add); ReLU.
    adapter_d  AdapterDrop (Rueckle et al. 2021): adapter_p's adapters removed from the lowest
               blocks (`drop_lowest`, and/or the block indices in `drop_layers`).

Their parameter count is the paper's |Theta| = L_Adpt (2 d r + r + d) + 2 L_LN d, with L_Adpt
the adapter layers and L_LN the LayerNorms trained (adapter_l: its own, one per block;
adapter_h: the model's). They cannot be merged into the weights: each adds a nonlinear layer,
hence the inference latency the paper's Table 1 measures (benchmarks/latency.py).

Where the papers leave room, the choices here: down-projections drawn from N(0, 0.02^2) (BERT's
initialiser), biases zero; Pfeiffer's adapter is placed at the feed-forward output as the LoRA
paper describes it, without AdapterHub's extra LayerNorm and residual options.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from lora_jax import config_rules as rules
from lora_jax.methods.base import Method, Params, Path, Registration, SettingError, join
from lora_jax.models import scan
from lora_jax.models.layers import activation, layer_norm_apply

DOWN_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class Adapters(Method):
    """Bottleneck adapters at some sublayer outputs of every block (see the module docstring).

    Attributes:
      name: the method's name ('adapter_h', ...).
      sublayers: which of the family's sublayers get an adapter ('attention', 'ffn', 'block').
      bottleneck: r, the adapter's inner width.
      nonlinearity: an activation name ('relu', 'gelu', ...).
      own_layer_norm: a LayerNorm of the adapter's own before the down-projection (Lin et al.).
      train_layer_norms: also train the model's LayerNorms in full (Houlsby et al.).
      drop_lowest: no adapters in the lowest this many blocks (AdapterDrop).
      drop_layers: no adapters in these blocks (AdapterDrop).
      family: the model family (where the sublayers and LayerNorms are).
    """

    name: str = "adapter"
    sublayers: tuple[str, ...] = ("ffn",)
    bottleneck: int = 8
    nonlinearity: str = "relu"
    own_layer_norm: bool = False
    train_layer_norms: bool = False
    drop_lowest: int = 0
    drop_layers: tuple[int, ...] = ()
    family: Any = None
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        activation(self.nonlinearity)  # an unknown name fails here
        unknown = [s for s in self.sublayers if s not in self.family.sublayers]
        if unknown:
            raise ValueError(f"{self.name}: {self.family.model_type} has no sublayers {unknown} "
                             f"(it has {sorted(self.family.sublayers)})")

    def sites(self, params: Params) -> list[Path]:
        """The module paths whose output gets an adapter, block by block.

        Raises:
          SettingError: drop_layers names a block the model lacks, or every block is dropped.
        """
        blocks = self.family.blocks(params)
        if any(i >= len(blocks) for i in self.drop_layers):
            raise SettingError("drop_layers", f"{self.name}: block indices must be < "
                               f"{len(blocks)}, the model's blocks")
        dropped = set(range(self.drop_lowest)) | set(self.drop_layers)
        if len(dropped & set(range(len(blocks)))) == len(blocks):
            field = "drop_lowest" if self.drop_lowest >= len(blocks) else "drop_layers"
            raise SettingError(field, f"{self.name}: drop_lowest={self.drop_lowest} and "
                               f"drop_layers={self.drop_layers} drop all {len(blocks)} blocks; "
                               "they must leave adapters in some")
        sites = []
        for i, block in enumerate(blocks):
            if i in dropped:
                continue
            for sublayer in self.sublayers:
                relative = self.family.sublayers[sublayer]
                sites.append(block + tuple(relative.split("/")) if relative else block)
        return sites

    def trains(self, params: Params) -> set[Path]:
        if not self.train_layer_norms:
            return set()
        return {p for p in traverse_util.flatten_dict(params)
                if re.search(self.family.layer_norm, join(p[:-1]))}

    def init(self, params: Params, key: jax.Array) -> dict:
        d, r = self.family.hidden_size(params), self.bottleneck
        sites = self.sites(params)
        added = {}
        for site, k in zip(sites, jax.random.split(key, len(sites))):
            layers = {"down": {"kernel": DOWN_INIT_STD * jax.random.normal(k, (d, r)),
                               "bias": jnp.zeros((r,))},
                      "up": {"kernel": jnp.zeros((r, d)), "bias": jnp.zeros((d,))}}
            if self.own_layer_norm:
                layers["layer_norm"] = {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}
            added[site] = layers
        return traverse_util.unflatten_dict(
            {site + path: jnp.asarray(v, jnp.float32) for site, layers in added.items()
             for path, v in traverse_util.flatten_dict(layers).items()})

    @contextlib.contextmanager
    def intercept(self, added: Params, rng: jax.Array | None, buffers: Params | None = None):
        weights = _site_weights(added)
        act = activation(self.nonlinearity)

        def adapted(path, out):
            if path not in weights:  # a block without an adapter (AdapterDrop's lower blocks)
                return out
            h = out[0] if isinstance(out, tuple) else out
            h = h + bottleneck(h, weights[path], act, self.layer_norm_epsilon)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        def hook(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = tuple(context.module.path)
            if context.method_name != "__call__" or not any(
                    p in weights for p in scan.block_paths(path) or (path,)):
                return out
            return scan.per_block(path, adapted, out)

        with nn.intercept_methods(hook):
            yield

    def describe(self) -> str:
        return f"{self.name}(r={self.bottleneck})"


def _site_weights(added: Params) -> dict[Path, dict]:
    """Site module path -> {'down', 'up'[, 'layer_norm']} (each a dict of arrays)."""
    sites: dict[Path, dict] = {}
    for path, leaf in traverse_util.flatten_dict(added).items():
        site, layer, name = path[:-2], path[-2], path[-1]
        sites.setdefault(site, {}).setdefault(layer, {})[name] = leaf
    return sites


def bottleneck(h: jax.Array, w: Mapping, act: Callable, epsilon: float) -> jax.Array:
    """up(act(down(h))) (down of LN(h) when the adapter has its own LayerNorm), in h's dtype."""
    x = h
    if "layer_norm" in w:
        x = layer_norm_apply(x, w["layer_norm"]["scale"], w["layer_norm"]["bias"], epsilon)
    down, up = w["down"], w["up"]
    z = act(x @ down["kernel"].astype(h.dtype) + down["bias"].astype(h.dtype))
    return z @ up["kernel"].astype(h.dtype) + up["bias"].astype(h.dtype)


# --- Registrations ------------------------------------------------------------------------------

PRESETS = {
    "adapter_h": dict(sublayers=("attention", "ffn"), nonlinearity="gelu",
                      train_layer_norms=True),
    "adapter_l": dict(sublayers=("block",), nonlinearity="relu", own_layer_norm=True),
    "adapter_p": dict(sublayers=("ffn",), nonlinearity="relu"),
    "adapter_d": dict(sublayers=("ffn",), nonlinearity="relu"),
}


def _registration(name: str) -> Registration:
    preset = PRESETS[name]
    dropping = name == "adapter_d"

    def defaults() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict({"bottleneck": 8, "nonlinearity": preset["nonlinearity"]})
        if dropping:
            c.drop_lowest = 1
            c.drop_layers = ()
        return c

    section_rules = {"bottleneck": rules.integer(1),
                     "nonlinearity": rules.one_of("relu", "gelu", "gelu_new", "silu")}
    if dropping:
        section_rules |= {"drop_lowest": rules.integer(0), "drop_layers": rules.int_tuple(0)}

    def build(c: Any, family: Any) -> Adapters:
        drop = dict(drop_lowest=c.drop_lowest, drop_layers=tuple(c.drop_layers)) if dropping \
            else {}
        return Adapters(name=name, bottleneck=c.bottleneck, family=family,
                        **{**preset, "nonlinearity": c.nonlinearity}, **drop)

    return Registration(defaults, section_rules, build)


ADAPTER_H, ADAPTER_L, ADAPTER_P, ADAPTER_D = (_registration(n) for n in PRESETS)
