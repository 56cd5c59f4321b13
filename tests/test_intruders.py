"""Intruder dimensions (lora_jax.analysis.intruders) on matrices built with a known number of
intruders, and over a params tree."""

import numpy as np
import pytest
import scipy.linalg

from lora_jax.analysis.intruders import (intruder_count, intruders_per_matrix, max_similarities,
                                         per_layer)

D = 40  # W0 and W are D x (D + 8): D left singular vectors each
SPREAD = list(range(16))  # Q's columns spread evenly over 16 of W0's vectors: max |cos| 1/4
TILTED = [16, 17]  # a pair rotated by 45 degrees: max |cos| 1/sqrt(2)
OWN = list(range(18, D))  # W0's own vectors: max |cos| 1


def orthogonal(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def rotation() -> np.ndarray:
    """Q, orthogonal: column j is tuned vector j in the basis of W0's left singular vectors."""
    q = np.eye(D)
    q[:16, :16] = scipy.linalg.hadamard(16) / 4.0
    c = np.sqrt(0.5)
    q[16:18, 16:18] = [[c, -c], [c, c]]
    return q


def planted(top: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(W0, W): W's left singular vectors, by decreasing singular value, are X Q[:, top] and then
    Q's other columns, X being W0's left singular vectors; so |cos(y_j, x_i)| = |Q_i,top[j]|."""
    x = orthogonal(D, seed)
    order = top + [j for j in range(D) if j not in top]
    v0, v = orthogonal(D + 8, seed + 1)[:, :D], orthogonal(D + 8, seed + 2)[:, :D]
    w0 = x @ np.diag(np.linspace(10.0, 1.0, D)) @ v0.T
    w = x @ rotation()[:, order] @ np.diag(np.linspace(30.0, 0.5, D)) @ v.T
    return w0, w


@pytest.mark.parametrize("intruders", [0, 1, 4, 10])
def test_counts_the_planted_intruders_among_the_top_ten(intruders):
    top = SPREAD[:intruders] + OWN[:10 - intruders]
    w0, w = planted(top)
    assert intruder_count(w0, w) == intruders
    # Where they rank does not matter, only whether they are among the top k.
    assert intruder_count(w0, planted(OWN[:10 - intruders] + SPREAD[:intruders])[1]) == intruders


def test_similarities_are_the_planted_cosines():
    w0, w = planted([SPREAD[0], TILTED[0], OWN[0], TILTED[1], SPREAD[5]])
    np.testing.assert_allclose(max_similarities(w0, w, k=5),
                               [0.25, np.sqrt(0.5), 1.0, np.sqrt(0.5), 0.25], atol=1e-10)


def test_epsilon_decides_which_directions_count():
    w0, w = planted([SPREAD[0], TILTED[0], OWN[0], TILTED[1], SPREAD[5]] + OWN[1:6])
    assert intruder_count(w0, w, epsilon=0.2) == 0  # below every cosine
    assert intruder_count(w0, w, epsilon=0.5) == 2  # the spread ones (1/4)
    assert intruder_count(w0, w, epsilon=0.75) == 4  # and the tilted ones (0.707)
    assert intruder_count(w0, w, epsilon=0.99) == 4  # W0's own vectors (cos 1) never count


def test_only_the_top_k_are_examined():
    w0, w = planted(OWN[:10] + SPREAD[:6])  # intruders at ranks 11..16
    assert intruder_count(w0, w, k=10) == 0
    assert intruder_count(w0, w, k=16) == 6


def test_an_unchanged_or_rescaled_matrix_has_none():
    w0, _ = planted(OWN[:10])
    assert intruder_count(w0, w0) == 0
    assert intruder_count(w0, -3.0 * w0, k=D) == 0  # signs and scale do not make intruders


def test_a_low_rank_update_along_a_spread_direction_intrudes_and_full_rank_drift_does_not():
    # LoRA's picture: a strong rank-1 dW whose output direction no singular vector of W0 holds.
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((D, D + 8))
    u = orthogonal(D, 4)[:, 0]  # a random direction: |cos| with each of W0's ~ 1/sqrt(D)
    lora_w = w0 + 40.0 * np.outer(u, rng.standard_normal(D + 8))
    assert intruder_count(w0, lora_w) == 1
    # Full fine-tuning's picture: a small dense drift keeps W0's top directions.
    assert intruder_count(w0, w0 + 1e-3 * rng.standard_normal(w0.shape)) == 0


def test_bad_arguments_are_named():
    w0, w = planted(OWN[:10])
    with pytest.raises(ValueError, match="one shape"):
        max_similarities(w0, w[:, :-1])
    with pytest.raises(ValueError, match="k=41"):
        max_similarities(w0, w, k=41)
    with pytest.raises(ValueError, match="epsilon"):
        intruder_count(w0, w, epsilon=0.0)


def test_per_matrix_over_a_params_tree():
    w0_q, w_q = planted(SPREAD[:3] + OWN[:7])
    w0_v, w_v = planted(SPREAD[:5] + OWN[:5], seed=7)
    base = {"model": {"layers_0": {"q_proj": {"kernel": w0_q.T}, "v_proj": {"kernel": w0_v.T}},
                      "layers_1": {"q_proj": {"kernel": w0_q.T}},
                      "norm": {"scale": np.ones(D)}},
            "embed": {"embedding": np.ones((5, D))}}
    tuned = {"model": {"layers_0": {"q_proj": {"kernel": w_q.T}, "v_proj": {"kernel": w_v.T}},
                       "layers_1": {"q_proj": {"kernel": w0_q.T}},
                       "norm": {"scale": np.ones(D)}},
             "embed": {"embedding": np.ones((5, D))}}
    counts = intruders_per_matrix(base, tuned)
    assert counts == {"model/layers_0/q_proj": 3, "model/layers_0/v_proj": 5,
                      "model/layers_1/q_proj": 0}
    assert per_layer(counts) == {0: 8, 1: 0}
    assert intruders_per_matrix(base, tuned, pattern="v_proj") == {"model/layers_0/v_proj": 5}
    with pytest.raises(ValueError, match="no 2-D kernel matches"):
        intruders_per_matrix(base, tuned, pattern="up_proj")
    with pytest.raises(ValueError, match="names no block"):
        per_layer({"embed": 1})


def test_a_quantized_kernel_is_read_as_its_dequantized_values():
    from lora_jax.quant.kernels import quantize

    w0, w = planted(SPREAD[:2] + OWN[:8])
    held = quantize(w0.astype(np.float32), "nf4")  # torch layout (d_out, d_in)
    base = {"layers_0": {"q": {"kernel": held}}}
    exact = intruder_count(np.asarray(held.dequantize(), np.float64).T, w)
    assert intruders_per_matrix(base, {"layers_0": {"q": {"kernel": w.T}}}) == {
        "layers_0/q": exact}
    assert exact == 2  # nf4's rounding moves no direction across epsilon here
