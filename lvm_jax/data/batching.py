"""Placing whole datasets on a device mesh and cutting them into batches on the device.

The data are replicated on every device (everything here fits: CIFAR-10 is
150 MB as uint8); each step gathers its batch from an index array whose batch
axis is sharded over the mesh's `data` axis, so each device gathers and
processes only its shard.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: all) with the axis name "data"."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_replicated(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A full copy of `array` on every device of `mesh`."""
    return jax.device_put(array, replicated(mesh))


def put_indices(idx: np.ndarray, mesh: Mesh) -> jax.Array:
    """Batch indices (steps, batch) with the batch axis split over the mesh.

    A batch that does not divide over the devices (a test set's last one) is
    replicated instead.
    """
    spec = P(None, "data") if idx.shape[1] % mesh.devices.size == 0 else P()
    return jax.device_put(idx.astype(np.int32), NamedSharding(mesh, spec))


def gather(data: jax.Array, idx: jax.Array, mesh: Mesh) -> jax.Array:
    """data[idx] inside a compiled step, sharded over the batch when it divides."""
    batch = data[idx]
    if idx.shape[0] % mesh.devices.size == 0:
        batch = jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, P("data")))
    return batch


def epoch_order(seed: int, epoch: int, num_examples: int, steps: int, batch_size: int) -> np.ndarray:
    """Indices (steps, batch_size) of one epoch: a permutation that depends only on
    (seed, epoch), so a resumed run sees the same batches; the remainder is dropped."""
    permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return permutation[: steps * batch_size].reshape(steps, batch_size)
