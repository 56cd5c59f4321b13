"""Shared model building blocks against their torch / closed-form references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.activations import ACT2FN

from lora_jax.models import layers


@pytest.mark.parametrize(
    "name", ["gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu"]
)
def test_activation_matches_transformers(name):
    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    expected = ACT2FN[name](torch.tensor(x)).numpy()
    np.testing.assert_allclose(layers.activation(name)(jnp.asarray(x)), expected, atol=1e-6, rtol=0)


def test_unknown_activation_names_itself():
    with pytest.raises(ValueError, match="'mish'"):
        layers.activation("mish")


def _qkv_and_mask():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 6, 4, 8))
    mask = (jnp.arange(6)[None, :] < jnp.array([6, 3])[:, None])[:, None, None, :]
    return q, k, v, mask


@pytest.mark.parametrize("is_causal, window, kv_heads", [
    (False, None, 4), (True, None, 4), (True, 3, 4), (True, None, 2), (True, 2, 1)])
def test_dropout_path_without_drops_equals_fused_path(is_causal, window, kv_heads):
    """The explicit (dropout) path computes the same attention as jax.nn.dot_product_attention,
    with a sliding window and with grouped-query heads (K of the 4 key/value heads)."""
    q, k, v, mask = _qkv_and_mask()
    k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]
    fused = layers.dot_product_attention(q, k, v, mask, is_causal=is_causal, local_window=window)
    # A rate below float32 resolution keeps every probability, so only the paths differ.
    explicit = layers._attention_with_dropout(q, k, v, mask, is_causal, window, 1e-12,
                                              jax.random.key(1))
    np.testing.assert_allclose(explicit, fused, atol=1e-6, rtol=0)
    if window is not None:  # the window matters here
        assert not np.allclose(fused, layers.dot_product_attention(q, k, v, mask,
                                                                   is_causal=is_causal))


def test_rms_norm_matches_hf():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = np.random.default_rng(0).normal(3.0, 2.0, (2, 5, 16)).astype(np.float32)
    torch_norm = LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        torch_norm.weight.add_(torch.linspace(-0.5, 0.5, 16))
    expected = torch_norm(torch.tensor(x)).detach().numpy()
    ours = layers.RMSNorm(1e-6).apply({"params": {"scale": torch_norm.weight.detach().numpy()}},
                                      jnp.asarray(x))
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)


def test_attention_dropout_drops_and_rescales():
    q, k, v, mask = _qkv_and_mask()
    v = jnp.ones_like(v)  # each output is then the sum of its kept, rescaled probabilities
    rng = jax.random.key(2)
    out = layers.dot_product_attention(q, k, v, mask, dropout_rate=0.5, dropout_rng=rng)
    assert not np.allclose(out, 1.0)
    np.testing.assert_allclose(out.mean(), 1.0, atol=0.1)  # unbiased in expectation
