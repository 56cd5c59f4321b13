"""GGUF's legacy block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) unpacked in JAX, from raw bytes.

A quantized GGUF matrix is stored row by row; each row is a run of blocks of 32 values along d_in.
A block starts with an fp16 scale `d` (and, in Q4_1/Q5_1, an fp16 offset `m`), then the values'
bits. This module turns those bytes into float32 inside a jitted program, so a frozen base weight
can stay packed in device memory and be unpacked where it is used.

The results equal `gguf.quants.dequantize` (the reference, in numpy) bit for bit: the same fp16 ->
float32 casts, the same single multiply `d * q` and add `+ m`. Each product `d * q` is exact in
float32 (an 11-bit fp16 mantissa times an integer of at most 8 bits), so a compiler that fuses
`d * q + m` into one FMA rounds once either way and gets the same float32.

The K-quants (Q4_K, ...) are not here: `lora_jax.interop.gguf_files` dequantizes them at load time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Format name -> (values per block, bytes per block). These are the file format's constants
# (ggml's `GGML_QUANT_SIZES`); the tests check them against the gguf package.
BLOCK_FORMATS: dict[str, tuple[int, int]] = {
    "Q8_0": (32, 2 + 32),         # d, 32 x int8
    "Q4_0": (32, 2 + 16),         # d, 32 x 4-bit
    "Q4_1": (32, 2 + 2 + 16),     # d, m, 32 x 4-bit
    "Q5_0": (32, 2 + 4 + 16),     # d, 32 high bits, 32 x low 4 bits
    "Q5_1": (32, 2 + 2 + 4 + 16),  # d, m, 32 high bits, 32 x low 4 bits
}


def can_keep(kind: str) -> bool:
    """Whether weights of this GGML type name can stay packed and be unpacked by `dequantize`."""
    return kind in BLOCK_FORMATS


def dequantize(raw: jax.Array, kind: str, shape: tuple[int, int]) -> jax.Array:
    """Unpack a block-quantized matrix.

    Jittable with `kind` and `shape` static, e.g. `jax.jit(dequantize, static_argnames=("kind",
    "shape"))`.

    Args:
      raw: uint8 (rows, bytes_per_row), the tensor's rows exactly as the GGUF file stores them.
      kind: one of `BLOCK_FORMATS` ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1").
      shape: (rows, cols) of the values; cols is a multiple of 32.

    Returns:
      float32 (rows, cols).

    Raises:
      ValueError: an unknown kind, or `raw` does not hold `shape` in that kind.
    """
    blocks = _blocks(raw, kind, shape)
    values = _UNPACK[kind](blocks)  # (rows, blocks per row, 32)
    return values.reshape(shape)


def _blocks(raw: jax.Array, kind: str, shape: tuple[int, int]) -> jax.Array:
    """`raw` as (rows, blocks per row, bytes per block), after checking it fits `shape`."""
    if kind not in BLOCK_FORMATS:
        raise ValueError(f"GGUF block format {kind!r} is not supported here; supported: "
                         f"{', '.join(BLOCK_FORMATS)}")
    block_values, block_bytes = BLOCK_FORMATS[kind]
    rows, cols = shape
    if cols % block_values:
        raise ValueError(f"{kind} rows of {cols} values: not a whole number of "
                         f"{block_values}-value blocks")
    expected = (rows, cols // block_values * block_bytes)
    if raw.dtype != jnp.uint8 or tuple(raw.shape) != expected:
        raise ValueError(f"{kind} data for shape {shape} must be uint8 {expected}, "
                         f"got {raw.dtype} {tuple(raw.shape)}")
    return raw.reshape(rows, cols // block_values, block_bytes)


def _half(blocks: jax.Array, start: int) -> jax.Array:
    """The fp16 field at byte `start` of each block, as float32 with a trailing axis of 1."""
    # bitcast (..., 2) uint8 -> (...) float16 reads the bytes in the machine's order: little-endian
    # on every JAX backend, as GGUF files store them.
    half = jax.lax.bitcast_convert_type(blocks[..., start:start + 2], jnp.float16)
    return half.astype(jnp.float32)[..., None]


def _nibbles(packed: jax.Array) -> jax.Array:
    """16 bytes -> 32 values: the low nibbles are values 0..15, the high nibbles 16..31."""
    return jnp.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _high_bits(blocks: jax.Array, start: int) -> jax.Array:
    """The 32-bit field of fifth bits at byte `start`: bit j belongs to value j (uint8 0/1)."""
    word = jax.lax.bitcast_convert_type(blocks[..., start:start + 4], jnp.uint32)[..., None]
    bits = (word >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return bits.astype(jnp.uint8)


def _unpack_q8_0(blocks: jax.Array) -> jax.Array:
    d = _half(blocks, 0)
    q = jax.lax.bitcast_convert_type(blocks[..., 2:], jnp.int8).astype(jnp.float32)
    return q * d


def _unpack_q4_0(blocks: jax.Array) -> jax.Array:
    d = _half(blocks, 0)
    q = _nibbles(blocks[..., 2:]).astype(jnp.int8) - 8
    return d * q.astype(jnp.float32)


def _unpack_q4_1(blocks: jax.Array) -> jax.Array:
    d, m = _half(blocks, 0), _half(blocks, 2)
    q = _nibbles(blocks[..., 4:]).astype(jnp.float32)
    return (d * q) + m


def _unpack_q5_0(blocks: jax.Array) -> jax.Array:
    d = _half(blocks, 0)
    q = _nibbles(blocks[..., 6:]) | (_high_bits(blocks, 2) << 4)
    return d * (q.astype(jnp.int8) - 16).astype(jnp.float32)


def _unpack_q5_1(blocks: jax.Array) -> jax.Array:
    d, m = _half(blocks, 0), _half(blocks, 2)
    q = _nibbles(blocks[..., 8:]) | (_high_bits(blocks, 4) << 4)
    return (d * q.astype(jnp.float32)) + m


_UNPACK = {
    "Q8_0": _unpack_q8_0,
    "Q4_0": _unpack_q4_0,
    "Q4_1": _unpack_q4_1,
    "Q5_0": _unpack_q5_0,
    "Q5_1": _unpack_q5_1,
}
