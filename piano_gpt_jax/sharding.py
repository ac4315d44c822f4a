"""Where arrays live: the device mesh, the batch split, and the parameter layout (replicated or
FSDP), for one process or many.

The mesh has two axes, ("data", "fsdp"), over every device of every process. The batch is split
over both, so every device gets batch_size / n_devices rows whatever the layout. Parameters and
their optimizer state are either replicated (param_sharding "none": mesh (N, 1), plain data
parallelism) or sharded over "fsdp" (param_sharding "fsdp": mesh (1, N), ZeRO-3 style): each
matrix is cut along its largest dimension that the axis divides; vectors stay replicated (they
are small). XLA inserts the all-gathers and reduce-scatters; the numbers are those of data
parallelism.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from piano_gpt_jax.config import PARAM_SHARDINGS  # noqa: F401 — declared with the config key

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(devices=None, param_sharding: str = "none") -> Mesh:
    """All devices (of all processes) as a (data, fsdp) mesh; built directly, since
    jax.make_mesh defaults to explicit axis types that shard_map-free code does not want."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    n = devices.size
    shape = (1, n) if param_sharding == "fsdp" else (n, 1)
    return Mesh(devices.reshape(shape), BATCH_AXES)


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"data.batch_size ({batch_size}) must be divisible by the number of devices ({n}); "
            f"use a multiple of {n}, e.g. {n * max(1, batch_size // n)}.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """This process's slice of the global micro-batch -> global arrays split over all devices."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def leaf_spec(shape: tuple[int, ...], fsdp_size: int) -> PartitionSpec:
    """Where one array goes: replicated, or cut over "fsdp" along its largest divisible dim."""
    if fsdp_size <= 1 or len(shape) < 2:
        return PartitionSpec()
    dims = [d for d in range(len(shape)) if shape[d] % fsdp_size == 0]
    if not dims:
        return PartitionSpec()
    dim = max(dims, key=lambda d: shape[d])
    return PartitionSpec(*(FSDP_AXIS if d == dim else None for d in range(len(shape))))


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs) by `leaf_spec`: the
    same rule places a parameter, its Adam moments and its accumulated gradient alike."""
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, leaf_spec(tuple(np.shape(x)), fsdp)), tree)


def unsharded_matrices(params: Any, fsdp_size: int) -> list[str]:
    """Names of >= 2-D parameters that FSDP must leave replicated (no dimension divisible)."""
    out = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        shape = tuple(np.shape(x))
        if fsdp_size > 1 and len(shape) >= 2 and leaf_spec(shape, fsdp_size) == PartitionSpec():
            out.append(f"{jax.tree_util.keystr(path)} {shape}")
    return out


def place(tree: Any, mesh: Mesh) -> Any:
    """Put a host (or single-device) tree on the mesh in its layout. Each process must hold the
    same values; every device takes its piece from them (works across processes, where a
    plain device_put of host values does not build a sound global array)."""
    return _put(tree, tree_shardings(tree, mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    sharding = NamedSharding(mesh, PartitionSpec())
    return _put(tree, jax.tree_util.tree_map(lambda _: sharding, tree))


def _put(tree: Any, shardings: Any) -> Any:
    def one(x, sharding):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(one, tree, shardings)


def bytes_per_device(tree: Any) -> int:
    """Bytes of `tree` held by one device (the first addressable one of each array)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array):
            total += x.addressable_shards[0].data.nbytes
        else:
            total += np.asarray(x).nbytes
    return total


def planned_bytes_per_device(tree: Any, fsdp_size: int) -> int:
    """Bytes per device `tree` (shapes suffice) would take with `fsdp_size`-way FSDP."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shape, itemsize = tuple(np.shape(x)), np.dtype(x.dtype).itemsize
        spec = leaf_spec(shape, fsdp_size)
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        total += n // fsdp_size if any(a is not None for a in spec) else n
    return total


def to_host(tree: Any) -> Any:
    """Every array of `tree` whole, as numpy, on every process (a collective when the job has
    several processes: all of them must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)

    return multihost_utils.process_allgather(tree, tiled=True)
