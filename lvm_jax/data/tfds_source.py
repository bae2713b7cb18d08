"""Full datasets through TensorFlow Datasets, loaded whole into uint8 arrays.

Reading goes through `tfds.data_source` (random access to the prepared
array_record files, images decoded by pillow), which needs no TensorFlow.
Preparing an image dataset the first time does need TensorFlow to encode the
images: install the optional extra `pip install "lvm_jax[tfds_prepare]"`.
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


def _read_split(source) -> np.ndarray:
    images = np.stack([example["image"] for example in source])
    return images[..., None] if images.ndim == 3 else images


def load(name: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) uint8 NHWC images of a TFDS dataset; MNIST variants padded to 32x32."""
    import tensorflow_datasets as tfds

    tfds_name = TFDS_NAMES[name]
    try:
        sources = tfds.data_source(tfds_name, split=["train", "test"], data_dir=data_dir)
    except ModuleNotFoundError as err:
        raise DataError(
            f"preparing the TFDS dataset {tfds_name!r} needs TensorFlow ({err}). Install the "
            'optional extra: pip install "lvm_jax[tfds_prepare]", or point --data_dir at a '
            "directory where it is already prepared.") from err
    except Exception as err:  # download or preparation failed: say what to do
        raise DataError(
            f"could not load or prepare the TFDS dataset {tfds_name!r} in data_dir={data_dir!r}: "
            f"{type(err).__name__}: {err}. Preparing needs internet access and "
            'pip install "lvm_jax[tfds_prepare]"; or use an embedded dataset '
            "(mnist_embedded, patches_embedded), which needs no download.") from err
    train, test = (_read_split(s) for s in sources)
    if name == "binarized_mnist":  # stored as {0, 1}; keep the uint8 [0, 255] convention
        train, test = train * 255, test * 255
    train = as_uint8_images(train, f"TFDS {tfds_name} train")
    test = as_uint8_images(test, f"TFDS {tfds_name} test")
    if "mnist" in name:
        train, test = pad_to_32(train), pad_to_32(test)
    return train, test
