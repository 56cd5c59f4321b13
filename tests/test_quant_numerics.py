"""`lora_jax.quant.nf4` and `lora_jax.quant.int8` against bitsandbytes on this CPU, bit for bit:
every stored number (codes, absmax, the nested codes, scales and offset) and every dequantized
value (`np.testing.assert_array_equal`), dequantization run jitted as in a train step."""

import os
import subprocess
import sys
import textwrap
import zlib

import jax
import numpy as np
import pytest
import torch

from lora_jax.quant import int8, nf4

bnb_functional = pytest.importorskip("bitsandbytes.functional")

# d_in not a multiple of 64 (blocks run across rows), an odd count (a padded nibble and a short
# last block), a single block (nested: absmax - offset is all zero), and a larger weight whose
# absmax vector spans many nested blocks of 256.
SHAPES = [(64, 48), (32, 100), (7, 33), (130, 99), (1, 64), (576, 1536)]
KINDS = ["normal", "outliers", "zero_block"]


def _weight(shape: tuple[int, int], kind: str) -> np.ndarray:
    """A float32 weight: N(0, 0.05^2), with 1% of values x300 ('outliers'), or with a 64-value
    block and the last row zeroed ('zero_block')."""
    rng = np.random.default_rng(zlib.crc32(f"{shape}{kind}".encode()))
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    flat = w.reshape(-1)
    if kind == "outliers":
        flat[rng.integers(0, flat.size, max(1, flat.size // 100))] *= 300
    elif kind == "zero_block":
        flat[64:128] = 0
        w[-1] = 0
    return w


def _bnb_nf4(w: np.ndarray, nested: bool, blocksize: int = 64):
    """bitsandbytes' (packed codes, quant state, dequantized weight) for w."""
    codes, state = bnb_functional.quantize_4bit(torch.from_numpy(w.copy()), blocksize=blocksize,
                                                quant_type="nf4", compress_statistics=nested)
    return codes, state, bnb_functional.dequantize_4bit(codes, state, quant_type="nf4").numpy()


def _jit_dequantize(module, parts, shape):
    return np.asarray(jax.jit(module.dequantize, static_argnums=1)(parts, shape))


@pytest.mark.parametrize("shape", SHAPES)
def test_the_bitsandbytes_reference_dequantizes_its_own_codes(shape):
    """The reference is self-consistent: bitsandbytes' dequantized weight is its NF4 table at
    its codes times its block's absmax (on an AVX512 CPU its native kernel is not, for
    (64, 48): conftest replaces it with its generic one there)."""
    w = _weight(shape, "normal")
    codes, state, expected = _bnb_nf4(w, nested=False)
    packed = codes.numpy().reshape(-1)
    index = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:w.size]
    table = bnb_functional.get_4bit_type("nf4", device="cpu").numpy()
    absmax = np.repeat(state.absmax.numpy(), 64)[:w.size]
    np.testing.assert_array_equal((table[index] * absmax).reshape(shape), expected)


def test_tables_are_bitsandbytes():
    np.testing.assert_array_equal(nf4.NF4_VALUES,
                                  bnb_functional.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(nf4.DYNAMIC_MAP, bnb_functional.create_dynamic_map().numpy())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_matches_bitsandbytes(shape, kind):
    w = _weight(shape, kind)
    codes, state, expected = _bnb_nf4(w, nested=False)
    parts = nf4.quantize(w)
    np.testing.assert_array_equal(parts["codes"], codes.numpy().reshape(-1))
    np.testing.assert_array_equal(parts["absmax"], state.absmax.numpy())
    np.testing.assert_array_equal(_jit_dequantize(nf4, parts, shape), expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_nested_matches_bitsandbytes(shape, kind):
    w = _weight(shape, kind)
    codes, state, expected = _bnb_nf4(w, nested=True)
    parts = nf4.quantize(w, nested=True)
    np.testing.assert_array_equal(parts["codes"], codes.numpy().reshape(-1))
    np.testing.assert_array_equal(parts["absmax_codes"], state.absmax.numpy())
    np.testing.assert_array_equal(parts["absmax_scale"], state.state2.absmax.numpy())
    np.testing.assert_array_equal(parts["absmax_offset"], state.offset.numpy())
    absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    np.testing.assert_array_equal(np.asarray(jax.jit(nf4._absmax)(parts)), absmax.numpy())
    np.testing.assert_array_equal(_jit_dequantize(nf4, parts, shape), expected)


# Run with XLA's default optimisation level: the suite compiles at level 0 (conftest.py), where
# LLVM forms no fused multiply-adds, so only a child process shows what `nf4._unfused` prevents.
_FMA_CHILD = textwrap.dedent("""
    import numpy as np, jax
    from lora_jax.quant import nf4
    w = (np.random.default_rng(0).standard_normal((576, 1536)) * 0.05).astype(np.float32)
    parts = nf4.quantize(w, nested=True)
    blocks = parts["absmax_codes"].size
    scale = np.repeat(parts["absmax_scale"], nf4.NESTED_BLOCKSIZE)[:blocks]
    expected = nf4.DYNAMIC_MAP[parts["absmax_codes"]] * scale + parts["absmax_offset"]
    np.testing.assert_array_equal(np.asarray(jax.jit(nf4._absmax)(parts)), expected)
""")


def test_nested_absmax_is_rounded_twice_when_optimised():
    """The nested absmax is (code * scale) + offset with the product rounded first, as
    bitsandbytes (and numpy) compute it, also when XLA optimises and could fuse the two."""
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _FMA_CHILD], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_nf4_other_blocksizes(blocksize):
    """Other block sizes, the dequantizer reading the size from the parts' shapes."""
    w = _weight((40, 100), "outliers")
    codes, state, expected = _bnb_nf4(w, nested=False, blocksize=blocksize)
    parts = nf4.quantize(w, blocksize=blocksize)
    np.testing.assert_array_equal(parts["codes"], codes.numpy().reshape(-1))
    np.testing.assert_array_equal(parts["absmax"], state.absmax.numpy())
    np.testing.assert_array_equal(_jit_dequantize(nf4, parts, (40, 100)), expected)


@pytest.mark.parametrize("size", [1, 7, 8, 33, 1000, 13824, 40000])
def test_offset_sum_is_torch_order(size):
    """The nested offset's last bit: our copy of torch's float32 summation order equals
    `torch.sum` (single-threaded, as torch runs sums of under 32768 values)."""
    rng = np.random.default_rng(size)
    x = (np.abs(rng.standard_normal(size)) * rng.uniform(0.01, 5)).astype(np.float32) + 0.3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = torch.from_numpy(x).sum().numpy()
        expected_mean = torch.from_numpy(x).mean().numpy()
    finally:
        torch.set_num_threads(threads)
    assert nf4._torch_float32_sum(x) == expected
    assert nf4._torch_float32_mean(x) == expected_mean


def test_nf4_refuses_bad_input():
    with pytest.raises(ValueError, match="blocksize 48"):
        nf4.quantize(np.ones((4, 64), np.float32), blocksize=48)
    with pytest.raises(ValueError, match="non-finite"):
        nf4.quantize(np.full((4, 64), np.nan, np.float32))
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize(np.zeros((0, 64), np.float32))
    parts = nf4.quantize(np.ones((4, 64), np.float32))
    with pytest.raises(KeyError, match="neither"):
        nf4.dequantize({"codes": parts["codes"]}, (4, 64))
    with pytest.raises(ValueError, match="do not hold 512 values"):
        nf4.dequantize(parts, (8, 64))


def test_nf4_nbytes():
    parts = nf4.quantize(np.ones((64, 64), np.float32), nested=True)
    # 4096 nibbles, 64 absmax codes, one nested scale, the offset.
    assert nf4.nbytes(parts) == 2048 + 64 + 4 + 4


@pytest.mark.parametrize("kind", ["normal", "outliers", "zero_block"])
@pytest.mark.parametrize("shape", [(64, 48), (7, 33), (1, 5), (576, 1536)])
def test_int8_matches_bitsandbytes(shape, kind):
    """Row-wise int8 with threshold 0 (no outlier columns held back); 'zero_block' has a row of
    zeros, which bitsandbytes stores as codes 0 with absmax 0."""
    w = _weight(shape, kind)
    codes, stats, outliers = bnb_functional.int8_vectorwise_quant(torch.from_numpy(w.copy()),
                                                                  threshold=0.0)
    assert outliers is None
    expected = bnb_functional.int8_vectorwise_dequant(codes, stats).numpy()
    parts = int8.quantize(w)
    np.testing.assert_array_equal(parts["codes"], codes.numpy())
    np.testing.assert_array_equal(parts["scale"], stats.numpy())
    np.testing.assert_array_equal(_jit_dequantize(int8, parts, shape), expected)


def test_int8_refuses_bad_input():
    with pytest.raises(ValueError, match="not a non-empty"):
        int8.quantize(np.ones(8, np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        int8.quantize(np.full((2, 8), np.inf, np.float32))
    with pytest.raises(ValueError, match="do not hold"):
        int8.dequantize(int8.quantize(np.ones((2, 8), np.float32)), (8, 2))
