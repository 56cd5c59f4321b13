"""Pure Flax models whose parameter paths mirror Hugging Face's; they know nothing of LoRA.

`FAMILIES` maps a Hugging Face model_type to its `ModelFamily` (see family.py): adding a family is
one model file and one entry here.
"""

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
from lora_jax.models.family import ModelFamily
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


__all__ = [
    "ClassifierOutput",
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
    "family",
    "lm_loss",
    "roberta_position_ids",
    "sequence_classification_loss",
]
