"""Placing whole datasets on a device mesh and cutting them into batches on the device.

Training data are split between the hosts (processes) of a run: each host
keeps a contiguous shard (`host_shard`) and every one of its devices holds a
full copy of that shard (everything here fits: CIFAR-10 is 150 MB as uint8);
the CPU devices of one process share a single copy (`aligned_copy`).
A step's global batch is the hosts' local batches side by side; each device
gathers its part of it from its own copy, with indices into its host's shard,
so no example crosses hosts. With one host the shard is the whole set.

Test data are replicated on every device of every host and batches are
gathered with global indices, so that a partial last batch can be evaluated
whole and every test example counts exactly once.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: all, of every host) with the axis name "data"."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# XLA:CPU uses a host array whose address is a multiple of this in place, as the buffer of
# every CPU device it is put on, instead of copying it per device (measured: 150 MB of uint8
# put on 8 CPU devices raised the process's resident memory by 1,172 MB from an array at a
# multiple of 16 bytes, by 0 MB from one at a multiple of 64).
HOST_ALIGNMENT = 64


def aligned_copy(x) -> np.ndarray:
    """A private copy of `x` (NumPy or JAX) at an address that is a multiple of HOST_ALIGNMENT:
    put on CPU devices, it is one buffer shared by all of them, and nothing else writes to
    it (nor may a compiled call donate such an array). Accelerators copy it to their own
    memory as they would any array."""
    x = np.asarray(x)
    buffer = np.empty(x.nbytes + HOST_ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % HOST_ALIGNMENT
    out = buffer[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def put_replicated(tree, mesh: Mesh):
    """A full copy of every array of `tree` (NumPy or JAX) on every device of `mesh` (on CPU
    devices, one `aligned_copy` that they all share).

    In a multi-host run every process passes the same values (the same data, or
    parameters initialised from the same seed); each fills only its own devices.
    """
    sharding = replicated(mesh)

    # Not jax.device_put: across several processes it first all-gathers a host value
    # to check that every process passed the same one.
    def put(x):
        x = aligned_copy(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda _: x)

    return jax.tree.map(put, tree)


def put_indices(idx: np.ndarray, mesh: Mesh) -> jax.Array:
    """Batch indices (steps, batch) into replicated data, the same on every host, with the
    batch axis split over the mesh.

    A batch that does not divide over the devices (a test set's last one) is
    replicated instead. Placed without jax.device_put, as in `put_replicated`.
    """
    idx = idx.astype(np.int32)
    spec = P(None, "data") if idx.shape[1] % mesh.devices.size == 0 else P()
    return jax.make_array_from_callback(idx.shape, NamedSharding(mesh, spec), lambda i: idx[i])


def gather(data: jax.Array, idx: jax.Array, mesh: Mesh) -> jax.Array:
    """data[idx] inside a compiled step, for replicated `data`; the batch is sharded over
    the mesh when it divides."""
    batch = data[idx]
    if idx.shape[0] % mesh.devices.size == 0:
        batch = jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, P("data")))
    return batch


def host_shard(num_examples: int, process_index: int, process_count: int) -> slice:
    """The contiguous slice of a training set that host `process_index` of `process_count`
    keeps.

    Every host gets num_examples // process_count examples, so that all run the
    same number of steps; the last num_examples % process_count examples (fewer
    than the hosts) are never trained on. One host keeps everything.
    """
    size = num_examples // process_count
    return slice(process_index * size, (process_index + 1) * size)


def put_host_shard(shard: np.ndarray, mesh: Mesh) -> jax.Array:
    """This host's shard (S, ...) copied onto each of its devices of `mesh`.

    The global array is (devices * S, ...), split over the "data" axis into one
    block per device, and each block is the shard of the device's own host.
    Every process calls this with its own shard; read it with `gather_host_shard`.
    """
    shard = aligned_copy(shard)  # on CPU devices, one copy that all of them share
    shape = (mesh.devices.size * len(shard), *shard.shape[1:])
    return jax.make_array_from_callback(shape, NamedSharding(mesh, P("data")), lambda _: shard)


def put_host_indices(local_idx: np.ndarray, mesh: Mesh) -> jax.Array:
    """This host's batch indices (steps, local batch), into its own shard, as the global
    (steps, local batch * hosts) array whose batch axis is split over the mesh: each
    host's columns land on its own devices."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(None, "data")),
                                                  local_idx.astype(np.int32))


def gather_host_shard(data: jax.Array, idx: jax.Array, mesh: Mesh) -> jax.Array:
    """The batch (batch, ...) inside a compiled step, split over the mesh: each device
    gathers its part of `idx` (batch,) from its own block of `data` (`put_host_shard`).

    `shard_map` makes the locality explicit; XLA, seeing only global indexing into
    the (devices * S, ...) array, would move whole blocks between devices.
    """
    return jax.shard_map(lambda block, i: block[i], mesh=mesh, in_specs=(P("data"), P("data")),
                         out_specs=P("data"))(data, idx)


def epoch_order(seed: int, epoch: int, num_examples: int, steps: int, batch_size: int,
                shard: slice | None = None) -> np.ndarray:
    """Indices (steps, batch_size) of one epoch: a permutation of the `num_examples` that
    depends only on (seed, epoch), so a resumed run sees the same batches; the
    remainder is dropped.

    With `shard` (a host's `host_shard`), the indices are those of the shard's
    examples, counted from its start, in the order the epoch's permutation of all
    examples visits them: each host draws a different random order of its own
    shard, and one host's order is exactly the single-host order.
    """
    permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
    if shard is not None:
        in_shard = (permutation >= shard.start) & (permutation < shard.stop)
        permutation = permutation[in_shard] - shard.start
    return permutation[: steps * batch_size].reshape(steps, batch_size)
