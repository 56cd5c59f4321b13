"""The base model a config names, with its tokenizer: a pretrained checkpoint (a directory, a hub
id or a family's packaged short name) or random weights of given sizes; and a run's PRNG keys."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import transformers

from lora_jax.data import tokenizers
from lora_jax.interop import hub

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(cfg: Any, key: jax.Array, data_dir: str | None = None,
                unquantized: tuple[str, ...] = ()):
    """(model, params, tokenizer, export info) for a config's `model` section (`data_dir`: the
    config's data.data_dir, where GPT-2's tokenizer files are).

    Fields: name (checkpoint: 'minilm', a directory or a hub id; empty for random init),
    random_init (HF config fields including model_type, used when name is empty), task (None for
    the LM, 'classification' otherwise), num_labels, tokenizer, dtype, param_dtype, remat,
    attention_implementation, scan_layers, quantize, double_quant. `unquantized`: kernel patterns loaded as
    they are whatever quantize says (`hub.load_pretrained`).
    """
    # .get: a run's config.json from before the field existed has no remat.
    dtypes = dict(dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
                  remat=bool(cfg.get("remat", False)),
                  scan_layers=bool(cfg.get("scan_layers", False)),
                  attention_implementation=cfg.get("attention_implementation"))
    num_labels = cfg.num_labels if cfg.task == "classification" else None
    if cfg.name:
        checkpoint = hub.checkpoint_path(cfg.name)
        model, params, hf_config = hub.load_pretrained(checkpoint, task=cfg.task,
                                                       num_labels=num_labels, rng=key,
                                                       quantize=quantize_option(cfg),
                                                       unquantized=unquantized, **dtypes)
    else:
        checkpoint = None
        fields = dict(cfg.random_init)
        hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
        model = hub.model_from_hf_config(hf_config, task=cfg.task, num_labels=num_labels, **dtypes)
        params = jax.jit(functools.partial(hub.init_params, model))(key)
    tokenizer = tokenizers.load(cfg.tokenizer, checkpoint, data_dir)
    info = {"model_type": hf_config.model_type, "task": cfg.task,
            "base_model_name_or_path": str(cfg.name) if cfg.name else None}
    return model, params, tokenizer, info


def quantize_option(cfg: Any) -> str:
    """`hub.load_pretrained`'s quantize for a config's model section (.get: configs saved
    before the fields existed)."""
    quantize = cfg.get("quantize", "none")
    return "nf4-nested" if quantize == "nf4" and cfg.get("double_quant", False) else quantize


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The (model init, adapter init, training) PRNG keys of a run: evaluation re-derives the
    same random base weights from the seed as training had."""
    return tuple(jax.random.split(jax.random.key(seed), 3))
