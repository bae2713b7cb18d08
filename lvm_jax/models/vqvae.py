"""VQ-VAE (van den Oord et al. 2017) and the two-stage training of its prior.

Stage 1 learns x -> z_e = encoder(x) -> z_q = nearest of K codebook vectors
-> x_hat = decoder(z_q), with the decoder fed z_q by the straight-through
estimator and

    loss = ||x - x_hat||^2 + ||sg(z_e) - z_q||^2 + beta ||z_e - sg(z_q)||^2,

each term a mean over elements (REFERENCE.md §4: beta = 1, images in [-1, 1]).
Stage 2 encodes the whole dataset once into (h, w) grids of code indices and
fits an autoregressive prior p(c) (PixelCNN or Gated PixelCNN) to them by
maximum likelihood. A sample is a grid drawn from the prior in raster order
(by default with the cached sampler of lvm_jax.nn.sampling), decoded to an image.
"""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import DTypeLike

from lvm_jax.nn.conv import VQDecoder, VQEncoder
from lvm_jax.nn.fsq import FiniteScalarQuantizer
from lvm_jax.nn.masked_conv import GatedPixelCNN, PixelCNN
from lvm_jax.nn.precision import to_float32
from lvm_jax.nn.quantizer import VectorQuantizer, VectorQuantizerEMA
from lvm_jax.nn.sampling import sample_codes

NUM_CODES, CODE_DIM = 128, 256
PRIORS = {"pixelcnn": PixelCNN, "gated": GatedPixelCNN}

# Named quantizer settings (options of `quantizer`), compared side by side by
# benchmarks/vq_codebook.py. "plain" is the course's VQ-VAE.
QUANTIZER_PRESETS = {
    "plain": {},
    "ema": dict(ema=True),
    "ema_restart": dict(ema=True, restart_after=10),
    "kmeans": dict(ema=True, restart_after=10, kmeans_iters=10),
    "cosine": dict(cosine=True, lookup_dim=32),
    "rotation": dict(rotation_trick=True),
    "ema_cosine_rotation": dict(ema=True, restart_after=10, kmeans_iters=10, cosine=True,
                                lookup_dim=32, rotation_trick=True),
    "fsq": dict(fsq_levels=(8, 4, 4)),
}


class VQVAE(nn.Module):
    """x -> z_e -> z_q -> x_hat.

    Attributes:
      encoder: (x (batch, H, W, C), train) -> z_e (batch, h, w, D).
      quantizer: K codes of D dims.
      decoder: (z_q (batch, h, w, D), train) -> x_hat (batch, H, W, C).

    Variables: 'params'; 'batch_stats', the BatchNorm running statistics; and
    'vq_stats' with an EMA quantizer. Calls with train=True need
    mutable=[those collections].

    Encoder and decoder compute in their own dtype; z_e enters the quantizer as
    float32, so the codebook, its distances, its EMA statistics and the VQ
    losses are float32, and x_hat leaves as float32 for the reconstruction
    loss (lvm_jax.nn.precision).
    """

    encoder: nn.Module
    quantizer: VectorQuantizer | FiniteScalarQuantizer
    decoder: nn.Module

    def __call__(self, x: jax.Array, train: bool = False, rng: jax.Array | None = None) -> dict:
        """The quantizer's outputs (see VectorQuantizer) plus `reconstruction` x_hat.

        Args:
          x: (batch, H, W, C) images in [-1, 1].
          train: BatchNorm on batch statistics, updating the running ones (and
            the EMA codebook); otherwise inference mode, which changes nothing.
          rng: PRNG key for the quantizer's restart of dead codes and k-means, if enabled.
        """
        vq = self.quantizer(to_float32(self.encoder(x, train)), train, rng)
        return {**vq, "reconstruction": to_float32(self.decoder(vq["quantized"], train))}

    def encode(self, x: jax.Array) -> jax.Array:
        """Images (batch, H, W, C) in [-1, 1] -> code grid (batch, h, w) int32, inference mode."""
        return self.quantizer(to_float32(self.encoder(x, False)))["indices"]

    def decode(self, codes: jax.Array) -> jax.Array:
        """Code grid (batch, h, w) int -> float32 images (batch, H, W, C) in (-1, 1), inference
        mode."""
        return to_float32(self.decoder(self.quantizer.lookup(codes), False))


def quantizer(num_codes: int = NUM_CODES, code_dim: int = CODE_DIM, *, ema: bool = False,
              restart_after: int | None = None, kmeans_iters: int = 0, cosine: bool = False,
              lookup_dim: int | None = None, rotation_trick: bool = False,
              fsq_levels: tuple[int, ...] | None = None
              ) -> VectorQuantizer | FiniteScalarQuantizer:
    """The bottleneck the options name (see VectorQuantizer and FiniteScalarQuantizer); the
    defaults are the course's: a gradient-trained codebook, straight-through, beta = 1.

    beta = 1 with the gradient-trained codebook; with ema=True the codebook
    follows moving averages and beta = 0.25 (van den Oord et al. 2017,
    DeepMind's VectorQuantizerEMA). fsq_levels selects finite scalar
    quantization, which has no codebook for the other options to act on.

    Raises:
      ValueError: contradictory options, before any compute.
    """
    if fsq_levels is not None:
        codebook_options = dict(ema=ema, restart_after=restart_after, kmeans_iters=kmeans_iters,
                                cosine=cosine, lookup_dim=lookup_dim,
                                rotation_trick=rotation_trick)
        given = [name for name, value in codebook_options.items() if value]
        if given:
            raise ValueError(f"fsq_levels has no learned codebook: {', '.join(given)} cannot "
                             "apply to it; drop them or fsq_levels.")
        return FiniteScalarQuantizer(num_codes, code_dim, tuple(fsq_levels))
    shared = dict(cosine=cosine, lookup_dim=lookup_dim, rotation_trick=rotation_trick)
    if ema:
        return VectorQuantizerEMA(num_codes, code_dim, restart_after=restart_after,
                                  kmeans_iters=kmeans_iters, **shared)
    for name, value in (("restart_after", restart_after), ("kmeans_iters", kmeans_iters)):
        if value:
            raise ValueError(f"{name} needs ema=True: the gradient-trained codebook is a "
                             f"parameter owned by the optimizer, which the quantizer cannot "
                             f"overwrite.")
    return VectorQuantizer(num_codes, code_dim, **shared)


# The encoder downsamples by 4: image height and width must be multiples of it.
SIZE_MULTIPLE = 4


def conv_vqvae(image_shape: tuple[int, int, int], num_codes: int = NUM_CODES,
               code_dim: int = CODE_DIM, dtype: DTypeLike = jnp.float32,
               **quantizer_options) -> VQVAE:
    """The VQ-VAE of REFERENCE.md §4 on (H, W, C) images: an (H/4, W/4) grid of codes
    (8x8 for 32x32 images), conv width = code_dim, encoder and decoder computing in `dtype`,
    and the bottleneck `quantizer(num_codes, code_dim, **quantizer_options)`.
    """
    height, width, channels = image_shape
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise ValueError(f"the VQ-VAE downsamples by {SIZE_MULTIPLE}: image height and width "
                         f"must be multiples of {SIZE_MULTIPLE}, got {image_shape}.")
    return VQVAE(VQEncoder(code_dim, dtype=dtype), quantizer(num_codes, code_dim,
                                                             **quantizer_options),
                 VQDecoder(code_dim, channels, dtype=dtype))


def loss_fn(model: VQVAE, params, model_state, x: jax.Array, rng: jax.Array, train: bool):
    """The stage-1 objective on a batch, with the signature of `train.Objective.loss`.

    Args:
      model: the VQVAE.
      params: its parameters.
      model_state: its other collections ('batch_stats', and 'vq_stats' with EMA).
      x: (batch, H, W, C) images in [-1, 1].
      rng: PRNG key (only used by a quantizer that restarts dead codes or runs k-means).
      train: training mode, which returns the updated model_state; evaluation
        runs in inference mode and returns model_state unchanged.
    Returns:
      (loss, (metrics, model_state)) with loss = recon_mse + vq_loss and the
      batch means (per element: of the B*H*W*C image values, or of the
      B*h*w*d code values, d = D unless the quantizer searches in a lookup_dim;
      FSQ's VQ terms are 0):
        recon_mse: mean squared error of x_hat, images in [-1, 1];
        codebook_loss, commitment_loss: ||sg(z_e) - z_q||^2, ||z_e - sg(z_q)||^2;
        vq_loss: their part of the objective, codebook + beta * commitment
          (beta * commitment with an EMA codebook);
        perplexity: exp of the entropy of this batch's code usage (it grows
          with the batch size; use `code_statistics` for a whole dataset);
        batch_codebook_usage: fraction of the K codes this batch uses (also
          batch-size dependent).
    """
    out, model_state = apply_model(model, params, model_state, x, rng, train)
    metrics = {"recon_mse": ((out["reconstruction"] - x) ** 2).mean(), **vq_metrics(out)}
    return metrics["recon_mse"] + metrics["vq_loss"], (metrics, model_state)


def apply_model(model: nn.Module, params, model_state, x: jax.Array, rng: jax.Array,
                train: bool) -> tuple[dict, dict]:
    """(outputs, model_state) of a VQ-VAE on a batch: in training mode, the updated
    BatchNorm and codebook statistics; in inference mode, model_state unchanged."""
    variables = {"params": params, **model_state}
    if train:
        return model.apply(variables, x, True, rng, mutable=list(model_state))
    return model.apply(variables, x), model_state


def vq_metrics(out: dict) -> dict[str, jax.Array]:
    """The batch means of one quantizer's outputs (see VectorQuantizer), per element of
    the B*h*w*d code values: vq_loss, codebook_loss, commitment_loss; and perplexity and
    batch_codebook_usage of this batch's codes."""
    # The quantizer sums its terms over one example's codes (projected with a lookup_dim).
    latent_size = out["codes"][0].size
    return {
        "vq_loss": out["loss"].mean() / latent_size,
        "codebook_loss": out["codebook_loss"].mean() / latent_size,
        "commitment_loss": out["commitment_loss"].mean() / latent_size,
        "perplexity": out["perplexity"],
        "batch_codebook_usage": (out["counts"] > 0).mean(),
    }


def _identity(x):
    return x


@functools.partial(jax.jit, static_argnames=("model", "preprocess"))
def _encode_batch(model: nn.Module, variables, images: jax.Array, preprocess: Callable):
    return model.apply(variables, preprocess(images), method="encode")


def encode_dataset(model: nn.Module, variables, images: np.ndarray, batch_size: int = 500,
                   preprocess: Callable = _identity):
    """Code grids of a whole dataset, in inference mode: (N, H, W, C) -> (N, h, w) int32,
    or the tuple of a model whose `encode` returns several grids (the VQ-VAE-2's (top,
    bottom)).

    One compiled call per batch; the last batch is zero-padded to the same
    size, so the function compiles once (inference mode treats every example
    independently, so the padding changes no code).

    Args:
      model, variables: the trained VQVAE (or VQVAE2) and all its collections.
      images: (N, H, W, C) as stored, e.g. uint8.
      batch_size: examples per call.
      preprocess: applied inside the compiled call, e.g. `data.scale_images`.
    """
    n = len(images)
    batch_size = min(batch_size, n)
    grids = []
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        padded = np.pad(batch, [(0, batch_size - len(batch))] + [(0, 0)] * (batch.ndim - 1))
        count = len(batch)
        grids.append(jax.tree.map(lambda grid: np.asarray(grid)[:count],
                                  _encode_batch(model, variables, padded, preprocess)))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *grids)


def code_statistics(codes: np.ndarray, num_codes: int) -> dict[str, float]:
    """Codebook use over a whole set of code grids (any shape of ints in [0, num_codes)).

    Returns:
      codebook_usage: fraction of the K codes that occur at least once.
      perplexity: exp of the entropy of the code frequencies, between 1 and K.
    """
    counts = np.bincount(np.ravel(codes), minlength=num_codes)
    p = counts[counts > 0] / counts.sum()
    return {"codebook_usage": float(np.mean(counts > 0)),
            "perplexity": float(np.exp(-np.sum(p * np.log(p))))}


def prior_loss_fn(prior: nn.Module, params, codes: jax.Array, rng: jax.Array):
    """Stage 2: -log p(codes) under the autoregressive prior, in nats per code.

    Args:
      prior: a PixelCNN or GatedPixelCNN over the K codes.
      params: its parameters.
      codes: (batch, h, w) int code grids.
      rng: unused; the prior is deterministic.
    Returns:
      (nll, {"prior_nll": nll}), nll the mean cross-entropy over the batch's codes.
    """
    del rng
    logits = prior.apply({"params": params}, codes)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, codes).mean()
    return nll, {"prior_nll": nll}


@functools.partial(jax.jit, static_argnames="model")
def decode(model: VQVAE, variables, codes: jax.Array) -> jax.Array:
    """Code grids (batch, h, w) int -> images (batch, H, W, C) in (-1, 1); inference mode, compiled.

    `variables` holds all the VQVAE's collections (params and batch_stats at least).
    """
    return model.apply(variables, codes, method=VQVAE.decode)


@functools.partial(jax.jit, static_argnames=("model", "prior", "num", "grid_shape", "sampler"))
def sample(model: VQVAE, variables, prior: nn.Module, prior_params, rng: jax.Array, num: int,
           grid_shape: tuple[int, int], sampler: str = "cached") -> tuple[jax.Array, jax.Array]:
    """Draws `num` images in one compiled call: code grids from the prior, then decoded.

    Args:
      model, variables: the trained VQVAE and all its collections.
      prior, prior_params: the trained prior.
      rng: PRNG key.
      num: number of samples.
      grid_shape: (h, w) of the code grid, e.g. (8, 8) for 32x32 images.
      sampler: "cached" (one position per step) or "raster" (a full pass per
        position), the methods of `lvm_jax.nn.sample_codes`: the same codes for
        the same key.
    Returns:
      (codes (num, h, w) int32, images (num, H, W, C) in (-1, 1)).
    """
    codes = sample_codes(prior, {"params": prior_params}, rng, num, *grid_shape, method=sampler)
    return codes, decode(model, variables, codes)
