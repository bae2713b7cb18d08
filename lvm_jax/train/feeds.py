"""Where the training loop's batches come from: the host's shard on its devices, or a stream.

`fit` asks a feed for the rows of each compiled call and passes them, with the
feed's `data`, to the training chunk, whose step reads its batch with the
feed's `read(data, rows[i])` inside the compiled call:

* `DeviceFeed` (`--input memory`, training data given as an array): the host's
  shard lives whole on its devices (`batching.put_host_shard`); rows are batch
  indices (n, local batch) into it, and `read` gathers the batch on the device.
* `StreamFeed` (`--input stream`, training data given as a source of
  `lvm_jax.data.stream`): each host reads its own examples through a grain
  pipeline (`stream.TrainBatches`); a thread stacks the local batches of the next
  calls and assembles them into global batches (n, batch, ...) on the devices with
  `jax.make_array_from_process_local_data` while the current call runs; rows are
  those batches and `read` is the identity. Its grain iterator's state at the loop's
  step (`iterator_state`) is saved in every checkpoint and positions it on resume.

Both visit the examples of `batching.epoch_order(seed, epoch, ...)`, so the two
paths train on the same batches and give the same numbers.
"""

import json
import queue
import threading

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lvm_jax.data import batching, stream
from lvm_jax.errors import CheckpointError

# Calls whose batches wait on the devices ahead of the running one.
CALLS_AHEAD = 2


class DeviceFeed:
    """The memory path: the host's shard of `train_data` (N, ...) whole on its devices."""

    def __init__(self, train_data: np.ndarray, mesh, seed: int, steps_per_epoch: int,
                 local_batch: int, shard: slice):
        self.example = train_data[:1]
        self.data = None  # the shard on the devices, once started
        self._train_data, self._mesh, self._seed, self._shard = train_data, mesh, seed, shard
        self._steps_per_epoch, self._local_batch = steps_per_epoch, local_batch
        self._order = (None, None)  # (epoch, its order)

    def read(self, data, rows):
        return batching.gather_host_shard(data, rows, self._mesh)

    def placeholder(self, n: int):
        """Rows of a call of `n` steps, to trace the chunk with."""
        return self.put(np.zeros((n, self._local_batch), np.int32))

    def start(self, step: int, restored=None) -> None:
        """Places the shard on the devices; any step's indices are computed when asked for (a
        `restored` stream's iterator state is not needed)."""
        del step, restored
        self.data = batching.put_host_shard(self._train_data[self._shard], self._mesh)

    def rows(self, step: int, n: int) -> np.ndarray:
        """The batch indices (n, local batch) of steps step..step+n-1, within one epoch."""
        epoch, offset = divmod(step, self._steps_per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, batching.epoch_order(self._seed, epoch, len(self._train_data),
                                                       self._steps_per_epoch, self._local_batch,
                                                       self._shard))
        return self._order[1][offset:offset + n]

    def put(self, rows: np.ndarray) -> jax.Array:
        return batching.put_host_indices(rows, self._mesh)

    def iterator_state(self, step: int) -> None:
        """Nothing to save: the indices of a step follow from (seed, step)."""
        del step
        return None

    def close(self) -> None:
        pass


class IteratorState:
    """A grain iterator's state (a dict), in the protocol of grain's orbax handler (JSON)."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        """Called by grain's handler after `set_state`: `StreamFeed.start` starts reading."""


class StreamFeed:
    """The stream path: batches read from `source` (`lvm_jax.data.stream`) by a grain
    pipeline, stacked per compiled call and placed on the devices by a thread, up to
    CALLS_AHEAD calls ahead of the one that trains on them. Each call's batches come
    with the iterator's state after them, so the feed knows the state at the step the
    loop has reached, and at the step before its last call."""

    def __init__(self, source, mesh, seed: int, steps_per_epoch: int, local_batch: int,
                 shard: slice, total_steps: int, steps_per_call: int):
        self.example = source[:1]
        self.data = None
        self._batches = stream.TrainBatches(source, seed, steps_per_epoch, local_batch, shard,
                                            total_steps)
        self._sharding = NamedSharding(mesh, P(None, "data"))
        self._batch_shape = (local_batch * jax.process_count(), *source.shape[1:])
        self._dtype = source.dtype
        self._steps_per_epoch, self._total_steps = steps_per_epoch, total_steps
        self._steps_per_call = steps_per_call
        self._iterator = None
        self._states: dict[int, dict] = {}  # step -> iterator state, of the last two calls
        self._thread: threading.Thread | None = None
        self._calls: queue.Queue = queue.Queue(maxsize=CALLS_AHEAD)
        self._stop = threading.Event()

    @staticmethod
    def read(data, rows):
        del data
        return rows

    def placeholder(self, n: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((n, *self._batch_shape), self._dtype, sharding=self._sharding)

    def start(self, step: int, restored: IteratorState | None = None) -> None:
        """Starts reading at `step`: from the `restored` iterator state, which must name
        `step` (the train state's), or positioned at `step` when there is none (a run begun
        with --input memory)."""
        self._iterator = self._batches.iterator(restored and restored.state, step)
        if stream.next_step(self._iterator) != step:
            raise CheckpointError(
                f"the checkpoint's data iterator is at step {stream.next_step(self._iterator)}, "
                f"its train state at step {step}: it was written by another program. Delete "
                "that checkpoint step to resume from an earlier one, or use another --workdir.")
        self._states = {step: self._iterator.get_state()}
        self._thread = threading.Thread(target=self._read_ahead, args=(step,),
                                        name="stream-feed", daemon=True)
        self._thread.start()

    def _read_ahead(self, step: int) -> None:
        """The thread: reads, stacks and places each call's batches, in order, until stopped."""
        try:
            while step < self._total_steps:
                n = min(self._steps_per_call, self._steps_per_epoch - step % self._steps_per_epoch)
                local = np.stack([next(self._iterator) for _ in range(n)])
                rows = jax.make_array_from_process_local_data(self._sharding, local)
                if not self._put((step, n, rows, self._iterator.get_state())):
                    return
                step += n
        except BaseException as err:  # raised by `rows`, in the loop's thread
            self._put(err)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._calls.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def rows(self, step: int, n: int) -> jax.Array:
        """The batches (n, batch, ...) of steps step..step+n-1, on the devices."""
        item = self._calls.get()
        if isinstance(item, BaseException):
            raise item
        first, count, rows, state_after = item
        if (first, count) != (step, n):
            raise RuntimeError(f"the stream feed read steps {first}..{first + count - 1}, the "
                               f"loop asked for {step}..{step + n - 1}")
        self._states = {step: self._states[step], step + n: state_after}
        return rows

    @staticmethod
    def put(rows: jax.Array) -> jax.Array:
        return rows

    def iterator_state(self, step: int) -> IteratorState:
        """The iterator's state before it read `step`, the loop's step or the one before its
        last call: what a checkpoint of the train state at `step` saves beside it."""
        return IteratorState(self._states[step])

    def close(self) -> None:
        """Stops the reading thread and grain's threads; returns promptly, also on Ctrl-C."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._iterator is not None:
            self._iterator.close()


def feed_for(train_data, mesh, seed: int, steps_per_epoch: int, local_batch: int, shard: slice,
             total_steps: int, steps_per_call: int):
    """A `StreamFeed` for a source (`stream.is_source`), else a `DeviceFeed`."""
    if stream.is_source(train_data):
        return StreamFeed(train_data, mesh, seed, steps_per_epoch, local_batch, shard,
                          total_steps, steps_per_call)
    return DeviceFeed(train_data, mesh, seed, steps_per_epoch, local_batch, shard)
