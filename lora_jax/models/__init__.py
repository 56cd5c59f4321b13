"""Pure Flax models whose parameter paths mirror Hugging Face's; they know nothing of LoRA.

`FAMILIES` maps a Hugging Face model_type to its `ModelFamily` (see family.py): adding a family is
one model file and one entry here.
"""

import re

from lora_jax.models.encoder import (
    ClassifierOutput,
    EncoderConfig,
    EncoderForSequenceClassification,
    EncoderModel,
    EncoderOutput,
    roberta_position_ids,
    sequence_classification_loss,
)
from lora_jax.models import encoder, gpt2, llama
from lora_jax.models.family import DataDirTokenizer, ModelFamily, PackagedCheckpoint
from lora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel, GPT2Output, lm_loss
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, LlamaOutput

FAMILIES: dict[str, ModelFamily] = {"gpt2": gpt2.GPT2, "bert": encoder.BERT,
                                    "roberta": encoder.ROBERTA, "llama": llama.LLAMA,
                                    "mistral": llama.MISTRAL, "qwen2": llama.QWEN2}


def family(model_type: str) -> ModelFamily:
    """The family of a Hugging Face model_type.

    Raises:
      ValueError: not one we implement (the message lists those we do).
    """
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def packaged_checkpoint(name: str) -> PackagedCheckpoint | None:
    """The packaged checkpoint a family names by `name` ('minilm'); None for any other name (a
    directory or a hub id)."""
    found = [f.checkpoints[name] for f in FAMILIES.values() if name in f.checkpoints]
    return found[0] if found else None


def fused_part_names(module_path: str) -> str:
    """The names of a fused projection's parts, one character each in output order, as its
    family declares them ('qkv' for GPT-2's 'h_0/attn/c_attn'); '' for any other module."""
    for f in FAMILIES.values():
        for pattern, names in f.fused_parts.items():
            if re.search(pattern, module_path):
                return names
    return ""


def data_dir_tokenizer(name: str) -> DataDirTokenizer | None:
    """The tokenizer a family names `name` ('gpt2'), read from the data dir; None for any other
    name (a checkpoint's tokenizer)."""
    found = [f.tokenizers[name] for f in FAMILIES.values() if name in f.tokenizers]
    return found[0] if found else None


__all__ = [
    "ClassifierOutput",
    "DataDirTokenizer",
    "EncoderConfig",
    "EncoderForSequenceClassification",
    "EncoderModel",
    "EncoderOutput",
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2Output",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaOutput",
    "FAMILIES",
    "ModelFamily",
    "PackagedCheckpoint",
    "data_dir_tokenizer",
    "family",
    "fused_part_names",
    "lm_loss",
    "packaged_checkpoint",
    "roberta_position_ids",
    "sequence_classification_loss",
]
