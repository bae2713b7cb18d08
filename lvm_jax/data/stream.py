"""Training data read while training: random-access sources and a grain pipeline over them.

A source is any object with `len(source)`, `source.shape` (N, ...), `source.dtype`,
`source.name` and `source.read_batch(indices) -> (B, ...)`, thread-safe:
`ArraySource` (arrays already in memory: the embedded datasets, the course's
pickles, the 2D toys), `RecordSource` (any `__len__`/`__getitem__` of records,
such as `tfds.data_source`), `shards.ShardSource` (a folder of .npy shards, of
any size). Slicing one (`source[a:b]`) reads those examples into an array, as
NumPy would; `head(source, n)` keeps it a source.

`TrainBatches` is the pipeline: a `grain.MapDataset` whose element k is the
local batch (local batch, ...) of training step k, read from the source in the
order of `batching.epoch_order(seed, epoch, ...)`, the memory path's order, so
that both paths train on the same batches and give the same numbers. A grain
iterator over it reads ahead on `num_threads` threads; its state, the index of
the next step, is what a checkpoint saves (`lvm_jax.train.feeds`). grain is imported
where a pipeline is made (0.2 s), so that a run of data in memory never pays for it.
"""

import functools
from collections.abc import Callable, Sequence

import numpy as np

from lvm_jax.data import batching
from lvm_jax.errors import DataError

# Threads that read batches ahead of the step, and batches read ahead: the reads are
# positioned file reads and CRC-32s, which release the GIL.
NUM_THREADS, PREFETCH_STEPS = 4, 8


class Indexing:
    """`source[i]` and `source[a:b]` read through `read_batch`, as NumPy indexing would."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.read_batch(np.arange(len(self))[index])
        return self.read_batch([index])[0]

    def __len__(self) -> int:
        return self.shape[0]


class ArraySource(Indexing):
    """An array already in memory, read as a source."""

    def __init__(self, array: np.ndarray, name: str):
        self.array, self.name = array, name
        self.shape, self.dtype = array.shape, array.dtype

    def read_batch(self, indices: Sequence[int]) -> np.ndarray:
        return self.array[np.asarray(indices, np.int64)]


class RecordSource(Indexing):
    """Examples decoded from any random-access collection of records (`len` and `[i]`), such
    as `tfds.data_source`: `to_examples` turns a stack of decoded records into the stored
    examples (the same function the memory path applies to the whole split). Every
    example must have the shape and dtype of the first: any other is a DataError naming
    the source and its index."""

    def __init__(self, records, name: str, decode: Callable = lambda r: r,
                 to_examples: Callable[[np.ndarray], np.ndarray] = lambda x: x):
        self.records, self.name = records, name
        self._decode, self._to_examples = decode, to_examples
        self._raw = np.asarray(decode(records[0]))  # what every record must decode to
        first = to_examples(self._raw[None])
        self.shape, self.dtype = (len(records), *first.shape[1:]), first.dtype

    def read_batch(self, indices: Sequence[int]) -> np.ndarray:
        raw = []
        for i in indices:
            try:
                x = np.asarray(self._decode(self.records[int(i)]))
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise DataError(f"{self.name}: record {i} cannot be read "
                                f"({type(err).__name__}: {err}).") from err
            if x.shape != self._raw.shape or x.dtype != self._raw.dtype:
                raise DataError(f"{self.name}: record {i} is {x.shape} {x.dtype}; record 0 and "
                                f"the rest are {self._raw.shape} {self._raw.dtype}.")
            raw.append(x)
        return self._to_examples(np.stack(raw)) if raw else np.empty((0, *self.shape[1:]),
                                                                      self.dtype)


class Head(Indexing):
    """The first `n` examples of `source`."""

    def __init__(self, source, n: int):
        self.source, self.name = source, source.name
        self.shape, self.dtype = (min(n, len(source)), *source.shape[1:]), source.dtype

    def read_batch(self, indices: Sequence[int]) -> np.ndarray:
        indices = np.asarray(indices, np.int64)
        if len(indices) and indices.max() >= len(self):
            raise IndexError(f"{self.name}: index {indices.max()} out of range [0, {len(self)})")
        return self.source.read_batch(indices)


def is_source(data) -> bool:
    """Whether `data` is read as a source (streamed) rather than held as an array."""
    return hasattr(data, "read_batch")


def head(data, n: int):
    """The first `n` examples of an array (an array) or a source (a source)."""
    return Head(data, n) if is_source(data) else data[:n]


class _StepBatches:
    """Random access to the local batches of a run's training steps, for grain:
    element k is the batch of step k, (local_batch, ...), read from `source`."""

    def __init__(self, source, seed: int, steps_per_epoch: int, local_batch: int,
                 shard: slice, total_steps: int):
        self.source, self.seed, self.shard = source, seed, shard
        self.steps_per_epoch, self.local_batch, self.total_steps = (steps_per_epoch, local_batch,
                                                                    total_steps)
        self.order = functools.lru_cache(maxsize=2)(self._order)  # this epoch's, the next's

    def __len__(self) -> int:
        return self.total_steps

    def _order(self, epoch: int) -> np.ndarray:
        return batching.epoch_order(self.seed, epoch, len(self.source), self.steps_per_epoch,
                                    self.local_batch, self.shard)

    def __getitem__(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.steps_per_epoch)
        return self.source.read_batch(self.order(epoch)[offset] + self.shard.start)


class TrainBatches:
    """A run's training batches as a grain pipeline: element k is the local batch of step k
    of this host, examples `batching.epoch_order(seed, epoch, len(source), steps_per_epoch,
    local_batch, shard)[k % steps_per_epoch] + shard.start` of `source`.

    Each host reads only the examples of its own `shard` (`batching.host_shard`): the
    last len(source) % hosts examples, and in each epoch the examples of its shard
    beyond steps_per_epoch * local_batch, are never read (as on the memory path).
    """

    def __init__(self, source, seed: int, steps_per_epoch: int, local_batch: int,
                 shard: slice, total_steps: int, num_threads: int = NUM_THREADS,
                 prefetch_steps: int = PREFETCH_STEPS):
        import grain

        self.dataset = grain.MapDataset.source(
            _StepBatches(source, seed, steps_per_epoch, local_batch, shard, total_steps))
        self.read_options = grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch_steps)

    def iterator(self, state: dict | None = None, step: int = 0):
        """A grain iterator of the batches from `state` (a saved `get_state()`), else from
        `step`; its `get_state()` names the next step it returns."""
        iterator = self.dataset.to_iter_dataset(self.read_options).__iter__()
        if state is not None:
            iterator.set_state(state)
        else:
            set_next_step(iterator, step)
        return iterator


def set_next_step(iterator, step: int) -> None:
    """Positions a `TrainBatches.iterator` to return the batch of `step` next."""
    import grain

    grain.experimental.set_next_index(iterator, step)


def next_step(iterator) -> int:
    """The step of the batch a `TrainBatches.iterator` returns next."""
    import grain

    return grain.experimental.get_next_index(iterator)
