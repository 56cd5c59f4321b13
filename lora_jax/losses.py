"""The losses, one per kind of task, as (sum, weight) so that micro-batches add up exactly.

    total, weight = loss_sum("lm", logits, batch, label_smoothing=0.1)   # mean: total / weight

  classification  softmax cross-entropy on batch['labels'] (label smoothing as optax's)
  regression      squared error on batch['labels'] (one output, as HF's num_labels=1)
  lm              next-token cross-entropy where batch['loss_mask'] marks the targets

A padded evaluation row (batch['example_mask'] 0) weighs 0; in packed LM rows
(batch['segment_ids']) no position predicts another example's first token. The models' own
`lm_loss` and `sequence_classification_loss` are these means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("classification", "regression", "lm")


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Per-row softmax cross-entropy with integer labels, label-smoothed as
    `optax.smooth_labels` (targets (1 - s) one_hot + s / V), without building the one-hot:
    (1 - s) * nll + s * mean(-log p).

    A label outside [0, V) (padding, a method's virtual token) is read as 0; such rows must
    weigh 0, which the callers below ensure.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.where((labels >= 0) & (labels < logits.shape[-1]), labels, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    if smoothing:
        nll = (1.0 - smoothing) * nll - smoothing * jnp.mean(logp, axis=-1)
    return nll


def lm_targets(batch: dict) -> tuple[jax.Array, jax.Array]:
    """(targets, weights) of next-token prediction: position t predicts token t + 1 where
    loss_mask[t + 1] is 1, within one example of a packed row, in a real row."""
    targets, weights = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].astype(jnp.float32)
    if "example_mask" in batch:
        weights = weights * batch["example_mask"][:, None]
    if "segment_ids" in batch:
        segments = batch["segment_ids"]
        weights = weights * (segments[:, 1:] == segments[:, :-1])
    return jnp.where(weights > 0, targets, 0), weights


def losses_and_weights(kind: str, logits: jax.Array, batch: dict,
                       label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Each row's loss (each target token's, for an LM) and its weight; padding rows and prompt
    tokens weigh 0. Arguments as `loss_sum`."""
    if kind == "lm":
        targets, weights = lm_targets(batch)
        losses = cross_entropy(logits[:, :-1], targets, label_smoothing)
    elif kind in ("classification", "regression"):
        weights = batch.get("example_mask", jnp.ones(logits.shape[:1]))
        if kind == "regression":
            losses = (logits[:, 0].astype(jnp.float32) - batch["labels"]) ** 2
        else:
            losses = cross_entropy(logits, batch["labels"], label_smoothing)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return losses, weights.astype(jnp.float32)


def loss_sum(kind: str, logits: jax.Array, batch: dict,
             label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(sum of losses, weight) for a micro-batch; padding rows and prompt tokens weigh 0.

    Args:
      kind: 'classification', 'regression' or 'lm'.
      logits: the model's output.
      batch: holds 'labels' (GLUE) or 'input_ids' and 'loss_mask' (LM); optionally
        'example_mask' and 'segment_ids' (see the module docstring).
      label_smoothing: for classification and LM (the paper uses 0.1 for E2E).
    """
    losses, weights = losses_and_weights(kind, logits, batch, label_smoothing)
    return jnp.sum(losses * weights), jnp.sum(weights)


def mean_loss(kind: str, logits: jax.Array, batch: dict,
              label_smoothing: float = 0.0) -> jax.Array:
    """`loss_sum` divided by its weight (0 when nothing weighs)."""
    total, weight = loss_sum(kind, logits, batch, label_smoothing)
    return total / jnp.maximum(weight, 1.0)


def predictions(kind: str, logits: jax.Array) -> jax.Array:
    """Class ids (classification), scores (regression); nothing for an LM."""
    if kind == "regression":
        return logits[:, 0]
    if kind == "classification":
        return jnp.argmax(logits, axis=-1)
    return jnp.zeros(logits.shape[:1])
