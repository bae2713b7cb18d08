"""Full datasets through TensorFlow Datasets, loaded whole into uint8 arrays or streamed.

Reading goes through `tfds.data_source` (random access to the prepared
array_record files, images decoded by pillow), which needs no TensorFlow.
Preparing an image dataset the first time downloads it (so it needs the
internet) and needs TensorFlow to encode the images: the optional extra,
`pip install -e ".[tfds_prepare]"` from a clone. A dataset prepared elsewhere is
read from its --data_dir.
"""

import os

import numpy as np

from lvm_jax.data.dataset import DataError, as_uint8_images, pad_to_32
from lvm_jax.data.identity import DataIdentity
from lvm_jax.data.stream import RecordSource

# our name -> TFDS name
TFDS_NAMES = {
    "mnist": "mnist",
    "binarized_mnist": "binarized_mnist",
    "svhn": "svhn_cropped",
    "cifar10": "cifar10",
}


_EMBEDDED = "use an embedded dataset (mnist_embedded, patches_embedded), which needs no download"


def _where(data_dir: str | None) -> str:
    return (f"--data_dir {data_dir}" if data_dir else
            "TFDS's default data directory ($TFDS_DATA_DIR or ~/tensorflow_datasets)")


def _images(name: str, images: np.ndarray, what: str) -> np.ndarray:
    """Decoded TFDS images (N, H, W[, C]) as the stored uint8 NHWC images of `name`: {0, 1}
    scaled to {0, 255}, MNIST variants padded to 32x32. The same on both input paths."""
    images = images[..., None] if images.ndim == 3 else images
    if name == "binarized_mnist":  # stored as {0, 1}; keep the uint8 [0, 255] convention
        images = images * 255
    images = as_uint8_images(images, what)
    return pad_to_32(images) if "mnist" in name else images


def _sources(name: str, data_dir: str | None):
    """The (train, test) `tfds.data_source`s of `name`, prepared first if need be."""
    import tensorflow_datasets as tfds

    tfds_name = TFDS_NAMES[name]
    try:
        return tfds.data_source(tfds_name, split=["train", "test"], data_dir=data_dir)
    except ImportError as err:  # TensorFlow, or one of the packages preparing needs
        raise DataError(
            f"the TFDS dataset {tfds_name!r} is not prepared in {_where(data_dir)}, and preparing "
            f"it needs TensorFlow, which the optional extra installs with the packages TFDS "
            f"prepares with (missing: {err.name or err}): "
            f'pip install -e ".[tfds_prepare]" (preparing downloads the data, so it needs the '
            f"internet), or pass --data_dir where it is prepared, or {_EMBEDDED}.") from err
    except Exception as err:  # download or preparation failed: say what to do
        raise DataError(
            f"could not load or prepare the TFDS dataset {tfds_name!r} in {_where(data_dir)} "
            f"({type(err).__name__}: {' '.join(str(err).split())}): preparing downloads the "
            f'data, so it needs the internet and pip install -e ".[tfds_prepare]"; or pass '
            f"--data_dir where it is prepared, or {_EMBEDDED}.") from err


def _identity(name: str, train, test) -> DataIdentity:
    """TFDS's identity of a prepared dataset: its name, version and split sizes (its files
    are not read for it), and the folder it was prepared in."""
    info = train.dataset_info
    return DataIdentity(name, os.path.realpath(info.data_dir),
                        f"{info.full_name}, {len(train)} train, {len(test)} test",
                        "TFDS name, version and split sizes")


def load(name: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, DataIdentity]:
    """(train, test, identity): uint8 NHWC images of a TFDS dataset, MNIST variants padded
    to 32x32."""
    sources = _sources(name, data_dir)
    return (*(_images(name, np.stack([example["image"] for example in source]),
                      f"TFDS {TFDS_NAMES[name]} {split}")
              for source, split in zip(sources, ("train", "test"))), _identity(name, *sources))


def stream(name: str, data_dir: str | None = None) -> tuple[RecordSource, np.ndarray, DataIdentity]:
    """(train read example by example from its `tfds.data_source`, test whole, identity)."""
    train, test = _sources(name, data_dir)
    what = f"TFDS {TFDS_NAMES[name]}"
    return (RecordSource(train, f"{what} train", decode=lambda example: example["image"],
                         to_examples=lambda images: _images(name, images, f"{what} train")),
            _images(name, np.stack([example["image"] for example in test]), f"{what} test"),
            _identity(name, train, test))
