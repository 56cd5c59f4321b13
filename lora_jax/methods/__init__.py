"""Parameter-efficient methods behind one protocol (`base.Method`), composable (`MethodStack`).

    stack = methods.build(config.method, family)      # e.g. use=('lora',) or ('lora', 'preembed')
    frozen, trainable = stack.split(params, key)      # trainable: what the methods train
    apply = stack.adapt(model.apply)                  # apply(frozen, trainable, ids, method_rng=)

`METHODS` is the registry: name -> `Registration` (the method's config section, the rules of its
fields, its builder, its PEFT codec and capabilities). A method is one file and one entry here;
`config.base_config()`, the config checks and `lora_jax.exports` read this table when called, so
an entry added at run time counts too (tests/test_new_method.py).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from lora_jax.methods import (adalora, adapters, corda, dora, eva, full, loftq, loha, lokr, lora,
                              lora_fa, lora_ga, lora_plus, milora, olora, pissa, prefix, vera)
from lora_jax.methods.base import (Method, MethodStack, NotMergeable, Registration, combine,
                                   count_params)

METHODS: dict[str, Registration] = {
    "lora": lora.REGISTRATION,
    "dora": dora.REGISTRATION,
    "pissa": pissa.REGISTRATION,
    "olora": olora.REGISTRATION,
    "milora": milora.REGISTRATION,
    "corda": corda.REGISTRATION,
    "lora_ga": lora_ga.REGISTRATION,
    "eva": eva.REGISTRATION,
    "loftq": loftq.REGISTRATION,
    "lora_plus": lora_plus.REGISTRATION,
    "lora_fa": lora_fa.REGISTRATION,
    "vera": vera.REGISTRATION,
    "adalora": adalora.REGISTRATION,
    "loha": loha.REGISTRATION,
    "lokr": lokr.REGISTRATION,
    "full": full.FULL,
    "top_layers": full.TOP_LAYERS,
    "bitfit": full.BITFIT,
    "adapter_h": adapters.ADAPTER_H,
    "adapter_l": adapters.ADAPTER_L,
    "adapter_p": adapters.ADAPTER_P,
    "adapter_d": adapters.ADAPTER_D,
    "preembed": prefix.PREEMBED,
    "prelayer": prefix.PRELAYER,
}

__all__ = ["METHODS", "Method", "MethodStack", "NotMergeable", "Registration", "build",
           "combine", "count_params", "default_config"]


def default_config() -> ml_collections.ConfigDict:
    """The `config.method` section: which methods run, what every method trains in full, and one
    sub-section of settings per registered method."""
    c = ml_collections.ConfigDict()
    c.use = ("lora",)
    c.also_train = (r"^classifier/",)  # the task head, trained in full with any method
    for name, registration in METHODS.items():
        c[name] = registration.defaults()
    return c


def build(cfg: Any, family: Any) -> MethodStack:
    """The stack a `config.method` section describes, for a model family.

    Raises:
      ValueError: an unknown method name (the registered ones are listed).
    """
    unknown = [name for name in cfg.use if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {', '.join(METHODS)}")
    return MethodStack(tuple(METHODS[name].build(cfg[name], family) for name in cfg.use),
                       also_train=tuple(cfg.also_train))
