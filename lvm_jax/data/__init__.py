"""Datasets as whole arrays or streamed sources, and their batching onto a device mesh.

`load(name, data_dir, stream)` returns a `Dataset`; `DATASETS` lists every name.
"""

import numpy as np

from lvm_jax.data import embedded, pickles, shards, stream as streaming, tfds_source, toy2d
from lvm_jax.data.dataset import (DataError, Dataset, as_float_vectors, as_uint8_images,
                                  binarize_images, scale_images, unscale_images)

_EMBEDDED = {"mnist_embedded": embedded.mnist, "patches_embedded": embedded.photo_patches}
_TOY2D = {f"toy2d_{k}": k for k in toy2d.SPECS}

SHARDS = "shards"  # a shard folder (`lvm_jax.data.shards`), named by --data_dir
DATASETS = (*_TOY2D, *_EMBEDDED, *tfds_source.TFDS_NAMES, *pickles.FILES, SHARDS)
IMAGE_DATASETS = tuple(n for n in DATASETS if n not in _TOY2D)


def load(name: str, data_dir: str | None = None, stream: bool = False) -> Dataset:
    """Loads dataset `name`; raises DataError with the fix on failure.

    Whole into host memory, or with `stream` its training split as a source read while
    training (`lvm_jax.data.stream`): a TFDS dataset's `tfds.data_source`, a shard
    folder's files; the datasets that are read whole anyway (the 2D toys, the embedded
    ones, the course's pickles) as their array. The test split is always whole.
    """
    if stream and name in tfds_source.TFDS_NAMES:
        return _streamed(name, *tfds_source.stream(name, data_dir))
    if stream and name == SHARDS:
        shards.require_folder(data_dir)
        return _streamed(name, shards.ShardSource(data_dir, "train"),
                         shards.ShardSource(data_dir, "test")[:])
    dataset = _load_whole(name, data_dir)
    if stream:
        return Dataset(name, streaming.ArraySource(dataset.train, f"{name} train"), dataset.test,
                       dataset.kind)
    return dataset


def _kind(example_shape: tuple[int, ...]) -> str:
    return "vector" if len(example_shape) == 1 else "image"


def _load_whole(name: str, data_dir: str | None) -> Dataset:
    if name in _TOY2D:
        train, test = toy2d.splits(_TOY2D[name])
        return Dataset(name, as_float_vectors(train, name), as_float_vectors(test, name), "vector")
    if name in _EMBEDDED:
        train, test = _EMBEDDED[name]()
    elif name in tfds_source.TFDS_NAMES:
        train, test = tfds_source.load(name, data_dir)
    elif name in pickles.FILES:
        train, test = pickles.load(name, data_dir)
    elif name == SHARDS:
        train, test = shards.load(data_dir)
        if _kind(train.shape[1:]) == "vector":
            return Dataset(name, as_float_vectors(train, f"{data_dir} train"),
                           as_float_vectors(test, f"{data_dir} test"), "vector")
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{name}: the {'training' if len(train) == 0 else 'test'} set is empty.")
    return Dataset(name, as_uint8_images(train, f"{name} train"),
                   as_uint8_images(test, f"{name} test"), "image")


def _streamed(name: str, train, test) -> Dataset:
    """A Dataset of a streamed training source, checked as `_load_whole` checks arrays
    (the source's shape and dtype here; each example's as it is read)."""
    kind = _kind(train.shape[1:])
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{name}: the {'training' if len(train) == 0 else 'test'} set is empty.")
    if kind == "vector":
        as_float_vectors(np.empty((0, *train.shape[1:]), train.dtype), train.name)
        return Dataset(name, train, as_float_vectors(test, f"{name} test"), kind)
    as_uint8_images(np.zeros((1, *train.shape[1:]), train.dtype), train.name)
    if train.dtype != np.uint8:
        raise DataError(f"{train.name}: examples of dtype {train.dtype}; streamed images must be "
                        "stored as uint8.")
    return Dataset(name, train, as_uint8_images(test, f"{name} test"), kind)


__all__ = ["DATASETS", "IMAGE_DATASETS", "DataError", "Dataset", "binarize_images", "load",
           "scale_images", "toy2d", "unscale_images"]
