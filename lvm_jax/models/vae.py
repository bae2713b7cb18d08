"""Variational autoencoder with a pluggable prior and likelihood (Kingma & Welling 2014).

ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z)), with q(z|x) = N(mean, diag(exp(log_var))).
The prior's `kl` gives the KL term: analytic for N(0, I), single-sample Monte
Carlo log q(z|x) - log p(z) for the MADE flow of the VLAE.
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from lvm_jax import losses
from lvm_jax.models.likelihoods import Likelihood
from lvm_jax.models.priors import StandardNormalPrior
from lvm_jax.nn.conv import ConvDecoder, ConvEncoder
from lvm_jax.nn.dense import MLP, GaussianHead
from lvm_jax.nn.precision import to_float32


class VAE(nn.Module):
    """x -> q(z|x) -> z -> p(x|z), with p(z) from `prior`.

    Attributes:
      trunk: x (batch, *event_shape) -> features (batch, F).
      decoder: z (batch, latent_dim) -> the likelihood's parameters, flat or spatial;
        reshaped to (batch, *likelihood.out_shape(event_shape)).
      prior: a module with log_prob / sample / kl (models/priors.py).
      likelihood: the observation model.
      event_shape: shape of one example.
      latent_dim: number of latent dimensions.
      dtype: computation dtype of the Gaussian head of q(z|x) (the trunk, decoder
        and prior carry their own). Whatever the modules compute in, q's
        parameters, z, the decoder output and every ELBO term are float32
        (lvm_jax.nn.precision).
    """

    trunk: nn.Module
    decoder: nn.Module
    prior: nn.Module
    likelihood: Likelihood
    event_shape: tuple[int, ...]
    latent_dim: int
    dtype: DTypeLike = jnp.float32

    def setup(self):
        self.head = GaussianHead(self.latent_dim, dtype=self.dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q(z|x): (mean, log_var), each (batch, latent_dim) float32; `x` preprocessed (float)."""
        if not jnp.issubdtype(x.dtype, jnp.floating):  # checked once, when traced
            raise TypeError(f"the VAE takes preprocessed floating-point inputs, not {x.dtype}: "
                            "apply it to run.preprocess(x) (experiments.load_run) or "
                            "its objective's preprocess(x), e.g. uint8 images scaled to [-1, 1].")
        return self.head(self.trunk(x))

    def decode(self, z: jax.Array) -> jax.Array:
        """Decoder output (batch, *likelihood.out_shape(event_shape)) float32, as the likelihood
        reads it."""
        out = to_float32(self.decoder(z))
        return out.reshape(z.shape[0], *self.likelihood.out_shape(self.event_shape))

    def __call__(self, x: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
        """Per-example ELBO terms for one reparameterised sample z ~ q(z|x).

        Returns a dict of (batch,) arrays in nats: `log_px_z` = log p(x|z),
        `kl` = the KL term, and `log_qz_x`, `log_pz` (Monte Carlo values at z,
        for importance weighting); and `kl_groups` (batch, G), the KL split into
        the prior's free-bits groups.
        """
        mean, log_var = self.encode(x)
        z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(rng, mean.shape)
        kl_groups = self.prior.kl_groups(z, mean, log_var)
        return {
            "log_px_z": self.likelihood.log_prob(x, self.decode(z)),
            "kl": kl_groups.sum(axis=-1),
            "kl_groups": kl_groups,
            "log_qz_x": losses.gaussian_log_prob(z, mean, log_var),
            "log_pz": self.prior.log_prob(z),
        }

    def sample(self, rng: jax.Array, num: int, noise: bool = False) -> jax.Array:
        """`num` draws x ~ p(x|z), z ~ p(z); the decoder mean when `noise` is False."""
        prior_rng, noise_rng = jax.random.split(rng)
        out = self.decode(self.prior.sample(prior_rng, num))
        return self.likelihood.sample(noise_rng, out) if noise else self.likelihood.mean(out)

    def reconstruct(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Decoder mean at the encoder mean, or with `rng` at z ~ q(z|x), (batch, *event_shape)."""
        mean, log_var = self.encode(x)
        if rng is not None:
            mean = mean + jnp.exp(0.5 * log_var) * jax.random.normal(rng, mean.shape)
        return self.likelihood.mean(self.decode(mean))


def loss_fn(model: VAE, params, x: jax.Array, rng: jax.Array, num_samples: int = 1,
            beta: float = 1.0, free_bits: float = 0.0):
    """The training objective and the ELBO terms, in nats per example.

    objective = recon + beta * sum_g max(free_bits, E_batch[KL_g]), averaged over
    `num_samples` reparameterised samples per example; beta = 1 and free_bits = 0
    give the negative ELBO. Free bits (Kingma et al. 2016) stop each KL group
    from being pushed below `free_bits` nats; the groups are the prior's
    (`kl_groups`: each latent dimension under N(0, I)). The reported metrics are
    always those of the true ELBO.

    Args:
      model: the VAE.
      params: its parameters.
      x: (batch, *event_shape) data in the model's range.
      rng: PRNG key for the reparameterised samples.
      num_samples: L samples z ~ q(z|x) per example.
      beta: weight of the KL term (beta-VAE, Higgins et al. 2017).
      free_bits: floor in nats of the batch-mean KL of each group.
    Returns:
      (objective, metrics): metrics `neg_elbo`, `recon` (= -log p(x|z)) and `kl`,
      batch means in nats per example.
    """
    rngs = jax.random.split(rng, num_samples)
    terms = jax.vmap(lambda r: model.apply({"params": params}, x, r))(rngs)
    recon = -terms["log_px_z"].mean()
    kl = terms["kl"].mean()
    kl_objective = jnp.maximum(free_bits, terms["kl_groups"].mean(axis=(0, 1))).sum()
    objective = recon + beta * kl_objective
    return objective, {"neg_elbo": recon + kl, "recon": recon, "kl": kl}


def mlp_vae(event_dim: int, latent_dim: int, hidden: Sequence[int], likelihood: Likelihood,
            prior: nn.Module | None = None, dtype: DTypeLike = jnp.float32) -> VAE:
    """VAE with MLP encoder and decoder on flat vectors (the 2D VAE: hidden (128, 128)).

    The encoder's hidden widths are `hidden`, the decoder's the same reversed;
    `hidden=()` gives single-layer (linear) encoder and decoder. `dtype` is the
    computation dtype of encoder and decoder; a `prior` with layers takes its own.
    """
    return VAE(trunk=MLP(tuple(hidden), activate_final=True, dtype=dtype),
               decoder=MLP((*reversed(hidden), math.prod(likelihood.out_shape((event_dim,)))),
                           zero_init_output=True, dtype=dtype),
               prior=prior or StandardNormalPrior(latent_dim), likelihood=likelihood,
               event_shape=(event_dim,), latent_dim=latent_dim, dtype=dtype)


# The height and width of the images the convolutional VAE takes: its encoder and decoder
# are built for 32x32.
CONV_IMAGE_SIZE = (32, 32)


def conv_vae(image_shape: tuple[int, int, int], latent_dim: int, likelihood: Likelihood,
             prior: nn.Module | None = None, dtype: DTypeLike = jnp.float32) -> VAE:
    """The image VAE of REFERENCE.md §2 on 32x32 images in [-1, 1]; `dtype` is the
    computation dtype of encoder and decoder; a `prior` with layers takes its own."""
    if tuple(image_shape[:2]) != CONV_IMAGE_SIZE:
        raise ValueError(f"the convolutional VAE takes 32x32 images, got {image_shape}.")
    return VAE(trunk=ConvEncoder(dtype=dtype),
               decoder=ConvDecoder(likelihood.channels_per_pixel(image_shape), dtype=dtype),
               prior=prior or StandardNormalPrior(latent_dim), likelihood=likelihood,
               event_shape=tuple(image_shape), latent_dim=latent_dim, dtype=dtype)


def image_bits_per_dim(neg_log_likelihood, num_dims: int):
    """Bits/dim on the 8-bit scale of a density over images scaled to [-1, 1].

    Scaling x in [0, 255] by 1/127.5 multiplies the density by 127.5 per dim,
    so -log p_8bit = -log p_[-1,1] + D log 127.5.
    """
    return losses.bits_per_dim(neg_log_likelihood + num_dims * math.log(127.5), num_dims)
