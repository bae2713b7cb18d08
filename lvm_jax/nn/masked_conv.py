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

Each prior and each layer also computes itself one position at a time, for
the cached sampler (lvm_jax.nn.sampling): `init_cache` makes the "cache"
collection (the input rows of every masked convolution, the vertical stack's
link into the next row, the conditioning terms), `step` computes the outputs
at (i, j), `end_position` writes the code drawn there into the type-A layer's
input rows and `end_row` does the work that waits for a whole row (the
vertical stack). All four are applied with mutable=["cache"].

Every module computes in its `dtype` attribute with float32 parameters; the
logits of both priors come out float32 (lvm_jax.nn.precision).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from lvm_jax.nn import row_cache
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

    (batch, H, W, C_in) -> (batch, H, W, features) in `dtype`. One position at a
    time (`init_cache`, `write`, `step`, `end_row`), it caches the last k//2 + 1
    rows of its input: the rows its mask reads.
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
        return nn.Conv(self.features, (k, k), padding="SAME", mask=mask, dtype=self.dtype,
                       name="conv")(x)

    def init_cache(self, num: int, width: int, channels: int) -> None:
        """Empty input rows for `num` grids of `width` columns of `channels` channels."""
        c = self.kernel_size // 2
        self.put_variable("cache", "rows",
                          row_cache.zeros(num, c + 1, width, (c, c), channels, self.dtype))
        # Masked and cut once, not at every step.
        self.put_variable("cache", "matrix", row_cache.conv_matrix(
            self.variables["params"]["conv"], self.dtype,
            conv_mask(self.kernel_size, self.mask_type), rows=c + 1))

    def write(self, x: jax.Array, j) -> None:
        """Writes the input x (num, C_in) at column j of the current row."""
        c = self.kernel_size // 2
        self.put_variable("cache", "rows",
                          row_cache.write(self.get_variable("cache", "rows"), j + c, x))

    def step(self, x: jax.Array | None, j) -> jax.Array:
        """The output (num, features) at column j of the current row.

        x (num, C_in) is the input at column j, written first, for type B; None for
        type A, whose output at j reads the columns before j only, which `write`
        put there.
        """
        if self.mask_type == "B":
            self.write(x, j)
        return row_cache.apply_matrix(
            self.get_variable("cache", "matrix"),
            row_cache.window(self.get_variable("cache", "rows"), j, self.kernel_size))

    def end_row(self) -> None:
        """The current row is complete: starts the next."""
        self.put_variable("cache", "rows", row_cache.push_row(self.get_variable("cache", "rows")))


def check_codes(codes: jax.Array, name: str = "codes") -> None:
    """Refuses codes that are not an integer (batch, H, W) array, in one line naming them."""
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {codes.dtype}")
    if codes.ndim != 3:
        raise ValueError(f"{name} must have shape (batch, H, W), got {codes.shape}")


def code_at(codes: jax.Array, i, j) -> jax.Array:
    """(num,): the codes at (i, j) of codes (num, H, W)."""
    return jax.lax.dynamic_index_in_dim(code_row(codes, i), j, 1, keepdims=False)


def code_row(codes: jax.Array, i) -> jax.Array:
    """(num, W): row i of codes (num, H, W)."""
    return jax.lax.dynamic_index_in_dim(codes, i, 1, keepdims=False)


class OutputHead(nn.Module):
    """ReLU, 1x1 conv to `hidden`, ReLU, 1x1 conv to the logits of `num_classes`, in `dtype`
    (the priors cast them to float32)."""

    hidden: int
    num_classes: int
    dtype: DTypeLike

    def setup(self):
        self.to_hidden = nn.Conv(self.hidden, (1, 1), dtype=self.dtype)
        self.to_logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(batch, H, W, C) -> (batch, H, W, num_classes)."""
        return self.to_logits(nn.relu(self.to_hidden(nn.relu(x))))

    def at(self, x: jax.Array) -> jax.Array:
        """The logits (num, num_classes) of one position's features x (num, C)."""
        x = row_cache.conv_at(self.to_hidden.variables["params"], nn.relu(x), self.dtype)
        return row_cache.conv_at(self.to_logits.variables["params"], nn.relu(x), self.dtype)


class ResidualBlock(nn.Module):
    """x + 1x1(ReLU(B(ReLU(1x1(ReLU(x)))))), B a type-B masked convolution; x has `features`
    channels."""

    features: int
    kernel_size: int
    dtype: DTypeLike

    def setup(self):
        self.conv_in = nn.Conv(self.features, (1, 1), dtype=self.dtype)
        self.masked = MaskedConv(self.features, self.kernel_size, "B", dtype=self.dtype)
        self.conv_out = nn.Conv(self.features, (1, 1), dtype=self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.masked(nn.relu(self.conv_in(nn.relu(x))))
        return x + self.conv_out(nn.relu(h))

    def init_cache(self, num: int, width: int) -> None:
        self.masked.init_cache(num, width, self.features)

    def step(self, x: jax.Array, j) -> jax.Array:
        """The output (num, features) at column j of the current row from the input there."""
        h = row_cache.conv_at(self.conv_in.variables["params"], nn.relu(x), self.dtype)
        h = self.masked.step(nn.relu(h), j)
        return x + row_cache.conv_at(self.conv_out.variables["params"], nn.relu(h), self.dtype)

    def end_row(self) -> None:
        self.masked.end_row()


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
        self.blocks = [ResidualBlock(self.embed_dim, self.kernel_size, self.dtype)
                       for _ in range(self.num_residual_blocks)]
        self.head = OutputHead(self.hidden, self.num_classes, self.dtype)

    def __call__(self, codes: jax.Array) -> jax.Array:
        check_codes(codes)
        return self.logits(self.embed(codes))

    def logits(self, x: jax.Array) -> jax.Array:
        """float32 logits from embedded codes x (batch, H, W, embed_dim); differentiable in x."""
        h = self.input_conv(x)
        for block in self.blocks:
            h = block(h)
        return to_float32(self.head(h))

    def init_cache(self, codes: jax.Array) -> None:
        """Empty caches for grids shaped like codes (num, H, W)."""
        num, _, width = codes.shape
        self.input_conv.init_cache(num, width, self.embed_dim)
        for block in self.blocks:
            block.init_cache(num, width)

    def step(self, codes: jax.Array, i, j, stop: int | None = None) -> jax.Array:
        """float32 logits (num, num_classes) at (i, j), the codes before it written by
        `end_position` (`codes` and `stop`, the attention's bound, are unused)."""
        x = self.input_conv.step(None, j)
        for block in self.blocks:
            x = block.step(x, j)
        return to_float32(self.head.at(x))

    def end_position(self, codes: jax.Array, i, j) -> None:
        """The code at (i, j) of codes (num, H, W) is drawn: its embedding enters the input
        conv's rows."""
        self.input_conv.write(self.embed(code_at(codes, i, j)), j)

    def end_row(self, codes: jax.Array, i) -> None:
        """Row i is complete: every masked conv starts the next."""
        self.input_conv.end_row()
        for block in self.blocks:
            block.end_row()


def gate(x: jax.Array) -> jax.Array:
    """tanh(a) * sigmoid(b) for the two halves a, b of the channels."""
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.tanh(a) * jax.nn.sigmoid(b)


def _down_shift(x: jax.Array) -> jax.Array:
    """Moves a (batch, H, W, C) map down one row, zeros in row 0: row i gets row i - 1."""
    return jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


class GatedLayer(nn.Module):
    """One gated layer (Fig. 2 of van den Oord et al. 2016b) on the stacks (v, h), each of
    `dim` channels.

    Vertical stack: a (k//2 + 1) x k conv, so row i of the output sees the rows
    i - k//2 .. i of its input (the current row too: it never feeds the current
    row directly). Horizontal stack: a 1 x (k//2 + 1) conv over columns
    j - k//2 .. j (the first layer drops column j, type A), plus a 1x1 link
    from the vertical stack shifted down one row, so that it adds exactly the
    rows above. Both are gated; the horizontal output goes through a 1x1 conv
    and, after the first layer, a residual connection (in the first layer the
    input holds the current code, which a residual would leak).

    When `conditioned`, each stack's pre-gate activations also get their own 1x1
    conv of `condition` (batch, H, W, C), features known before sampling starts
    (the conditional prior's upsampled top codes; eq. 5 of the paper, with a
    spatial h). Dropout (rate `dropout_rate`, train only) acts on the gated
    horizontal features before the output 1x1 conv.

    One position at a time, it caches the current row of the horizontal
    stack's input, the last k//2 + 1 rows of the vertical stack's input, the
    link into the current row, and the conditioning terms of the whole grid.
    """

    dim: int
    kernel_size: int
    first: bool
    dtype: DTypeLike
    dropout_rate: float = 0.0
    conditioned: bool = False

    def setup(self):
        c, k, features = self.kernel_size // 2, self.kernel_size, 2 * self.dim
        self.vertical = nn.Conv(features, (c + 1, k), padding=((c, 0), (c, c)), dtype=self.dtype)
        mask = np.broadcast_to(horizontal_mask(k, self.first)[:, :, None, None],
                               (1, c + 1, self.dim, features))
        self.horizontal = nn.Conv(features, (1, c + 1), padding=((0, 0), (c, 0)), mask=mask,
                                  dtype=self.dtype)
        if self.conditioned:
            self.condition_vertical = nn.Conv(features, (1, 1), dtype=self.dtype)
            self.condition_horizontal = nn.Conv(features, (1, 1), dtype=self.dtype)
        self.link = nn.Conv(features, (1, 1), dtype=self.dtype)
        self.dropout = nn.Dropout(self.dropout_rate)
        self.out = nn.Conv(self.dim, (1, 1), dtype=self.dtype)

    def __call__(self, v: jax.Array, h: jax.Array, condition: jax.Array | None = None,
                 train: bool = False) -> tuple[jax.Array, jax.Array]:
        """(v, h) (batch, H, W, dim) each -> the next layer's (v, h)."""
        v_pre, h_pre = self.vertical(v), self.horizontal(h)
        if self.conditioned:
            v_pre = v_pre + self.condition_vertical(condition)
            h_pre = h_pre + self.condition_horizontal(condition)
        h_pre = h_pre + self.link(_down_shift(v_pre))
        h_out = self.out(self.dropout(gate(h_pre), deterministic=not train))
        return gate(v_pre), h_out if self.first else h + h_out

    def _conv_at(self, conv: nn.Conv, x: jax.Array):
        return row_cache.conv_at(conv.variables["params"], x, self.dtype)

    def init_cache(self, num: int, width: int, condition: jax.Array | None = None) -> None:
        """Empty caches for `num` grids of `width` columns; the conditioning terms of
        `condition` (num, H, W, C) when `conditioned`."""
        c = self.kernel_size // 2
        self.put_variable("cache", "h_rows",
                          row_cache.zeros(num, 1, width, (c, 0), self.dim, self.dtype))
        self.put_variable("cache", "v_rows",
                          row_cache.zeros(num, c + 1, width, (c, c), self.dim, self.dtype))
        # Row 0's link sees the zero row that the down-shift brings in.
        zeros = jnp.zeros((num, width, 2 * self.dim), self.dtype)
        self.put_variable("cache", "link", self._conv_at(self.link, zeros))
        # Masked once, not at every step.
        self.put_variable("cache", "horizontal", row_cache.conv_matrix(
            self.horizontal.variables["params"], self.dtype,
            horizontal_mask(self.kernel_size, self.first)))
        if self.conditioned:
            self.put_variable("cache", "condition_vertical",
                              self._conv_at(self.condition_vertical, condition))
            self.put_variable("cache", "condition_horizontal",
                              self._conv_at(self.condition_horizontal, condition))

    def write(self, h: jax.Array, j) -> None:
        """Writes the horizontal input h (num, dim) at column j of the current row."""
        c = self.kernel_size // 2
        self.put_variable("cache", "h_rows",
                          row_cache.write(self.get_variable("cache", "h_rows"), j + c, h))

    def step(self, h: jax.Array | None, i, j) -> jax.Array:
        """The horizontal stack's output (num, dim) at (i, j) of the current row i.

        h (num, dim) is the horizontal input at (i, j), written first; None in the
        first layer (type A), which reads the columns before j only, which `write`
        put there.
        """
        c = self.kernel_size // 2
        if not self.first:
            self.write(h, j)
        link = self.get_variable("cache", "link")
        h_pre = (row_cache.apply_matrix(self.get_variable("cache", "horizontal"),
                                        row_cache.window(self.get_variable("cache", "h_rows"),
                                                         j, c + 1))
                 + jax.lax.dynamic_index_in_dim(link, j, 1, keepdims=False))
        if self.conditioned:
            h_pre = h_pre + self.get_variable("cache", "condition_horizontal")[:, i, j]
        h_out = self._conv_at(self.out, gate(h_pre))
        return h_out if self.first else h + h_out

    def end_row(self, v: jax.Array, i) -> jax.Array:
        """The vertical stack over the completed row i, from its input v (num, W, dim), which
        prepares the link into row i + 1 and empties the horizontal row; returns the next
        layer's vertical input over row i, (num, W, dim)."""
        c = self.kernel_size // 2
        rows = row_cache.write_row(row_cache.push_row(self.get_variable("cache", "v_rows")), v, c)
        self.put_variable("cache", "v_rows", rows)
        v_pre = self._conv_at(self.vertical, row_cache.row_windows(rows, self.kernel_size))
        if self.conditioned:
            v_pre = v_pre + self.get_variable("cache", "condition_vertical")[:, i]
        self.put_variable("cache", "link", self._conv_at(self.link, v_pre))
        self.put_variable("cache", "h_rows",
                          row_cache.push_row(self.get_variable("cache", "h_rows")))
        return gate(v_pre)


class GatedSteps:
    """`step`, `end_position` and `end_row` of a prior made of gated layers: a module with an
    `embed` (nn.Embed), a list of `layers` (GatedLayer, the first type A) and a `head`
    (OutputHead)."""

    def step(self, codes: jax.Array, i, j, stop: int | None = None) -> jax.Array:
        """float32 logits (num, num_classes) at (i, j), the codes before it written by
        `end_position` (`codes` and `stop`, the attention's bound, are unused)."""
        h = None
        for layer in self.layers:
            h = layer.step(h, i, j)
        return to_float32(self.head.at(h))

    def end_position(self, codes: jax.Array, i, j) -> None:
        """The code at (i, j) of codes (num, H, W) is drawn: its embedding enters the first
        layer's horizontal row."""
        self.layers[0].write(self.embed(code_at(codes, i, j)), j)

    def end_row(self, codes: jax.Array, i) -> None:
        """Row i of codes (num, H, W) is complete: every layer runs its vertical stack over it,
        in order."""
        v = self.embed(code_row(codes, i))
        for layer in self.layers:
            v = layer.end_row(v, i)


class GatedPixelCNN(GatedSteps, nn.Module):
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
        self.layers = [GatedLayer(self.dim, self.kernel_size, first=(i == 0), dtype=self.dtype)
                       for i in range(self.num_layers)]
        self.head = OutputHead(self.hidden, self.num_classes, self.dtype)

    def __call__(self, codes: jax.Array) -> jax.Array:
        check_codes(codes)
        return self.logits(self.embed(codes))

    def logits(self, x: jax.Array) -> jax.Array:
        """float32 logits from embedded codes x (batch, H, W, dim); differentiable in x."""
        return _gated_logits(self.layers, self.head, x)

    def init_cache(self, codes: jax.Array) -> None:
        """Empty caches for grids shaped like codes (num, H, W)."""
        for layer in self.layers:
            layer.init_cache(codes.shape[0], codes.shape[2])


def _gated_logits(layers, head, x: jax.Array, condition: jax.Array | None = None) -> jax.Array:
    """float32 logits of the gated layers and head on embedded codes x (batch, H, W, dim), each
    layer also given `condition` (batch, H, W, C) when there is one."""
    v = h = x
    for layer in layers:
        v, h = layer(v, h, condition)
    return to_float32(head(h))


def upsampling_factors(shape: tuple[int, ...], condition_shape: tuple[int, ...],
                       name: str = "condition_codes") -> tuple[int, int]:
    """(fy, fx) integers with a (batch, H, W) grid = (fy * h, fx * w) of a (batch, h, w) condition.

    Raises a one-line ValueError naming the condition `name` when the batch sizes differ,
    a side is empty or a factor is not an integer.
    """
    (batch, height, width), (c_batch, c_height, c_width) = shape, condition_shape
    if (batch != c_batch or min(c_height, c_width) < 1 or height % c_height
            or width % c_width):
        raise ValueError(f"{name} {tuple(condition_shape)} must have the batch of codes "
                         f"{tuple(shape)} and a non-empty grid whose size divides theirs by "
                         f"an integer")
    return height // c_height, width // c_width


class ConditioningStack(nn.Module):
    """Top codes (batch, h, w) int -> features (batch, h, w, dim): an embedding (a one-hot
    times a matrix) and `num_blocks` residual blocks x + 1x1(ReLU(3x3(ReLU(x)))), unmasked: the
    top codes are all known before the bottom ones are drawn."""

    num_classes: int
    dim: int
    num_blocks: int
    dtype: DTypeLike

    def setup(self):
        self.embed = nn.Embed(self.num_classes, self.dim, dtype=self.dtype)
        self.convs_3x3 = [nn.Conv(self.dim, (3, 3), padding="SAME", dtype=self.dtype)
                          for _ in range(self.num_blocks)]
        self.convs_1x1 = [nn.Conv(self.dim, (1, 1), dtype=self.dtype)
                          for _ in range(self.num_blocks)]

    def __call__(self, codes: jax.Array) -> jax.Array:
        x = self.embed(codes)
        for conv_3x3, conv_1x1 in zip(self.convs_3x3, self.convs_1x1):
            x = x + conv_1x1(nn.relu(conv_3x3(nn.relu(x))))
        return x


class ConditionalGatedPixelCNN(GatedSteps, nn.Module):
    """Gated PixelCNN conditioned on a coarser grid of codes: VQ-VAE-2's bottom prior.

    codes (batch, H, W) int, condition_codes (batch, h, w) int -> logits
    (batch, H, W, num_classes), the logits at (i, j) depending on the codes
    before (i, j) in raster order and on all of condition_codes. The
    conditioning stack (`ConditioningStack`, condition_dim channels,
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
        self.condition_stack = ConditioningStack(self.num_condition_classes, self.condition_dim,
                                                 self.num_condition_blocks, self.dtype)
        self.layers = [GatedLayer(self.dim, self.kernel_size, first=(i == 0), dtype=self.dtype,
                                  conditioned=True)
                       for i in range(self.num_layers)]
        self.head = OutputHead(self.hidden, self.num_classes, self.dtype)

    def __call__(self, codes: jax.Array, condition_codes: jax.Array) -> jax.Array:
        check_codes(codes)
        check_codes(condition_codes, "condition_codes")
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

    def check_context(self, shape: tuple[int, int, int], condition_codes,
                      name: str = "condition_codes") -> None:
        """Refuses, in one line naming them `name`, condition codes that are not an integer
        array (batch, h, w) of values in [0, num_condition_classes) whose grid divides the
        codes' `shape` (num, H, W) (their values only where known: not under a trace)."""
        if not hasattr(condition_codes, "dtype"):
            raise TypeError(f"{name} must be an integer array, got "
                            f"{type(condition_codes).__name__}")
        check_codes(condition_codes, name)
        upsampling_factors(shape, condition_codes.shape, name)
        if isinstance(condition_codes, jax.core.Tracer):
            return
        values = np.asarray(condition_codes)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= self.num_condition_classes:
            raise ValueError(f"{name} must lie in [0, {self.num_condition_classes}) "
                             f"(num_condition_classes), got values in [{low}, {high}]")

    def init_cache(self, codes: jax.Array, condition_codes: jax.Array) -> None:
        """Empty caches for grids shaped like codes (num, H, W), and every layer's conditioning
        terms: the conditioning stack runs here, once."""
        features = self.condition(condition_codes, codes.shape[1:])
        for layer in self.layers:
            layer.init_cache(codes.shape[0], codes.shape[2], features)
