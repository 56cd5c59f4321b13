"""How a LoRA update relates to the frozen weight it adapts (Hu et al. 2021, Section 7.3, Table 7).

For dW = s B A (d_out x d_in, s = alpha / r) with top-r singular vectors U (d_out, r) and
V (r, d_in), the paper projects the frozen W onto dW's subspace, ||U^T W V^T||_F, and compares
it with projecting W onto its own top-r directions and onto a random matrix's. A small
||U^T W V^T||_F next to ||dW||_F means dW amplifies directions W already has but does not
emphasize; the ratio

    amplification = ||dW||_F / ||U^T W V^T||_F

is about 21.5 at r = 4 and about 2 at r = 64 for GPT-3's layer 48.

Matrices here are in the paper's (d_out, d_in) orientation; a Flax kernel (d_in, d_out) must be
transposed first.

Example:
    stats = amplification(kernel.T, a, b, scale=alpha / r, key=jax.random.key(0))
    stats["amplification"], stats["w_on_dw"], stats["w_on_w"]
"""

from __future__ import annotations

import jax
import numpy as np

from lora_jax.analysis.subspace import random_gaussian_like


def top_singular_vectors(m: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(U (d_out, r), V (r, d_in)): the top-r left and right singular vectors of m (d_out, d_in)."""
    u, _, vh = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    return u[:, :r], vh[:r]


def projection_norm(w: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    """||U^T W V^T||_F: the part of W (d_out, d_in) inside the subspaces U (d_out, r), V (r, d_in).

    The value depends on the subspaces only, not on the basis chosen in them, so ties between
    singular values do not make it ambiguous.
    """
    return float(np.linalg.norm(u.T @ np.asarray(w, np.float64) @ v.T))


def amplification(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float,
                  key: jax.Array) -> dict[str, float]:
    """Table 7's quantities for one adapted matrix.

    Args:
      w: the frozen weight W, (d_out, d_in) (a Flax kernel transposed).
      a: the adapter's A, (r, d_in).
      b: the adapter's B, (d_out, r).
      scale: s, e.g. alpha / r.
      key: PRNG key for the random Gaussian control matrix.

    Returns:
      A dict of floats, U and V being dW's top-r singular vectors:
        rank: r.
        dw_norm, w_norm: ||dW||_F and ||W||_F.
        w_on_dw: ||U^T W V^T||_F (Table 7's column dW).
        w_on_w: W projected onto its own top-r directions, sqrt(sum of W's top-r sigma^2)
          (Table 7's column W); the largest any rank-r projection of W can be.
        w_on_random: W projected onto a random Gaussian matrix's top-r directions (column Random).
        dw_on_dw: dW projected onto its own directions; equals dw_norm (a check of the pipeline).
        random_on_dw: a random Gaussian matrix of W's shape, rescaled to ||W||_F, projected onto
          dW's directions: what w_on_dw would be if W had no relation to dW.
        amplification: dw_norm / w_on_dw (inf when W has nothing in dW's subspace).
    """
    w = np.asarray(w, np.float64)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    r = a.shape[0]
    if w.shape != (b.shape[0], a.shape[1]) or b.shape[1] != r:
        raise ValueError(f"W {w.shape} must be (d_out, d_in) = ({b.shape[0]}, {a.shape[1]}) for "
                         f"A {a.shape} and B {b.shape}; transpose a Flax kernel first")
    dw = scale * (b @ a)
    u, v = top_singular_vectors(dw, r)
    u_w, v_w = top_singular_vectors(w, r)
    noise = random_gaussian_like(w, key)
    noise *= np.linalg.norm(w) / np.linalg.norm(noise)
    u_rand, v_rand = top_singular_vectors(noise, r)
    dw_norm, w_on_dw = float(np.linalg.norm(dw)), projection_norm(w, u, v)
    return {
        "rank": r,
        "dw_norm": dw_norm,
        "w_norm": float(np.linalg.norm(w)),
        "w_on_dw": w_on_dw,
        "w_on_w": projection_norm(w, u_w, v_w),
        "w_on_random": projection_norm(w, u_rand, v_rand),
        "dw_on_dw": projection_norm(dw, u, v),
        "random_on_dw": projection_norm(noise, u, v),
        "amplification": dw_norm / w_on_dw if w_on_dw > 0 else float("inf"),
    }
