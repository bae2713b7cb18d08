"""The `Dataset` record every source returns, and validation of its arrays."""

import dataclasses
import math
import typing

import numpy as np

from lvm_jax.data import stream
from lvm_jax.errors import DataError

if typing.TYPE_CHECKING:  # identity reads shard folders, whose writer checks examples here
    from lvm_jax.data.identity import DataIdentity


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset: its test split whole in host memory, its training split too or read while
    training.

    Attributes:
      name: registry name, e.g. "mnist_embedded".
      train, test: images as uint8 (N, H, W, C) with values in [0, 255], or
        vectors as float32 (N, D); `train` may instead be a source read while training
        (`lvm_jax.data.stream`), which has the shape, dtype, length and slices of one.
      kind: "image" or "vector".
      identity: what data these are (`lvm_jax.data.identity`), the same whichever way
        the training split is read; None for a Dataset built in Python rather than by
        `lvm_jax.data.load`.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    kind: str
    identity: "DataIdentity | None" = None

    def head(self, num_train: int, num_test: int) -> "Dataset":
        """The first examples of each split; a streamed training split stays streamed. The
        identity stays that of the whole dataset, which a --quick run records with its
        `quick` setting."""
        return dataclasses.replace(self, train=stream.head(self.train, num_train),
                                   test=self.test[:num_test])

    @property
    def event_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. (32, 32, 3) or (2,)."""
        return tuple(self.train.shape[1:])

    @property
    def num_dims(self) -> int:
        """Number of scalar dimensions of one example (for bits/dim)."""
        return math.prod(self.event_shape)

    @property
    def value_range(self) -> tuple[float, float]:
        """Range of the stored values: (0, 255) for images, observed min/max for vectors."""
        if self.kind == "image":
            return (0.0, 255.0)
        train = self.train[:]  # vectors: a streamed split is read whole for this
        return (float(train.min()), float(train.max()))

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train)} train / {len(self.test)} test, "
                f"example shape {self.event_shape}, {self.kind}, values in {self.value_range}")


def require_images(dataset: Dataset, model: str, *, size: tuple[int, int] | None = None,
                   multiple_of: int = 1, channels: tuple[int, ...] = (1, 3)) -> None:
    """Refuses, with a one-line DataError, data that `model` (its name, for the message)
    cannot take: anything but uint8 images (N, H, W, C) with C in `channels`, train and
    test of one example shape, H x W equal to `size` or else multiples of `multiple_of`.

    Reads shapes and dtypes only, so it costs nothing on either input path (a streamed
    training split is not read): call it before anything is written.
    """
    where = dataset.identity.location if dataset.identity else None
    what = f"{dataset.name}{f' ({where})' if where and where != dataset.name else ''}"
    for split, examples in (("train", dataset.train), ("test", dataset.test)):
        shape, dtype = tuple(examples.shape[1:]), np.dtype(examples.dtype)
        if len(shape) != 3 or dtype != np.uint8:
            raise DataError(f"{model} takes uint8 images (H, W, C), got {split} examples of "
                            f"shape {shape} {dtype} from {what}.")
    shape = tuple(dataset.train.shape[1:])
    if tuple(dataset.test.shape[1:]) != shape:
        raise DataError(f"{model} takes train and test images of one shape, got train "
                        f"{_pixels(shape)} and test {_pixels(dataset.test.shape[1:])} images "
                        f"from {what}.")
    if shape[2] not in channels:
        raise DataError(f"{model} takes {' or '.join(f'{c}-channel' for c in channels)} images, "
                        f"got {_pixels(shape)} images from {what}.")
    if size is not None and shape[:2] != tuple(size):
        raise DataError(f"{model} takes {size[0]}x{size[1]} images, got {_pixels(shape)} images "
                        f"from {what}.")
    if shape[0] % multiple_of or shape[1] % multiple_of:
        raise DataError(f"{model} takes images whose height and width are multiples of "
                        f"{multiple_of}, got {_pixels(shape)} images from {what}.")


def _pixels(shape: tuple[int, ...]) -> str:
    """(32, 32, 3) -> "32x32x3"."""
    return "x".join(map(str, shape))


def example_kind(example_shape: tuple[int, ...], dtype: np.dtype, what: str) -> str:
    """"image" or "vector": the kind of the stored examples of `example_shape` and `dtype`,
    images uint8 (H, W, C) with C = 1 or 3, vectors floating point (D,). Anything else
    raises DataError naming `what`; shapes and dtypes only, no example is read."""
    shape, dtype = tuple(example_shape), np.dtype(dtype)
    if all(n >= 1 for n in shape):
        if len(shape) == 1 and np.issubdtype(dtype, np.floating):
            return "vector"
        if len(shape) == 3 and shape[-1] in (1, 3) and dtype == np.uint8:
            return "image"
    raise DataError(f"{what}: examples of shape {shape} {dtype}; store images as uint8 (H, W, C) "
                    "with C = 1 or 3, vectors as floating point (D,).")


def as_uint8_images(x: np.ndarray, what: str) -> np.ndarray:
    """Checks that `x` holds 8-bit images (N, H, W, C), C in {1, 3}, and returns them as uint8.

    Integer arrays with values in [0, 255] are accepted and cast; anything else
    raises DataError naming the problem, before any compute.
    """
    x = np.asarray(x)
    if x.ndim == 3:
        raise DataError(f"{what}: got shape {x.shape}; images must be (N, H, W, C). "
                        "Add a channel axis, e.g. x[..., None] for greyscale.")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{what}: got shape {x.shape}; images must be NHWC (N, H, W, C) "
                        "with C = 1 or 3.")
    if not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{what}: got dtype {x.dtype} with values in [{x.min()}, {x.max()}]; "
                        "images must be stored as integers in [0, 255] (uint8). "
                        "Models scale them to [-1, 1] inside the compiled step.")
    if x.size and (x.min() < 0 or x.max() > 255):
        raise DataError(f"{what}: values in [{x.min()}, {x.max()}] fall outside [0, 255].")
    return x.astype(np.uint8, copy=False)


def as_float_vectors(x: np.ndarray, what: str) -> np.ndarray:
    """Checks that `x` holds finite float vectors (N, D) and returns them as float32."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"{what}: got shape {x.shape}; vector data must be (N, D).")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{what}: got dtype {x.dtype}; vector data must be floating point.")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{what}: contains NaN or infinite values.")
    return x.astype(np.float32, copy=False)


def pad_to_32(images: np.ndarray) -> np.ndarray:
    """Zero-pads 28x28 images (MNIST) to 32x32, 2 pixels each side, like LeNet-5."""
    if images.shape[1:3] == (32, 32):
        return images
    if images.shape[1:3] != (28, 28):
        raise DataError(f"cannot pad images of size {images.shape[1:3]} to 32x32.")
    return np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))


def scale_images(x):
    """uint8 images in [0, 255] -> float32 in [-1, 1] (works on NumPy and JAX arrays)."""
    return x.astype("float32") / 127.5 - 1.0


def binarize_images(x):
    """uint8 images -> float32 in {-1, 1}: white where the intensity exceeds half the range
    (x / 255 > 0.5), a fixed binarization (works on NumPy and JAX arrays). The Bernoulli
    likelihood reads -1 as 0 and 1 as 1."""
    return (scale_images(x) > 0).astype("float32") * 2 - 1


def unscale_images(x) -> np.ndarray:
    """Images in [-1, 1] (clipped) -> uint8 in [0, 255], for figures."""
    return np.round((np.clip(np.asarray(x), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
