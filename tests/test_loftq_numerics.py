"""`lora_jax.methods.loftq.loftq_factors` against PEFT's LoftQ (`peft.utils.loftq_utils`).

Since PEFT 0.22, `loftq_init` (and `get_peft_model` with init_lora_weights="loftq") runs on the
CPU (its device is `infer_device()`; before, it was "cuda" unconditionally), so the comparisons call
PEFT itself, with bitsandbytes' own quantizer, patching nothing.

SVD factors are unique only up to the sign of each rank component (row k of A and column k of B
flip together), and numpy and torch may choose differently: A and B are compared after aligning
each component's sign to PEFT's. The dequantized base and the residual W - Q - B A do not depend
on signs.
"""

import numpy as np
import pytest
import torch

from lora_jax.methods.loftq import loftq_factors
from lora_jax.quant import int8, nf4

pytest.importorskip("bitsandbytes")  # PEFT's LoftQ quantizes with it
loftq_utils = pytest.importorskip("peft.utils.loftq_utils")

TOL = dict(rtol=0, atol=1e-4)


def _peft_loftq(weight: np.ndarray, num_bits: int, reduced_rank: int, num_iter: int):
    """PEFT's `loftq_init(weight, num_bits, reduced_rank, num_iter)`: (dequantized base, lora_A,
    lora_B) as numpy."""
    base, a, b = loftq_utils.loftq_init(torch.from_numpy(weight), num_bits=num_bits,
                                        reduced_rank=reduced_rank, num_iter=num_iter)
    return base.numpy(), a.numpy(), b.numpy()


def _sign_aligned(a: np.ndarray, b: np.ndarray, a_ref: np.ndarray):
    """(a, b) with rank component k (row k of a, column k of b) negated where it points away
    from a_ref's row k."""
    signs = np.where(np.sum(a * a_ref, axis=1) < 0, -1.0, 1.0).astype(np.float32)
    return a * signs[:, None], b * signs[None, :]


def _assert_matches_peft(w, parts, a, b, dequantize, peft_result):
    """Base, sign-aligned A and B, and the residual W - Q - B A within 1e-4 of PEFT's."""
    base_ref, a_ref, b_ref = peft_result
    base = np.asarray(dequantize(parts, w.shape))
    a, b = _sign_aligned(a, b, a_ref)
    np.testing.assert_allclose(base, base_ref, **TOL)
    np.testing.assert_allclose(a, a_ref, **TOL)
    np.testing.assert_allclose(b, b_ref, **TOL)
    np.testing.assert_allclose(w - base - b @ a, w - base_ref - b_ref @ a_ref, **TOL)


def _normal(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("rank", [4, 8])
@pytest.mark.parametrize("iterations", [1, 5])
@pytest.mark.parametrize("shape", [(64, 48), (96, 64)])
def test_loftq_matches_peft_nf4(shape, iterations, rank):
    w = _normal(shape, seed=shape[0] + iterations + rank)
    parts, a, b = loftq_factors(w, rank, iterations, nf4.quantize, nf4.dequantize)
    peft_result = _peft_loftq(w, 4, rank, iterations)
    assert a.shape == (rank, shape[1]) and b.shape == (shape[0], rank)
    _assert_matches_peft(w, parts, a, b, nf4.dequantize, peft_result)
    if iterations == 1:  # the first step quantizes W itself: bit for bit
        np.testing.assert_array_equal(np.asarray(nf4.dequantize(parts, shape)), peft_result[0])


def test_loftq_matches_peft_int8():
    """8 bits: PEFT's Int8Params casts the weight to float16 before bitsandbytes' row-wise
    int8, so the quantizer here is int8.quantize of W in float16."""
    w = _normal((64, 48), seed=3)
    parts, a, b = loftq_factors(w, 8, 5, lambda x: int8.quantize(x.astype(np.float16)),
                                int8.dequantize)
    _assert_matches_peft(w, parts, a, b, int8.dequantize, _peft_loftq(w, 8, 8, 5))


def test_loftq_scale_divides_the_factors():
    """With a LoRA scale s, the same Q and the factors divided by sqrt(s) each, so that
    Q + s B A is what Q + B A is for s = 1 (PEFT ignores s; see the module docstring)."""
    w = _normal((64, 48), seed=4)
    parts1, a1, b1 = loftq_factors(w, 8, 3, nf4.quantize, nf4.dequantize)
    parts2, a2, b2 = loftq_factors(w, 8, 3, nf4.quantize, nf4.dequantize, scale=2.0)
    for key in parts1:
        np.testing.assert_array_equal(parts1[key], parts2[key])
    np.testing.assert_allclose(a2 * np.sqrt(2), a1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b2 * np.sqrt(2), b1, rtol=1e-6, atol=1e-7)
    base = np.asarray(nf4.dequantize(parts2, w.shape))
    np.testing.assert_allclose(base + 2.0 * b2 @ a2, base + b1 @ a1, rtol=0, atol=1e-5)


def test_loftq_reduces_the_quantization_error():
    """The point of LoftQ: Q + B A is closer to W than QLoRA's Q = q(W) is, more so with more
    iterations."""
    w = _normal((96, 64), seed=5)
    q_only = np.asarray(nf4.dequantize(nf4.quantize(w), w.shape))
    errors = []
    for iterations in (1, 5):
        parts, a, b = loftq_factors(w, 8, iterations, nf4.quantize, nf4.dequantize)
        errors.append(np.linalg.norm(w - np.asarray(nf4.dequantize(parts, w.shape)) - b @ a))
    assert errors[1] <= errors[0] < np.linalg.norm(w - q_only)


def test_nf4_requantizes_its_dequantized_base():
    """PEFT keeps the dequantized Q as a float weight, to be saved and reloaded in 4 bits: NF4
    (not nested) gives back the same codes and absmax from its own dequantized values."""
    w = _normal((96, 64), seed=6)
    parts, _, _ = loftq_factors(w, 8, 2, nf4.quantize, nf4.dequantize)
    again = nf4.quantize(np.asarray(nf4.dequantize(parts, w.shape)))
    for key in parts:
        np.testing.assert_array_equal(again[key], parts[key])


def test_loftq_refuses_bad_arguments():
    w = _normal((16, 8))
    for kwargs, message in [(dict(rank=0), "rank 0"), (dict(rank=9), "rank 9"),
                            (dict(iterations=0), "iterations"), (dict(scale=0.0), "scale")]:
        args = dict(rank=4, iterations=1, scale=1.0) | kwargs
        with pytest.raises(ValueError, match=message):
            loftq_factors(w, args["rank"], args["iterations"], nf4.quantize, nf4.dequantize,
                          scale=args["scale"])
    with pytest.raises(ValueError, match="not a"):
        loftq_factors(w.reshape(-1), 4, 1, nf4.quantize, nf4.dequantize)
