"""A frozen Dense kernel held quantized in the params tree, and the matmul that reads it.

`QuantizedKernel` stands where a Flax `kernel` leaf stands: `traverse_util.flatten_dict` sees it
as one leaf (with the kernel's `shape`), JAX sees its stored parts (codes, scales, GGUF blocks)
as the arrays it places, shards and passes into a jitted step. `models.layers.Dense` computes
with it through `matmul`, which dequantizes inside the step, one kernel at a time; nothing else
in the package needs to know: the methods intercept `Dense.__call__` as before and add their
terms to its output, and those that read W0 itself (DoRA's norm, PiSSA's SVD, merging) call
`value`.

Formats (each stores the torch-layout weight W = kernel^T, (d_out, d_in), as the reference
libraries do, so that codes and blocks compare with theirs one for one):
  - 'int8': per output channel absmax (bitsandbytes' LLM.int8 row-wise quantization);
  - 'nf4', 'nf4-nested': QLoRA's 4-bit NormalFloat in blocks of 64, the second with the block
    scales quantized again to 8 bits (QLoRA's double quantization), as bitsandbytes stores them;
  - 'gguf-Q8_0', 'gguf-Q4_0', 'gguf-Q4_1', 'gguf-Q5_0', 'gguf-Q5_1': a GGUF file's own blocks,
    kept as read.

Why not qwix (0.1.8, which tunix and MaxText use): its quantized arrays come with its own
interception, which replaces the model class and rewrites `lax.dot_general` calls inside it,
while every method here intercepts `nn.Dense.__call__`; two interception layers over one matmul
would be two mechanisms for one thing. Its 'nf4' rounds to the nearest bucket with its own
packing and scale layout, so neither bitsandbytes' codes and double quantization nor GGUF's
blocks are qwix types: parity with those libraries, which is the proof asked of us, would not
hold. The formats here are small (`nf4.py`, `int8.py`, `gguf_blocks.py`) and each is checked
bit for bit against its reference library (tests/test_quant_numerics.py, tests/test_gguf.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_jax.quant import gguf_blocks, int8, nf4

# config.model.quantize values, 'none' first; `LOAD_OPTIONS` adds what loading is asked for when
# model.double_quant is set ('nf4-nested').
QUANTIZE_OPTIONS = ("none", "int8", "nf4", "gguf")
LOAD_OPTIONS = (*QUANTIZE_OPTIONS, "nf4-nested")


@dataclasses.dataclass(frozen=True)
class Format:
    """One way of storing W (d_out, d_in).

    Attributes:
      quantize: W as float32 numpy -> its parts (numpy); None for a format only read from files.
      dequantize: (parts, (d_out, d_in)) -> W in float32, in jnp (runs inside jitted steps).
    """

    quantize: Callable[[np.ndarray], dict[str, np.ndarray]] | None
    dequantize: Callable[[Mapping[str, jax.Array], tuple[int, int]], jax.Array]


def _gguf_format(kind: str) -> Format:
    return Format(None, lambda parts, shape: gguf_blocks.dequantize(parts["blocks"], kind, shape))


FORMATS: dict[str, Format] = {
    "int8": Format(int8.quantize, int8.dequantize),
    "nf4": Format(nf4.quantize, nf4.dequantize),
    "nf4-nested": Format(lambda w: nf4.quantize(w, nested=True), nf4.dequantize),
} | {f"gguf-{kind}": _gguf_format(kind) for kind in gguf_blocks.BLOCK_FORMATS}


@struct.dataclass
class QuantizedKernel:
    """A (d_in, d_out) Dense kernel stored as `format`'s parts of W = kernel^T.

    Attributes:
      parts: the stored arrays (the pytree's children).
      format: a key of `FORMATS`.
      shape: the kernel's shape, (d_in, d_out), as the Flax leaf it stands for.
      dtype: what it dequantizes to (the model's param dtype).
    """

    parts: dict[str, jax.Array]
    format: str = struct.field(pytree_node=False)
    shape: tuple[int, int] = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False, default=jnp.float32)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        """The weights it holds (d_in * d_out), as the array it stands for would count them."""
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes the stored parts take."""
        return sum(int(p.size) * jnp.dtype(p.dtype).itemsize for p in self.parts.values())

    def torch_weight(self) -> jax.Array:
        """W = kernel^T, (d_out, d_in), in float32."""
        d_in, d_out = self.shape
        return FORMATS[self.format].dequantize(self.parts, (d_out, d_in))

    def dequantize(self) -> jax.Array:
        """The kernel, (d_in, d_out), in `dtype`."""
        return self.torch_weight().T.astype(self.dtype)


def quantize(w: np.ndarray, fmt: str, dtype: Any = jnp.float32) -> QuantizedKernel:
    """A kernel given as its torch-layout weight W ((d_out, d_in), host memory, any float dtype)
    stored in `fmt` (a key of `FORMATS` that can quantize), its parts placed on the default
    device. Only this one weight is ever held in float32, on the host."""
    if FORMATS[fmt].quantize is None:
        raise ValueError(f"format {fmt!r} is only read from GGUF files; it cannot quantize")
    parts = FORMATS[fmt].quantize(np.ascontiguousarray(np.asarray(w, np.float32)))
    d_out, d_in = w.shape
    return QuantizedKernel({k: jnp.asarray(v) for k, v in parts.items()}, fmt, (d_in, d_out),
                           dtype)


def kept(blocks: np.ndarray, kind: str, shape: tuple[int, int],
         dtype: Any = jnp.float32) -> QuantizedKernel:
    """A kernel of `shape` (d_in, d_out) kept in a GGUF file's own blocks: `blocks` holds W's
    d_out rows of raw bytes, as the file stores them."""
    d_in, d_out = shape
    values, size = gguf_blocks.BLOCK_FORMATS[kind]
    if blocks.shape != (d_out, d_in // values * size) or d_in % values:
        raise ValueError(f"{kind} blocks of shape {blocks.shape} do not hold a ({d_out}, {d_in}) "
                         "weight")
    return QuantizedKernel({"blocks": jnp.asarray(blocks)}, f"gguf-{kind}", (d_in, d_out), dtype)


def _stored_shapes(fmt: str, d_out: int, d_in: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """name -> (shape, dtype) of the parts `fmt` stores for a (d_out, d_in) weight."""
    n = d_out * d_in
    blocks = -(-n // 64)
    if fmt == "int8":
        return {"codes": ((d_out, d_in), np.int8), "scale": ((d_out,), np.float32)}
    if fmt == "nf4":
        return {"codes": ((-(-n // 2),), np.uint8), "absmax": ((blocks,), np.float32)}
    if fmt == "nf4-nested":
        return {"codes": ((-(-n // 2),), np.uint8), "absmax_codes": ((blocks,), np.uint8),
                "absmax_scale": ((-(-blocks // nf4.NESTED_BLOCKSIZE),), np.float32),
                "absmax_offset": ((), np.float32)}
    raise ValueError(f"no stored shapes for format {fmt!r}")


def abstract(kernel: jax.ShapeDtypeStruct, fmt: str) -> QuantizedKernel:
    """The `QuantizedKernel` `quantize` would make of a (d_in, d_out) kernel, in shapes only
    (`jax.ShapeDtypeStruct` parts): what a model too large to load here would hold (the 7B plan).
    tests/test_quantized_base.py checks these shapes against `quantize`'s."""
    d_in, d_out = kernel.shape
    parts = {name: jax.ShapeDtypeStruct(shape, dtype)
             for name, (shape, dtype) in _stored_shapes(fmt, d_out, d_in).items()}
    return QuantizedKernel(parts, fmt, (d_in, d_out), kernel.dtype)


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, QuantizedKernel)


def value(kernel: Any) -> jax.Array:
    """A kernel's values: dequantized if it is a `QuantizedKernel`, else the array itself."""
    return kernel.dequantize() if is_quantized(kernel) else kernel


def matmul(x: jax.Array, kernel: QuantizedKernel, precision: Any = None) -> jax.Array:
    """x @ kernel over the last axis of x, with W dequantized inside the computation.

    The frozen kernel takes no gradient, so the backward pass needs only dx = dy W, for which
    it dequantizes W again (bitsandbytes' 4-bit matmul does the same) instead of keeping the
    forward's full-precision copy as a residual: only the stored parts live between the two.
    Each dequantization is tied to the data it multiplies (x forward, dy backward), so that XLA
    cannot hoist all of them to the start of the pass and hold every dequantized kernel at once:
    one kernel's transient at a time, as the matmul needs it.
    """
    return _quantized_matmul(kernel.format, kernel.shape, precision, x, kernel.parts)


def _dequantized_with(fmt: str, shape: tuple[int, int], parts: Mapping[str, jax.Array],
                      data: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(W (d_out, d_in) in data's dtype, data): W computed only once `data` is."""
    d_in, d_out = shape

    def dequantized(parts):
        return FORMATS[fmt].dequantize(parts, (d_out, d_in)).astype(data.dtype)

    # XLA:CPU drops optimization barriers before scheduling; a conditional on the data keeps the
    # dequantization after it (both branches are the same: only the dependency matters).
    first = data.reshape(-1)[0]
    return jax.lax.cond(first == first, dequantized, dequantized, parts), data


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _quantized_matmul(fmt, shape, precision, x, parts):
    w, x = _dequantized_with(fmt, shape, parts, x)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=precision)


def _quantized_matmul_fwd(fmt, shape, precision, x, parts):
    return _quantized_matmul(fmt, shape, precision, x, parts), parts


def _quantized_matmul_bwd(fmt, shape, precision, parts, dy):
    w, dy = _dequantized_with(fmt, shape, parts, dy)
    dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (0,)), ((), ())), precision=precision)
    return dx, None  # the stored parts are frozen: no cotangent


_quantized_matmul.defvjp(_quantized_matmul_fwd, _quantized_matmul_bwd)


def frozen_bytes(tree: Any) -> int:
    """Bytes a params tree's arrays take, read from the arrays themselves (quantized parts at
    their stored size)."""
    return sum(int(leaf.size) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree_util.tree_leaves(tree))
