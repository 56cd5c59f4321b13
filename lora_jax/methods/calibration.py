"""Statistics of a few batches that data-driven starts of LoRA take before step 1 (CorDA's input
covariances; EVA's and LoRA-GA's are of the same kind).

The model runs on each batch as the run runs it (no adapters, no dropout), and each call of a
targeted nn.Dense reports its input rows: the real tokens where the batch has a mask. A
statistic is kept per kernel path, in float32 on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.methods.base import Params, intercept_dense


def _inputs(apply_fn: Callable, params: Params, modules: Sequence[tuple[str, ...]],
            statistic: Callable[[jax.Array, jax.Array], jax.Array]) -> Callable:
    """A jitted (params, ids, mask) -> {module: statistic(its input rows, their mask)}: every
    call of each module reported (a module called twice in one forward pass reports the sum)."""

    def run(params, ids, mask):
        found: dict[tuple[str, ...], jax.Array] = {}

        def output(call, _, x, y, dropped):
            rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            keep = mask.reshape(-1)[:, None].astype(jnp.float32)
            value = statistic(rows, keep)
            found[call.path] = found[call.path] + value if call.path in found else value
            return y

        with intercept_dense({m: True for m in modules}, None, 0.0, output, "calibration"):
            apply_fn({"params": params}, ids, attention_mask=mask)
        return found

    return jax.jit(run)


def _peft_corda_covariance(rows: jax.Array, keep: jax.Array) -> jax.Array:
    # PEFT's (and CorDA's code's) per-call statistic: X / |max(X)|, then X^T X, over the real
    # tokens (PEFT hooks unpadded batches of one example, where the two agree).
    largest = jnp.max(jnp.where(keep > 0, rows, -jnp.inf))
    rows = rows * keep / jnp.abs(largest)
    return rows.T @ rows


def input_covariances(apply_fn: Callable, params: Params, kernel_paths: Sequence[str],
                      batches: Iterable[tuple[Any, Any]]) -> dict[str, np.ndarray]:
    """CorDA's covariance of each targeted kernel's input: over the batches (ids, mask), the
    mean per call of X^T X with X the call's input rows scaled by 1 / |max X|, as PEFT's
    `preprocess_corda` builds it.

    Raises:
      ValueError: no batches.
    """
    modules = [tuple(p.split("/")[:-1]) for p in kernel_paths]
    step = _inputs(apply_fn, params, modules, _peft_corda_covariance)
    total, count = None, 0
    for ids, mask in batches:
        found = step(params, jnp.asarray(ids), jnp.asarray(mask))
        total = found if total is None else jax.tree_util.tree_map(jnp.add, total, found)
        count += 1
    if count == 0:
        raise ValueError("calibration needs at least one batch")
    return {"/".join(m + ("kernel",)): np.asarray(total[m]) / count for m in modules}
