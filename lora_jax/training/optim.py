"""Optimizers and the update step over the trainable tree only.

The frozen tree is never handed to optax: the optimizer is initialised on the
trainable tree (adapters plus any fully-trained head), so its state exists only
for those leaves, and gradients are taken only with respect to them, so no
gradient for W0 is ever computed. (`optax.masked` would not do: it passes the
masked leaves' raw gradients through as updates.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Batch = Any
LossFn = Callable[[Any, Any, Batch, jax.Array], jax.Array]
"""loss_fn(frozen, trainable, batch, rng) -> scalar loss."""


def learning_rate_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup (steps, or a ratio of all steps) to `lr`, then linear decay to 0."""
    warmup = cfg.warmup_steps if cfg.warmup_steps else int(cfg.warmup_ratio * total_steps)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
         optax.linear_schedule(cfg.lr, 0.0, max(total_steps - warmup, 1))], [warmup])


def adamw(
    learning_rate: float | optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay, as torch.optim.AdamW, optionally
    preceded by global-norm gradient clipping."""
    tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx


def scale_updates(scales: Any) -> optax.GradientTransformation:
    """Multiplies each leaf's update by its entry of `scales` (a tree like the params of floats):
    after AdamW, a leaf with scale k moves as under lr * k, weight decay included (LoRA+)."""

    def update(updates, state, params=None):
        return jax.tree_util.tree_map(lambda u, k: u * k, updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


WeightedLossFn = Callable[[Any, Any, Batch, jax.Array], tuple[jax.Array, jax.Array]]
"""loss_fn(frozen, trainable, micro_batch, rng) -> (sum of the per-example or per-token losses,
their weight)."""


def make_train_step(loss_fn: LossFn | WeightedLossFn, tx: optax.GradientTransformation, *,
                    accumulate: bool = False, jit: bool = True, out_shardings: Any = None):
    """One optimizer step on the trainable tree: the only train-step factory (the trainer's
    `build_train_step` and the benchmarks use it too).

    Args:
      loss_fn: loss_fn(frozen, trainable, batch, rng) -> scalar; with `accumulate`, -> (sum of
        losses, their weight) for one micro-batch.
      tx: any optax transformation; its state must come from `tx.init(trainable)`.
      accumulate: every batch leaf is [accum, micro_batch, ...]; the micro-batches' gradients
        are summed and divided by the total weight (examples, or target tokens) once at the
        end, so the update equals that of the whole batch in one pass, whatever the padding of
        each micro-batch.
      jit: compile the step, donating the trainable tree and optimizer state (they are replaced
        each step, so XLA may update them in place). The frozen tree is not donated: it is
        reused by every step.
      out_shardings: for the jitted step's outputs (the trainer replicates them over its mesh).

    Returns:
      step(frozen, trainable, opt_state, batch, rng) -> (trainable, opt_state, loss, finite):
      `finite` is a device bool, whether the new trainable tree holds no NaN or inf (read with
      the loss, it costs no extra host sync).
    """

    def plain_gradients(frozen, trainable, batch, rng):
        return jax.value_and_grad(loss_fn, argnums=1)(frozen, trainable, batch, rng)

    weighted = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)

    def accumulated_gradients(frozen, trainable, batch, rng):
        def micro_step(carry, inputs):
            grads_sum, loss_sum, weight_sum = carry
            micro_batch, i = inputs
            (loss, weight), grads = weighted(frozen, trainable, micro_batch,
                                             jax.random.fold_in(rng, i))
            grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, grads)
            return (grads_sum, loss_sum + loss.astype(jnp.float32),
                    weight_sum + jnp.asarray(weight, jnp.float32)), None

        accum = jax.tree_util.tree_leaves(batch)[0].shape[0]
        zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        init = (zeros, jnp.float32(0), jnp.float32(0))
        (grads, loss, weight), _ = jax.lax.scan(micro_step, init, (batch, jnp.arange(accum)))
        weight = jnp.maximum(weight, 1.0)
        return loss / weight, jax.tree_util.tree_map(lambda g: g / weight, grads)

    gradients = accumulated_gradients if accumulate else plain_gradients

    def step(frozen, trainable, opt_state, batch, rng):
        loss, grads = gradients(frozen, trainable, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, loss, all_finite(trainable)

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(1, 2), out_shardings=out_shardings)


def all_finite(tree: Any) -> jax.Array:
    """A scalar bool: no leaf of `tree` holds NaN or inf. Computed inside the step, so the
    trainer learns of a divergence with the losses it fetches anyway, not by a sync of its own."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves \
        else jnp.bool_(True)
