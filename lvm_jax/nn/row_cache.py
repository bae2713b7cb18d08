"""The pieces of a prior's incremental step: rows of a convolution's input, and convolutions
applied at one position as matrix products.

A prior's cached step (`lvm_jax.nn.sampling`) computes, at each position, only
the activations that the newly drawn code changes. A convolution's output at
(i, j) is the dot product of its (masked) kernel with the input window around
(i, j), so each masked convolution keeps the rows of its input that the window
reaches in a row buffer (num, rows, pad_left + width + pad_right, C): the
`rows` latest rows, zero-padded left and right as the full pass pads them,
the last row the current one. A buffer starts as zeros: the rows above the
grid, and a current row whose later positions the kernels' masks never read.
Columns below are padded columns: grid column j is padded column j + pad_left.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax.typing import DTypeLike


def zeros(num: int, rows: int, width: int, pad: tuple[int, int], channels: int,
          dtype: DTypeLike) -> jax.Array:
    """An empty buffer (num, rows, pad[0] + width + pad[1], channels)."""
    return jnp.zeros((num, rows, pad[0] + width + pad[1], channels), dtype)


def write(buffer: jax.Array, column, x: jax.Array) -> jax.Array:
    """Writes x (num, C) at padded `column` of the current (last) row."""
    current = buffer.shape[1] - 1
    return jax.lax.dynamic_update_slice(buffer, x[:, None, None].astype(buffer.dtype),
                                        (0, current, column, 0))


def write_row(buffer: jax.Array, row: jax.Array, pad: int) -> jax.Array:
    """Sets the current row's grid columns to `row` (num, width, C), after `pad` columns."""
    return buffer.at[:, -1, pad:pad + row.shape[1]].set(row.astype(buffer.dtype))


def push_row(buffer: jax.Array) -> jax.Array:
    """Drops the oldest row and appends an empty current row."""
    return jnp.concatenate([buffer[:, 1:], jnp.zeros_like(buffer[:, :1])], axis=1)


def window(buffer: jax.Array, column, size: int) -> jax.Array:
    """(num, rows * size * C): the padded columns column .. column + size - 1 of every row,
    the window of the output at grid column `column` of a conv padded `size // 2` on the
    left."""
    cut = jax.lax.dynamic_slice_in_dim(buffer, column, size, axis=2)
    return cut.reshape(cut.shape[0], -1)


def row_windows(buffer: jax.Array, size: int) -> jax.Array:
    """(num, width, rows * size * C): the window of every output column of the buffer's rows."""
    width = buffer.shape[2] - size + 1
    windows = jnp.stack([buffer[:, :, dx:dx + width] for dx in range(size)], axis=3)
    num, rows, _, _, channels = windows.shape
    return windows.transpose(0, 2, 1, 3, 4).reshape(num, width, rows * size * channels)


def conv_matrix(params: dict, dtype: DTypeLike, mask: np.ndarray | None = None,
                rows: int | None = None) -> tuple[jax.Array, jax.Array]:
    """A convolution's (or dense layer's) parameters as (kernel matrix, bias) acting on
    flattened windows (`window`, `row_windows`).

    Args:
      params: the `nn.Conv`'s {"kernel": (kh, kw, C_in, F), "bias": (F,)} (or an
        `nn.Dense`'s, kernel (C_in, F)).
      dtype: the layer's computation dtype.
      mask: the conv's (kh, kw) spatial mask, applied as flax applies a conv's mask
        (in float32, before the cast to `dtype`).
      rows: keep the kernel's first `rows` rows (those of a window that a
        raster-order mask reads: above the centre and the centre's); all if None.
    Returns:
      kernel (rows * kw * C_in, F) and bias (F,) in `dtype`.
    """
    kernel = params["kernel"]
    if mask is not None:
        kernel = kernel * mask[:, :, None, None]
    kernel = kernel[:rows]
    return promote_dtype(kernel.reshape(-1, kernel.shape[-1]), params["bias"], dtype=dtype)


def apply_matrix(matrix: tuple[jax.Array, jax.Array], x: jax.Array) -> jax.Array:
    """x (..., rows * kw * C_in) windows -> (..., F): the layer's output at their positions,
    as it computes them up to the order of sums; `matrix` from `conv_matrix`."""
    kernel, bias = matrix
    return x.astype(kernel.dtype) @ kernel + bias


def conv_at(params: dict, x: jax.Array, dtype: DTypeLike) -> jax.Array:
    """An unmasked convolution's (or dense layer's) output at the positions whose windows x
    holds: `apply_matrix` of `conv_matrix(params, dtype)`."""
    return apply_matrix(conv_matrix(params, dtype), x)
