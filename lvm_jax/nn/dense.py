"""MLPs and bounded outputs."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from lvm_jax.nn.precision import to_float32


def soft_clamp(x: jax.Array, bound: float) -> jax.Array:
    """Smoothly maps x into (-bound, bound): bound * tanh(x / bound).

    Used on log-variances and log-scales so exp() can never overflow, while
    keeping a non-zero gradient everywhere (a hard clip would kill it).
    """
    return bound * jnp.tanh(x / bound)


class MLP(nn.Module):
    """Dense layers with ReLU between them, and after the last when `activate_final`
    (for a trunk that feeds another layer, as Haiku's MLP).

    `zero_init_output` starts the last layer at zero, so an output that
    parameterises a distribution starts at a neutral value (mean 0,
    log-variance 0) whatever the scale of the inputs. (batch, ..., F_in) ->
    (batch, ..., features[-1]) in `dtype`, the computation dtype; parameters are
    float32 (lvm_jax.nn.precision).
    """

    features: Sequence[int]
    activate_final: bool = False
    zero_init_output: bool = False
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.features):
            last = i == len(self.features) - 1
            init = nn.initializers.zeros if last and self.zero_init_output else nn.initializers.lecun_normal()
            x = nn.Dense(width, kernel_init=init, dtype=self.dtype)(x)
            if not last or self.activate_final:
                x = nn.relu(x)
        return x


class GaussianHead(nn.Module):
    """Dense layer to (mean, log_var) of a diagonal Gaussian, each (batch, dim).

    log_var is soft-clamped to (-log_var_bound, log_var_bound) nats. The layer
    starts at zero, so q(z|x) starts at N(0, I) (zero KL) whatever the scale of
    the features: with unnormalised inputs a random start can put log_var at its
    bound and the first losses at 1e6 nats.

    The layer computes in `dtype`; mean and log_var come out float32, because
    they enter the KL and the log-densities (lvm_jax.nn.precision).
    """

    dim: int
    log_var_bound: float = 10.0
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = nn.Dense(2 * self.dim, kernel_init=nn.initializers.zeros, dtype=self.dtype)(h)
        mean, log_var = jnp.split(to_float32(out), 2, axis=-1)
        return mean, soft_clamp(log_var, self.log_var_bound)
