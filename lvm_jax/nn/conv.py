"""Convolutional encoders and decoders of the image models (REFERENCE.md §2), NHWC.

Every module computes in its `dtype` attribute and keeps float32 parameters
(lvm_jax.nn.precision); its outputs are in `dtype`.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax.typing import DTypeLike

# PyTorch's padding=1 on both sides; flax's "SAME" pads (0, 1) for stride 2,
# which shifts the sampling grid by one pixel.
PAD1 = ((1, 1), (1, 1))

# ConvTranspose(kernel 4, stride 2, padding 1) scatters x[i] @ w[a] onto output
# row 2i - 1 + a (and likewise along columns). Gathered per output row 2m + r:
#   r = 0: x[m - 1] @ w[3] + x[m] @ w[1]
#   r = 1: x[m] @ w[2] + x[m + 1] @ w[0]
# so each output phase (r, s) is a 2x2 convolution of x with the kernel taps
# w[3 - r::-2, 3 - s::-2], padded by one pixel on the side its window reaches
# past the edge: 16 multiply-adds per input pixel and channel pair in all,
# exactly the transposed convolution's, and no zero-dilated input.
_PHASE_PADDING = ((1, 0), (0, 1))
_NHWC = ("NHWC", "HWIO", "NHWC")


def depth_to_space(x: jax.Array, block: int) -> jax.Array:
    """(B, H, W, block*block*C) -> (B, H*block, W*block, C), channels ordered (row, col, C)."""
    b, h, w, c = x.shape
    c //= block * block
    x = x.reshape(b, h, w, block, block, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * block, w * block, c)


def _stride2_conv(y: jax.Array, kernel: jax.Array) -> jax.Array:
    """(B, 2H, 2W, Cout) -> (B, H, W, Cin): Conv(4x4, stride 2, padding 1) with the
    (4, 4, Cin, Cout) kernel read as (H, W, O, I), the adjoint in x of
    `conv_transpose_4x4_s2(x, kernel)`."""
    return jax.lax.conv_general_dilated(y, kernel, window_strides=(2, 2), padding=PAD1,
                                        dimension_numbers=("NHWC", "HWOI", "NHWC"))


@jax.custom_vjp
def conv_transpose_4x4_s2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """PyTorch's ConvTranspose2d(kernel_size=4, stride=2, padding=1) without bias.

    x (B, H, W, Cin), kernel (4, 4, Cin, Cout) -> (B, 2H, 2W, Cout), where
    `kernel[a, b]` multiplies the input at offset (a, b) of the scatter view
    (PyTorch's weight[:, :, a, b]). Forward: four 2x2 convolutions, one per
    output phase, interleaved by depth-to-space. Backward: the input gradient is
    one stride-2 convolution of the output gradient and the kernel gradient its
    kernel gradient, each with the forward's multiply-adds; XLA:CPU runs these
    faster than the transposes of the four phase convolutions
    (benchmarks/conv_transpose.py). Reverse-mode differentiable only (a custom VJP).
    """
    phases = [jax.lax.conv_general_dilated(
        x, kernel[3 - r::-2, 3 - s::-2], window_strides=(1, 1),
        padding=(_PHASE_PADDING[r], _PHASE_PADDING[s]), dimension_numbers=_NHWC)
        for r in range(2) for s in range(2)]
    return depth_to_space(jnp.concatenate(phases, axis=-1), 2)


def _conv_transpose_forward(x, kernel):
    return conv_transpose_4x4_s2(x, kernel), (x, kernel)


def _conv_transpose_backward(residuals, y_grad):
    x, kernel = residuals
    _, kernel_vjp = jax.vjp(lambda k: _stride2_conv(y_grad, k), kernel)
    return _stride2_conv(y_grad, kernel), kernel_vjp(x)[0]


conv_transpose_4x4_s2.defvjp(_conv_transpose_forward, _conv_transpose_backward)


class SubPixelConvTranspose(nn.Module):
    """Exactly PyTorch's ConvTranspose2d(kernel_size=4, stride=2, padding=1), H, W -> 2H, 2W.

    Same parameters (a (4, 4, Cin, Cout) kernel in PyTorch's tap order and a
    bias) and the same function, computed per output sub-pixel phase by
    `conv_transpose_4x4_s2` with the FLOPs of the transposed convolution itself.
    Parameters are float32; input, kernel and bias are cast to `dtype` for the
    computation, as in flax's nn.ConvTranspose.
    """

    features: int
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (4, 4, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv_transpose_4x4_s2(x, kernel) + bias


class ConvEncoder(nn.Module):
    """32x32 images -> features (batch, 4*4*256) in `dtype`, the encoder trunk of
    REFERENCE.md §2."""

    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(32, (3, 3), padding=PAD1, dtype=self.dtype)(x))
        for width in (64, 128, 256):
            x = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2), padding=PAD1, dtype=self.dtype)(x))
        return x.reshape(x.shape[0], -1)


class ConvDecoder(nn.Module):
    """Latents (batch, L) -> (batch, 32, 32, out_channels) in `dtype`, the decoder of
    REFERENCE.md §2.

    `upsample(features, dtype=dtype)` builds each ConvTranspose(4x4, stride 2,
    padding 1) layer; the benchmarks swap in other forms of it to compare.
    """

    out_channels: int
    upsample: Callable[..., nn.Module] = SubPixelConvTranspose
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        h = nn.relu(nn.Dense(4 * 4 * 128, dtype=self.dtype)(z)).reshape(z.shape[0], 4, 4, 128)
        for width in (128, 64, 32):
            h = nn.relu(self.upsample(width, dtype=self.dtype)(h))
        return nn.Conv(self.out_channels, (3, 3), padding=PAD1, dtype=self.dtype)(h)


def _batch_norm(train: bool, dtype: DTypeLike) -> nn.BatchNorm:
    """BatchNorm over (batch, H, W) per channel; batch statistics in training, running ones after.

    Momentum 0.9 is PyTorch's BatchNorm2d default (its 0.1 weights the new
    batch). Flax's default 0.99 would leave the running statistics near their
    initial values after the few hundred steps of a short run, and evaluation
    uses them. Flax computes the statistics in float32 and keeps the running
    ones float32 whatever `dtype`, the dtype of the normalised output.
    """
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)


class ResidualBlock(nn.Module):
    """x + Conv1x1(ReLU(BN(Conv3x3(ReLU(BN(x)))))), the VQ-VAE block of REFERENCE.md §4.

    (batch, H, W, C) -> (batch, H, W, C) in `dtype`. `train` selects batch
    statistics and updates the running ones (collection 'batch_stats', apply
    with mutable=['batch_stats']).
    """

    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # The skip path in `dtype` too: a float32 input (the quantized latents) would
        # otherwise promote the whole residual stream to float32.
        x = jnp.asarray(x, self.dtype)
        features = x.shape[-1]
        h = nn.Conv(features, (3, 3), padding=PAD1, dtype=self.dtype)(
            nn.relu(_batch_norm(train, self.dtype)(x)))
        h = nn.Conv(features, (1, 1), dtype=self.dtype)(nn.relu(_batch_norm(train, self.dtype)(h)))
        return x + h


class VQEncoder(nn.Module):
    """Images (batch, H, W, C) -> z_e (batch, H/4, W/4, features) in `dtype`, the VQ-VAE
    encoder of REFERENCE.md §4: Conv 4x4 s2, BN, ReLU, Conv 4x4 s2, two ResidualBlocks."""

    features: int = 256
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(self.features, (4, 4), strides=(2, 2), padding=PAD1, dtype=self.dtype)(x)
        x = nn.Conv(self.features, (4, 4), strides=(2, 2), padding=PAD1, dtype=self.dtype)(
            nn.relu(_batch_norm(train, self.dtype)(x)))
        for _ in range(2):
            x = ResidualBlock(dtype=self.dtype)(x, train)
        return x


class VQDecoder(nn.Module):
    """z_q (batch, h, w, D) -> images (batch, 4h, 4w, out_channels) in (-1, 1) in `dtype`,
    the VQ-VAE decoder of REFERENCE.md §4: two ResidualBlocks, BN, ReLU, ConvTranspose
    4x4 s2 to `features`, BN, ReLU, ConvTranspose 4x4 s2 to out_channels, tanh.

    `upsample(features, dtype=dtype)` builds each ConvTranspose, as in ConvDecoder.
    """

    features: int = 256
    out_channels: int = 3
    upsample: Callable[..., nn.Module] = SubPixelConvTranspose
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool) -> jax.Array:
        for _ in range(2):
            z = ResidualBlock(dtype=self.dtype)(z, train)
        h = self.upsample(self.features, dtype=self.dtype)(
            nn.relu(_batch_norm(train, self.dtype)(z)))
        h = self.upsample(self.out_channels, dtype=self.dtype)(
            nn.relu(_batch_norm(train, self.dtype)(h)))
        return jnp.tanh(h)


def _num_halvings(factor: int) -> int:
    """log2 of a resampling factor of 2 or 4, the strides the VQ-VAE-2's levels use."""
    if factor not in (2, 4):
        raise ValueError(f"the resampling factor must be 2 or 4, got {factor}")
    return factor.bit_length() - 1


class StridedEncoder(nn.Module):
    """(batch, H, W, C) -> (batch, H/factor, W/factor, features or out_features) in `dtype`,
    one level of the VQ-VAE-2 encoder (rosinality's `Encoder`, with this package's
    BatchNorm ResidualBlocks): Conv 4x4 s2 per halving (the first to features/2 when there
    are two), Conv 3x3, ResidualBlocks, BN, ReLU, then, if `out_features` is set, the 1x1
    conv to the quantizer's code dimension.
    """

    features: int
    factor: int = 4
    num_residual_blocks: int = 2
    out_features: int | None = None
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        halvings = _num_halvings(self.factor)
        for i in range(halvings):
            width = self.features // 2 if i < halvings - 1 else self.features
            x = nn.relu(nn.Conv(width, (4, 4), strides=(2, 2), padding=PAD1, dtype=self.dtype)(x))
        x = nn.Conv(self.features, (3, 3), padding=PAD1, dtype=self.dtype)(x)
        for _ in range(self.num_residual_blocks):
            x = ResidualBlock(dtype=self.dtype)(x, train)
        x = nn.relu(_batch_norm(train, self.dtype)(x))
        if self.out_features is not None:
            x = nn.Conv(self.out_features, (1, 1), dtype=self.dtype)(x)
        return x


class StridedDecoder(nn.Module):
    """(batch, h, w, D) -> (batch, h*factor, w*factor, out_channels) in `dtype`, one level of
    the VQ-VAE-2 decoder (rosinality's `Decoder`): Conv 3x3 to `features`, ResidualBlocks,
    then per doubling BN, ReLU and a ConvTranspose 4x4 s2 (to features/2, the last to
    out_channels); tanh on the output with `tanh=True` (images in (-1, 1)).
    """

    features: int
    out_channels: int
    factor: int = 4
    num_residual_blocks: int = 2
    tanh: bool = False
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool) -> jax.Array:
        doublings = _num_halvings(self.factor)
        h = nn.Conv(self.features, (3, 3), padding=PAD1, dtype=self.dtype)(z)
        for _ in range(self.num_residual_blocks):
            h = ResidualBlock(dtype=self.dtype)(h, train)
        for i in range(doublings):
            width = self.out_channels if i == doublings - 1 else self.features // 2
            h = SubPixelConvTranspose(width, dtype=self.dtype)(
                nn.relu(_batch_norm(train, self.dtype)(h)))
        return jnp.tanh(h) if self.tanh else h
