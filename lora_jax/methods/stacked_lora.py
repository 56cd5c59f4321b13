"""Several LoRA adapters on one leading adapter axis: the layout a study's members train in
(`lora_jax.training.members`) and a mixed-adapter batch runs through (`lora_jax.adapter_set`).

    shapes = union_shapes([adapters_0, adapters_1])          # path -> the largest shape
    stacked = stack([adapters_0, adapters_1], shapes)        # path -> [N, ...], zero-padded
    scales = stacked_scales([spec_0, spec_1], [adapters_0, adapters_1], kernels)   # [N] each
    with per_example(stacked_modules, scales, parts, ids):   # row b through adapter ids[b]
        logits = model.apply(...)

Why padding is exact: adapters of rank r are zero-padded to the largest rank R (A's rows, B's
columns: the rank axis is A's -2 and B's -1), and a kernel an adapter lacks gets A = B = 0. The
padded product B A equals the adapter's own, and in training the gradient of a padded column of B
is (A_pad x)^T g = 0 and that of a padded row of A is B_pad^T g x^T = 0, so padding stays zero.
Each adapter keeps its own scale s = alpha / r (or alpha / sqrt r) as an array, 0 where it has no
adapter, since one program cannot hold per-adapter static scales.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax.methods.base import intercept_dense, join
from lora_jax.methods.lora import LORA_A, LORA_B, LoraSpec, assemble_parts

Path = tuple[str, ...]


def union_shapes(adapters: Sequence[Mapping]) -> dict[Path, tuple[int, ...]]:
    """Leaf path -> the largest shape any of the adapter trees has there, axis by axis."""
    shapes: dict[Path, tuple[int, ...]] = {}
    for tree in adapters:
        for path, leaf in traverse_util.flatten_dict(tree).items():
            old = shapes.get(path, leaf.shape)
            shapes[path] = tuple(max(a, b) for a, b in zip(old, leaf.shape))
    return shapes


def padded(adapters: Mapping, shapes: Mapping[Path, tuple[int, ...]]) -> dict:
    """An adapter tree laid out as `shapes`: zero-padded to their ranks, zeros where it has no
    leaf (float32)."""
    flat = traverse_util.flatten_dict(adapters)
    out = {}
    for path, shape in shapes.items():
        if path not in flat:
            out[path] = jnp.zeros(shape, jnp.float32)
            continue
        leaf = flat[path]
        out[path] = jnp.pad(jnp.asarray(leaf, jnp.float32),
                            [(0, full - have) for full, have in zip(shape, leaf.shape)])
    return traverse_util.unflatten_dict(out)


def stack(adapters: Sequence[Mapping], shapes: Mapping[Path, tuple[int, ...]]) -> dict:
    """The adapter trees padded to `shapes` and stacked on a leading adapter axis."""
    return jax.tree_util.tree_map(lambda *x: jnp.stack(x),
                                  *[padded(tree, shapes) for tree in adapters])


def stacked_scales(specs: Sequence[LoraSpec], adapters: Sequence[Mapping],
                   kernels: Sequence[str]) -> dict[str, jax.Array]:
    """Kernel path -> [N] float32: each adapter's scale s for that kernel at its own rank, 0
    where it has no adapter."""
    out = {}
    for kernel in kernels:
        module = tuple(kernel.split("/")[:-1])
        row = []
        for spec, tree in zip(specs, adapters):
            flat = traverse_util.flatten_dict(tree)
            a = flat.get(module + (LORA_A,))
            row.append(0.0 if a is None else spec.scale(kernel, a.shape[-2]))
        out[kernel] = jnp.asarray(np.asarray(row, np.float32))
    return out


def _rows(v: jax.Array, like: jax.Array) -> jax.Array:
    """Per-row values [batch, ...] shaped to broadcast against `like` [batch, ..., features]:
    a scale [batch] as [batch, 1, ..., 1], a bias [batch, d] as [batch, 1, ..., d]."""
    return v.reshape(v.shape[:1] + (1,) * (like.ndim - v.ndim) + v.shape[1:])


def per_row_dense(leaves: Mapping[str, jax.Array], ids: jax.Array, x: jax.Array) -> jax.Array:
    """x_b W_b + b_b for every row b, with a Dense module's stacked kernel and bias."""
    kernel = leaves["kernel"][ids].astype(x.dtype)  # [batch, d_in, d_out]
    y = jnp.einsum("b...i,bio->b...o", x, kernel)
    return y + _rows(leaves["bias"][ids].astype(x.dtype), y)


def per_row_low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array,
                     parts: Sequence[bool]) -> jax.Array:
    """s_b B_b (A_b x_b) for every row b: a, b are the rows' adapters, [batch, (n,) ...]."""
    a, b, scale = a.astype(x.dtype), b.astype(x.dtype), scale.astype(x.dtype)
    if len(parts) == 1:
        h = jnp.einsum("b...i,bri->b...r", x, a)
        y = jnp.einsum("b...r,bor->b...o", h, b)
        return _rows(scale, y) * y
    h = jnp.einsum("b...i,bnri->b...nr", x, a)
    y = jnp.einsum("b...nr,bnor->b...no", h, b)
    y = assemble_parts([y[..., j, :] for j in range(y.shape[-2])], parts)
    return _rows(scale, y) * y


def per_example(low_rank: Mapping[Path, Mapping[str, jax.Array]],
                scales: Mapping[str, jax.Array], parts: Mapping[Path, tuple[bool, ...]],
                ids: jax.Array, dense: Mapping[Path, Mapping[str, jax.Array]] | None = None,
                ) -> Any:
    """A context in which batch row b runs through adapter ids[b] (`intercept_dense`).

    Args:
      low_rank: module path -> its stacked {lora_a, lora_b} ([N, ...]).
      scales: kernel path -> [N] scales (`stacked_scales`).
      parts: module path -> its split-output parts.
      ids: [batch] adapter ids.
      dense: module path -> stacked {kernel, bias} of Dense modules each adapter trains in
        full (task heads): row b uses adapter ids[b]'s.
    """
    dense = dense or {}
    entries = {m: (low_rank.get(m), dense.get(m)) for m in {**low_rank, **dense}}

    def output(module, entry, x, y, dropped):
        ab, head = entry
        if head is not None:
            y = per_row_dense(head, ids, x)
        if ab is not None:
            path = tuple(module.path)
            y = y + per_row_low_rank(x.astype(y.dtype), ab[LORA_A][ids], ab[LORA_B][ids],
                                     scales[join(path + ("kernel",))][ids],
                                     parts[path]).astype(y.dtype)
        return y

    return intercept_dense(entries, None, 0.0, output, "stacked LoRA", strict=False)
