"""VQ-VAE-2 (Razavi et al. 2019): a top code grid for global structure, a bottom one for detail.

The layout of rosinality/vq-vae-2-pytorch's `vqvae.py` (REFERENCE.md §6c):

    f_b   = bottom_encoder(x)                       (B, H/s, W/s, width), s = 4 in the paper
    z_t   = top_encoder(f_b)                        (B, H/2s, W/2s, D), through a 1x1 conv
    q_t   = top_quantizer(z_t)
    z_b   = Conv1x1([top_decoder(q_t), f_b])        (B, H/s, W/s, D), top_decoder upsamples x2
    q_b   = bottom_quantizer(z_b)
    x_hat = decoder([ConvTranspose4x4s2(q_t), q_b]) (B, H, W, C) in (-1, 1)

and the objective of the single-level VQ-VAE with one VQ term per level,

    loss = ||x - x_hat||^2 + sum over levels (||sg(z) - q||^2 + beta ||z - sg(q)||^2),

each term a mean over its elements (with an EMA codebook only beta * commitment). Each level
has its own codebook, a `vqvae.quantizer`, so every preset of `vqvae.QUANTIZER_PRESETS`
applies to each level separately. Both grids are then fitted by autoregressive priors: the
top grid alone, the bottom grid given the top one (experiments/vqvae2.py).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from lvm_jax.errors import ConfigError
from lvm_jax.models import vqvae
from lvm_jax.nn.conv import StridedDecoder, StridedEncoder, SubPixelConvTranspose
from lvm_jax.nn.fsq import FiniteScalarQuantizer
from lvm_jax.nn.precision import to_float32
from lvm_jax.nn.quantizer import VectorQuantizer

# rosinality's widths at 256 px are 128 channels and 64-dim codes; K = 128 codes per level
# is the single-level VQ-VAE's, so the two compare at the same K.
NUM_CODES, CODE_DIM, WIDTH = vqvae.NUM_CODES, 64, 128
LEVELS = ("top", "bottom")
# Image sizes are multiples of 8 whatever the grids' downsampling (issue 23): the paper's
# layout needs 8, and one size rule for every bottom_factor keeps the experiments comparable.
SIZE_MULTIPLE = 8

Quantizer = VectorQuantizer | FiniteScalarQuantizer


class VQVAE2(nn.Module):
    """x -> (top codes, bottom codes) -> x_hat.

    Attributes:
      top_quantizer, bottom_quantizer: each level's bottleneck, K codes of D dims (the same D).
      out_channels: C, the image channels.
      width: channels of the encoders and decoders.
      bottom_factor: s, the bottom grid's downsampling (4 in the paper; 2 puts a 16x16 bottom
        and an 8x8 top grid on 32x32 images); the top grid is s*2 times smaller than x.
      num_residual_blocks: per encoder and decoder.
      dtype: of the convolutions; the quantizers and the outputs are float32
        (lvm_jax.nn.precision).

    Variables: 'params', 'batch_stats' and, with an EMA codebook, 'vq_stats' (one subtree per
    level's quantizer); calls with train=True need mutable=[those collections].
    """

    top_quantizer: Quantizer
    bottom_quantizer: Quantizer
    out_channels: int = 3
    width: int = WIDTH
    bottom_factor: int = 4
    num_residual_blocks: int = 2
    dtype: DTypeLike = jnp.float32

    def setup(self):
        code_dim = self.top_quantizer.code_dim
        blocks = dict(num_residual_blocks=self.num_residual_blocks, dtype=self.dtype)
        self.bottom_encoder = StridedEncoder(self.width, self.bottom_factor, **blocks)
        self.top_encoder = StridedEncoder(self.width, 2, out_features=code_dim, **blocks)
        self.top_decoder = StridedDecoder(self.width, code_dim, 2, **blocks)
        self.bottom_projection = nn.Conv(code_dim, (1, 1), dtype=self.dtype)
        self.upsample_top = SubPixelConvTranspose(code_dim, dtype=self.dtype)
        self.decoder = StridedDecoder(self.width, self.out_channels, self.bottom_factor,
                                      tanh=True, **blocks)

    def __call__(self, x: jax.Array, train: bool = False, rng: jax.Array | None = None) -> dict:
        """{"top": ..., "bottom": ...}, each level's quantizer outputs (see VectorQuantizer),
        and "reconstruction" x_hat (batch, H, W, C) float32 in (-1, 1).

        Args:
          x: (batch, H, W, C) images in [-1, 1].
          train: BatchNorm on batch statistics, updating the running ones and the EMA
            codebooks; otherwise inference mode, which changes nothing.
          rng: PRNG key for the quantizers' restarts and k-means, if enabled (the top level
            gets fold_in(rng, 0), the bottom fold_in(rng, 1)).
        """
        top_rng, bottom_rng = ((None, None) if rng is None
                               else (jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)))
        features = self.bottom_encoder(x, train)
        top = self.top_quantizer(to_float32(self.top_encoder(features, train)), train, top_rng)
        bottom = self.bottom_quantizer(self._bottom_input(top["quantized"], features, train),
                                       train, bottom_rng)
        return {"top": top, "bottom": bottom,
                "reconstruction": self._decode(top["quantized"], bottom["quantized"], train)}

    def _bottom_input(self, top_quantized: jax.Array, features: jax.Array, train: bool):
        """The bottom quantizer's input: the top codes decoded to the bottom grid, beside the
        bottom encoder's features, mixed by a 1x1 conv; float32."""
        top_features = self.top_decoder(top_quantized, train)
        mixed = jnp.concatenate([jnp.asarray(top_features, self.dtype), features], axis=-1)
        return to_float32(self.bottom_projection(mixed))

    def _decode(self, top_quantized: jax.Array, bottom_quantized: jax.Array, train: bool):
        upsampled = self.upsample_top(top_quantized)
        both = jnp.concatenate([upsampled, jnp.asarray(bottom_quantized, upsampled.dtype)], -1)
        return to_float32(self.decoder(both, train))

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (batch, H, W, C) in [-1, 1] -> (top (batch, H/2s, W/2s), bottom (batch,
        H/s, W/s)) int32 code grids, inference mode."""
        out = self(x)
        return out["top"]["indices"], out["bottom"]["indices"]

    def decode(self, top_codes: jax.Array | None, bottom_codes: jax.Array | None) -> jax.Array:
        """Code grids -> float32 images (batch, H, W, C) in (-1, 1), inference mode.

        A level given as None is decoded from its mean code vector (the mean of its K code
        vectors, the same at every position), which shows what the other level alone
        carries; at least one level must be given.
        """
        if top_codes is None and bottom_codes is None:
            raise ValueError("decode needs the codes of at least one level")
        if top_codes is None:
            batch, height, width = bottom_codes.shape
            top = self._mean_code(self.top_quantizer, (batch, height // 2, width // 2))
        else:
            top = self.top_quantizer.lookup(top_codes)
        if bottom_codes is None:
            batch, height, width = top_codes.shape
            bottom = self._mean_code(self.bottom_quantizer, (batch, 2 * height, 2 * width))
        else:
            bottom = self.bottom_quantizer.lookup(bottom_codes)
        return self._decode(top, bottom, False)

    @staticmethod
    def _mean_code(quantizer: Quantizer, grid_shape: tuple[int, int, int]) -> jax.Array:
        """The mean of the quantizer's K decoder inputs, broadcast to (*grid_shape, D)."""
        mean = quantizer.lookup(jnp.arange(quantizer.num_codes)).mean(axis=0)
        return jnp.broadcast_to(mean, (*grid_shape, mean.shape[-1]))


def conv_vqvae2(image_shape: tuple[int, int, int], num_codes: int = NUM_CODES,
                code_dim: int = CODE_DIM, width: int = WIDTH, bottom_factor: int = 4,
                top_options: dict | None = None, bottom_options: dict | None = None,
                dtype: DTypeLike = jnp.float32) -> VQVAE2:
    """The VQ-VAE-2 on (H, W, C) images, each level's bottleneck
    `vqvae.quantizer(num_codes, code_dim, **its options)` (e.g. a `vqvae.QUANTIZER_PRESETS`
    entry), the convolutions computing in `dtype`.

    Raises:
      ConfigError: H or W not a multiple of SIZE_MULTIPLE (8) and of the top grid's
        downsampling 2 * bottom_factor, before any compute; ValueError: contradictory
        quantizer options.
    """
    height, width_px, channels = image_shape
    factor = math.lcm(SIZE_MULTIPLE, 2 * bottom_factor)
    if height % factor or width_px % factor:
        raise ConfigError(f"the VQ-VAE-2 takes images whose height and width are multiples of "
                          f"{factor}, got {height}x{width_px}.")
    return VQVAE2(vqvae.quantizer(num_codes, code_dim, **(top_options or {})),
                  vqvae.quantizer(num_codes, code_dim, **(bottom_options or {})),
                  out_channels=channels, width=width, bottom_factor=bottom_factor, dtype=dtype)


def loss_fn(model: VQVAE2, params, model_state, x: jax.Array, rng: jax.Array, train: bool):
    """The VQ-VAE-2 objective on a batch, with the signature of `train.Objective.loss`.

    Args: as `vqvae.loss_fn`.
    Returns:
      (loss, (metrics, model_state)) with loss = recon_mse + vq_loss; the metrics are
      recon_mse (mean squared error per element, images in [-1, 1]), vq_loss (the sum of the
      two levels' vq_loss) and each level's `vqvae.vq_metrics`, prefixed top_ and bottom_.
    """
    out, model_state = vqvae.apply_model(model, params, model_state, x, rng, train)
    metrics = {"recon_mse": ((out["reconstruction"] - x) ** 2).mean()}
    for level in LEVELS:
        metrics.update({f"{level}_{name}": value
                        for name, value in vqvae.vq_metrics(out[level]).items()})
    metrics["vq_loss"] = metrics["top_vq_loss"] + metrics["bottom_vq_loss"]
    return metrics["recon_mse"] + metrics["vq_loss"], (metrics, model_state)


@functools.partial(jax.jit, static_argnames="model")
def decode(model: VQVAE2, variables, top_codes: jax.Array | None,
           bottom_codes: jax.Array | None) -> jax.Array:
    """`VQVAE2.decode`, compiled: code grids (either may be None) -> images in (-1, 1)."""
    return model.apply(variables, top_codes, bottom_codes, method=VQVAE2.decode)
