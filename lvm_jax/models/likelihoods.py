"""Observation models p(x | z) of the VAE-style models.

A likelihood reads the decoder output `out`, shaped (batch, *event_shape,
params_per_dim), and gives per-example log-probabilities in nats (batch,).
Images are seen in [-1, 1].
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from lvm_jax import losses
from lvm_jax.nn.dense import soft_clamp

LOG_VAR_BOUND = 10.0  # decoder log-variances live in (-10, 10) nats


@dataclasses.dataclass(frozen=True)
class Likelihood:
    """A family p(x | out) with `params_per_dim` decoder outputs per data dimension."""

    name: str
    params_per_dim: int

    def _split(self, out):
        if self.name == "gaussian":
            return out[..., 0], soft_clamp(out[..., 1], LOG_VAR_BOUND)
        return out[..., 0], jnp.zeros_like(out[..., 0])

    def log_prob(self, x: jax.Array, out: jax.Array) -> jax.Array:
        """log p(x | out) in nats, (batch,)."""
        mean, log_var = self._split(out)
        return losses.gaussian_log_prob(x, mean, log_var)

    def mean(self, out: jax.Array) -> jax.Array:
        """E[x | out], (batch, *event_shape)."""
        return self._split(out)[0]

    def sample(self, rng: jax.Array, out: jax.Array) -> jax.Array:
        """x ~ p(x | out): the mean plus decoder noise, (batch, *event_shape)."""
        mean, log_var = self._split(out)
        return mean + jnp.exp(0.5 * log_var) * jax.random.normal(rng, mean.shape)


LIKELIHOODS = {
    # N(mu, diag(sigma^2)) with a learned, bounded log-variance per dimension.
    "gaussian": Likelihood("gaussian", 2),
    # N(mu, I): the specification's image decoder (REFERENCE.md §2).
    "unit_gaussian": Likelihood("unit_gaussian", 1),
}


def get(name: str) -> Likelihood:
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}.")
    return LIKELIHOODS[name]


def reference_units(metrics: dict, num_dims: int) -> dict:
    """The course's units for an N(mu, I) decoder: squared error summed over dims (no 1/2,
    no constant) as `recon_sse`, and `neg_elbo_sse` = recon_sse + KL (REFERENCE.md §2).
    Exact from batch means, since both are affine in the Gaussian NLL."""
    recon_sse = 2.0 * metrics["recon"] - num_dims * math.log(2.0 * math.pi)
    return {"recon_sse": recon_sse, "neg_elbo_sse": recon_sse + metrics["kl"]}
