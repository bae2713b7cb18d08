"""The original course's pickle files (CS294-158 "deepul"), for users of the PyTorch version.

Each file is a dict {"train": uint8 (N, 32, 32, 3), "test": uint8 (M, 32, 32, 3)}.
A pickle can run any code while it loads, so these files are read with an
unpickler that builds only what they hold (dicts, lists, tuples, built-in
scalars, NumPy arrays, dtypes and scalars) and refuses every other global
before calling it.
"""

import os
import pickle

import numpy as np

from lvm_jax.data.dataset import DataError, as_uint8_images

FILES = {"deepul_svhn": "svhn.pkl", "deepul_cifar10": "cifar10.pkl"}
IMAGE_SHAPE = (32, 32, 3)

# The globals that pickled NumPy arrays name, under NumPy 1 (numpy.core) and 2 (numpy._core);
# each only rebuilds an array, dtype or scalar from the data that follows it.
_ARRAY_GLOBALS = {
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core")
      for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol 2 stores bytes as latin-1 text
}


class _ArrayUnpickler(pickle.Unpickler):
    """Builds containers, scalars and NumPy arrays; refuses any other global by name."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ARRAY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it names the global {module}.{name}, which is not array data; refused without "
            "running it")


def _check_images(images, what: str) -> np.ndarray:
    images = as_uint8_images(images, what)
    if len(images) == 0:
        raise DataError(f"{what} holds no images.")
    if images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{what}: images of shape {images.shape[1:]}; the course's files and "
                        f"the models that read them use {IMAGE_SHAPE} (32x32 RGB).")
    return images


def load(name: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) uint8 NHWC images (N, 32, 32, 3) from `data_dir`/<file>.pkl.

    Raises DataError for a missing or unreadable file, one that names any global
    other than NumPy's array constructors (nothing of it is run), and arrays
    that are not non-empty 32x32 RGB uint8 images.
    """
    filename = FILES[name]
    if data_dir is None:
        raise DataError(f"{name} reads {filename} from a local directory: pass --data_dir "
                        f"pointing at the folder that holds {filename}.")
    path = os.path.join(data_dir, filename)
    if not os.path.isfile(path):
        raise DataError(f"{name}: data file {path} not found. Put the course's {filename} "
                        "there, or choose another --data_dir.")
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, MemoryError) as err:
        raise DataError(f"{name}: could not read {path} as a pickle of arrays ({err}).") from err
    if not isinstance(data, dict) or not {"train", "test"} <= set(data):
        raise DataError(f"{name}: {path} must hold a dict with 'train' and 'test' arrays.")
    return (_check_images(data["train"], f"{path}['train']"),
            _check_images(data["test"], f"{path}['test']"))
