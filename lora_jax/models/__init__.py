"""Pure Flax models whose parameter paths mirror Hugging Face's; they know nothing of LoRA."""

from lora_jax.models.encoder import (
    ClassifierOutput,
    EncoderConfig,
    EncoderForSequenceClassification,
    EncoderModel,
    EncoderOutput,
    roberta_position_ids,
    sequence_classification_loss,
)
from lora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel, GPT2Output, lm_loss

__all__ = [
    "ClassifierOutput",
    "EncoderConfig",
    "EncoderForSequenceClassification",
    "EncoderModel",
    "EncoderOutput",
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2Output",
    "lm_loss",
    "roberta_position_ids",
    "sequence_classification_loss",
]
