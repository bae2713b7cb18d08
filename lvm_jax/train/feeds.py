"""Where the training loop's batches come from: the host's shard on its devices, or a stream.

A feed gives the rows of each compiled call, (n, local batch, ...) on this host, which `put`
assembles into the global (n, batch, ...) array split over the mesh; the compiled step reads
its batch with the feed's `read(data, rows[i])`:

* `MemoryFeed` (`--input memory`, training data given as an array): the host's shard lives
  whole on its devices (`data`); rows are batch indices into it, gathered on the device.
* `StreamFeed` (`--input stream`, a source of `lvm_jax.data.stream`): rows are the batches
  themselves, read by a grain pipeline whose threads prefetch them (`stream.TrainBatches`);
  its iterator (`iterator`) is saved in each checkpoint by grain's own orbax handler.

Both visit the examples of `batching.epoch_order(seed, epoch, ...)`, so the two paths train
on the same batches and give the same numbers, and a run may switch between them.
"""

import json

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lvm_jax.data import batching, stream
from lvm_jax.errors import CheckpointError


class MemoryFeed:
    """The memory path: the host's shard of `train_data` (N, ...) whole on its devices."""

    iterator = None  # nothing to save: a step's batch indices follow from (seed, step)

    def __init__(self, train_data: np.ndarray, mesh, seed: int, plan):
        self.example, self.plan, self.mesh, self.seed = train_data[:1], plan, mesh, seed
        self.sharding = NamedSharding(mesh, P(None, "data"))
        # The rows of a whole call, so that the first call reuses the trace of the column names.
        self.spec = jax.ShapeDtypeStruct((plan.steps_per_call, plan.local_batch *
                                          jax.process_count()), np.int32, sharding=self.sharding)
        self.data = batching.put_host_shard(train_data[plan.shard], mesh)
        self.num_examples = len(train_data)
        self.order = (None, None)  # (epoch, its batch indices (steps per epoch, local batch))

    def read(self, data, rows):
        return batching.gather_host_shard(data, rows, self.mesh)

    def rows(self, step: int, n: int) -> np.ndarray:
        """This host's batch indices (n, local batch) of steps step..step+n-1, in one epoch."""
        epoch, offset = divmod(step, self.plan.steps_per_epoch)
        if self.order[0] != epoch:
            self.order = (epoch, batching.epoch_order(
                self.seed, epoch, self.num_examples, self.plan.steps_per_epoch,
                self.plan.local_batch, self.plan.shard).astype(np.int32))
        return self.order[1][offset:offset + n]

    def start(self, step: int, restored: bool) -> None:
        del step, restored  # any step's indices are computed when asked for

    def close(self) -> None:
        pass


class StreamFeed:
    """The stream path: batches read from `source` (`lvm_jax.data.stream`) by grain."""

    data = None

    def __init__(self, source, mesh, seed: int, plan):
        self.example = source[:1]
        self.sharding = NamedSharding(mesh, P(None, "data"))
        self.spec = jax.ShapeDtypeStruct((plan.steps_per_call, plan.local_batch *
                                          jax.process_count(), *source.shape[1:]), source.dtype,
                                         sharding=self.sharding)
        self.iterator = stream.TrainBatches(source, seed, plan.steps_per_epoch, plan.local_batch,
                                            plan.shard, plan.total_steps).iterator()

    @staticmethod
    def read(data, rows):
        del data
        return rows

    def start(self, step: int, restored: bool) -> None:
        """Positions the iterator at `step`, the train state's, unless it was `restored` from
        the checkpoint (a run begun with --input memory saved none): then checks it is there."""
        if not restored:
            stream.set_next_step(self.iterator, step)
        at = stream.next_step(self.iterator)
        if at != step:
            raise CheckpointError(
                f"the checkpoint's data iterator is at step {at}, its train state at step "
                f"{step}: it was written by another program. Delete that checkpoint step to "
                "resume from an earlier one, or use another --workdir.")

    def rows(self, step: int, n: int) -> np.ndarray:
        """This host's batches (n, local batch, ...) of steps step..step+n-1."""
        del step
        return np.stack([next(self.iterator) for _ in range(n)])

    def close(self) -> None:
        """Stops grain's reading threads."""
        self.iterator.close()


class Snapshot:
    """An iterator's state, frozen when a save starts (orbax writes it on another thread while
    the loop reads on), in the protocol of grain's handler."""

    def __init__(self, state: dict):
        self.state = json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self.state


def iterator_state(feed, step: int) -> Snapshot | None:
    """The state of the feed's iterator at `step`, or None on the memory path. The iterator
    is set back to `step` when it read beyond it (a call that failed: the run then stops)."""
    if feed.iterator is None:
        return None
    if stream.next_step(feed.iterator) != step:
        stream.set_next_step(feed.iterator, step)
    return Snapshot(feed.iterator.get_state())


def feed_for(train_data, mesh, seed: int, plan):
    """A `StreamFeed` for a source (`stream.is_source`), else a `MemoryFeed`."""
    kind = StreamFeed if stream.is_source(train_data) else MemoryFeed
    return kind(train_data, mesh, seed, plan)


def put(feed, rows: np.ndarray) -> jax.Array:
    """This host's `rows` (n, local batch, ...) as the global array split over the mesh."""
    return jax.make_array_from_process_local_data(feed.sharding, rows)
