"""Statistics of a few batches that data-driven starts of LoRA take before step 1: CorDA's
covariances of the targets' inputs, LoRA-GA's gradients of the targets' full weights.

The model runs on each batch as the run would, without adapters or dropout. A statistic is kept
per kernel path, in float32 on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax.methods.base import Params, intercept_dense


@dataclasses.dataclass(frozen=True)
class Batches:
    """What a data-driven start takes its statistics from (the trainer builds it:
    `lora_jax.training.calibration`).

    Attributes:
      forward: (params, batch) -> logits, the base model as the run calls it, in evaluation.
      params: the base model's parameters.
      batches: the run's first training batches (dicts of arrays: input_ids, attention_mask,
        the task's labels or loss mask).
      loss: (logits, batch) -> the run's mean training loss of the batch.
    """

    forward: Callable[[Params, dict], jax.Array]
    params: Params
    batches: Sequence[dict]
    loss: Callable[[jax.Array, dict], jax.Array]

    def first(self, count: int) -> "Batches":
        return dataclasses.replace(self, batches=tuple(self.batches[:count]))


def _peft_corda_covariance(rows: jax.Array, keep: jax.Array) -> jax.Array:
    # PEFT's (and CorDA's code's) per-call statistic: X / |max(X)|, then X^T X, over the real
    # tokens (PEFT hooks unpadded batches of one example, where the two agree).
    largest = jnp.max(jnp.where(keep > 0, rows, -jnp.inf))
    rows = rows * keep / jnp.abs(largest)
    return rows.T @ rows


def input_covariances(data: Batches, kernel_paths: Sequence[str]) -> dict[str, np.ndarray]:
    """CorDA's covariance of each targeted kernel's input: over the batches, the mean per call
    of X^T X, X the call's input rows (its real tokens) scaled by 1 / |max X|, as PEFT's
    `preprocess_corda` builds it.

    Raises:
      ValueError: no batches.
    """
    modules = [tuple(p.split("/")[:-1]) for p in kernel_paths]

    @jax.jit
    def covariances(params, batch):
        found: dict[tuple[str, ...], jax.Array] = {}
        mask = batch["attention_mask"]

        def output(call, _, x, y, dropped):
            rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            value = _peft_corda_covariance(rows, mask.reshape(-1)[:, None].astype(jnp.float32))
            found[call.path] = found[call.path] + value if call.path in found else value
            return y

        with intercept_dense({m: True for m in modules}, None, 0.0, output, "calibration"):
            data.forward(params, batch)
        return found

    return _mean(covariances(data.params, b) for b in data.batches)


def kernel_gradients(data: Batches, kernel_paths: Sequence[str]) -> dict[str, np.ndarray]:
    """LoRA-GA's statistic: the gradient of the mean training loss with respect to each
    targeted kernel (d_in, d_out), averaged over the batches, as PEFT's `preprocess_loraga`
    averages it over its backward passes.

    Raises:
      ValueError: no batches.
    """
    flat = traverse_util.flatten_dict(data.params)
    keys = [tuple(p.split("/")) for p in kernel_paths]

    @jax.jit
    def gradients(kernels, params, batch):
        def loss(kernels):
            full = traverse_util.flatten_dict(params)
            full.update(kernels)
            return data.loss(data.forward(traverse_util.unflatten_dict(full), batch), batch)

        return jax.grad(loss)(kernels)

    kernels = {k: jnp.asarray(flat[k], jnp.float32) for k in keys}
    return _mean({k[:-1]: v for k, v in gradients(kernels, data.params, b).items()}
                 for b in data.batches)


def _mean(per_batch) -> dict[str, np.ndarray]:
    total, count = None, 0
    for found in per_batch:
        total = found if total is None else jax.tree_util.tree_map(jnp.add, total, found)
        count += 1
    if count == 0:
        raise ValueError("calibration needs at least one batch")
    return {"/".join(m + ("kernel",)): np.asarray(v) / count for m, v in total.items()}


def random_batches(forward: Callable[[Params, dict], jax.Array], params: Params, count: int,
                   vocab_size: int, key: jax.Array, loss: Callable | None = None) -> Batches:
    """`count` batches of random token ids (2 rows of 8, no padding) for the base `params`:
    what shape-level checks and tests calibrate on where a run's data are not at hand. The
    loss is the mean squared logit unless given."""
    ids = np.asarray(jax.random.randint(key, (count, 2, 8), 3, vocab_size))
    batches = tuple({"input_ids": i, "attention_mask": np.ones_like(i)} for i in ids)
    return Batches(forward, params, batches,
                   loss or (lambda logits, batch: jnp.mean(jnp.square(logits))))

