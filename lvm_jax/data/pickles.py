"""The original course's pickle files (CS294-158 "deepul"), for users of the PyTorch version.

Each file is a dict {"train": uint8 (N, 32, 32, 3), "test": uint8 (M, 32, 32, 3)}.
"""

import os
import pickle

import numpy as np

from lvm_jax.data.dataset import DataError, as_uint8_images

FILES = {"deepul_svhn": "svhn.pkl", "deepul_cifar10": "cifar10.pkl"}


def load(name: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) uint8 NHWC images from `data_dir`/<file>.pkl."""
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
            data = pickle.load(f)
    except Exception as err:
        raise DataError(f"{name}: could not read {path} as a pickle ({err}).") from err
    if not isinstance(data, dict) or not {"train", "test"} <= set(data):
        raise DataError(f"{name}: {path} must hold a dict with 'train' and 'test' arrays.")
    return (as_uint8_images(data["train"], f"{path}['train']"),
            as_uint8_images(data["test"], f"{path}['test']"))
