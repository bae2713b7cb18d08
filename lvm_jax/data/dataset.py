"""The `Dataset` record every source returns, and validation of its arrays."""

import dataclasses
import math

import numpy as np

from lvm_jax.data import stream
from lvm_jax.errors import DataError


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
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    kind: str

    def head(self, num_train: int, num_test: int) -> "Dataset":
        """The first examples of each split; a streamed training split stays streamed."""
        return Dataset(self.name, stream.head(self.train, num_train), self.test[:num_test],
                       self.kind)

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
