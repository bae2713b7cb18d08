"""Priors p(z) over a flat latent vector, pluggable into the VAE.

Every prior is a Flax module with three methods:
  log_prob(z)             (batch, D) -> (batch,) log p(z) in nats
  sample(rng, num)        -> (num, D) draws from p(z)
  kl(z, mean, log_var)    (batch,) the KL term of the ELBO for the posterior
                          N(mean, exp(log_var)) and its sample z, in nats
  kl_groups(z, mean, log_var)  (batch, G) the same KL split into the groups that
                          free bits apply to; sums to `kl`
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from lvm_jax import losses
from lvm_jax.nn.made import MADE, autoregressive_order


class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I); the KL term is the analytic KL, exact for any sample."""

    latent_dim: int

    def log_prob(self, z: jax.Array) -> jax.Array:
        return losses.gaussian_log_prob(z, 0.0, 0.0)

    def sample(self, rng: jax.Array, num: int) -> jax.Array:
        return jax.random.normal(rng, (num, self.latent_dim))

    def kl(self, z: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
        del z  # the analytic KL needs no sample
        return losses.kl_std_normal(mean, log_var)

    def kl_groups(self, z: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
        """One group per latent dimension: the dimensions are independent under N(0, I)."""
        del z
        return losses.kl_std_normal_per_dim(mean, log_var)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.log_prob(z)


class MADEFlowPrior(nn.Module):
    """Autoregressive-flow prior of the VLAE: a MADE maps z to a standard normal.

    The flow is eps = z * exp(log_scale(z)) + shift(z), with (shift, log_scale)
    from a MADE, so eps_i depends on z_i and on z before i in `order`. Its
    Jacobian is triangular in that order, hence
      log p(z) = log N(eps; 0, I) + sum_i log_scale_i(z).
    The MADE's zero-initialised output layer makes p(z) = N(0, I) at init.

    Attributes:
      latent_dim: D, the width of z.
      hidden, order, log_scale_bound: passed to `MADE`.
      dtype: computation dtype of the MADE's layers; its shift and log-scale,
        hence the flow, the log-determinant and log p(z), are float32.
    """

    latent_dim: int
    hidden: Sequence[int] = (512, 512)
    order: Sequence[int] | None = None
    log_scale_bound: float = 1.0
    dtype: DTypeLike = jnp.float32

    def setup(self):
        self.made = MADE(self.hidden, self.order, self.log_scale_bound, dtype=self.dtype)

    def forward(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """z (batch, D) -> (eps (batch, D), log|det d eps / d z| (batch,) in nats)."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"expected z of shape (batch, {self.latent_dim}), got {z.shape}")
        shift, log_scale = self.made(z)
        return z * jnp.exp(log_scale) + shift, log_scale.sum(axis=-1)

    def log_prob(self, z: jax.Array) -> jax.Array:
        """z (batch, D) -> log p(z) (batch,) in nats, by the change of variables."""
        eps, log_det = self.forward(z)
        return losses.gaussian_log_prob(eps, 0.0, 0.0) + log_det

    def kl(self, z: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
        """Single-sample Monte Carlo KL: log q(z | x) - log p(z), z ~ q(z | x)."""
        return losses.gaussian_log_prob(z, mean, log_var) - self.log_prob(z)

    def kl_groups(self, z: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
        """A single group: the flow couples the dimensions, so per-dimension terms of the
        Monte Carlo KL are not separate quantities to hold above a floor."""
        return self.kl(z, mean, log_var)[:, None]

    def sample(self, rng: jax.Array, num: int) -> jax.Array:
        """Draws (num, D) samples by inverting the flow one dimension at a time.

        Dimension i = order[k] is z_i = (eps_i - shift_i(z)) * exp(-log_scale_i(z)),
        exact once the dimensions before it are in place, because shift_i and
        log_scale_i see only those. The D sequential MADE evaluations form one
        `nn.scan` over the order, so the sampler compiles to a single loop.
        """
        eps = jax.random.normal(rng, (num, self.latent_dim))

        def invert_one(prior, z, i):
            shift, log_scale = prior.made(z)
            z_i = (eps[:, i] - shift[:, i]) * jnp.exp(-log_scale[:, i])
            return z.at[:, i].set(z_i), None

        invert_all = nn.scan(invert_one, variable_broadcast="params", split_rngs={"params": False})
        order = jnp.asarray(autoregressive_order(self.order, self.latent_dim))
        z, _ = invert_all(self, jnp.zeros_like(eps), order)
        return z

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.log_prob(z)
