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
  those batches and `read` is the identity. Its grain iterator's state is saved in
  every checkpoint (`Checkpointer.save(..., data_iterator=)`) and restored with it.

Both visit the examples of `batching.epoch_order(seed, epoch, ...)`, so the two
paths train on the same batches and give the same numbers.
"""

import collections
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

    def start(self, step: int) -> None:
        """Places the shard on the devices; any step's indices are computed when asked for."""
        del step
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

    def close(self) -> None:
        pass


class _SavedState:
    """A grain iterator's state at one step, in the shape grain's orbax handler saves."""

    def __init__(self, state: dict):
        self._state = state

    def get_state(self) -> bytes:
        return json.dumps(self._state).encode()


class StreamFeed:
    """The stream path: batches read from `source` (`lvm_jax.data.stream`) by a grain
    pipeline and placed on the devices ahead of the step that trains on them.

    Also the object grain's orbax handler restores (`set_state`, `start_prefetch`):
    a checkpoint's iterator state positions the pipeline, and `start` checks that it
    names the step of the restored train state.
    """

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
        self._restored: dict | None = None
        self._iterator = None
        self._thread: threading.Thread | None = None
        self._calls: queue.Queue = queue.Queue(maxsize=CALLS_AHEAD)
        self._stop = threading.Event()
        # The iterator's state before each step read lately. The thread runs up to
        # CALLS_AHEAD + 1 calls ahead of the loop, which may checkpoint a state up to 2 calls
        # back (the last good state before a non-finite loss, see fit).
        self._states: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self._states_kept = (CALLS_AHEAD + 3) * steps_per_call + 1
        self._states_lock = threading.Lock()

    @staticmethod
    def read(data, rows):
        del data
        return rows

    def placeholder(self, n: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((n, *self._batch_shape), self._dtype, sharding=self._sharding)

    def set_state(self, state: bytes) -> None:
        self._restored = json.loads(state)

    def start_prefetch(self) -> None:
        """Called by grain's orbax handler after `set_state`; `start` starts reading."""

    def start(self, step: int) -> None:
        """Starts reading at `step`, from the restored iterator state if any, which must
        name `step` (the train state's)."""
        self._iterator = self._batches.iterator(self._restored, step)
        if stream.next_step(self._iterator) != step:
            raise CheckpointError(
                f"the checkpoint's data iterator is at step {stream.next_step(self._iterator)}, "
                f"its train state at step {step}: it was written by another program. Delete "
                "that checkpoint step to resume from an earlier one, or use another --workdir.")
        self._remember(step)  # before any read: a checkpoint of `step` may come first
        self._thread = threading.Thread(target=self._read_ahead, args=(step,),
                                        name="stream-feed", daemon=True)
        self._thread.start()

    def _call_sizes(self, step: int):
        """(first step, steps) of each compiled call from `step`, as `fit` cuts them."""
        while step < self._total_steps:
            offset = step % self._steps_per_epoch
            n = min(self._steps_per_call, self._steps_per_epoch - offset)
            yield step, n
            step += n

    def _remember(self, step: int) -> None:
        with self._states_lock:
            self._states[step] = self._iterator.get_state()
            while len(self._states) > self._states_kept:
                self._states.popitem(last=False)

    def _read_ahead(self, step: int) -> None:
        """The thread: reads, stacks and places each call's batches, in order, until stopped."""
        try:
            for first, n in self._call_sizes(step):
                local = []
                for k in range(first, first + n):
                    local.append(next(self._iterator))
                    self._remember(k + 1)
                rows = jax.make_array_from_process_local_data(self._sharding, np.stack(local))
                if not self._put((first, n, rows)):
                    return
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
        first, count, rows = item
        if (first, count) != (step, n):
            raise RuntimeError(f"the stream feed read steps {first}..{first + count - 1}, the "
                               f"loop asked for {step}..{step + n - 1}")
        return rows

    @staticmethod
    def put(rows: jax.Array) -> jax.Array:
        return rows

    def iterator_state(self, step: int) -> _SavedState:
        """The grain iterator's state before it read `step`: what a checkpoint of the train
        state at `step` saves beside it."""
        with self._states_lock:
            return _SavedState(self._states[step])

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
