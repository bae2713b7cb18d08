"""The original course's pickle files (CS294-158 "deepul"), for users of the PyTorch version.

Each file is a dict {"train": uint8 (N, 32, 32, 3), "test": uint8 (M, 32, 32, 3)}.
A pickle can run any code while it loads, so these files are read with an
unpickler that builds only what they hold (dicts, lists, tuples, built-in
scalars, NumPy arrays, dtypes and scalars) and refuses every other global
before calling it. Even NumPy's constructors are only given what NumPy's own
pickles give them (`_CheckedArray`): an array is built empty and then filled
with exactly the bytes its shape needs, of a plain numeric dtype (no Python
objects, no structured records), and never larger than the file; so a small
hostile file can neither return uninitialised memory nor claim gigabytes.
"""

import math
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


def _check_dtype(dtype) -> np.dtype:
    """`dtype` if it is a plain number type (bool, integer, float, complex)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or dtype.fields \
            or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"it holds an array of dtype {dtype}, not of numbers")
    return dtype


class _Ndarray:
    """Stands for numpy.ndarray in a pickle: the type `_reconstruct` is given, never called
    (calling it would allocate an array of any size without filling it)."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("it calls numpy.ndarray, which would return unfilled memory")


class _CheckedArray(np.ndarray):
    """An array built by `_reconstruct` and filled by its pickled state, checked first."""

    max_bytes = 0  # the size of the file being read: no array it holds can be larger

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) in (4, 5)):
            raise pickle.UnpicklingError("it holds an array state of the wrong form")
        shape, dtype, data = state[-4], _check_dtype(state[-3]), state[-1]
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise pickle.UnpicklingError(f"it holds an array of shape {shape!r:.60}")
        size = math.prod(shape) * dtype.itemsize
        if size > self.max_bytes:
            raise pickle.UnpicklingError(f"it declares an array of {size} bytes, more than the "
                                         f"file's {self.max_bytes}")
        if not isinstance(data, bytes) or len(data) != size:
            raise pickle.UnpicklingError("it holds an array whose data does not fill its shape")
        super().__setstate__(state)


def _reconstruct(subtype, shape, dtype):
    """numpy's `_reconstruct`, for the empty array that a pickle's state then fills."""
    if subtype is not _Ndarray or not isinstance(shape, tuple) or math.prod(shape) != 0:
        raise pickle.UnpicklingError("it builds an array other than as NumPy pickles one")
    return np.ndarray.__new__(_CheckedArray, shape, np.dtype(dtype))


def _scalar(dtype, data=None):
    if not isinstance(data, bytes) or len(data) != _check_dtype(dtype).itemsize:
        raise pickle.UnpicklingError("it holds a NumPy scalar whose bytes do not fit its dtype")
    return np.frombuffer(data, dtype)[0]


def _frombuffer(buffer, dtype, shape, order):
    """numpy's `_frombuffer` (protocol 5), after checking that `buffer` fills `shape`."""
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape) \
            or len(memoryview(buffer)) != math.prod(shape) * _check_dtype(dtype).itemsize:
        raise pickle.UnpicklingError("it holds an array whose data does not fill its shape")
    return np.frombuffer(buffer, dtype).reshape(shape, order=order)


# What each allowed global is replaced by: NumPy's constructors restricted to what they
# build for a NumPy pickle.
_SAFE = {"_reconstruct": _reconstruct, "scalar": _scalar, "_frombuffer": _frombuffer,
         "ndarray": _Ndarray}


class _ArrayUnpickler(pickle.Unpickler):
    """Builds containers, scalars and NumPy arrays of numbers, none larger than `max_bytes`;
    refuses any other global by name."""

    def __init__(self, file, max_bytes: int):
        super().__init__(file)
        self.max_bytes = max_bytes

    def find_class(self, module: str, name: str):
        if (module, name) in _ARRAY_GLOBALS:
            return _SAFE.get(name) or super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it names the global {module}.{name}, which is not array data; refused without "
            "running it")

    def load(self):
        _CheckedArray.max_bytes = self.max_bytes
        return super().load()


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
    other than NumPy's array constructors (nothing of it is run) or uses them
    otherwise than NumPy's pickles do, arrays of Python objects or records, arrays
    larger than the file, and arrays that are not non-empty 32x32 RGB uint8 images.
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
            data = _ArrayUnpickler(f, os.fstat(f.fileno()).st_size).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, MemoryError, OverflowError, RecursionError,
            OSError) as err:
        raise DataError(f"{name}: could not read {path} as a pickle of arrays "
                        f"({str(err)[:200]}).") from None
    if not isinstance(data, dict) or not {"train", "test"} <= set(data):
        raise DataError(f"{name}: {path} must hold a dict with 'train' and 'test' arrays.")
    for split in ("train", "test"):
        if not isinstance(data[split], np.ndarray):
            raise DataError(f"{name}: {path}['{split}'] is a {type(data[split]).__name__}, not "
                            "a NumPy array of images.")
    return (_check_images(data["train"].view(np.ndarray), f"{path}['train']"),
            _check_images(data["test"].view(np.ndarray), f"{path}['test']"))
