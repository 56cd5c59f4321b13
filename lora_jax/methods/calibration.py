"""Data-driven starts (`CalibratedStart`: CorDA, LoRA-GA; EVA; PreLayer's) and the statistics of
a few batches they take before step 1: CorDA's covariances of the targets' inputs, LoRA-GA's
gradients of the targets' full weights, EVA's rows of the targets' inputs, PreLayer's block
inputs (the model's hidden states, `Batches.hidden_states`).

The model runs on each batch as the run would, without adapters or dropout. A statistic is kept
per kernel path, in float32 on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax.methods import lora, pissa
from lora_jax.methods.base import Params, SettingError, intercept_dense
from lora_jax.quant import kernels as quant


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
      hidden_states: (params, batch) -> the base model's hidden states as transformers gives
        them (the embeddings' output, then each block's output), in evaluation; None where the
        caller has none to give (a start that reads them says so).
    """

    forward: Callable[[Params, dict], jax.Array]
    params: Params
    batches: Sequence[dict]
    loss: Callable[[jax.Array, dict], jax.Array]
    hidden_states: Callable[[Params, dict], Sequence[jax.Array]] | None = None

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


def token_positions(batch: Mapping[str, Any], use_label_mask: bool) -> np.ndarray:
    """The flat (batch x length) positions of a batch's real tokens in real rows and, with
    `use_label_mask` where the batch marks tokens for the loss (`loss_mask`), of those only."""
    keep = np.asarray(batch["attention_mask"]) > 0
    if "example_mask" in batch:
        keep &= np.asarray(batch["example_mask"])[:, None] > 0
    if use_label_mask and "loss_mask" in batch:
        keep &= np.asarray(batch["loss_mask"]) > 0
    return np.flatnonzero(keep.reshape(-1))


@functools.partial(jax.jit, static_argnames=("forward", "modules"))
def _dense_inputs(params, batch, *, forward, modules):
    found = {}

    def output(call, _, x, y, dropped):
        found[call.path] = x.reshape(-1, x.shape[-1])
        return y

    with intercept_dense({m: True for m in modules}, None, 0.0, output, "calibration"):
        forward(params, batch)
    return found


def input_rows(data: Batches, kernel_paths: Sequence[str], index: int,
               use_label_mask: bool = False) -> dict[str, np.ndarray]:
    """kernel path -> the rows (tokens, d_in) its layer reads in batch `index` of `data`, at
    the batch's `token_positions`, in float32 on the host (EVA's PCA input)."""
    batch = data.batches[index]
    modules = tuple(tuple(p.split("/")[:-1]) for p in kernel_paths)
    found = _dense_inputs(data.params, batch, forward=data.forward, modules=modules)
    keep = token_positions(batch, use_label_mask)
    return {path: np.asarray(found[module], np.float32)[keep]
            for path, module in zip(kernel_paths, modules)}


def kernel_gradients(data: Batches, kernel_paths: Sequence[str]) -> dict[str, np.ndarray]:
    """LoRA-GA's statistic: the gradient of the mean training loss with respect to each
    targeted kernel (d_in, d_out), averaged over the batches, as PEFT's `preprocess_loraga`
    averages it over its backward passes.

    Raises:
      ValueError: no batches.
    """
    flat = traverse_util.flatten_dict(data.params)
    keys = [tuple(p.split("/")) for p in kernel_paths]
    held = [p for p, k in zip(kernel_paths, keys) if quant.is_quantized(flat[k])]
    if held:  # PEFT refuses this too: the start needs full-precision gradients
        raise SettingError("targets", f"{', '.join(held)} are held quantized: a start from their "
                           "gradients needs them in full precision (model.quantize = 'none')")

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
                   vocab_size: int, key: jax.Array, loss: Callable | None = None,
                   hidden_states: Callable | None = None, length: int = 8) -> Batches:
    """`count` batches of random token ids (2 rows of `length`, no padding) for the base
    `params`: what shape-level checks and tests calibrate on where a run's data are not at
    hand. The loss is the mean squared logit unless given."""
    ids = np.asarray(jax.random.randint(key, (count, 2, length), 3, vocab_size))
    batches = tuple({"input_ids": i, "attention_mask": np.ones_like(i)} for i in ids)
    return Batches(forward, params, batches,
                   loss or (lambda logits, batch: jnp.mean(jnp.square(logits))), hidden_states)



@dataclasses.dataclass(frozen=True)
class CalibratedStart(pissa.PiSSA):
    """A start of PiSSA's kind made from statistics of the run's first batches (CorDA's input
    covariances, LoRA-GA's gradients): `take` takes them per target kernel, `start` makes one
    kernel's (A0, B0) from its statistic. The rest (the residual base, the export) is PiSSA's.

    Attributes:
      calibration_batches: the run's first training batches the statistics are taken over.
      statistics: kernel path -> its statistic (`calibrated` sets them; the trainer keeps them
        in the workdir, `lora_jax.training.calibration`).
    """

    # Names the statistic in messages ('input covariance', 'gradient').
    statistic: ClassVar[str] = "statistic"

    calibration_batches: int = 8
    statistics: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False,
                                                             repr=False)

    def take(self, data: Batches, kernel_paths: Sequence[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def start(self, kernel: jax.Array, statistic: Any, rank: int, scale: float,
              part: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def check(self, kernel_shape: tuple[int, int], rank: int, path: str) -> None:
        """Raises a `SettingError` for a rank or shape the start cannot take (none here)."""

    def factors(self, kernel: jax.Array, rank: int, scale: float, path: str,
                part: tuple[int, int] = (0, 1)) -> tuple[jax.Array, jax.Array]:
        self.check(kernel.shape, rank, path)
        if self.statistics is None and isinstance(kernel, jax.core.Tracer):
            # The split evaluated in shapes (the config checks, before any batch is read): the
            # start's shapes do not depend on the data.
            d_in, d_out = kernel.shape
            return jnp.zeros((rank, d_in), jnp.float32), jnp.zeros((d_out, rank), jnp.float32)
        if self.statistics is None or path not in self.statistics:
            raise SettingError("targets", f"{self.name} has no {self.statistic} for {path}: "
                               "calibrate it on batches of the task first (`calibrated`)",
                               self.name)
        return self.start(kernel, self.statistics[path], rank, scale, part)

    def calibration(self) -> int:
        return 0 if self.statistics is not None else self.calibration_batches

    def calibrated(self, data: Batches) -> "CalibratedStart":
        """With the statistics of its targets over the batches of `data`."""
        paths = lora.target_kernels(self.spec, data.params)
        return dataclasses.replace(self, statistics=self.take(data, paths))

    def calibration_state(self) -> dict[str, Any]:
        return dict(self.statistics or {})

    def with_calibration(self, state: Mapping[str, Any]) -> "CalibratedStart":
        return dataclasses.replace(self, statistics=dict(state))
