"""Normalized subspace similarity between two learned adapters (Hu et al. 2021, Section 7.2).

For A1 (r1, d) and A2 (r2, d) with right-singular vectors U1, U2 (columns, in R^d, sorted by
singular value),

    phi(A1, A2, i, j) = || U1[:, :i]^T U2[:, :j] ||_F^2 / min(i, j)   in [0, 1]:

1 when the smaller of the two top subspaces lies inside the other, 0 when they are orthogonal.
It depends only on the subspaces, so neither a rotation R A (R orthogonal r x r) nor the scale of A
changes it. Two independent uniformly random subspaces of dims i and j in R^d give
E[phi] = max(i, j) / d, the baseline the paper's random-Gaussian control shows.

B (d_out, r) is compared the same way through its left-singular vectors (side="left").

Example:
    grid = similarity_grid(a_r8, a_r64)          # (8, 64); grid[0, 0] = phi(1, 1)
    phi = subspace_similarity(a_r8, a_r64, 1, 1)
"""

from __future__ import annotations

from typing import Literal

import jax
import numpy as np

Side = Literal["right", "left"]


def singular_directions(m: np.ndarray | jax.Array, side: Side = "right") -> np.ndarray:
    """Orthonormal singular directions of `m`, as columns sorted by singular value.

    Args:
      m: A (r, d_in) for side="right", B (d_out, r) for side="left".
      side: "right" (rows of Vh, living in R^{d_in}) or "left" (columns of U, in R^{d_out}).

    Returns:
      (d, r) float64 array: column k is the k-th direction.
    """
    m = np.asarray(m, np.float64)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D adapter matrix, got shape {m.shape}")
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' (A's row space) or 'left' (B's column space), "
                         f"got {side!r}")
    u, _, vh = np.linalg.svd(m, full_matrices=False)
    return vh.T if side == "right" else u


def similarity_grid(m1: np.ndarray | jax.Array, m2: np.ndarray | jax.Array, *,
                    side: Side = "right") -> np.ndarray:
    """phi(m1, m2, i, j) for every i in 1..r1 and j in 1..r2, from one SVD of each matrix.

    Args:
      m1, m2: two A matrices (r1, d) and (r2, d) (side="right"), or two B matrices (d, r1) and
        (d, r2) (side="left").
      side: which singular vectors span the compared subspaces.

    Returns:
      (r1, r2) float64 array; entry [i - 1, j - 1] is phi(i, j).
    """
    u1, u2 = singular_directions(m1, side), singular_directions(m2, side)
    if u1.shape[0] != u2.shape[0]:
        raise ValueError(f"the two subspaces live in different spaces: R^{u1.shape[0]} and "
                         f"R^{u2.shape[0]} (shapes {np.shape(m1)} and {np.shape(m2)})")
    # ||U1[:, :i]^T U2[:, :j]||_F^2 is the sum of the squared overlaps in the top-left i x j block,
    # so one 2-D cumulative sum gives every (i, j) at once.
    overlap = np.cumsum(np.cumsum((u1.T @ u2) ** 2, axis=0), axis=1)
    i = np.arange(1, overlap.shape[0] + 1)[:, None]
    j = np.arange(1, overlap.shape[1] + 1)[None, :]
    # Rounding can push a value a few ulps past 1; the quantity itself never exceeds it.
    return np.clip(overlap / np.minimum(i, j), 0.0, 1.0)


def subspace_similarity(m1: np.ndarray | jax.Array, m2: np.ndarray | jax.Array, i: int, j: int,
                        *, side: Side = "right") -> float:
    """phi(m1, m2, i, j): how much of the top-min(i, j) directions the two top subspaces share.

    Args:
      m1, m2: as for `similarity_grid`.
      i, j: how many top directions of m1 and of m2 to take (1-based counts).
      side: "right" for A matrices, "left" for B matrices.

    Returns:
      A float in [0, 1].
    """
    r1, r2 = min(np.shape(m1)), min(np.shape(m2))  # the number of singular directions
    if not (1 <= i <= r1 and 1 <= j <= r2):
        raise ValueError(f"need 1 <= i <= {r1} and 1 <= j <= {r2}, got i={i}, j={j}")
    return float(similarity_grid(m1, m2, side=side)[i - 1, j - 1])


def random_gaussian_like(m: np.ndarray | jax.Array, key: jax.Array) -> np.ndarray:
    """A matrix of `m`'s shape with i.i.d. N(0, 1) entries: the paper's control (Figure 4).

    Its singular subspaces are uniformly random, so the similarity of two such matrices shows
    what phi looks like when nothing is shared.

    Args:
      m: any array; only its shape is used.
      key: a JAX PRNG key, to be used for nothing else.

    Returns:
      float64 array of m's shape.
    """
    return np.asarray(jax.random.normal(key, np.shape(m), np.float32), np.float64)
