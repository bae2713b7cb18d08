"""Ladder VAE (Sønderby et al. 2016) with spatial latents, in the style of Dittadi's
PyTorch implementation (REFERENCE.md §5, seeds/003).

Layers are numbered 1 (nearest the data) to L (top). The generative model is
top-down,
  p(x, z) = p(x | z_1) p(z_L) prod_{i<L} p(z_i | z_{>i}),
with z_i spatial (h_i, w_i, latent_channels) and every p(z_i | .) a diagonal
Gaussian computed from the deterministic top-down features h_i. With `skip`,
h_i is computed from z_{i+1} *and* h_{i+1}, so layer i conditions on all the
layers above it; without, p(z_i | z_{i+1}) is a Markov chain as in the paper.

Inference shares the top-down path. A deterministic bottom-up pass gives
features d_i at every layer; q(z_L | x) is read from d_L alone. Below the top,
q(z_i | x, z_{>i}) combines d_i with the top-down features h_i in one of two ways
(`merge`):
  "learned" (the seed's, default): q's parameters are computed from [d_i, h_i] by
    a 1x1 convolution, a residual block and a zero-initialised head;
  "precision" (the paper's eqs. 18-19): a bottom-up estimate N(mu^, sigma^^2) from
    d_i is merged with the prior N(mu_p, sigma_p^2) by precision weighting,
      sigma_q^2 = 1 / (sigma^^-2 + sigma_p^-2),  mu_q = (mu^ sigma^^-2 + mu_p sigma_p^-2) sigma_q^2.
With "learned", q = p = N(0, I) at initialisation, so every layer starts at zero
KL as the top one does. Precision weighting cannot start there with a usable
bottom-up signal: at equal precisions q has half p's variance, which costs
about 0.1 nats per latent dimension (~200 nats for an 8x8x32 layer) from the
first step. In 5-epoch runs on embedded MNIST its lower layers collapsed (3
layers: 0.01 and 0.8 nats of KL below a 25-nat top; the learned merge: 22, 10, 9).

The KL term of layer i is the single-sample Monte Carlo value
  log q(z_i | x, z_{>i}) - log p(z_i | z_{>i})   at the sampled z_i,
never an analytic KL: then log p(x | z) + log p(z) - log q(z | x) is the log
of an unbiased importance weight and the importance-weighted bound of
`lvm_jax.evaluate` stays valid (REFERENCE.md §5).

Free bits (Kingma et al. 2016) clamp each layer's batch-mean KL from below in
the training objective only; the reported -ELBO never includes them.

Residual blocks carry no BatchNorm (each example's terms must depend on that
example alone); the seed's data-dependent initialisation (`data_init`) scales
every hidden convolution to unit-variance outputs on a batch of data instead.

Resolution schedule for 32x32 inputs: a 5x5 stride-2 stem halves to 16x16,
then `downsample[i]` stride-2 convolutions start bottom-up layer i (mirrored
by sub-pixel transposed convolutions that end top-down layer i). The default
spreads two halvings evenly over the layers, so the top latents are 4x4.
"""

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from lvm_jax import losses
from lvm_jax.models.likelihoods import Likelihood
from lvm_jax.nn.conv import SubPixelConvTranspose
from lvm_jax.nn.dense import soft_clamp
from lvm_jax.nn.precision import to_float32

LOG_VAR_BOUND = 10.0  # latent log-variances live in (-10, 10) nats, as in GaussianHead
MERGES = ("learned", "precision")


class DiagNormal(NamedTuple):
    """A diagonal Gaussian; each field (batch, h, w, latent_channels) float32, log_var in nats."""

    mean: jax.Array
    log_var: jax.Array


def precision_weighted(bottom_up: DiagNormal, top_down: DiagNormal) -> DiagNormal:
    """The product of two Gaussians, normalised: Sønderby et al. (2016), eqs. 18-19.

    Written with the share of the bottom-up precision,
    w = sigma^^-2 / (sigma^^-2 + sigma_p^-2) = sigmoid(log_var_p - log_var^),
    so mu_q = w mu^ + (1 - w) mu_p and log sigma_q^2 = -logaddexp(-log_var^, -log_var_p),
    neither of which exponentiates a log-variance.
    """
    w = jax.nn.sigmoid(top_down.log_var - bottom_up.log_var)
    return DiagNormal(w * bottom_up.mean + (1.0 - w) * top_down.mean,
                      -jnp.logaddexp(-bottom_up.log_var, -top_down.log_var))


def _diag_normal(params: jax.Array) -> DiagNormal:
    """Splits (..., 2 C) raw parameters into a mean and a soft-clamped log-variance, float32
    whatever the computation dtype: z and the log-densities of the KL derive from them."""
    mean, log_var = jnp.split(to_float32(params), 2, axis=-1)
    return DiagNormal(mean, soft_clamp(log_var, LOG_VAR_BOUND))


def downsampling_schedule(num_layers: int, halvings: int = 2) -> tuple[int, ...]:
    """Stride-2 steps at the start of each layer, `halvings` in all, spread evenly.

    Layer i (0-based, bottom first) ends after ceil((i + 1) halvings / L) halvings,
    e.g. L = 1: (2,); L = 3: (1, 1, 0); L = 6: (1, 0, 0, 1, 0, 0).
    """
    done = [math.ceil((i + 1) * halvings / num_layers) for i in range(num_layers)]
    return tuple(b - a for a, b in zip([0, *done[:-1]], done))


def _normalised_at_init(layer: nn.Module, x: jax.Array, data_init: bool) -> jax.Array:
    """layer(x); with `data_init`, during `init` the layer's kernel and bias are first
    rescaled so that its output has zero mean and unit variance per channel on this
    batch (the data-dependent initialisation of Salimans & Kingma 2016, §3).

    Works for any layer whose output is linear in a `kernel` with the output
    channels last plus a `bias` (nn.Conv, SubPixelConvTranspose). Flax's `init`
    is a forward pass, so each layer sees the already normalised outputs of the
    layers before it: the sequential initialisation of the paper in one call.
    """
    y = layer(x)
    if not (data_init and layer.is_initializing()):
        return y
    axes = tuple(range(y.ndim - 1))
    # Statistics in float32 whatever the computation dtype: they set float32 parameters.
    y32 = to_float32(y)
    mean, std = y32.mean(axes), y32.std(axes)
    # A channel constant on the batch (an all-zero init batch) keeps its scale
    # rather than being blown up by 1/0.
    scale = jnp.where(std > 1e-4, 1.0 / std, 1.0)
    layer.put_variable("params", "kernel", layer.get_variable("params", "kernel") * scale)
    layer.put_variable("params", "bias", (layer.get_variable("params", "bias") - mean) * scale)
    return ((y - mean) * scale).astype(y.dtype)


def _conv(features: int, kernel: int = 3, *, dtype: DTypeLike, **kwargs) -> nn.Conv:
    """A k x k convolution padded by k // 2 on every side, like PyTorch's padding=k//2
    (flax's "SAME" pads (0, 1) at stride 2, which shifts the grid by a pixel). At stride
    1 it keeps H and W; at stride 2 it halves them. Computes in `dtype`, float32 parameters."""
    return nn.Conv(features, (kernel, kernel), padding=((kernel // 2,) * 2,) * 2, dtype=dtype,
                   **kwargs)


class ResBlock(nn.Module):
    """x + f(x), f = Conv3x3(ELU(Conv3x3(ELU(x)))), (batch, h, w, C) -> same shape.

    Unlike `nn.conv.ResidualBlock` it has no BatchNorm: every example's terms
    must depend on that example alone, or importance weights are not per
    example. With `gated` the last convolution emits 2C channels (a, g) and f =
    a * sigmoid(g), a gated linear unit (Dauphin et al. 2017), the seed's
    "gated residual blocks".
    """

    gated: bool = True
    data_init: bool = False
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        h = _normalised_at_init(_conv(channels, dtype=self.dtype), nn.elu(x), self.data_init)
        h = _normalised_at_init(_conv(2 * channels if self.gated else channels, dtype=self.dtype),
                                nn.elu(h), self.data_init)
        if self.gated:
            a, g = jnp.split(h, 2, axis=-1)
            h = a * jax.nn.sigmoid(g)
        return x + h


class BottomUpLayer(nn.Module):
    """`downsample` stride-2 convolutions, then `num_blocks` residual blocks: d_{i-1} -> d_i."""

    hidden: int
    num_blocks: int
    downsample: int
    gated: bool
    data_init: bool
    dtype: DTypeLike

    @nn.compact
    def __call__(self, d: jax.Array) -> jax.Array:
        for _ in range(self.downsample):
            d = _normalised_at_init(_conv(self.hidden, strides=(2, 2), dtype=self.dtype), nn.elu(d),
                                    self.data_init)
        for _ in range(self.num_blocks):
            d = ResBlock(self.gated, self.data_init, dtype=self.dtype)(d)
        return d


class TopDownLayer(nn.Module):
    """One stochastic layer of the top-down path, generative or inference.

    p(z_i | .) is read from the top-down features h (a learned or fixed
    N(mu, sigma^2) at the top); with bottom-up features d, z_i is drawn from q
    instead. Then z_i (merged with h when `skip`) passes through `num_blocks`
    residual blocks and `upsample` sub-pixel transposed convolutions, giving the
    features of the layer below.

    Attributes:
      latent_shape: (h, w, latent_channels) of z_i.
      is_top: the top layer (no h; prior from `learn_prior`).
      learn_prior: at the top, learn a mean and log-variance per latent (zero at
        init, i.e. N(0, I)); otherwise p(z_L) = N(0, I).
      merge: how q combines d and h below the top, "learned" or "precision".
    """

    latent_shape: tuple[int, int, int]
    hidden: int
    num_blocks: int
    upsample: int
    is_top: bool
    learn_prior: bool
    merge: str
    skip: bool
    gated: bool
    data_init: bool
    dtype: DTypeLike

    @nn.compact
    def __call__(self, h: jax.Array | None, d: jax.Array | None, eps: jax.Array):
        """
        Args:
          h: (batch, h_i, w_i, hidden) top-down features; None at the top.
          d: (batch, h_i, w_i, hidden) bottom-up features to infer z_i from q;
            None to generate it from p.
          eps: (batch, *latent_shape) standard normal noise, z_i = mean + sigma * eps
            (zeros give the mean).
        Returns:
          (features for the layer below (batch, 2^upsample h_i, ..., hidden),
           z_i (batch, *latent_shape), the distribution z_i was drawn from (q, or p
           when generating), p(z_i | .)).
        """
        channels = 2 * self.latent_shape[-1]
        # Zero-initialised heads start p and q (with "precision": q's bottom-up estimate)
        # at N(0, I), whatever the scale of the features.
        head = functools.partial(_conv, channels, kernel_init=nn.initializers.zeros,
                                 dtype=self.dtype)
        if self.is_top:
            top = (self.param("prior", nn.initializers.zeros, (*self.latent_shape[:2], channels))
                   if self.learn_prior else jnp.zeros((*self.latent_shape[:2], channels)))
            prior = _diag_normal(jnp.broadcast_to(top, (eps.shape[0], *top.shape)))
        else:
            prior = _diag_normal(head(name="prior")(h))
        # Explicit names: generation skips the inference-only modules, and auto-naming
        # by call order would then hand their parameters to the wrong layers.
        if d is None:
            dist = prior
        elif self.is_top:
            dist = _diag_normal(head(name="posterior")(d))
        elif self.merge == "precision":
            dist = precision_weighted(_diag_normal(head(name="posterior")(d)), prior)
        else:
            merged = _normalised_at_init(_conv(self.hidden, kernel=1, dtype=self.dtype,
                                               name="merge_in"),
                                         jnp.concatenate([d, h], axis=-1), self.data_init)
            merged = ResBlock(self.gated, self.data_init, dtype=self.dtype,
                              name="merge_block")(merged)
            dist = _diag_normal(head(name="posterior")(merged))
        z = dist.mean + jnp.exp(0.5 * dist.log_var) * eps

        out = _normalised_at_init(_conv(self.hidden, dtype=self.dtype, name="z_in"), z,
                                  self.data_init)
        if self.skip and h is not None:
            out = _normalised_at_init(_conv(self.hidden, kernel=1, dtype=self.dtype, name="skip"),
                                      jnp.concatenate([out, h], axis=-1), self.data_init)
        for j in range(self.num_blocks):
            out = ResBlock(self.gated, self.data_init, dtype=self.dtype, name=f"block_{j}")(out)
        for j in range(self.upsample):
            out = _normalised_at_init(
                SubPixelConvTranspose(self.hidden, dtype=self.dtype, name=f"upsample_{j}"),
                nn.elu(out), self.data_init)
        return out, z, dist, prior


class LVAE(nn.Module):
    """Ladder VAE on images (batch, H, W, C) in the likelihood's range ([-1, 1]).

    Attributes:
      image_shape: (H, W, C); H and W divisible by 2^(1 + sum(downsample)).
      likelihood: p(x | z_1), e.g. `likelihoods.get("bernoulli")` or "dmol".
      num_layers: L stochastic layers.
      latent_channels: channels of every z_i.
      hidden: channels of the deterministic paths.
      blocks_per_layer: residual blocks per layer in each path.
      downsample: stride-2 steps per layer, bottom first; default
        `downsampling_schedule(num_layers)` (latents at 8x8 and 4x4 for 32x32).
      merge: "learned" or "precision", how q(z_i | .) combines the bottom-up and
        top-down paths below the top (module docstring).
      skip: condition each layer on all layers above (else on the one above).
      gated: gated residual blocks.
      learn_top_prior: learn p(z_L) (else N(0, I)).
      data_init: data-dependent initialisation; `init` must then see a real
        batch of data (a few hundred examples), whose statistics set the scales.
      dtype: computation dtype of every layer. The latent distributions, z, the
        decoder output and every ELBO term are float32 whatever it is
        (lvm_jax.nn.precision).
    """

    image_shape: tuple[int, int, int]
    likelihood: Likelihood
    num_layers: int = 3
    latent_channels: int = 32
    hidden: int = 64
    blocks_per_layer: int = 2
    downsample: tuple[int, ...] | None = None
    merge: str = "learned"
    skip: bool = True
    gated: bool = True
    learn_top_prior: bool = True
    data_init: bool = False
    dtype: DTypeLike = jnp.float32

    @property
    def schedule(self) -> tuple[int, ...]:
        """Stride-2 steps per layer, bottom first."""
        if self.downsample is None:
            return downsampling_schedule(self.num_layers)
        return tuple(self.downsample)

    @property
    def size_multiple(self) -> int:
        """What image height and width must be multiples of: the stem's stride 2 and each
        layer's stride-2 steps."""
        return 2 ** (1 + sum(self.schedule))

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(h_i, w_i, latent_channels) of z_1 ... z_L."""
        height, width, _ = self.image_shape
        shapes, factor = [], 2  # the stem halves
        for steps in self.schedule:
            factor *= 2 ** steps
            shapes.append((height // factor, width // factor, self.latent_channels))
        return shapes

    def setup(self):
        if self.num_layers < 1 or len(self.schedule) != self.num_layers:
            raise ValueError(f"need num_layers >= 1 and one downsampling entry per layer; got "
                             f"num_layers={self.num_layers}, downsample={self.schedule}.")
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}.")
        factor = self.size_multiple
        if len(self.image_shape) != 3 or self.image_shape[0] % factor or self.image_shape[1] % factor:
            raise ValueError(f"image_shape {self.image_shape} must be (H, W, C) with H and W "
                             f"divisible by {factor} for the downsampling schedule {self.schedule}.")
        common = dict(hidden=self.hidden, num_blocks=self.blocks_per_layer, gated=self.gated,
                      data_init=self.data_init, dtype=self.dtype)
        self.stem = _conv(self.hidden, 5, strides=(2, 2), dtype=self.dtype)
        self.bottom_up_layers = [BottomUpLayer(downsample=s, **common) for s in self.schedule]
        self.top_down_layers = [
            TopDownLayer(latent_shape=shape, upsample=s, is_top=i == self.num_layers - 1,
                         learn_prior=self.learn_top_prior, merge=self.merge, skip=self.skip,
                         **common)
            for i, (shape, s) in enumerate(zip(self.latent_shapes(), self.schedule))]
        self.output_head = SubPixelConvTranspose(
            self.likelihood.channels_per_pixel(self.image_shape), dtype=self.dtype)

    def bottom_up(self, x: jax.Array) -> list[jax.Array]:
        """Deterministic features d_1 ... d_L, d_i (batch, h_i, w_i, hidden)."""
        if x.shape[1:] != tuple(self.image_shape):
            raise ValueError(f"expected images (batch, {', '.join(map(str, self.image_shape))}), "
                             f"got {x.shape}.")
        d = _normalised_at_init(self.stem, x, self.data_init)
        features = []
        for layer in self.bottom_up_layers:
            d = layer(d)
            features.append(d)
        return features

    def _top_down(self, noise: Sequence[jax.Array], features: Sequence[jax.Array] | None):
        """The top-down pass, z_L first.

        Args:
          noise: per layer, bottom first, standard normal noise (batch,
            *latent_shape_i); zeros take the mean of that layer's distribution.
          features: the bottom-up d_i to draw from q; None draws from p.
        Returns:
          (decoder output (batch, *likelihood.out_shape(image_shape)) float32, per
          layer, bottom first, (z_i, sampling distribution, prior)).
        """
        h, layers = None, []
        for i in reversed(range(self.num_layers)):
            d = None if features is None else features[i]
            h, *layer = self.top_down_layers[i](h, d, noise[i])
            layers.append(layer)
        out = to_float32(self.output_head(nn.elu(h)))
        return out.reshape(out.shape[0], *self.likelihood.out_shape(self.image_shape)), layers[::-1]

    def _noise(self, rng: jax.Array, num: int) -> list[jax.Array]:
        """Independent standard normal noise for every layer, bottom first."""
        return [jax.random.normal(key, (num, *shape))
                for key, shape in zip(jax.random.split(rng, self.num_layers), self.latent_shapes())]

    def _at_means(self, x: jax.Array):
        """The inference pass with every z_i at the mean of q: (decoder output, layers)."""
        zeros = [jnp.zeros((x.shape[0], *shape)) for shape in self.latent_shapes()]
        return self._top_down(zeros, self.bottom_up(x))

    def __call__(self, x: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
        """Per-example ELBO terms for one reparameterised sample z ~ q(z | x).

        Returns a dict of arrays in nats: `log_px_z` = log p(x | z_1), `log_qz_x`
        = sum_i log q(z_i | x, z_{>i}), `log_pz` = log p(z_L) + sum_{i<L} log
        p(z_i | z_{>i}), each (batch,), all Monte Carlo values at z;
        `kl_layers` (batch, L), layer 1 first, the Monte Carlo log q - log p of
        each layer; and `kl` (batch,) their sum.
        """
        out, layers = self._top_down(self._noise(rng, x.shape[0]), self.bottom_up(x))
        log_q = jnp.stack([losses.gaussian_log_prob(z, *q) for z, q, _ in layers], axis=-1)
        log_p = jnp.stack([losses.gaussian_log_prob(z, *p) for z, _, p in layers], axis=-1)
        kl_layers = log_q - log_p
        return {"log_px_z": self.likelihood.log_prob(x, out), "kl": kl_layers.sum(axis=-1),
                "log_qz_x": log_q.sum(axis=-1), "log_pz": log_p.sum(axis=-1),
                "kl_layers": kl_layers}

    def generate(self, noise: Sequence[jax.Array]) -> jax.Array:
        """Decoder output (batch, *likelihood.out_shape(image_shape)) of the generative pass
        z_i = mu_p + sigma_p * noise[i], noise bottom first, each (batch, *latent_shape_i)."""
        return self._top_down(noise, None)[0]

    def sample(self, rng: jax.Array, num: int, noise: bool = False) -> jax.Array:
        """`num` draws x ~ p(x | z), z ~ p(z); the decoder mean when `noise` is False."""
        latent_rng, noise_rng = jax.random.split(rng)
        out = self.generate(self._noise(latent_rng, num))
        return self.likelihood.sample(noise_rng, out) if noise else self.likelihood.mean(out)

    def reconstruct(self, x: jax.Array) -> jax.Array:
        """Decoder mean with every z_i at the mean of q, (batch, *image_shape)."""
        return self.likelihood.mean(self._at_means(x)[0])

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, log_var) of q(z_i | x, z_{>i}) with every z_{>i} at its mean, flattened and
        concatenated over the layers (layer 1 first): each (batch, sum_i h_i w_i C).

        For latent diagnostics such as `evaluate.active_units`.
        """
        _, layers = self._at_means(x)
        posteriors = [q for _, q, _ in layers]
        # zip(*posteriors) groups the layers' means, then their log-variances.
        return tuple(jnp.concatenate([part.reshape(x.shape[0], -1) for part in parts], axis=-1)
                     for parts in zip(*posteriors))

    def layer_samples(self, rng: jax.Array, layer: int | jax.Array, num_rows: int,
                      num_cols: int) -> jax.Array:
        """The seed's view of what layer `layer` (1 = bottom, L = top) encodes.

        Each row draws z_{>layer} ~ p once; its columns draw z_layer ~ p(. | z_{>layer})
        independently; the layers below take the mean of p; the images are the
        decoder mean. Shared noise above makes z_{>layer} identical within a row.
        `layer` may be traced, so one compilation serves every layer.

        Returns:
          (num_rows * num_cols, *image_shape), row-major.
        """
        if isinstance(layer, int) and not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in 1..{self.num_layers}, got {layer}.")
        noise = []
        for i, (key, shape) in enumerate(
                zip(jax.random.split(rng, self.num_layers), self.latent_shapes()), start=1):
            row_key, col_key = jax.random.split(key)
            per_row = jnp.repeat(jax.random.normal(row_key, (num_rows, *shape)), num_cols, axis=0)
            per_image = jax.random.normal(col_key, (num_rows * num_cols, *shape))
            noise.append(jnp.where(i > layer, per_row, jnp.where(i == layer, per_image, 0.0)))
        return self.likelihood.mean(self.generate(noise))


def loss_fn(model: LVAE, params, x: jax.Array, rng: jax.Array, free_bits: float = 0.5):
    """Training objective and metrics, batch means in nats per example.

    loss = recon + sum_i max(KL_i, free_bits), with KL_i the batch mean of layer
    i's Monte Carlo KL: a layer whose KL is below `free_bits` nats gets no
    gradient pushing it further down, which keeps layers from collapsing early
    in training. The metrics are the true ELBO's terms, free bits excluded.

    Args:
      model: the LVAE; params: its parameters.
      x: (batch, *image_shape) data in the model's range.
      rng: PRNG key for the reparameterised samples.
      free_bits: nats per layer; 0 trains on the ELBO itself.
    Returns:
      (loss, metrics): `neg_elbo` = `recon` + `kl`, `recon` = -log p(x | z),
      `kl` = sum of the layers' KLs, and `kl_layer_1` ... `kl_layer_L`.
    """
    terms = model.apply({"params": params}, x, rng)
    recon = -terms["log_px_z"].mean()
    kl_layers = terms["kl_layers"].mean(axis=0)
    kl = kl_layers.sum()
    # free_bits = 0 is the ELBO itself: a Monte Carlo KL can be negative on a batch, and
    # clamping it at 0 would change the objective.
    clamped = jnp.where(free_bits > 0, jnp.maximum(kl_layers, free_bits), kl_layers)
    loss = recon + clamped.sum()
    metrics = {"neg_elbo": recon + kl, "recon": recon, "kl": kl}
    metrics.update({f"kl_layer_{i + 1}": kl_layers[i] for i in range(model.num_layers)})
    return loss, metrics
