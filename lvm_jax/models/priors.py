"""Priors p(z) over a flat latent vector, pluggable into the VAE.

Every prior is a Flax module with three methods:
  log_prob(z)             (batch, D) -> (batch,) log p(z) in nats
  sample(rng, num)        -> (num, D) draws from p(z)
  kl(z, mean, log_var)    (batch,) the KL term of the ELBO for the posterior
                          N(mean, exp(log_var)) and its sample z, in nats
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax import losses


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

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.log_prob(z)
