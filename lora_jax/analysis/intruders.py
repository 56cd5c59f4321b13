"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228).

Fine-tuning turns W0 into W = W0 + dW. Take the top-k left singular vectors y_1..y_k of W (by
singular value) and all left singular vectors x_i of W0. y_j is an *intruder dimension* when no
singular vector of W0 resembles it:

    max_i |cos(y_j, x_i)| < epsilon.

The paper's main setting is k = 10, epsilon = 0.5 (its figures also sweep epsilon). Signs of
singular vectors are arbitrary, hence |cos|. W0 is compared through *all* its singular vectors,
not its top ones only: a direction W0 already has in its spectrum's middle is no intruder. The
paper finds LoRA introduces such new high-ranking directions and full fine-tuning does not.

What a count means: an intruder is a direction spread over many of W0's singular vectors (one
spread evenly over m of them scores 1 / sqrt(m)), not one outside their span (W0's left singular
vectors span its whole output space when d_out <= d_in).

Matrices are in the paper's (d_out, d_in) orientation; a Flax kernel (d_in, d_out) is transposed.

Example:
    intruder_count(kernel0.T, kernel.T)            # 0..10
    intruders_per_matrix(base_params, tuned_params)  # {'model/layers_0/self_attn/q_proj': 3, ...}
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import numpy as np
from flax import traverse_util

from lora_jax.quant.kernels import QuantizedKernel

TOP_K = 10  # the paper's k: the tuned matrix's top singular vectors examined
EPSILON = 0.5  # the paper's threshold on the largest |cos| with any of W0's singular vectors
# The projections inside the blocks of every family (Llama's q, k, v, o, gate, up, down; GPT-2's
# c_attn, c_proj, c_fc; BERT's query .. output): where LoRA and full fine-tuning both act.
BLOCK = r"(?:layers|h|layer)_(\d+)"  # a block's module: Llama's, GPT-2's, BERT's
BLOCK_KERNELS = BLOCK + r"/.*/kernel$"


def _left_singular_vectors(m: np.ndarray) -> np.ndarray:
    """Columns: the left singular vectors of m, sorted by singular value (largest first)."""
    u, _, _ = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    return u


def max_similarities(w0: np.ndarray, w: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """For each of W's top-k left singular vectors, its largest |cos| with any of W0's.

    Args:
      w0: the pre-trained matrix, (d_out, d_in).
      w: the tuned matrix, same shape.
      k: how many of W's top singular vectors to examine (at most min(d_out, d_in)).

    Returns:
      (k,) float64 array in [0, 1], in W's singular-value order.

    Raises:
      ValueError: shapes differ, or k is out of range.
    """
    w0, w = np.asarray(w0, np.float64), np.asarray(w, np.float64)
    if w0.ndim != 2 or w0.shape != w.shape:
        raise ValueError(f"W0 {w0.shape} and W {w.shape} must be matrices of one shape")
    if not 1 <= k <= min(w.shape):
        raise ValueError(f"k={k} must be in [1, {min(w.shape)}] for a {w.shape} matrix")
    tuned = _left_singular_vectors(w)[:, :k]
    pretrained = _left_singular_vectors(w0)
    return np.abs(pretrained.T @ tuned).max(axis=0)


def intruder_count(w0: np.ndarray, w: np.ndarray, k: int = TOP_K,
                   epsilon: float = EPSILON) -> int:
    """How many of W's top-k left singular vectors are intruders: max |cos| with W0's < epsilon."""
    if not 0.0 < epsilon <= 1.0:
        raise ValueError(f"epsilon={epsilon} must be in (0, 1]")
    return int((max_similarities(w0, w, k) < epsilon).sum())


def _as_matrix(leaf) -> np.ndarray:
    """A kernel as a float64 (d_out, d_in) matrix; a quantized kernel as its dequantized values."""
    if isinstance(leaf, QuantizedKernel):
        leaf = leaf.dequantize()
    return np.asarray(jax.device_get(leaf), np.float64).T


def intruders_per_matrix(base: Mapping, tuned: Mapping, pattern: str = BLOCK_KERNELS,
                         k: int = TOP_K, epsilon: float = EPSILON,
                         changed_only: bool = True) -> dict[str, int]:
    """The intruder count of every 2-D kernel whose path matches `pattern`.

    Args:
      base: the pre-trained params tree (kernels (d_in, d_out), or quantized kernels).
      tuned: the same tree after fine-tuning (e.g. a run's `stack.merge(frozen, trainable)`).
      pattern: regex on the '/'-joined path of the kernel; default the blocks' projections.
      k, epsilon: as in `intruder_count`.
      changed_only: skip kernels equal in both trees (their count is 0): a LoRA run on q and v
        then costs two SVD pairs per block, not seven.

    Returns:
      Module path (without '/kernel') -> count, in tree order.

    Raises:
      ValueError: no kernel matches `pattern`, or the trees hold different kernels.
    """
    # A QuantizedKernel is no dict: flatten_dict keeps it whole, a leaf like an array.
    flat_base, flat_tuned = traverse_util.flatten_dict(base), traverse_util.flatten_dict(tuned)
    paths = [p for p in flat_base if re.search(pattern, "/".join(map(str, p)))
             and flat_base[p].ndim == 2]
    if not paths:
        raise ValueError(f"no 2-D kernel matches {pattern!r}")
    missing = [p for p in paths if p not in flat_tuned]
    if missing:
        raise ValueError(f"the tuned tree lacks {'/'.join(map(str, missing[0]))}")
    counts = {}
    for path in paths:
        w0, w = _as_matrix(flat_base[path]), _as_matrix(flat_tuned[path])
        name = "/".join(map(str, path[:-1]))
        counts[name] = 0 if changed_only and np.array_equal(w0, w) else intruder_count(
            w0, w, k, epsilon)
    return counts


def per_layer(counts: Mapping[str, int]) -> dict[int, int]:
    """Counts summed per block: {block index: intruders over its matrices}.

    Example:
      >>> per_layer({"model/layers_0/self_attn/q_proj": 2, "model/layers_0/mlp/up_proj": 1,
      ...            "model/layers_3/self_attn/q_proj": 4})
      {0: 3, 3: 4}
    """
    layers: dict[int, int] = {}
    for name, count in counts.items():
        match = re.search(BLOCK + r"(?:/|$)", name)
        if match is None:
            raise ValueError(f"{name!r} names no block (layers_<i>, h_<i> or layer_<i>)")
        layers[int(match.group(1))] = layers.get(int(match.group(1)), 0) + count
    return dict(sorted(layers.items()))
