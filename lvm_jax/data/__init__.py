"""Datasets as whole arrays, and their batching onto a device mesh.

`load(name, data_dir)` returns a `Dataset`; `DATASETS` lists every name.
"""

from lvm_jax.data import embedded, pickles, tfds_source, toy2d
from lvm_jax.data.dataset import (DataError, Dataset, as_float_vectors, as_uint8_images,
                                  binarize_images, scale_images, unscale_images)

_EMBEDDED = {"mnist_embedded": embedded.mnist, "patches_embedded": embedded.photo_patches}
_TOY2D = {f"toy2d_{k}": k for k in toy2d.SPECS}

DATASETS = (*_TOY2D, *_EMBEDDED, *tfds_source.TFDS_NAMES, *pickles.FILES)
IMAGE_DATASETS = tuple(n for n in DATASETS if n not in _TOY2D)


def load(name: str, data_dir: str | None = None) -> Dataset:
    """Loads dataset `name` whole into host memory; raises DataError with the fix on failure."""
    if name in _TOY2D:
        train, test = toy2d.splits(_TOY2D[name])
        return Dataset(name, as_float_vectors(train, name), as_float_vectors(test, name), "vector")
    if name in _EMBEDDED:
        train, test = _EMBEDDED[name]()
    elif name in tfds_source.TFDS_NAMES:
        train, test = tfds_source.load(name, data_dir)
    elif name in pickles.FILES:
        train, test = pickles.load(name, data_dir)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{name}: the {'training' if len(train) == 0 else 'test'} set is empty.")
    return Dataset(name, as_uint8_images(train, f"{name} train"),
                   as_uint8_images(test, f"{name} test"), "image")


__all__ = ["DATASETS", "IMAGE_DATASETS", "DataError", "Dataset", "binarize_images", "load",
           "scale_images", "toy2d", "unscale_images"]
