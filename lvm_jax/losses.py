"""Pure loss and density functions on arrays.

Conventions, shared by every function here:
  * the leading axis is the batch; every other axis is an event axis;
  * results are per example, summed over the event axes, shape (batch,);
  * units are nats unless the name says otherwise.

Nothing here holds parameters or state, so each function can be dropped into
any JAX code, jitted, vmapped and differentiated.
"""

import math

import jax
import jax.numpy as jnp

LOG_2PI = math.log(2.0 * math.pi)


def _sum_events(values: jax.Array) -> jax.Array:
    """Sums over every axis but the leading (batch) axis: (batch, ...) -> (batch,)."""
    return values.reshape(values.shape[0], -1).sum(axis=-1)


def gaussian_log_prob(x: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """log N(x; mean, diag(exp(log_var))) in nats, shape (batch,).

    Args:
      x: (batch, ...) observations.
      mean, log_var: broadcastable to x; log_var is the natural log of the
        variance. Bound it before calling (the models do) so exp cannot overflow.
    """
    sq = jnp.square(x - mean) * jnp.exp(-log_var)
    return -0.5 * _sum_events(jnp.broadcast_to(LOG_2PI + log_var + sq, jnp.shape(x)))


def bernoulli_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
    """log Bernoulli(x; sigmoid(logits)) in nats, shape (batch,).

    x is in {0, 1} (or [0, 1] for the continuous relaxation used with grey
    values); written as x * l - softplus(l), which is stable for any logit.
    """
    return _sum_events(x * logits - jax.nn.softplus(logits))


def kl_std_normal(mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """Analytic KL(N(mean, diag(exp(log_var))) || N(0, I)) in nats, shape (batch,).

    KL = 1/2 sum_i (sigma_i^2 + mu_i^2 - 1 - log sigma_i^2), summed (never
    averaged) over the latent dimensions, so that recon + KL is the ELBO.
    """
    return 0.5 * _sum_events(jnp.exp(log_var) + jnp.square(mean) - 1.0 - log_var)


def straight_through(z_e: jax.Array, z_q: jax.Array) -> jax.Array:
    """Value z_q, gradient of the identity to z_e (van den Oord et al. 2017).

    z_e + sg(z_q - z_e): the decoder sees the quantized vectors while its
    gradient flows unchanged into the encoder output.
    """
    return z_e + jax.lax.stop_gradient(z_q - z_e)


def vq_losses(z_e: jax.Array, z_q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """VQ-VAE codebook and commitment terms, each (batch,), summed over elements.

    codebook   = ||sg(z_e) - z_q||^2  (moves the codes towards the encoder outputs)
    commitment = ||z_e - sg(z_q)||^2  (keeps the encoder close to its codes)

    z_q must be the codebook vectors themselves, not the straight-through
    output, or the codebook receives no gradient.
    """
    codebook = _sum_events(jnp.square(jax.lax.stop_gradient(z_e) - z_q))
    commitment = _sum_events(jnp.square(z_e - jax.lax.stop_gradient(z_q)))
    return codebook, commitment


def iwae_bound(log_weights: jax.Array) -> jax.Array:
    """Importance-weighted bound log (1/k) sum_j w_j (Burda et al. 2016).

    Args:
      log_weights: (k, batch) values log p(x, z_j) - log q(z_j | x), z_j ~ q.
    Returns:
      (batch,) lower bound on log p(x) in nats; k = 1 gives the ELBO.
    """
    k = log_weights.shape[0]
    return jax.nn.logsumexp(log_weights, axis=0) - math.log(k)


def bits_per_dim(nll_nats: jax.Array, num_dims: int) -> jax.Array:
    """Converts a negative log-likelihood in nats per example to bits per dimension."""
    return nll_nats / (num_dims * math.log(2.0))
