"""Full datasets through TensorFlow Datasets, loaded whole into uint8 arrays.

Reading goes through `tfds.data_source` (random access to the prepared
array_record files, images decoded by pillow), which needs no TensorFlow.
Preparing an image dataset the first time downloads it (so it needs the
internet) and needs TensorFlow to encode the images: the optional extra,
`pip install -e ".[tfds_prepare]"` from a clone. A dataset prepared elsewhere is
read from its --data_dir.
"""

import numpy as np

from lvm_jax.data.dataset import DataError, as_uint8_images, pad_to_32

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


def _read_split(source) -> np.ndarray:
    images = np.stack([example["image"] for example in source])
    return images[..., None] if images.ndim == 3 else images


def load(name: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) uint8 NHWC images of a TFDS dataset; MNIST variants padded to 32x32."""
    import tensorflow_datasets as tfds

    tfds_name = TFDS_NAMES[name]
    try:
        sources = tfds.data_source(tfds_name, split=["train", "test"], data_dir=data_dir)
    except ImportError as err:  # TensorFlow, or one of the packages preparing needs
        raise DataError(
            f"the TFDS dataset {tfds_name!r} is not prepared in {_where(data_dir)}, and preparing "
            f"it needs the optional extra (missing: {err.name or err}): "
            f'pip install -e ".[tfds_prepare]" (preparing downloads the data, so it needs the '
            f"internet), or pass --data_dir where it is prepared, or {_EMBEDDED}.") from err
    except Exception as err:  # download or preparation failed: say what to do
        raise DataError(
            f"could not load or prepare the TFDS dataset {tfds_name!r} in {_where(data_dir)} "
            f"({type(err).__name__}: {' '.join(str(err).split())}): preparing downloads the "
            f'data, so it needs the internet and pip install -e ".[tfds_prepare]"; or pass '
            f"--data_dir where it is prepared, or {_EMBEDDED}.") from err
    train, test = (_read_split(s) for s in sources)
    if name == "binarized_mnist":  # stored as {0, 1}; keep the uint8 [0, 255] convention
        train, test = train * 255, test * 255
    train = as_uint8_images(train, f"TFDS {tfds_name} train")
    test = as_uint8_images(test, f"TFDS {tfds_name} test")
    if "mnist" in name:
        train, test = pad_to_32(train), pad_to_32(test)
    return train, test
