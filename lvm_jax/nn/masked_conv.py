"""Autoregressive priors over grids of discrete codes: PixelCNN and Gated PixelCNN.

Both model p(c) = prod_{(i, j)} p(c_ij | c_<(i, j)) over a (H, W) grid of
integer codes in raster order (row by row, left to right): the logits at
(i, j) see only the codes strictly before (i, j). Images are NHWC. The codes
form a single channel, so the masks are purely spatial (no colour groups).

  * PixelCNN (van den Oord et al. 2016a) stacks masked convolutions. Its
    receptive field has a blind spot: a stack of 3x3 type-B convolutions never
    sees the row above beyond the reach of the first layer to the right.
  * Gated PixelCNN (van den Oord et al. 2016b, "Conditional Image Generation
    with PixelCNN Decoders") splits the receptive field into a vertical stack
    (rows above) and a horizontal stack (the current row up to the left
    neighbour), which removes the blind spot, and uses tanh * sigmoid gates.
  * ConditionalGatedPixelCNN: the Gated PixelCNN with every gated layer also
    given features of a coarser grid of codes (VQ-VAE-2's bottom prior, given
    the top codes; Razavi et al. 2019).

PixelSNAIL (lvm_jax.nn.pixelsnail) adds self-attention to the same gated layers.

Every module computes in its `dtype` attribute with float32 parameters; the
logits of both priors come out float32 (lvm_jax.nn.precision).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from lvm_jax.nn.precision import to_float32


def check_kernel_size(kernel_size: int) -> None:
    """Refuses a kernel size that has no centre tap: the masks need a positive odd size."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")


def conv_mask(kernel_size: int, mask_type: str) -> np.ndarray:
    """Spatial (k, k) mask of a raster-order masked convolution.

    Type A keeps the taps above the centre row and left of the centre on the
    centre row (the first layer: the current pixel is not yet known). Type B
    also keeps the centre (later layers: the centre holds features of earlier
    pixels only).
    """
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    check_kernel_size(kernel_size)
    c = kernel_size // 2
    mask = np.zeros((kernel_size, kernel_size), np.float32)
    mask[:c] = 1.0
    mask[c, : c + (mask_type == "B")] = 1.0
    return mask


def horizontal_mask(kernel_size: int, first: bool) -> np.ndarray:
    """(1, k//2 + 1) mask of the Gated PixelCNN's horizontal stack over columns j - k//2 .. j:
    the centre row of `conv_mask` up to the centre, type A in the first layer, else type B."""
    c = kernel_size // 2
    return conv_mask(kernel_size, "A" if first else "B")[c:c + 1, :c + 1]


class MaskedConv(nn.Module):
    """kernel_size x kernel_size 'SAME' convolution whose kernel is multiplied by `conv_mask`.

    (batch, H, W, C_in) -> (batch, H, W, features) in `dtype`.
    """

    features: int
    kernel_size: int
    mask_type: str
    dtype: DTypeLike = jnp.float32

    def __post_init__(self):
        conv_mask(self.kernel_size, self.mask_type)  # bad arguments fail at construction
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        mask = conv_mask(k, self.mask_type)[:, :, None, None]
        mask = np.broadcast_to(mask, (k, k, x.shape[-1], self.features))
        return nn.Conv(self.features, (k, k), padding="SAME", mask=mask, dtype=self.dtype)(x)


def _check_codes(codes: jax.Array, name: str = "codes") -> None:
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {codes.dtype}")
    if codes.ndim != 3:
        raise ValueError(f"{name} must have shape (batch, H, W), got {codes.shape}")


class _OutputHead(nn.Module):
    """ReLU, 1x1 conv to `hidden`, ReLU, 1x1 conv to the logits of `num_classes`."""

    hidden: int
    num_classes: int
    dtype: DTypeLike

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.hidden, (1, 1), dtype=self.dtype)(nn.relu(x))
        return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(nn.relu(x))


class _ResidualBlock(nn.Module):
    """x + 1x1(ReLU(B(ReLU(1x1(ReLU(x)))))), B a type-B masked convolution."""

    kernel_size: int
    dtype: DTypeLike

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        h = nn.Conv(features, (1, 1), dtype=self.dtype)(nn.relu(x))
        h = MaskedConv(features, self.kernel_size, "B", dtype=self.dtype)(nn.relu(h))
        return x + nn.Conv(features, (1, 1), dtype=self.dtype)(nn.relu(h))


class PixelCNN(nn.Module):
    """PixelCNN prior: codes (batch, H, W) int -> logits (batch, H, W, num_classes).

    Learned embedding to embed_dim channels, one 7x7 type-A masked conv,
    num_residual_blocks residual blocks around a type-B masked conv of
    `kernel_size`, and a head of two 1x1 convs (to `hidden`, then to
    num_classes). Logits are in nats: log_softmax gives log p(c_ij | c_<ij).
    """

    num_classes: int
    embed_dim: int = 64
    num_residual_blocks: int = 12
    hidden: int = 512
    kernel_size: int = 3
    dtype: DTypeLike = jnp.float32

    def setup(self):
        self.embed = nn.Embed(self.num_classes, self.embed_dim, dtype=self.dtype)
        self.input_conv = MaskedConv(self.embed_dim, 7, "A", dtype=self.dtype)
        self.blocks = [_ResidualBlock(self.kernel_size, self.dtype)
                       for _ in range(self.num_residual_blocks)]
        self.head = _OutputHead(self.hidden, self.num_classes, self.dtype)

    def __call__(self, codes: jax.Array) -> jax.Array:
        _check_codes(codes)
        return self.logits(self.embed(codes))

    def logits(self, x: jax.Array) -> jax.Array:
        """float32 logits from embedded codes x (batch, H, W, embed_dim); differentiable in x."""
        h = self.input_conv(x)
        for block in self.blocks:
            h = block(h)
        return to_float32(self.head(h))


def gate(x: jax.Array) -> jax.Array:
    """tanh(a) * sigmoid(b) for the two halves a, b of the channels."""
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.tanh(a) * jax.nn.sigmoid(b)


def _down_shift(x: jax.Array) -> jax.Array:
    """Moves a (batch, H, W, C) map down one row, zeros in row 0: row i gets row i - 1."""
    return jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


class _GatedLayer(nn.Module):
    """One gated layer (Fig. 2 of van den Oord et al. 2016b) on the stacks (v, h).

    Vertical stack: a (k//2 + 1) x k conv, so row i of the output sees the rows
    i - k//2 .. i of its input (the current row too: it never feeds the current
    row directly). Horizontal stack: a 1 x (k//2 + 1) conv over columns
    j - k//2 .. j (the first layer drops column j, type A), plus a 1x1 link
    from the vertical stack shifted down one row, so that it adds exactly the
    rows above. Both are gated; the horizontal output goes through a 1x1 conv
    and, after the first layer, a residual connection (in the first layer the
    input holds the current code, which a residual would leak).

    With `condition` (batch, H, W, C), features known before sampling starts
    (the conditional prior's upsampled top codes), each stack's pre-gate
    activations also get their own 1x1 conv of it (eq. 5 of the paper, with a
    spatial h). Dropout (rate `dropout_rate`, train only) acts on the gated
    horizontal features before the output 1x1 conv.
    """

    dim: int
    kernel_size: int
    first: bool
    dtype: DTypeLike
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, v: jax.Array, h: jax.Array, condition: jax.Array | None = None,
                 train: bool = False) -> tuple[jax.Array, jax.Array]:
        c = self.kernel_size // 2
        v_pre = nn.Conv(2 * self.dim, (c + 1, self.kernel_size), padding=((c, 0), (c, c)),
                        dtype=self.dtype)(v)
        mask = np.broadcast_to(horizontal_mask(self.kernel_size, self.first)[:, :, None, None],
                               (1, c + 1, h.shape[-1], 2 * self.dim))
        h_pre = nn.Conv(2 * self.dim, (1, c + 1), padding=((0, 0), (c, 0)), mask=mask,
                        dtype=self.dtype)(h)
        if condition is not None:
            # Named, so that the automatic names of the unconditioned layer's convs stay the same.
            v_pre = v_pre + nn.Conv(2 * self.dim, (1, 1), dtype=self.dtype,
                                    name="condition_vertical")(condition)
            h_pre = h_pre + nn.Conv(2 * self.dim, (1, 1), dtype=self.dtype,
                                    name="condition_horizontal")(condition)
        h_pre = h_pre + nn.Conv(2 * self.dim, (1, 1), dtype=self.dtype)(_down_shift(v_pre))
        gated = nn.Dropout(self.dropout_rate, deterministic=not train)(gate(h_pre))
        h_out = nn.Conv(self.dim, (1, 1), dtype=self.dtype)(gated)
        return gate(v_pre), h_out if self.first else h + h_out


class GatedPixelCNN(nn.Module):
    """Gated PixelCNN prior: codes (batch, H, W) int -> logits (batch, H, W, num_classes).

    Learned embedding to `dim` channels feeding both stacks, num_layers gated
    layers of `kernel_size`, and a head of two 1x1 convs (to `hidden`, then to
    num_classes) on the horizontal stack. With kernel size k and L layers the
    logits at (i, j) see every earlier code in rows i - L*(k//2) - 1 .. i and
    columns j - L*(k//2) .. j + L*(k//2) (3x3 kernels and 7 layers cover an 8x8 grid).
    """

    num_classes: int
    dim: int = 128
    num_layers: int = 15
    kernel_size: int = 3
    hidden: int = 512
    dtype: DTypeLike = jnp.float32

    def __post_init__(self):
        check_kernel_size(self.kernel_size)
        super().__post_init__()

    def setup(self):
        self.embed = nn.Embed(self.num_classes, self.dim, dtype=self.dtype)
        self.layers = [_GatedLayer(self.dim, self.kernel_size, first=(i == 0), dtype=self.dtype)
                       for i in range(self.num_layers)]
        self.head = _OutputHead(self.hidden, self.num_classes, self.dtype)

    def __call__(self, codes: jax.Array) -> jax.Array:
        _check_codes(codes)
        return self.logits(self.embed(codes))

    def logits(self, x: jax.Array) -> jax.Array:
        """float32 logits from embedded codes x (batch, H, W, dim); differentiable in x."""
        return _gated_logits(self.layers, self.head, x)


def _gated_logits(layers, head, x: jax.Array, condition: jax.Array | None = None) -> jax.Array:
    """float32 logits of the gated layers and head on embedded codes x (batch, H, W, dim), each
    layer also given `condition` (batch, H, W, C) when there is one."""
    v = h = x
    for layer in layers:
        v, h = layer(v, h, condition)
    return to_float32(head(h))


def upsampling_factors(shape: tuple[int, ...], condition_shape: tuple[int, ...]) -> tuple[int, int]:
    """(fy, fx) integers with a (batch, H, W) grid = (fy * h, fx * w) of a (batch, h, w) condition.

    Raises a one-line ValueError when the batch sizes differ or a factor is not an integer.
    """
    (batch, height, width), (c_batch, c_height, c_width) = shape, condition_shape
    if batch != c_batch or height % c_height or width % c_width:
        raise ValueError(f"condition_codes {tuple(condition_shape)} must have the batch of codes "
                         f"{tuple(shape)} and a grid whose size divides theirs by an integer")
    return height // c_height, width // c_width


class _ConditioningStack(nn.Module):
    """Top codes (batch, h, w) int -> features (batch, h, w, dim): an embedding (a one-hot
    times a matrix) and `num_blocks` residual blocks x + 1x1(ReLU(3x3(ReLU(x)))), unmasked: the
    top codes are all known before the bottom ones are drawn."""

    num_classes: int
    dim: int
    num_blocks: int
    dtype: DTypeLike

    @nn.compact
    def __call__(self, codes: jax.Array) -> jax.Array:
        x = nn.Embed(self.num_classes, self.dim, dtype=self.dtype)(codes)
        for _ in range(self.num_blocks):
            h = nn.Conv(self.dim, (3, 3), padding="SAME", dtype=self.dtype)(nn.relu(x))
            x = x + nn.Conv(self.dim, (1, 1), dtype=self.dtype)(nn.relu(h))
        return x


class ConditionalGatedPixelCNN(nn.Module):
    """Gated PixelCNN conditioned on a coarser grid of codes: VQ-VAE-2's bottom prior.

    codes (batch, H, W) int, condition_codes (batch, h, w) int -> logits
    (batch, H, W, num_classes), the logits at (i, j) depending on the codes
    before (i, j) in raster order and on all of condition_codes. The
    conditioning stack (`_ConditioningStack`, condition_dim channels,
    num_condition_blocks blocks) runs once on condition_codes; its features
    are upsampled to (H, W) by repeating each (nearest neighbour; H / h and
    W / w must be integers) and every gated layer adds its own 1x1 conv of
    them to both stacks' pre-gate activations. The rest is GatedPixelCNN's:
    the same layers, receptive field and head.
    """

    num_classes: int
    num_condition_classes: int
    dim: int = 128
    num_layers: int = 15
    kernel_size: int = 3
    hidden: int = 512
    condition_dim: int = 64
    num_condition_blocks: int = 2
    dtype: DTypeLike = jnp.float32

    def __post_init__(self):
        check_kernel_size(self.kernel_size)
        super().__post_init__()

    def setup(self):
        self.embed = nn.Embed(self.num_classes, self.dim, dtype=self.dtype)
        self.condition_stack = _ConditioningStack(self.num_condition_classes, self.condition_dim,
                                                  self.num_condition_blocks, self.dtype)
        self.layers = [_GatedLayer(self.dim, self.kernel_size, first=(i == 0), dtype=self.dtype)
                       for i in range(self.num_layers)]
        self.head = _OutputHead(self.hidden, self.num_classes, self.dtype)

    def __call__(self, codes: jax.Array, condition_codes: jax.Array) -> jax.Array:
        _check_codes(codes)
        _check_codes(condition_codes, "condition_codes")
        upsampling_factors(codes.shape, condition_codes.shape)  # the batch sizes too
        return self.logits(self.embed(codes), self.condition(condition_codes, codes.shape[1:]))

    def condition(self, condition_codes: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """The conditioning features (batch, H, W, condition_dim) of the codes' grid (H, W)."""
        fy, fx = upsampling_factors((condition_codes.shape[0], *grid), condition_codes.shape)
        features = self.condition_stack(condition_codes)
        return jnp.repeat(jnp.repeat(features, fy, axis=1), fx, axis=2)

    def logits(self, x: jax.Array, condition: jax.Array) -> jax.Array:
        """float32 logits from embedded codes x (batch, H, W, dim) and conditioning features
        (batch, H, W, condition_dim); differentiable in both."""
        return _gated_logits(self.layers, self.head, x, condition)
