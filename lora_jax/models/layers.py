"""Building blocks shared by the models: Dense, activations, layer norm, RMSNorm, attention.

Nothing here owns parameters except through plain Flax layers, so module paths stay exactly those of
the models that use them.
"""

from collections.abc import Callable
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.quant import kernels as quant

# Hugging Face `hidden_act` / `activation_function` names. 'gelu' is the exact (erf) form; the
# others are the tanh approximation under their several historical names.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function a Hugging Face config names.

    Args:
      name: e.g. 'gelu' (exact), 'gelu_new' (tanh approximation), 'relu', 'silu'.

    Returns:
      An elementwise function.

    Raises:
      ValueError: the name is not one we implement.
    """
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class Dense(nn.Dense):
    """`nn.Dense` (same fields, parameters and computation) that also runs over a frozen kernel
    held quantized (`quant.QuantizedKernel`), dequantizing it inside the matmul.

    The models build every projection from it, so a quantized base needs nothing else: methods
    intercept `__call__` as they do any `nn.Dense`'s (this class is one) and add to its output.
    The body is nn.Dense's own, written out rather than calling it, because calling the parent's
    `__call__` would pass the methods' interception a second time.
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        stored = (self.get_variable("params", "kernel")
                  if self.has_variable("params", "kernel") else None)
        if quant.is_quantized(stored):
            kernel = None  # never materialised here: `quant.matmul` dequantizes per call
        else:
            kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                                self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        if kernel is None:
            y = quant.matmul(inputs, stored, self.precision)
        else:
            y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                                    precision=self.precision)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def layer_norm(epsilon: float, dtype, param_dtype, name: str) -> nn.LayerNorm:
    """A LayerNorm that matches torch's: statistics in float32, two-pass variance.

    Flax's default one-pass variance (E[x^2] - E[x]^2) cancels badly when the mean is large relative
    to the spread; torch computes the variance around the mean, and so do we.

    Args:
      epsilon: the config's layer-norm epsilon.
      dtype: compute/output dtype.
      param_dtype: dtype of scale and bias.
      name: module name (part of the parameter path).

    Returns:
      An unbound `nn.LayerNorm`.
    """
    return nn.LayerNorm(
        epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name
    )


def layer_norm_apply(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """`layer_norm`'s computation as a function of given weights (for layers a method adds):
    float32 statistics, two-pass variance, output in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(variance + epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm, as HF's LlamaRMSNorm: float32 statistics, the normalised x cast back
    to the compute dtype before the scale multiplies it. The weight is called `scale`, as
    LayerNorm's (HF's `weight`)."""

    epsilon: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    *,
    is_causal: bool = False,
    local_window: int | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention over [batch, length, heads, head_dim] arrays.

    Without dropout this is `jax.nn.dot_product_attention`; its `implementation=None` means XLA
    (jax 0.10 does not pick cuDNN by itself), 'cudnn' asks for the fused GPU kernel (fp16/bf16).
    That function has no dropout on the attention probabilities, so training with attention dropout
    takes the explicit path below; both keep the softmax in float32.

    Args:
      query: [B, T, N, H].
      key: [B, S, K, H]; K divides N (grouped-query attention: query head n reads key head
        n // (N / K)).
      value: [B, S, K, H].
      mask: boolean, broadcastable to [B, 1, T, S]; True = attend. None = attend everywhere.
      is_causal: also forbid attending to later positions.
      local_window: with is_causal, a query at position t sees keys t - window + 1 .. t only
        (Mistral's sliding window); None: all earlier keys.
      dropout_rate: attention-probability dropout; applied only when `dropout_rng` is given.
      dropout_rng: PRNG key for the dropout; None means deterministic.
      implementation: None/'xla' or 'cudnn', for `jax.nn.dot_product_attention`.

    Returns:
      [B, T, N, H] in the dtype of `value`.
    """
    if dropout_rng is None or dropout_rate == 0.0:
        if mask is not None:
            # cuDNN takes the mask as a bias and requires its full [.., T, S] extent; for XLA
            # the broadcast is free.
            batch, length, _, _ = query.shape
            mask = jnp.broadcast_to(mask, (batch, 1, length, key.shape[1]))
        window = None if local_window is None else (local_window - 1, 0)
        return jax.nn.dot_product_attention(
            query, key, value, mask=mask, is_causal=is_causal, local_window_size=window,
            implementation=implementation,
        )
    return _attention_with_dropout(query, key, value, mask, is_causal, local_window,
                                   dropout_rate, dropout_rng)


def _attention_with_dropout(query, key, value, mask, is_causal, window, rate, rng):
    """The same computation as `jax.nn.dot_product_attention`'s XLA path, with dropout added."""
    groups = query.shape[2] // key.shape[2]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
    scale = query.shape[-1] ** -0.5
    logits = jnp.einsum(
        "btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32
    ) * scale
    keep = jnp.ones(logits.shape, dtype=bool)
    if mask is not None:
        keep = keep & mask
    if is_causal:
        t, s = logits.shape[-2:]
        keep = keep & jnp.tril(jnp.ones((t, s), dtype=bool))
        if window is not None:
            keep = keep & ~jnp.tril(jnp.ones((t, s), dtype=bool), -window)
    # A finite fill (not -inf) so that a fully masked row gives a uniform, not NaN, distribution.
    logits = jnp.where(keep, logits, -0.7 * jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(logits, axis=-1)
    survive = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
    probs = jnp.where(survive, probs / (1.0 - rate), 0.0).astype(value.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, value)
