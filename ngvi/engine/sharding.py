"""Data-parallel fits: the data axis of the observed arrays on a device mesh.

ngvi passes the model's array arguments to its jitted steps as traced inputs (``split_data``), so
sharding is a matter of where those arrays live. ``shard_data`` puts the data axis (rows) of each
array on a one-dimensional ``jax.sharding.Mesh`` with ``NamedSharding(mesh, P("data"))`` and
replicates everything else; jit (GSPMD) then partitions the ELBO, so each device scores its own
rows, and reduces the gradient and the curvature statistics, which are sums over rows, with an
all-reduce:

    grad L = sum_devices grad L_device,      h = sum_devices h_device.

Nothing else changes: ``NGVI(model, guide).run(key, n, *shard_data(X, y))`` is the same fit as on
one device, up to the order of floating-point additions. On several hosts the same code runs in
every process after ``jax.distributed.initialize()``, with the global arrays built from each
process's rows by ``jax.make_array_from_process_local_data`` (see the README).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ngvi.errors import ConfigError

__all__ = ["data_mesh", "shard_data", "data_sharding"]

AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = AXIS) -> Mesh:
    """A one-dimensional mesh ``(len(devices),)`` named ``axis_name`` over ``devices``
    (default ``jax.devices()``: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ConfigError("data_mesh: got an empty device list; pass at least one jax.Device.")
    return Mesh(np.asarray(devices), (axis_name,))


def data_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    """``NamedSharding`` splitting dimension ``axis`` of an ``ndim``-d array over the mesh's
    (single) axis and replicating the other dimensions."""
    spec = [None] * ndim
    spec[axis] = mesh.axis_names[0]
    return NamedSharding(mesh, P(*spec))


def shard_data(*arrays: Any, mesh: Mesh | None = None, axis: int = 0, size: int | None = None):
    """Put the data axis of ``arrays`` (arrays or pytrees of them, e.g. a kwargs dict) on ``mesh``.

    An array leaf whose dimension ``axis`` has length ``size`` (default: that dimension of the
    first array leaf with one) is split over the mesh, ``NamedSharding(mesh, P("data"))`` for
    ``axis=0``; other array leaves (scalars, per-feature priors) are replicated on every device;
    leaves that are not arrays (None, ints, strings) pass through unchanged, as the model's static
    arguments. Returns the sharded arguments in order (a single one unwrapped).

    Raises ``ConfigError`` when the data axis length is not divisible by the number of devices.
    """
    mesh = data_mesh() if mesh is None else mesh
    if len(mesh.axis_names) != 1:
        raise ConfigError(
            f"shard_data: mesh has axes {mesh.axis_names}; pass a one-dimensional mesh such as "
            "ngvi.data_mesh(devices)."
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    size = _data_size(leaves, axis) if size is None else int(size)
    out = [_place(path, x, mesh, axis, size) for path, x in leaves]
    result = jax.tree.unflatten(treedef, out)
    return result[0] if len(result) == 1 else result


def _data_size(leaves, axis: int) -> int | None:
    for _, x in leaves:
        if _is_array(x) and np.ndim(x) > axis:
            return int(np.shape(x)[axis])
    return None


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _place(path, x, mesh: Mesh, axis: int, size: int | None):
    """One leaf: split its data axis, replicate it, or leave a non-array alone."""
    if not _is_array(x):
        return x
    shape = np.shape(x)
    if len(shape) <= axis or shape[axis] != size:
        return jax.device_put(x, NamedSharding(mesh, P()))
    n_dev = mesh.devices.size
    if size % n_dev:
        name = f"argument {path[0].idx}{jax.tree_util.keystr(path[1:])}"
        lo, hi = size - size % n_dev, size + n_dev - size % n_dev
        raise ConfigError(
            f"shard_data: {name} has data-axis (axis {axis}) length {size}, which is not "
            f"divisible by the {n_dev} devices of the mesh. Trim the data to a multiple of "
            f"{n_dev} ({lo} rows), pad it to {hi} rows and mask the padding out of the "
            "likelihood (numpyro.handlers.mask), or build the mesh from a number of devices "
            f"that divides {size} (ngvi.data_mesh(jax.devices()[:k]))."
        )
    return jax.device_put(x, data_sharding(mesh, len(shape), axis))
