"""The jitted functions a run calls, built from an adapted apply: the forward pass, the train
step and the eval step (the trainer, `evaluate` and the benchmarks all use these).

    forward = make_forward(stack.adapt(model.apply))
    train_step = build_train_step(forward, "lm", tx, mesh, label_smoothing=0.1)
    eval_step = make_eval_step(forward, "lm", sharding.replicated(mesh))
"""

from __future__ import annotations

import jax

from lora_jax import losses
from lora_jax.training import optim, sharding


def model_inputs(batch: dict) -> dict:
    """The keyword arguments a model call takes from a batch (packed batches add segment_ids
    and position_ids)."""
    keys = ("attention_mask", "token_type_ids", "segment_ids", "position_ids")
    return {k: batch[k] for k in keys if k in batch}


def make_forward(adapted_apply):
    """forward(frozen, trainable, batch, rng, train) -> logits, for a `MethodStack.adapt`-ed
    apply.

    In training, `rng` drives both the model's dropout and the methods' (LoRA dropout); in
    evaluation neither.
    """

    def forward(frozen, trainable, batch, rng, train: bool):
        dropout_rng, method_rng = jax.random.split(rng)
        return adapted_apply(frozen, trainable, batch["input_ids"], **model_inputs(batch),
                             deterministic=not train, rngs={"dropout": dropout_rng},
                             method_rng=method_rng if train else None).logits

    return forward


def build_train_step(forward, kind: str, tx, mesh, label_smoothing: float = 0.0,
                     regularizer=None, jit: bool = True):
    """The trainer's jitted step(frozen, trainable, opt_state, batch, rng) -> (trainable,
    opt_state, mean loss, whether the new trainable tree is all finite), for a batch of
    [accum, micro, ...] arrays (`sharding.global_batch`).

    `trainable` and `opt_state` are donated (updated in place); benchmarks call this same function.

    Args:
      forward: `make_forward` of an adapted apply.
      kind: the task's kind ('classification', 'regression', 'lm'), for `losses.loss_sum`.
      tx: the optax optimizer.
      mesh: where the step runs; its outputs are replicated over it.
      label_smoothing: for classification and LM losses.
      regularizer: trainable -> a term added to the mean loss (`MethodStack.regularizer`).
      jit: False gives the step uncompiled (a study's members map it over their axis).
    """

    def loss_fn(frozen, trainable, batch, rng):
        logits = forward(frozen, trainable, batch, rng, train=True)
        total, weight = losses.loss_sum(kind, logits, batch, label_smoothing)
        if regularizer is not None:
            # Once per step: the micro-batches' weights sum to the step's, which divides.
            total = total + regularizer(trainable) * weight
        return total, weight

    return optim.make_train_step(loss_fn, tx, accumulate=True, jit=jit,
                                 out_shardings=(sharding.replicated(mesh),) * 4)


def make_eval_step(forward, kind: str, out_sharding):
    """A jitted eval_step(frozen, trainable, batch) -> (loss sum, weight, predictions)."""

    def eval_step(frozen, trainable, batch):
        logits = forward(frozen, trainable, batch, jax.random.key(0), train=False)
        loss, weight = losses.loss_sum(kind, logits, batch)
        return loss, weight, losses.predictions(kind, logits)

    return jax.jit(eval_step, out_shardings=out_sharding)
