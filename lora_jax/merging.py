"""Combining task tensors of several adapters into one: task arithmetic, magnitude pruning,
TIES (Yadav et al. 2023) and DARE (Yu et al. 2024), as PEFT's `merge_utils` defines them.

A task tensor is what one adapter contributes (a LoRA factor, or its whole update dW); `weights`
scale each. All functions are pure, over host numpy arrays stacked or listed per adapter:

  task_arithmetic   sum_i w_i t_i
  magnitude_prune   each t_i keeps its density x size largest-magnitude entries, then the sum
  ties              prune by magnitude; elect each entry's sign (the sign of sum_i t_i, 'total',
                    or the sign most t_i have, 'frequency'); then the mean of the weighted
                    entries that agree with it (disjoint merge)
  dare_linear       each t_i keeps a random density fraction of its entries, rescaled by
                    1 / density (DARE's drop and rescale), then the sum
  dare_ties         DARE's drop and rescale, then TIES' sign election and disjoint merge

DARE's masks are drawn from a JAX key, one independent draw per task tensor (`fold_in` of its
index), so a merge is reproducible from its key.

Example:
    merged = ties([dw_1, dw_2], weights=[1.0, 0.5], density=0.2)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import numpy as np

SignMethod = Literal["total", "frequency"]
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def _stack(tensors: Sequence[np.ndarray], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    stacked = np.stack([np.asarray(t) for t in tensors])
    w = np.asarray(weights, stacked.dtype)
    if w.shape != (len(tensors),):
        raise ValueError(f"{len(w)} weights for {len(tensors)} task tensors")
    return stacked, w.reshape((-1,) + (1,) * (stacked.ndim - 1))


def check_density(density: float | None) -> float:
    """The density a pruning merge keeps, checked: in [0, 1] (1 and above keep everything)."""
    if density is None:
        raise ValueError("this merge prunes: give density, the fraction of entries each task "
                         "tensor keeps, in [0, 1]")
    if not density >= 0:
        raise ValueError(f"density must be >= 0, got {density}")
    return float(density)


def prune_by_magnitude(tensor: np.ndarray, density: float) -> np.ndarray:
    """`tensor` with all but its int(density x size) largest-magnitude entries set to 0."""
    if density >= 1:
        return tensor
    k = int(density * tensor.size)
    flat = np.abs(tensor).reshape(-1)
    keep = np.zeros(tensor.size, bool)
    if k > 0:
        keep[np.argpartition(-flat, k - 1)[:k]] = True
    return tensor * keep.reshape(tensor.shape)


def prune_at_random(tensor: np.ndarray, density: float, key: jax.Array) -> np.ndarray:
    """DARE's drop and rescale: each entry kept with probability `density`, divided by it."""
    if density >= 1:
        return tensor
    keep = np.asarray(jax.random.bernoulli(key, density, tensor.shape))
    return tensor * keep / np.asarray(density, tensor.dtype)


def majority_sign_mask(stacked: np.ndarray, method: SignMethod = "total") -> np.ndarray:
    """Where each task tensor's entry has the elected sign (ties elect +)."""
    sign = np.sign(stacked)
    if method == "total":
        magnitude = stacked.sum(axis=0)
    elif method == "frequency":
        magnitude = sign.sum(axis=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    return sign == np.where(magnitude >= 0, 1, -1)


def disjoint_merge(weighted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mean over task tensors of the weighted entries `mask` keeps (0 where none does)."""
    return (weighted * mask).sum(axis=0) / np.maximum(mask.sum(axis=0), 1).astype(weighted.dtype)


def task_arithmetic(tensors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    stacked, w = _stack(tensors, weights)
    return (stacked * w).sum(axis=0)


def magnitude_prune(tensors: Sequence[np.ndarray], weights: Sequence[float],
                    density: float) -> np.ndarray:
    density = check_density(density)
    return task_arithmetic([prune_by_magnitude(t, density) for t in tensors], weights)


def ties(tensors: Sequence[np.ndarray], weights: Sequence[float], density: float,
         majority_sign_method: SignMethod = "total") -> np.ndarray:
    density = check_density(density)
    stacked, w = _stack([prune_by_magnitude(np.asarray(t), density) for t in tensors], weights)
    # The sign is elected on the pruned tensors before weighting (TIES; PEFT alike).
    return disjoint_merge(stacked * w, majority_sign_mask(stacked, majority_sign_method))


def _dropped(tensors: Sequence[np.ndarray], density: float, key: jax.Array) -> list[np.ndarray]:
    if key is None:
        raise ValueError("DARE drops entries at random: give a key (jax.random.key(seed))")
    return [prune_at_random(np.asarray(t), density, jax.random.fold_in(key, i))
            for i, t in enumerate(tensors)]


def dare_linear(tensors: Sequence[np.ndarray], weights: Sequence[float], density: float,
                key: jax.Array) -> np.ndarray:
    return task_arithmetic(_dropped(tensors, check_density(density), key), weights)


def dare_ties(tensors: Sequence[np.ndarray], weights: Sequence[float], density: float,
              key: jax.Array, majority_sign_method: SignMethod = "total") -> np.ndarray:
    stacked, w = _stack(_dropped(tensors, check_density(density), key), weights)
    return disjoint_merge(stacked * w, majority_sign_mask(stacked, majority_sign_method))


def combine(method: str, tensors: Sequence[np.ndarray], weights: Sequence[float], *,
            density: float | None = None, majority_sign_method: SignMethod = "total",
            key: jax.Array | None = None) -> np.ndarray:
    """One of the merges above by name: 'linear' (task arithmetic), 'magnitude_prune', 'ties',
    'dare_linear' or 'dare_ties'."""
    if method == "linear":
        return task_arithmetic(tensors, weights)
    if method == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    if method == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if method == "dare_linear":
        return dare_linear(tensors, weights, density, key)
    if method == "dare_ties":
        return dare_ties(tensors, weights, density, key, majority_sign_method)
    raise ValueError(f"unknown merge {method!r}: expected linear, {', '.join(DENSITY_METHODS)}")
