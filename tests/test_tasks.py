"""The trainer's loss: label smoothing, padding rows and prompt tokens weigh as they should."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.losses import loss_sum


def test_classification_with_label_smoothing_and_padding_rows():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [9.0, 9.0, 9.0]])
    batch = {"labels": jnp.array([0, 2, 1]), "example_mask": jnp.array([1, 1, 0])}
    total, weight = loss_sum("classification", logits, batch, label_smoothing=0.1)
    logp = np.asarray(jax.nn.log_softmax(logits))
    # Smoothed target: 1 - 0.1 on the label plus 0.1 / 3 on every class.
    expected = sum(-(0.9 * logp[i, y] + 0.1 / 3 * logp[i].sum()) for i, y in [(0, 0), (1, 2)])
    assert float(weight) == 2.0  # the dummy row does not count
    assert float(total) == pytest.approx(expected, rel=1e-6)


def test_regression_is_squared_error():
    batch = {"labels": jnp.array([1.0, 3.5])}
    total, weight = loss_sum("regression", jnp.array([[2.0], [3.0]]), batch)
    assert (float(total), float(weight)) == pytest.approx((1.0 + 0.25, 2.0))


def test_language_model_loss_counts_only_target_tokens():
    vocab = 5
    logits = jax.random.normal(jax.random.key(0), (1, 4, vocab))
    ids = jnp.array([[3, 1, 4, 2]])
    loss_mask = jnp.array([[0, 0, 1, 1]])  # prompt, prompt, reference, EOS
    total, weight = loss_sum("lm", logits, {"input_ids": ids, "loss_mask": loss_mask})
    logp = np.asarray(jax.nn.log_softmax(logits[0]))
    # Position t predicts token t+1; only tokens 2 and 3 are targets.
    assert float(weight) == 2.0
    assert float(total) == pytest.approx(-(logp[1, 4] + logp[2, 2]), rel=1e-6)
