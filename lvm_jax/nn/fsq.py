"""Finite scalar quantization (Mentzer et al. 2023, arXiv 2309.15505).

FSQ replaces the learned codebook by a fixed grid: z_e is projected to
d = len(levels) dimensions, dimension i is bounded to L_i values by a tanh and
rounded (straight-through), so the implicit codebook is the product grid of
prod(L_i) codes. Nothing can collapse, and there is no codebook or
commitment loss. An index in [0, prod L_i) is the grid point written in mixed
radix, so the same PixelCNN priors model FSQ's codes.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax import losses
from lvm_jax.nn.quantizer import usage_statistics

# The paper's bound keeps tanh's range this far inside the outermost levels, so
# rounding never lands one beyond them.
BOUND_EPS = 1e-3


class FiniteScalarQuantizer(nn.Module):
    """Maps encoder outputs z_e (batch, ..., code_dim) to points of a fixed grid.

    Attributes:
      num_codes: K, which must equal prod(levels).
      code_dim: D, the size of each encoder output and decoder input.
      levels: L_i, the number of values of each of the d = len(levels)
        quantized dimensions, each >= 3, e.g. (8, 4, 4) for K = 128.

    Parameters: params/project_in Dense(d) and params/project_out Dense(D).
    The call has the signature and output dict of `VectorQuantizer`, with
    zero VQ losses.
    """

    num_codes: int = 128
    code_dim: int = 256
    levels: tuple[int, ...] = (8, 4, 4)

    def __post_init__(self):
        # L = 2 has no room for the half-level offset of even levels: (L - 1) / 2 < 1/2.
        if any(level < 3 for level in self.levels):
            raise ValueError(f"fsq levels must each be >= 3, got {tuple(self.levels)}")
        if math.prod(self.levels) != self.num_codes:
            raise ValueError(f"fsq levels {tuple(self.levels)} give {math.prod(self.levels)} "
                             f"codes, not num_codes={self.num_codes}: choose levels whose "
                             f"product is {self.num_codes}, e.g. (8, 4, 4) for 128.")
        super().__post_init__()

    def setup(self):
        self.project_in = nn.Dense(len(self.levels), name="project_in")
        self.project_out = nn.Dense(self.code_dim, name="project_out")

    def _constants(self):
        levels = np.asarray(self.levels)
        # Mixed radix: index = sum_i digit_i * prod_{j<i} L_j.
        basis = np.concatenate([[1], np.cumprod(levels[:-1])])
        return levels, levels // 2, basis

    def bound(self, z: jax.Array) -> jax.Array:
        """(..., d) -> (..., d), dimension i in (-L_i/2, L_i/2) around 0 for even L_i and
        [-(L_i-1)/2, (L_i-1)/2] for odd, so that rounding gives exactly L_i integers.

        tanh(z + shift) * h - offset with h = (L - 1)(1 - eps) / 2: an even L
        has no level at 0, so its grid is offset by 1/2 (levels -L/2..L/2 - 1)
        and shift = atanh(offset / h) keeps bound(0) = 0. (The paper's code
        writes tan for atanh; the two differ by O(offset^3 / h^3).)
        """
        levels, _, _ = self._constants()
        half = (levels - 1) * (1.0 - BOUND_EPS) / 2.0
        offset = np.where(levels % 2 == 0, 0.5, 0.0)
        shift = np.arctanh(offset / half)
        return jnp.tanh(z + shift) * half - offset

    def digits_to_codes(self, digits: jax.Array) -> jax.Array:
        """Integers digit_i in [0, L_i) (..., d) -> grid points (..., d) in [-1, 1]."""
        _, half_width, _ = self._constants()
        return (digits - half_width) / half_width

    def indices_to_digits(self, indices: jax.Array) -> jax.Array:
        """Code indices (...,) in [0, K) -> their mixed-radix digits (..., d)."""
        levels, _, basis = self._constants()
        return (indices[..., None] // basis) % levels

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Decoder inputs of integer codes: (...,) -> (..., code_dim); decodes prior samples."""
        return self.project_out(self.digits_to_codes(self.indices_to_digits(indices)))

    def __call__(self, z_e: jax.Array, train: bool = False, rng: jax.Array | None = None) -> dict:
        """Quantizes z_e to the grid; `train` and `rng` are unused (no state, no randomness).

        Returns the dict of `VectorQuantizer.__call__`: quantized (batch, ..., D)
        the projected-back grid point, its gradient passed straight through the
        rounding; codes (batch, ..., d) the grid point in [-1, 1]; indices
        (batch, ...) int32; codebook_loss, commitment_loss and loss (batch,)
        zeros; perplexity () and counts (K,) int32 of this batch.
        """
        del train, rng
        if not jnp.issubdtype(z_e.dtype, jnp.floating):
            raise TypeError(f"z_e must be floating point, got dtype {z_e.dtype}")
        if z_e.ndim < 2 or z_e.shape[-1] != self.code_dim:
            raise ValueError(
                f"z_e must have shape (batch, ..., code_dim={self.code_dim}), got {z_e.shape}")
        levels, half_width, basis = self._constants()
        bounded = self.bound(self.project_in(z_e))
        rounded = jnp.round(bounded)
        # round(bound) lies in [-L/2, L/2 - 1] (even L) or [-(L-1)/2, (L-1)/2] (odd): + L//2 is
        # the digit in [0, L).
        digits = (rounded + half_width).astype(jnp.int32)
        indices = jnp.sum(digits * basis, axis=-1).astype(jnp.int32)
        codes = losses.straight_through(bounded, rounded) / half_width
        counts, perplexity = usage_statistics(indices, self.num_codes)
        zeros = jnp.zeros(z_e.shape[0], z_e.dtype)
        return {
            "quantized": self.project_out(codes),
            "codes": codes,
            "indices": indices,
            "codebook_loss": zeros,
            "commitment_loss": zeros,
            "loss": zeros,
            "perplexity": perplexity,
            "counts": counts,
        }
