"""MADE: Masked Autoencoder for Distribution Estimation (Germain et al. 2015).

A MADE is an MLP whose kernels are multiplied by fixed binary masks so that
output i sees only the inputs that come before i in a chosen ordering. The
masks follow from integer degrees:
  * input and output degrees: dimension order[k] has degree k + 1 (1..D);
  * hidden degrees lie in [1, D - 1];
  * a hidden unit of degree d sees the previous layer's units of degree <= d;
  * an output of degree d sees the last hidden layer's units of degree < d.

Degrees and masks are plain NumPy constants computed from the module
attributes and the input width. They are never stored as parameters and need
no RNG at apply time, so the parameter tree holds only ordinary Dense weights.
Kernels are laid out (in_features, out_features) as in `flax.linen.Dense`,
and so are the masks.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax.typing import DTypeLike

from lvm_jax.nn.dense import soft_clamp
from lvm_jax.nn.precision import to_float32


def autoregressive_order(order: Sequence[int] | None, dim: int) -> np.ndarray:
    """The ordering as an int array of shape (dim,); None means 0..dim-1.

    Raises ValueError unless `order` is a permutation of range(dim).
    """
    if order is None:
        return np.arange(dim)
    order_array = np.asarray(order)
    if order_array.shape != (dim,) or not np.array_equal(np.sort(order_array), np.arange(dim)):
        raise ValueError(f"order must be a permutation of range({dim}), got {tuple(order)}")
    return order_array


def input_degrees(order: np.ndarray) -> np.ndarray:
    """Degrees of the D inputs, shape (D,): input order[k] gets degree k + 1."""
    degrees = np.empty(len(order), dtype=np.int64)
    degrees[order] = np.arange(1, len(order) + 1)
    return degrees


def hidden_degrees(width: int, dim: int) -> np.ndarray:
    """Degrees of a hidden layer, shape (width,): 1, 2, ..., D - 1, 1, 2, ...

    Cycling puts every degree in [1, D - 1] into the layer once width >= D - 1,
    so no output loses its path to any earlier input. For D = 1 there is no
    valid degree; all units get degree 1, which no output (degree 1) may see,
    so the outputs are constants, as an autoregressive model of one variable
    requires.
    """
    return 1 + np.arange(width) % max(dim - 1, 1)


def made_masks(order: np.ndarray, hidden: Sequence[int]) -> list[np.ndarray]:
    """Kernel masks, float32 (in_features, out_features), one per layer.

    Returns one mask per hidden layer, then the output mask of shape
    (hidden[-1], D) (or (D, D) with no hidden layer) for one output per
    dimension.
    """
    out_degrees = input_degrees(order)  # output i models input i: same degree
    degrees = out_degrees
    masks = []
    for width in hidden:
        next_degrees = hidden_degrees(width, len(order))
        masks.append(degrees[:, None] <= next_degrees[None, :])
        degrees = next_degrees
    masks.append(degrees[:, None] < out_degrees[None, :])
    return [mask.astype(np.float32) for mask in masks]


class MaskedDense(nn.Module):
    """Dense layer whose kernel is multiplied by a fixed 0/1 mask.

    Attributes:
      features: number of outputs.
      mask: (in_features, features) NumPy constant; masked-out weights get
        neither signal nor gradient.
      dtype: the computation dtype; kernel and bias are float32 parameters, cast
        to it after masking, as in nn.Dense.
    """

    features: int
    mask: np.ndarray
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in_features) -> (..., features) in `dtype`."""
        shape = (x.shape[-1], self.features)
        if self.mask.shape != shape:
            raise ValueError(f"mask has shape {self.mask.shape}, expected {shape}")
        kernel = self.param("kernel", self.kernel_init, shape)
        bias = self.param("bias", self.bias_init, (self.features,))
        x, kernel, bias = promote_dtype(x, kernel * jnp.asarray(self.mask, kernel.dtype), bias,
                                        dtype=self.dtype)
        return x @ kernel + bias


class MADE(nn.Module):
    """Autoregressive shift and log-scale network of a MADE flow.

    Attributes:
      hidden: widths of the ReLU hidden layers.
      order: a permutation of range(D), D the input width; output order[k]
        depends only on inputs order[:k]. None means 0..D-1.
      log_scale_bound: b > 0; log_scale = b * tanh(raw / b) lies in (-b, b),
        so the flow's scales exp(+-log_scale) stay below e^b and cannot
        overflow. b = 1 is the tanh of the official solution.
      dtype: the computation dtype of the masked layers. shift and log_scale
        come out float32 whatever it is: the flow and its log-determinant, a
        sum of log-scales, are part of a log-density (lvm_jax.nn.precision).
    """

    hidden: Sequence[int] = (512, 512)
    order: Sequence[int] | None = None
    log_scale_bound: float = 1.0
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """z (batch, D) float -> (shift, log_scale), each (batch, D) float32."""
        if z.ndim != 2 or not jnp.issubdtype(z.dtype, jnp.floating):
            raise ValueError(f"MADE expects float z of shape (batch, D), got {z.dtype} {z.shape}")
        if self.log_scale_bound <= 0:
            raise ValueError(f"log_scale_bound must be positive, got {self.log_scale_bound}")
        dim = z.shape[-1]
        *hidden_masks, out_mask = made_masks(autoregressive_order(self.order, dim), self.hidden)

        h = z
        for i, (width, mask) in enumerate(zip(self.hidden, hidden_masks)):
            h = nn.relu(MaskedDense(width, mask, dtype=self.dtype, name=f"hidden_{i}")(h))
        # Zero output weights make shift = log_scale = 0 at init: the flow is
        # the identity and the prior starts as N(0, I), so a VLAE begins as a
        # plain VAE instead of fighting a random prior.
        out = MaskedDense(
            2 * dim,
            np.concatenate([out_mask, out_mask], axis=1),
            kernel_init=nn.initializers.zeros_init(),
            dtype=self.dtype,
            name="out",
        )(h)
        shift, raw_log_scale = jnp.split(to_float32(out), 2, axis=-1)
        return shift, soft_clamp(raw_log_scale, self.log_scale_bound)
