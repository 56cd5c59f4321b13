"""QLoRA's 4-bit NormalFloat (Dettmers et al. 2023), stored as bitsandbytes stores it.

A weight W (torch layout, (d_out, d_in)) is flattened row-major, as bitsandbytes flattens the
torch tensor, and cut into blocks of `blocksize` values (the last one may be short). Each block
keeps its absmax (float32) and, per value, the index of the NF4 code nearest to value / absmax,
two indices per byte, the first value in the high nibble. With `nested=True` (QLoRA's double
quantization, bitsandbytes' `compress_statistics=True`) the absmax vector is itself stored as
bitsandbytes does: its mean `offset`, and absmax - offset in blocks of 256 as 8-bit indices into
bitsandbytes' signed dynamic map, with one float32 scale per block.

Parts (all numpy on the host after `quantize`, jax arrays inside jitted steps):

  plain:   {"codes": uint8 (ceil(n / 2),), "absmax": float32 (blocks,)}
  nested:  {"codes", "absmax_codes": uint8 (blocks,), "absmax_scale": float32 (ceil(blocks / 256),),
            "absmax_offset": float32 ()}

Every stored number equals bitsandbytes' own (`bitsandbytes.functional.quantize_4bit`, its CPU
path) and `dequantize` returns its `dequantize_4bit` bit for bit; tests/test_quant_numerics.py
checks both. Three things make that so and are easy to get wrong: bitsandbytes scales full
blocks by the reciprocal of the absmax but divides the short last block by it; its nested
offset is torch's float32 `mean`, whose last bit depends on torch's summation order (copied here,
see `_torch_float32_sum`); and its CPU 8-bit quantizer for the absmax is not a nearest-entry search
but a 65536-point lookup table (`_quantize_dynamic`), which near a midpoint may pick the farther
entry.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# bitsandbytes' NF4 table (`functional.get_4bit_type("nf4")`): quantiles of N(0, 1) scaled to
# [-1, 1], with an exact zero. Index order is value order.
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # those bitsandbytes accepts
NESTED_BLOCKSIZE = 256  # bitsandbytes hard-codes this for the absmax vector

_PLAIN_PARTS = frozenset({"codes", "absmax"})
_NESTED_PARTS = frozenset({"codes", "absmax_codes", "absmax_scale", "absmax_offset"})

# bitsandbytes clamps an absmax to this before taking its reciprocal, so an all-zero block
# scales to zeros instead of NaN; the clamped value is what it stores for a short last block.
_ABSMAX_FLOOR = np.float32(1e-38)

# Lanes of torch's float32 vector type on an AVX2 CPU, which fixes the order of its sums.
_TORCH_SUM_LANES = 8


# ---------------------------------------------------------------------------------------------
# 4-bit codes


def _nf4_bounds() -> np.ndarray:
    """Midpoints between neighbouring NF4 values, rounded in float32 as bitsandbytes does."""
    return (NF4_VALUES[:-1] + NF4_VALUES[1:]) / np.float32(2)


def _flat_weight(w: np.ndarray) -> np.ndarray:
    """W flattened row-major to float32, refused if it is empty or not finite."""
    w = np.asarray(w)
    if not np.issubdtype(w.dtype, np.floating) and w.dtype.name != "bfloat16":
        raise TypeError(f"nf4.quantize: weight dtype {w.dtype} is not a float type")
    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    if flat.size == 0:
        raise ValueError(f"nf4.quantize: weight of shape {w.shape} is empty")
    if not np.isfinite(flat).all():
        raise ValueError(f"nf4.quantize: weight of shape {w.shape} has non-finite values")
    return flat


def _scaled_blocks(flat: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """(absmax per block, values scaled into [-1, 1]), in bitsandbytes' float32 arithmetic."""
    full = flat.size - flat.size % blocksize
    body = flat[:full].reshape(-1, blocksize)
    absmax = np.abs(body).max(axis=1, initial=np.float32(0))
    # Full blocks: multiply by the reciprocal (torch's `1.0 / x` is `reciprocal(x) * 1.0`).
    recip = np.float32(1) / np.maximum(absmax, _ABSMAX_FLOOR)
    scaled = [np.clip(body * recip[:, None], -1, 1).reshape(-1)]
    if full < flat.size:
        # The short last block is divided instead, and its clamped absmax is what is stored.
        tail = flat[full:]
        tail_max = np.maximum(np.abs(tail).max(), _ABSMAX_FLOOR)
        absmax = np.append(absmax, tail_max)
        scaled.append(np.clip(tail / tail_max, -1, 1))
    return absmax.astype(np.float32), np.concatenate(scaled)


def _pack(indices: np.ndarray) -> np.ndarray:
    """4-bit indices two per byte, the first in the high nibble; an odd count is padded with the
    index of 0.0, as bitsandbytes pads."""
    if indices.size % 2:
        indices = np.append(indices, np.uint8(np.searchsorted(_nf4_bounds(), 0.0)))
    return (indices[0::2] << 4) | indices[1::2]


def _unpack(codes: jax.Array, n: int) -> jax.Array:
    """The first n 4-bit indices of packed bytes, in storage order."""
    pairs = jnp.stack([codes >> 4, codes & 0xF], axis=-1)
    return pairs.reshape(-1)[:n]


# ---------------------------------------------------------------------------------------------
# torch's float32 arithmetic that bitsandbytes' double quantization inherits


def _ceil_log2(x: int) -> int:
    """torch's `utils::CeilLog2`: 1 for x <= 2."""
    return 1 if x <= 2 else (x - 1).bit_length()


def _cascade_sum(rows: np.ndarray) -> np.ndarray:
    """torch's `multi_row_sum`: sums `rows` (size, ...) over the first axis in float32 in chunks
    of 2^p, chunk sums carried up four levels, so only similar magnitudes meet."""
    size = rows.shape[0]
    power = max(4, _ceil_log2(size) // 4)
    step, mask = 1 << power, (1 << power) - 1
    acc = np.zeros((4,) + rows.shape[1:], np.float32)
    i = 0
    while i + step <= size:
        # A strictly sequential float32 sum of the chunk (level 0 is zero at each chunk start).
        acc[0] = np.cumsum(rows[i:i + step], axis=0, dtype=np.float32)[-1]
        i += step
        for level in range(1, 4):
            acc[level] += acc[level - 1]
            acc[level - 1] = 0
            if i & (mask << (level * power)):
                break
    for row in rows[i:]:
        acc[0] += row
    return ((acc[0] + acc[1]) + acc[2]) + acc[3]


def _ilp_sum(items: np.ndarray) -> np.ndarray:
    """torch's `row_sum`: four interleaved cascades over `items` (size, ...), then the leftover
    items and the four partial sums added in order."""
    size_ilp = items.shape[0] // 4
    partial = _cascade_sum(items[:size_ilp * 4].reshape((size_ilp, 4) + items.shape[1:]))
    total = partial[0]
    for item in items[size_ilp * 4:]:
        total = total + item
    for k in range(1, 4):
        total = total + partial[k]
    return total


def _torch_float32_sum(x: np.ndarray, lanes: int = _TORCH_SUM_LANES) -> np.float32:
    """`torch.sum` of a contiguous 1-D float32 CPU tensor, in torch's own order.

    torch sums vectors of `lanes` floats with `_ilp_sum`, adds the leftover scalars, then the
    lanes one by one. Its last bit depends on that order, and bitsandbytes' nested offset
    inherits it. This is torch's single-threaded order on an AVX2 CPU (8 lanes; torch on an
    AVX-512 CPU uses 16), and above 32768 values torch splits the sum across its threads, so
    bitsandbytes' own offset can then differ in the last bit between machines; ours does not.
    """
    n_vec = x.size // lanes
    if n_vec == 0:
        return np.float32(_ilp_sum(x))
    lane_sums = _ilp_sum(x[:n_vec * lanes].reshape(n_vec, lanes))
    total = np.float32(0)
    for value in np.concatenate([x[n_vec * lanes:], lane_sums]):
        total = np.float32(total + value)
    return total


def _torch_float32_mean(x: np.ndarray) -> np.float32:
    """`torch.mean` on CPU: the float32 sum divided by the count, in float32."""
    return np.float32(_torch_float32_sum(x) / np.float32(x.size))


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=float32)` on CPU: each point is start + i*step
    (from the start for the first half, from the end for the rest) rounded once, as torch's
    kernel, compiled to a fused multiply-add, rounds it (a separately rounded product differs
    for 9 points and more). The products and sums are exact in float64 here."""
    s, e = np.float32(start), np.float32(end)
    step = (e - s) / np.float32(steps - 1)
    i = np.arange(steps, dtype=np.float64)
    first = np.float64(s) + np.float64(step) * i
    last = np.float64(e) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, first, last).astype(np.float32)


def _dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (`functional.create_dynamic_map()`): 0, 1 and 7
    decades of linearly spaced fractions with both signs, sorted; the lowest is -0.99297."""
    values = [np.zeros(1, np.float32), np.ones(1, np.float32)]
    for level in range(7):
        bounds = _torch_linspace(0.1, 1.0, 2 ** level + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scaled = np.float32(10.0 ** (level - 6)) * means
        values += [scaled, -scaled]
    return np.sort(np.concatenate(values))


DYNAMIC_MAP = _dynamic_map()

_LUT_SIZE = 65536


def _dynamic_lut(code: np.ndarray) -> np.ndarray:
    """bitsandbytes' CPU lookup table: [-1, 1] cut into 65536 grid points, each mapped to the
    first map entry whose upper midpoint is not below it (float32 midpoints and grid)."""
    midpoints = (code[:-1] + code[1:]) * np.float32(0.5)
    grid = np.float32(-1) + (np.float32(2) * np.arange(_LUT_SIZE, dtype=np.float32)
                             ) / np.float32(_LUT_SIZE - 1)
    return np.searchsorted(midpoints, grid, side="left").astype(np.uint8)


_DYNAMIC_LUT = _dynamic_lut(DYNAMIC_MAP)


def _lut_index(normed: np.ndarray) -> np.ndarray:
    """The grid point bitsandbytes reads for a value in [-1, 1]: (v + 1) / 2 * 65535 + 0.5,
    truncated, each step rounded to float32."""
    v = np.clip(normed, -1, 1).astype(np.float32)
    half = (v + np.float32(1)) * np.float32(0.5)
    return (half * np.float32(_LUT_SIZE - 1) + np.float32(0.5)).astype(np.uint16)


def _quantize_dynamic(x: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' CPU `quantize_blockwise` of float32 x: (uint8 indices, absmax per block).

    Not a nearest-entry search: bitsandbytes (0.50) multiplies each value by its block's
    reciprocal absmax, reads one of 65536 grid points (`_lut_index`) and takes that point's
    nearest map entry (`_dynamic_lut`), so near a midpoint it may pick the farther entry. A
    block of zeros gets index 0 (any index dequantizes to 0 there, its scale being 0).
    """
    blocks = -(-x.size // blocksize)
    padded = np.zeros(blocks * blocksize, np.float32)
    padded[:x.size] = x
    absmax = np.abs(padded.reshape(blocks, blocksize)).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.float32(1) / absmax
    per_value = np.repeat(inv, blocksize)[:x.size]
    nonzero = np.repeat(absmax > 0, blocksize)[:x.size]
    with np.errstate(invalid="ignore"):
        normed = np.where(nonzero, x * per_value, np.float32(0))
    codes = np.where(nonzero, _DYNAMIC_LUT[_lut_index(normed)], 0)
    return codes.astype(np.uint8), absmax.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# public API


def quantize(w: np.ndarray, blocksize: int = 64, nested: bool = False) -> dict[str, np.ndarray]:
    """W (any shape, torch layout, float) -> NF4 parts (see the module docstring), on the host.

    Matches `bitsandbytes.functional.quantize_4bit(W, blocksize, quant_type="nf4",
    compress_statistics=nested)` on CPU, including sizes that are not a multiple of `blocksize`.
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"nf4.quantize: blocksize {blocksize} is not one of {BLOCKSIZES}")
    flat = _flat_weight(w)
    absmax, scaled = _scaled_blocks(flat, blocksize)
    indices = np.searchsorted(_nf4_bounds(), scaled, side="left").astype(np.uint8)
    codes = _pack(indices)
    if not nested:
        return {"codes": codes, "absmax": absmax}
    offset = _torch_float32_mean(absmax)
    absmax_codes, absmax_scale = _quantize_dynamic(absmax - offset, NESTED_BLOCKSIZE)
    return {"codes": codes, "absmax_codes": absmax_codes, "absmax_scale": absmax_scale,
            "absmax_offset": np.asarray(offset, np.float32)}


def _infer_blocksize(n: int, blocks: int) -> int:
    """The block size that cuts n values into `blocks` blocks (unique among `BLOCKSIZES` when
    blocks > 1; a single block may be taken as n long)."""
    if blocks == 1:
        return n
    for size in BLOCKSIZES:
        if -(-n // size) == blocks:
            return size
    raise ValueError(f"nf4.dequantize: {blocks} absmax values fit no block size in {BLOCKSIZES} "
                     f"for {n} weights")


def _blockwise(values: jax.Array, scale: jax.Array, blocksize: int) -> jax.Array:
    """values (n,) times their block's scale, one float32 product each."""
    n = values.shape[0]
    pad = scale.shape[0] * blocksize - n
    blocks = jnp.pad(values, (0, pad)).reshape(scale.shape[0], blocksize)
    return (blocks * scale[:, None]).reshape(-1)[:n]


def _unfused(product: jax.Array) -> jax.Array:
    """`product`, behind a select that a compiler does not look through.

    bitsandbytes rounds code * scale to float32 before adding the offset. XLA's CPU backend
    fuses the two into one loop and LLVM contracts them into a fused multiply-add, which rounds
    once and differs in the last bit (an optimization barrier does not help: it is dropped
    before fusion). With the select in between, the add's operand is no longer a multiply and
    is not contracted; GPU backends contract the same way (not checked on a GPU here). The
    select changes nothing for stored parts, whose products are finite.
    """
    return jnp.where(jnp.isnan(product), jnp.float32(0), product)


def _absmax(parts: Mapping[str, jax.Array]) -> jax.Array:
    """The per-block absmax, rebuilt from the nested parts where they are nested."""
    if "absmax" in parts:
        return jnp.asarray(parts["absmax"], jnp.float32)
    codes = jnp.asarray(parts["absmax_codes"])
    centered = _blockwise(jnp.asarray(DYNAMIC_MAP)[codes], jnp.asarray(parts["absmax_scale"]),
                          NESTED_BLOCKSIZE)
    return _unfused(centered) + jnp.asarray(parts["absmax_offset"], jnp.float32)


def _check_parts(parts: Mapping[str, jax.Array], n: int) -> None:
    """Refuse parts that are neither layout, or whose codes do not hold n values."""
    keys = frozenset(parts)
    if keys not in (_PLAIN_PARTS, _NESTED_PARTS):
        raise KeyError(f"nf4.dequantize: parts {sorted(keys)} are neither {sorted(_PLAIN_PARTS)} "
                       f"nor {sorted(_NESTED_PARTS)}")
    if parts["codes"].shape != ((n + 1) // 2,):
        raise ValueError(f"nf4.dequantize: codes of shape {parts['codes'].shape} do not hold "
                         f"{n} values (expected ({(n + 1) // 2},))")


def dequantize(parts: Mapping[str, jax.Array], shape: tuple[int, ...],
               blocksize: int | None = None) -> jax.Array:
    """NF4 parts -> W of `shape` in float32, in jnp (jittable): each value is its NF4 code times
    its block's absmax, as `bitsandbytes.functional.dequantize_4bit` computes it. The block size
    is read from the parts' shapes unless given."""
    n = int(np.prod(shape))
    _check_parts(parts, n)
    absmax = _absmax(parts)
    blocksize = blocksize or _infer_blocksize(n, absmax.shape[0])
    values = jnp.asarray(NF4_VALUES)[_unpack(jnp.asarray(parts["codes"]), n)]
    return _blockwise(values, absmax, blocksize).reshape(shape)


def nbytes(parts: Mapping[str, jax.Array]) -> int:
    """Bytes the stored parts take."""
    return sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in parts.values())
