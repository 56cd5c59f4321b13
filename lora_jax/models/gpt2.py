"""GPT-2 language model in Flax linen, module for module with Hugging Face's GPT2LMHeadModel.

Parameter paths mirror HF's `transformer.*` keys (our root is HF's `transformer`):

    wte/embedding, wpe/embedding
    h_{i}/ln_1, h_{i}/attn/c_attn, h_{i}/attn/c_proj, h_{i}/ln_2, h_{i}/mlp/c_fc, h_{i}/mlp/c_proj
    ln_f

Every projection is a plain `nn.Dense` with a (d_in, d_out) kernel, which is also the layout of HF's
Conv1D weights. The LM head is tied to `wte`.

For incremental decoding the model takes and returns an explicit `KVCache` (a plain pytree argument,
not a Flax variable collection, so that wrappers such as `lora.adapt`, which build the variables
themselves, pass it through untouched).
"""

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.losses import mean_loss
from lora_jax.models.family import DataDirTokenizer, ModelFamily, hf_values
from lora_jax.models import layers
from lora_jax.models.layers import activation, dot_product_attention, layer_norm

# HF GPT-2 options whose non-default values this implementation does not reproduce.
_REQUIRED_HF_VALUES = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}


# The Hugging Face config's fields that our config takes over unchanged.
_HF_FIELDS = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "layer_norm_epsilon", "embd_pdrop", "attn_pdrop", "resid_pdrop", "initializer_range",
)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyperparameters, named as in `transformers.GPT2Config`.

    `dtype` is the compute dtype and `param_dtype` the storage dtype of the weights; softmax and
    layer-norm statistics run in float32 whatever they are.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd, as in HF
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02
    attention_implementation: str | None = None  # None (XLA) or 'cudnn' (GPU, bf16/fp16)
    # Recompute each block's activations in the backward pass instead of keeping them: memory
    # for long sequences and deep models (GPT-2 XL) at the price of about one more forward.
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    # A class attribute, not a field: like EncoderConfig.model_type, it names the family.
    model_type = "gpt2"

    def __post_init__(self):
        activation(self.activation_function)  # an unknown name fails here, not mid-trace
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "GPT2Config":
        """Builds a config from a `transformers.GPT2Config`.

        Args:
          hf_config: the Hugging Face config object.
          **overrides: fields to set differently, e.g. `dtype=jnp.bfloat16`.

        Returns:
          The config.
        """
        values = hf_values(hf_config, _HF_FIELDS, _REQUIRED_HF_VALUES, "GPT-2")
        return cls(**(values | overrides))


# One layer's cached (keys, values) in incremental decoding: what a block reads and returns.
LayerKV = tuple[jax.Array, jax.Array]


class KVCache(NamedTuple):
    """Keys and values of the tokens fed so far, for incremental decoding.

    The token fed at step s sits in slot s of every layer. The model's `attention_mask` [B, S] then
    marks the slots that hold real tokens (0 for left padding); a token attends to the real slots up
    to its own.
    """

    keys: tuple[jax.Array, ...]  # n_layer arrays [B, S, n_head, head_dim], compute dtype
    values: tuple[jax.Array, ...]
    index: jax.Array  # int32 scalar: the slot the next input token is written to


def init_cache(config: GPT2Config, batch_size: int, length: int) -> KVCache:
    """An empty cache with `length` slots per row.

    Args:
      config: the model's config.
      batch_size: rows B.
      length: slots S, at least the prompt length plus the tokens to generate.

    Returns:
      A KVCache of zeros whose next slot is 0.
    """
    shape = (batch_size, length, config.n_head, config.n_embd // config.n_head)
    zeros = tuple(jnp.zeros(shape, config.dtype) for _ in range(config.n_layer))
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32))


class GPT2Output(NamedTuple):
    logits: jax.Array  # [B, T, vocab], compute dtype
    hidden_states: tuple[jax.Array, ...] | None  # n_layer + 1 arrays [B, T, n_embd], as HF
    cache: KVCache | None = None  # the updated cache, when one was passed


def _dense(cfg: GPT2Config, features: int, name: str) -> layers.Dense:
    return layers.Dense(
        features,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
        name=name,
    )


def _layer_norm(cfg: GPT2Config, name: str) -> nn.LayerNorm:
    return layer_norm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype, name)


class GPT2Attention(nn.Module):
    """Causal self-attention: fused `c_attn` (d -> 3d) projection, then `c_proj`."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool,
                 kv: LayerKV | None = None, index: jax.Array | None = None,
                 ) -> tuple[jax.Array, LayerKV | None]:
        """Returns (output, updated (keys, values) or None). With `kv`, `mask` is the whole
        [B, 1, T, S] attention pattern over the cache slots (causality included)."""
        cfg = self.config
        batch, length, width = x.shape
        qkv = _dense(cfg, 3 * width, "c_attn")(x)
        # HF splits q|k|v first, then each into contiguous heads.
        q, k, v = (
            t.reshape(batch, length, cfg.n_head, width // cfg.n_head)
            for t in jnp.split(qkv, 3, axis=-1)
        )
        if kv is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), index, axis=1)
            kv = (k, v)
        rng = None if deterministic or cfg.attn_pdrop == 0 else self.make_rng("dropout")
        y = dot_product_attention(
            q, k, v, mask,
            is_causal=kv is None,
            dropout_rate=cfg.attn_pdrop,
            dropout_rng=rng,
            implementation=cfg.attention_implementation,
        )
        y = _dense(cfg, width, "c_proj")(y.reshape(batch, length, width))
        # Named as HF's modules: methods attach at the sublayer outputs by these paths.
        y = nn.Dropout(cfg.resid_pdrop, name="resid_dropout")(y, deterministic=deterministic)
        return y, kv


class GPT2MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        h = _dense(cfg, cfg.n_inner or 4 * cfg.n_embd, "c_fc")(x)
        h = _dense(cfg, cfg.n_embd, "c_proj")(activation(cfg.activation_function)(h))
        return nn.Dropout(cfg.resid_pdrop, name="dropout")(h, deterministic=deterministic)


class GPT2Block(nn.Module):
    """Pre-norm transformer block."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool,
                 kv: LayerKV | None = None, index: jax.Array | None = None,
                 ) -> tuple[jax.Array, LayerKV | None]:
        cfg = self.config
        y, kv = GPT2Attention(cfg, name="attn")(
            _layer_norm(cfg, "ln_1")(x), mask, deterministic, kv, index
        )
        x = x + y
        return x + GPT2MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x), deterministic), kv


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its embedding-tied LM head.

    Example:
      model = GPT2LMHeadModel(GPT2Config.from_hf(hf_config))
      out = model.apply({"params": params}, input_ids, attention_mask)
      loss = lm_loss(out.logits, input_ids, attention_mask)
    """

    config: GPT2Config

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, deterministic: bool = True,
                 output_hidden_states: bool = False, cache: KVCache | int | None = None,
                 segment_ids: jax.Array | None = None) -> GPT2Output:
        """Next-token logits.

        Args:
          input_ids: [B, T] token ids.
          attention_mask: [B, T], 1 = real token, 0 = padding. None: no padding.
          position_ids: [B, T]; default 0..T-1 (right for right padding).
          deterministic: False enables dropout (needs a 'dropout' rng).
          output_hidden_states: also return HF-style hidden states (embeddings, each block's output,
            the last one after `ln_f`).
          cache: incremental decoding. A KVCache (see `init_cache`), or an int S to start an empty
            one with S slots. The T input tokens are written to slots index..index+T-1 and attend to
            the real, causally earlier slots; `attention_mask` is then [B, S], over the slots, and
            `position_ids` default to the slot numbers (pass them for left-padded prompts).
          segment_ids: [B, T] for packed rows (`lora_jax.data.packing`): 1..k numbers the k
            examples of a row, 0 marks padding. A token then attends only to the causally earlier
            tokens of its own example; pass per-example `position_ids` with it. Not with `cache`.

        Returns:
          GPT2Output(logits, hidden_states or None, the updated cache or None).
        """
        cfg = self.config
        embed_init = nn.initializers.normal(cfg.initializer_range)
        embed = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, embedding_init=embed_init)
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, name="wte", **embed)
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, name="wpe", **embed)
        if isinstance(cache, int):
            cache = init_cache(cfg, input_ids.shape[0], cache)
        position_ids, mask = positions_and_mask(input_ids, attention_mask, position_ids, cache,
                                                segment_ids)

        h = nn.Dropout(cfg.embd_pdrop, name="drop")(wte(input_ids) + wpe(position_ids),
                                                     deterministic)
        hidden_states, new_kv = [h], []
        index = None if cache is None else cache.index
        # static_argnums counts `self`: argument 3 is `deterministic`, a Python bool.
        block = nn.remat(GPT2Block, static_argnums=(3,)) if cfg.remat else GPT2Block
        for i in range(cfg.n_layer):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            h, kv = block(cfg, name=f"h_{i}")(h, mask, deterministic, kv, index)
            hidden_states.append(h)
            new_kv.append(kv)
        h = _layer_norm(cfg, "ln_f")(h)
        hidden_states[-1] = h  # HF reports the final state after ln_f
        logits = wte.attend(h)
        if cache is not None:
            keys, values = zip(*new_kv)
            cache = KVCache(keys, values, index + input_ids.shape[1])
        return GPT2Output(logits, tuple(hidden_states) if output_hidden_states else None, cache)


def positions_and_mask(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    position_ids: jax.Array | None,
    cache: KVCache | None,
    segment_ids: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None]:
    """A decoder's position ids and attention mask from its call arguments (see
    `GPT2LMHeadModel.__call__`; the Llama family shares them): without a cache, padding and packed
    segments hide keys and the kernel adds causality; with one, the whole pattern over its slots.
    """
    if segment_ids is not None and cache is not None:
        raise ValueError("segment_ids (packed rows) are for training; they do not combine "
                         "with a cache")
    if cache is not None:
        return _cached_positions_and_mask(cache, input_ids.shape[1], attention_mask, position_ids)
    if position_ids is None:
        position_ids = jnp.arange(input_ids.shape[1])[None, :]
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
    if segment_ids is not None:
        segments = _segment_mask(segment_ids)
        mask = segments if mask is None else mask & segments
    return position_ids, mask


def _segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T]: a query sees the keys of its own segment (0 = padding is no segment);
    causality is left to the attention kernel.

    A padding query sees every key instead: with none at all its softmax row would be fully masked
    (NaN in some kernels, and NaN * 0 is NaN in the loss). What it reads never reaches a real
    token, whose mask hides padding keys.
    """
    query, key = segment_ids[:, None, :, None], segment_ids[:, None, None, :]
    return ((query == key) & (key != 0)) | (query == 0)


def _cached_positions_and_mask(
    cache: KVCache, length: int, attention_mask: jax.Array | None, position_ids: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Position ids [B or 1, T] and the [B or 1, 1, T, S] attention pattern of T tokens written to
    the cache at its index: each sees the real slots up to its own."""
    slots = cache.keys[0].shape[1]
    query_slots = cache.index + jnp.arange(length)
    if position_ids is None:
        position_ids = query_slots[None, :]
    mask = (jnp.arange(slots)[None, :] <= query_slots[:, None])[None, None]
    if attention_mask is not None:
        if attention_mask.shape[-1] != slots:
            raise ValueError(
                f"with a cache, attention_mask covers the cache's {slots} slots, "
                f"got shape {attention_mask.shape}"
            )
        mask = mask & attention_mask.astype(bool)[:, None, None, :]
    return position_ids, mask


def lm_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy, equal to HF's loss with `labels=input_ids` (-100 = masked).

    Position t predicts token t+1; token t+1 counts as a target where `loss_mask[:, t+1]` is 1.
    (`lora_jax.losses`, kind 'lm'.)

    Args:
      logits: [B, T, V] from the model.
      input_ids: [B, T] the same ids the model read.
      loss_mask: [B, T], 1 where the token is a target (e.g. the attention mask, or only the
        completion of a prompt/completion pair).

    Returns:
      Scalar float32 loss: the mean over target tokens (0 if there are none).
    """
    return mean_loss("lm", logits, {"input_ids": input_ids, "loss_mask": loss_mask})


def build(hf_config: Any, task: str | None = None, num_labels: int | None = None, *,
          remat: bool = False, **options: Any) -> GPT2LMHeadModel:
    """Our GPT-2 for a `transformers.GPT2Config`; `options` are GPT2Config fields (dtype,
    param_dtype, attention_implementation)."""
    del task, num_labels  # the family accepts only the LM (checked by `ModelFamily.check_task`)
    return GPT2LMHeadModel(GPT2Config.from_hf(hf_config, remat=remat, **options))


GPT2 = ModelFamily(
    model_type="gpt2",
    build=build,
    tasks=(None,),
    base_prefix="transformer",
    transposed_kernels=False,  # HF's Conv1D holds W as (d_in, d_out), as our kernels
    peft_root="transformer.",  # our root is HF's `transformer`
    peft_task_types={None: "CAUSAL_LM"},
    tied_embedding="wte",
    # The paper's E2E setup: q and v of the fused c_attn, k untouched (loralib's MergedLinear).
    lora_targets=(r"attn/c_attn",),
    lora_split_outputs={r"attn/c_attn": (True, False, True)},
    stop_ids=(50256, 628),  # <|endoftext|> and '\n\n', as microsoft/LoRA's beam search
    block=r"h_(\d+)",
    sublayers={"attention": "attn/resid_dropout", "ffn": "mlp/dropout", "block": ""},
    word_embedding="wte",
    layer_norm=r"(?:^|/)(?:ln_1|ln_2|ln_f)$",
    hidden_size=lambda params: params["wte"]["embedding"].shape[1],
    vocab_size=lambda params: params["wte"]["embedding"].shape[0],
    dropout_fields=("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"),
    # The BPE files (not a checkpoint's copy) tokenize the paper's E2E runs and tiny models.
    tokenizers={"gpt2": DataDirTokenizer(
        folder="tokenizers/gpt2", files=("vocab.json", "merges.txt"),
        transformers_class="GPT2TokenizerFast", probe=("Hello world", (15496, 995)),
        eos_id=50256)},
    checkpoint_buffers=("attn.bias", "attn.masked_bias"),  # HF's causal-mask buffers
    fused_parts={r"attn/c_attn": "qkv"},
    gguf_architecture="gpt2",
)
