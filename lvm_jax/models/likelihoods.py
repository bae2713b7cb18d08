"""Observation models p(x | z) of the VAE-style models.

A likelihood reads the decoder output `out`, shaped (batch, *out_shape(event_shape)),
and gives per-example log-probabilities in nats, shape (batch,). Every family
reads the data as the models see them: images scaled to [-1, 1] (8-bit value k
is k / 127.5 - 1), vectors as they are. `mean` and `sample` answer in that same
space, so figures and encoders never depend on the family.

The families, by name in `LIKELIHOODS`:
  gaussian       N(mu, diag(sigma^2)) with a learned, bounded log-variance (a density)
  unit_gaussian  N(mu, I), the course's image decoder (REFERENCE.md §2) (a density)
  bernoulli      binary pixels (a probability mass over {-1, 1})
  dmol           PixelCNN++'s discretized mixture of 10 logistics (a probability
                 mass over the 256 values of each channel)
"""

import abc
import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from lvm_jax import losses
from lvm_jax.nn.dense import soft_clamp

LOG_VAR_BOUND = 10.0  # decoder log-variances live in (-10, 10) nats


class Likelihood(abc.ABC):
    """A family p(x | out) for examples of shape `event_shape`.

    Attributes:
      discrete: True when `log_prob` is a log-probability mass over the values
        8-bit (or binary) images take, so an NLL in nats is a code length as it
        stands; False for a density over [-1, 1], whose 8-bit bits/dim needs
        D log 127.5 more nats (`lvm_jax.evaluate.image_bits_per_dim` does both).
      pixel_scale: the images' values it models, the scale bits/dim count on: "8-bit"
        (256 values per channel) or "binary" (one bit per pixel at most).
    """

    discrete: ClassVar[bool]
    pixel_scale: ClassVar[str]

    @abc.abstractmethod
    def out_shape(self, event_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the decoder output for one example of shape `event_shape`."""

    def channels_per_pixel(self, image_shape: tuple[int, int, int]) -> int:
        """Channels an image decoder emits per pixel for images (H, W, C).

        Its output (batch, H, W, channels) reshapes to (batch, *out_shape(image_shape)).
        """
        height, width, _ = image_shape
        return math.prod(self.out_shape(image_shape)) // (height * width)

    @abc.abstractmethod
    def log_prob(self, x: jax.Array, out: jax.Array) -> jax.Array:
        """log p(x | out) in nats, (batch,), for x (batch, *event_shape)."""

    @abc.abstractmethod
    def mean(self, out: jax.Array) -> jax.Array:
        """The decoder's point estimate of x, (batch, *event_shape)."""

    @abc.abstractmethod
    def sample(self, rng: jax.Array, out: jax.Array) -> jax.Array:
        """x ~ p(x | out), (batch, *event_shape)."""


@dataclasses.dataclass(frozen=True)
class Gaussian(Likelihood):
    """N(mu, diag(sigma^2)) per dimension.

    out[..., 0] is mu; with `learned_variance`, out[..., 1] is log sigma^2,
    soft-clamped to (-10, 10) so exp() cannot overflow; without, sigma = 1.
    """

    learned_variance: bool = True
    discrete: ClassVar[bool] = False
    pixel_scale: ClassVar[str] = "8-bit"

    @property
    def params_per_dim(self) -> int:
        return 2 if self.learned_variance else 1

    def out_shape(self, event_shape):
        return (*event_shape, self.params_per_dim)

    def _mean_log_var(self, out):
        if self.learned_variance:
            return out[..., 0], soft_clamp(out[..., 1], LOG_VAR_BOUND)
        return out[..., 0], jnp.zeros_like(out[..., 0])

    def log_prob(self, x, out):
        return losses.gaussian_log_prob(x, *self._mean_log_var(out))

    def mean(self, out):
        return out[..., 0]

    def sample(self, rng, out):
        """The mean plus decoder noise."""
        mean, log_var = self._mean_log_var(out)
        return mean + jnp.exp(0.5 * log_var) * jax.random.normal(rng, mean.shape)


@dataclasses.dataclass(frozen=True)
class Bernoulli(Likelihood):
    """Binary pixels: p(white | out) = sigmoid(out[..., 0]).

    Images in [-1, 1] map to b = (x + 1) / 2: binarized images (stored as
    {0, 255}, scaled to {-1, 1}) give b in {0, 1} and an exact log-probability
    mass. Grey values give targets b in (0, 1): the cross-entropy of that
    relaxation trains well but is no likelihood, so binarize the data for
    comparable numbers. `mean` is E[x] = 2 sigmoid(logit) - 1, i.e. the white
    probability sigmoid(logit) on the [-1, 1] scale; samples are in {-1, 1}.
    """

    discrete: ClassVar[bool] = True
    pixel_scale: ClassVar[str] = "binary"
    params_per_dim: ClassVar[int] = 1

    def out_shape(self, event_shape):
        return (*event_shape, self.params_per_dim)

    def log_prob(self, x, out):
        return losses.bernoulli_log_prob((x + 1.0) / 2.0, out[..., 0])

    def mean(self, out):
        return 2.0 * jax.nn.sigmoid(out[..., 0]) - 1.0

    def sample(self, rng, out):
        return jnp.where(jax.random.bernoulli(rng, jax.nn.sigmoid(out[..., 0])), 1.0, -1.0)


@dataclasses.dataclass(frozen=True)
class DiscretizedLogisticMixture(Likelihood):
    """PixelCNN++'s discretized mixture of logistics over the 256 values of 8-bit images.

    The last event axis holds the C channels; the decoder emits M (1 + 2C +
    C(C-1)/2) parameters per pixel (30 for grey, 100 for RGB with the default
    M = 10), laid out as in `losses.logistic_mixture_params`.

    Component m's locations are offset by the centre of the m-th of M equal
    slices of [-1, 1]. A zero-initialised output layer would otherwise start
    all components identical, and identical components receive identical
    gradients forever.
    """

    num_components: int = 10
    discrete: ClassVar[bool] = True
    pixel_scale: ClassVar[str] = "8-bit"

    def out_shape(self, event_shape):
        if len(event_shape) < 2:
            raise ValueError(
                f"dmol models pixels with a channel axis last, e.g. (H, W, C); got event shape "
                f"{tuple(event_shape)}. Add a channel axis (e.g. (784,) -> (784, 1)).")
        c = event_shape[-1]
        return (*event_shape[:-1], self.num_components * (1 + 2 * c + c * (c - 1) // 2))

    def _num_channels(self, out) -> int:
        # Solves M (1 + 2C + C(C-1)/2) = K for C, i.e. C^2 + 3C + 2 - 2K/M = 0.
        per_component = out.shape[-1] // self.num_components
        c = (math.isqrt(1 + 8 * per_component) - 3) // 2
        if c < 1 or self.num_components * (1 + 2 * c + c * (c - 1) // 2) != out.shape[-1]:
            raise ValueError(f"{out.shape[-1]} decoder outputs per pixel fit no number of channels "
                             f"with {self.num_components} components.")
        return c

    def _with_offsets(self, out, num_channels):
        """out with the component offsets added, as the flat layout of `losses`."""
        m = self.num_components
        centres = (2.0 * jnp.arange(m) + 1.0) / m - 1.0
        means = slice(m, m + num_channels * m)  # after the M logits, channel-major
        return out + jnp.zeros(out.shape[-1]).at[means].set(jnp.tile(centres, num_channels))

    def log_prob(self, x, out):
        return losses.discretized_logistic_mixture_log_prob(x, self._with_offsets(out, x.shape[-1]))

    def mean(self, out):
        """The mixture of the components' locations, each clipped to [-1, 1] and coupled
        to the clipped locations of the channels before it.

        A point estimate for figures: the exact mean of the discretized,
        channel-coupled mixture has no closed form.
        """
        c = self._num_channels(out)
        log_pi, means, _, coeffs = losses.logistic_mixture_params(self._with_offsets(out, c), c)
        locations = jnp.zeros_like(means)
        for channel in range(c):  # channel c's location reads only the channels before it
            coupled = losses.logistic_mixture_locations(means, coeffs, locations)[..., channel, :]
            locations = locations.at[..., channel, :].set(jnp.clip(coupled, -1.0, 1.0))
        return (jnp.exp(log_pi)[..., None, :] * locations).sum(axis=-1)

    def sample(self, rng, out):
        """An exact draw: a component, then each channel's logistic given the channels
        already drawn, rounded to the 8-bit grid (the tails fall on -1 and 1)."""
        c = self._num_channels(out)
        log_pi, means, log_scales, coeffs = losses.logistic_mixture_params(
            self._with_offsets(out, c), c)
        component_rng, noise_rng = jax.random.split(rng)
        component = jax.random.categorical(component_rng, log_pi)[..., None, None]
        means, log_scales, coeffs = (jnp.take_along_axis(a, component, axis=-1)
                                     for a in (means, log_scales, coeffs))
        noise = jax.random.logistic(noise_rng, means.shape)
        x = jnp.zeros_like(means)  # (..., C, 1)
        for channel in range(c):
            location = losses.logistic_mixture_locations(means, coeffs, x)[..., channel, :]
            value = location + jnp.exp(log_scales[..., channel, :]) * noise[..., channel, :]
            x = x.at[..., channel, :].set(_to_8bit_grid(value))
        return x[..., 0]


def _to_8bit_grid(x: jax.Array) -> jax.Array:
    """Rounds values to the nearest of the 256 levels k / 127.5 - 1, clipping to [-1, 1]."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0.0, 255.0) / 127.5 - 1.0


LIKELIHOODS: dict[str, Likelihood] = {
    "bernoulli": Bernoulli(),
    "gaussian": Gaussian(learned_variance=True),
    "unit_gaussian": Gaussian(learned_variance=False),
    "dmol": DiscretizedLogisticMixture(num_components=10),
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
