"""Device mesh and placement rules for LoRA training.

The mesh has two axes: 'data' and 'fsdp'. The batch is split over both (every device sees
different examples), the frozen W0 is sharded over 'fsdp' (each device holds 1/fsdp of it,
gathered layer by layer by XLA when needed), and the adapters and optimizer state, which are
tiny, are replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
# Leaves smaller than this stay replicated: sharding a bias saves nothing and costs a gather.
MIN_SHARDED_SIZE = 2**14


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices of all processes.

    Args:
      data: size of the data axis; -1 takes whatever `fsdp` leaves.
      fsdp: size of the axis the frozen weights are sharded over; -1 takes whatever `data`
        leaves (e.g. data=1, fsdp=-1 shards a model too large for one device over all of them).
      devices: defaults to `jax.devices()` (global across processes).

    Raises:
      ValueError: the axis sizes do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp == -1:
        if data == -1:
            raise ValueError("mesh data and fsdp cannot both be -1: give one of them a size")
        if len(devices) % data:
            raise ValueError(f"mesh data={data} does not divide the {len(devices)} devices")
        fsdp = len(devices) // data
    if data == -1:
        if len(devices) % fsdp:
            raise ValueError(f"mesh fsdp={fsdp} does not divide the {len(devices)} devices")
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} != {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """For [accum, micro_batch, ...] arrays: micro-batch rows split over every device."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def frozen_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shards the largest dimension that 'fsdp' divides; small or indivisible leaves replicate."""
    if fsdp == 1 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return P(*(["fsdp" if d == dim else None for d in range(len(shape))]))
    return P()


def frozen_shardings(frozen, mesh: Mesh):
    """A NamedSharding per frozen leaf (pytree of the same structure)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, frozen_spec(x.shape, fsdp)), frozen)


def bytes_per_device(tree, shardings) -> dict:
    """Bytes of `tree` (arrays or `jax.ShapeDtypeStruct`s) that each device holds under
    `shardings` (a pytree of Shardings like `frozen_shardings` gives), without placing anything.

    Returns:
      {device: bytes}, for every device of the shardings' meshes.
    """
    held: dict = {}

    def count(leaf, sharding):
        itemsize = np.dtype(leaf.dtype).itemsize
        for device, index in sharding.devices_indices_map(tuple(leaf.shape)).items():
            size = 1
            for dim, piece in zip(leaf.shape, index):
                size *= len(range(*piece.indices(dim)))
            held[device] = held.get(device, 0) + size * itemsize

    jax.tree_util.tree_map(count, tree, shardings)
    return held


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh, accum: int = 1) -> dict[str, jax.Array]:
    """Places a host batch, identical on every process, as [accum, micro, ...] arrays whose
    micro-batch rows are split over the mesh.

    Every process builds the same global batch (data order is a pure function of seed and step),
    and each contributes the rows its own devices hold, so one code path serves one device, many
    devices and many hosts.
    """
    sharding = batch_sharding(mesh)

    def place(x):
        x = np.asarray(x)
        if x.shape[0] % accum:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={accum}")
        x = x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
        if x.shape[1] % sharding.mesh.size:
            raise ValueError(f"micro-batch size {x.shape[1]} is not divisible by the "
                             f"{sharding.mesh.size} devices of the mesh")
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return {k: place(v) for k, v in batch.items()}


def place(tree, shardings):
    """Puts host values (the same on every process) onto the mesh with the given shardings.

    Unlike `jax.device_put`, this builds each global array from the slices this process's devices
    hold, which works the same on one host and many. An array already placed as asked is kept
    as it is: no copy, so placing does not double the device memory a large model needs.
    """

    def put(x, s):
        # Only the very same sharding: an equivalent one of another type (a single-device
        # array) would make the jitted step compile again when its outputs come back as `s`.
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    if isinstance(shardings, NamedSharding):
        return jax.tree_util.tree_map(lambda x: put(x, shardings), tree)
    return jax.tree_util.tree_map(put, tree, shardings)


def first_replica(x: jax.Array) -> np.ndarray:
    """A replicated array's value, readable on every process (no cross-host fetch)."""
    return np.asarray(x.addressable_data(0))
