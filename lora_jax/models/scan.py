"""Scanned blocks: a model's identical blocks run by one `nn.scan`, compiled once rather than once
per block, while the params keep one entry per block (`layers_0`, `layers_1`, ...).

The params tree is the same scanned or not, so checkpoints, every method's split and merge,
sharding rules and PEFT exports never see the difference:

- `stack_blocks` / `unstack_blocks` are the `nn.map_variables` maps around the base model: the
  blocks' variables are stacked on the way in (one copy per call, of the stored arrays: a
  quantized kernel stays quantized), and a fresh init comes out unstacked.
- `running` marks the block a scan step runs: the blocks' unrolled paths and the traced index.
- `per_block` is how the methods' interception (Flax method interception, keyed by module paths)
  works inside the scan. A module inside the scanned block has one path for every block
  (`model/layers/block/...`); `per_block(path, fn, *args)` traces fn once per block with that
  block's own unrolled path and runs the running block's: the arrays that differ between blocks
  (the adapters fn closes over) stacked and indexed by the running block, and where blocks
  compute differently (adapters on some blocks only), one branch per distinct computation. A
  method keeps writing fn for one module at one path, scanned or not.

This is levanter's and qwix's answer to stacked layers (their adapters carry a layer axis), made
to fit interception that looks adapters up by path: arrays fn closes over get the layer axis,
code does not change.

What differs from the unrolled model, by design:
- a scanned `init` splits its key across the blocks, so it draws other random weights than the
  unrolled model's init of the same key (`interop.hub.init_params` draws them unrolled);
- the model's own dropout (attention dropout) draws other masks per block (the methods' dropout
  is keyed by module, as unrolled, and draws the same);
- a KV cache is stacked into the scan and unstacked out of it at every call (a copy of the
  cache per decoded token);
- the stacked blocks' variables are a copy, for the call's duration, of the frozen block weights
  as stored (SmolLM2-135M: 57 MiB at nf4, 405 MiB at fp32; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

Path = tuple[str, ...]

# The name of the stacked blocks' scan module and of the block inside it: the scanned block's
# path is base/SCANNED/BLOCK (model/layers/block), its params base/SCANNED/BLOCK/... stacked.
SCANNED, BLOCK = "layers", "block"


@dataclasses.dataclass(frozen=True)
class _Running:
    scanned: Path  # the scanned block module's path, the same for every block
    blocks: tuple[Path, ...]  # each block's unrolled path (model/layers_0, ...)
    index: jax.Array  # the block this scan step runs (traced)


# Set by a scan step around its block's call, read by the methods' interception hooks, which run
# inside that call (Flax's interception is itself a context of the same kind).
_RUNNING: contextvars.ContextVar[_Running | None] = contextvars.ContextVar(
    "lora_jax_scanned_block", default=None)


@contextlib.contextmanager
def running(scanned: Path, blocks: tuple[Path, ...], index: jax.Array) -> Iterator[None]:
    """The context of one scan step: the block module at `scanned` runs block `index` of the
    blocks whose unrolled paths are `blocks`."""
    token = _RUNNING.set(_Running(tuple(scanned), tuple(blocks), index))
    try:
        yield
    finally:
        _RUNNING.reset(token)


def block_paths(path: Path) -> tuple[Path, ...] | None:
    """The unrolled paths of the module at `path` in every block, when it sits inside the block a
    scan step is running (None otherwise: the model is not scanned there)."""
    now = _RUNNING.get()
    path = tuple(path)
    if now is None or path[:len(now.scanned)] != now.scanned:
        return None
    return tuple(block + path[len(now.scanned):] for block in now.blocks)


def per_block(path: Path, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(path, *args) for the module at `path`, scanned or not.

    Inside a scanned block, fn is traced with each block's unrolled path. Blocks whose traces
    are one program (the same operations and constants) run it with the arrays fn closes over
    (their adapters) stacked across them and indexed by the running block; an array every block
    shares is passed as it is, not copied. Where blocks differ (adapters on some blocks only,
    ranks or scales that differ by block), `lax.switch` picks the running block's program.
    """
    paths = block_paths(path)
    if paths is None:
        return fn(tuple(path), *args)
    traces = [jax.make_jaxpr(functools.partial(fn, p), return_shape=True)(*args) for p in paths]
    groups: dict[str, list[int]] = {}  # program -> the blocks running it
    for block, (closed, _) in enumerate(traces):
        groups.setdefault(str(closed.jaxpr), []).append(block)
    shapes = {str(jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), shape))
              for _, shape in traces}
    if len(shapes) > 1:
        raise ValueError(f"the blocks' outputs at {'/'.join(path)} differ in shape: {shapes}")
    index = _RUNNING.get().index
    flat_args = jax.tree_util.tree_leaves(args)

    def run(blocks: list[int]):
        position = np.zeros(len(paths), np.int32)  # each block's row in this group's stacks
        position[blocks] = np.arange(len(blocks))
        row = jnp.asarray(position)[index]
        consts = [_select(column, row) for column in zip(*(traces[b][0].consts for b in blocks))]
        return jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(traces[blocks[0]][0].jaxpr, consts))(
            *flat_args)

    programs = list(groups.values())
    if len(programs) == 1:
        flat = run(programs[0])
    else:
        program_of = np.zeros(len(paths), np.int32)
        for k, blocks in enumerate(programs):
            program_of[blocks] = k
        flat = jax.lax.switch(jnp.asarray(program_of)[index],
                              [functools.partial(run, blocks) for blocks in programs])
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(traces[0][1]), flat)


def _select(column: tuple[Any, ...], row: jax.Array) -> Any:
    """The running block's value of one constant, given each block's (of one program)."""
    if all(c is column[0] for c in column):
        return column[0]
    return jax.lax.dynamic_index_in_dim(jnp.stack(column), row, keepdims=False)


def _unrolled_name(path: Path) -> str:
    return "/".join(path)


def stack_blocks(variables: Mapping[str, Any], names: tuple[str, ...]) -> dict:
    """Each collection of `variables` (a base model's) with the blocks `names` replaced by
    SCANNED/BLOCK holding their leaves stacked on a new leading axis; `nn.map_variables`' way in.
    A collection without them (a fresh init's empty one) is left as it is."""
    out = {}
    for collection, tree in variables.items():
        if not all(name in tree for name in names):
            out[collection] = tree
            continue
        rest = {k: v for k, v in tree.items() if k not in names}
        stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves),
                                         *(tree[name] for name in names))
        out[collection] = {**rest, SCANNED: {BLOCK: stacked}}
    return out


def unstack_blocks(variables: Mapping[str, Any], names: tuple[str, ...]) -> dict:
    """The inverse of `stack_blocks` (a scanned init's variables in the unrolled layout)."""
    out = {}
    for collection, tree in variables.items():
        if SCANNED not in tree:
            out[collection] = tree
            continue
        rest = {k: v for k, v in tree.items() if k != SCANNED}
        stacked = tree[SCANNED][BLOCK]
        out[collection] = rest | {name: jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], stacked)
                                  for i, name in enumerate(names)}
    return out
