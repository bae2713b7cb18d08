"""PixelSNAIL (Chen et al. 2018): gated masked convolutions plus causal self-attention.

VQ-VAE-2's top prior (Razavi et al. 2019). The convolutions are the Gated
PixelCNN's layers (`masked_conv.GatedLayer`: a vertical and a horizontal
stack, exactly causal in raster order, no blind spot within their reach);
after every `layers_per_block` of them, multi-head self-attention over the
raster order lets each position see every earlier one, however far:

  * queries from [features, coordinates] at position t,
  * keys and values from [code embedding, features, coordinates] at s < t,

as in the official PixelSNAIL and rosinality's VQ-VAE-2. Position t attends
to the positions s < t strictly: the key at s holds the code at s, which t
may see; position 0 has nothing to attend to and its attention output is 0.
Every module computes in `dtype` with float32 parameters; the attention
softmax and the logits are float32. One position at a time (`init_cache`,
`step`, `end_position`, `end_row`, as masked_conv's priors), each attention
block keeps the keys and values of the positions drawn so far.
"""

from typing import ClassVar


import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from lvm_jax.nn.masked_conv import (GatedLayer, GatedSteps, OutputHead, check_codes,
                                     check_kernel_size, code_at, gate)
from lvm_jax.nn.precision import to_float32


def coordinates(i, j, height: int, width: int) -> jax.Array:
    """(..., 2) float32: row and column of positions (i, j) scaled to (-1, 1), pixel centres."""
    return jnp.stack([(2 * i + 1) / height - 1, (2 * j + 1) / width - 1], axis=-1).astype(
        jnp.float32)


def attend(query: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array,
           num_heads: int) -> jax.Array:
    """Multi-head dot-product attention over the visible keys; 0 where none is visible.

    Args:
      query: (..., T, key_dim).
      keys: (..., S, key_dim), values (..., S, value_dim); key_dim and value_dim
        divisible by num_heads.
      visible: (T, S) bool, which keys each query sees.
      num_heads: the heads, each on key_dim / num_heads query and key channels
        and value_dim / num_heads value channels.
    Returns:
      (..., T, value_dim) in the values' dtype: per head, the softmax (in float32,
      scaled by 1 / sqrt(key channels)) of the visible scores times the values.
    """

    def heads(x):
        return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)

    q, k, v = heads(query), heads(keys), heads(values)
    scores = jnp.einsum("...thd,...shd->...hts", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(q.shape[-1])
    # Hidden keys get the lowest score (weight exactly 0); `where` again zeroes the rows with
    # no visible key, whose softmax would be uniform over hidden ones.
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    weights = jnp.where(visible, jax.nn.softmax(scores, axis=-1), 0.0).astype(values.dtype)
    out = jnp.einsum("...hts,...shd->...thd", weights, v)
    return out.reshape(*out.shape[:-2], -1)


class CausalAttentionBlock(nn.Module):
    """Causal self-attention over the raster order, added to the features by a gated residual.

    features (batch, H, W, dim), inputs (batch, H, W, dim) the code embeddings
    -> features + 1x1(gate(1x1(features) + 1x1(attention))), where the
    attention at position t reads the positions s < t (`attend`).

    One position at a time, it caches keys (num, H*W, key_dim) and values
    (num, H*W, value_dim), slot s written once the code at s is drawn (`write`),
    and its input features at the latest position (`step`), which the key and
    value at s read.
    """

    dim: int
    num_heads: int
    key_dim: int
    value_dim: int
    dropout_rate: float
    dtype: DTypeLike

    def setup(self):
        self.query = nn.Dense(self.key_dim, dtype=self.dtype)
        self.key = nn.Dense(self.key_dim, dtype=self.dtype)
        self.value = nn.Dense(self.value_dim, dtype=self.dtype)
        self.dropout = nn.Dropout(self.dropout_rate)
        self.mix_features = nn.Dense(2 * self.dim, dtype=self.dtype)
        self.mix_attention = nn.Dense(2 * self.dim, dtype=self.dtype)
        self.mix_out = nn.Dense(self.dim, dtype=self.dtype)

    def __call__(self, features: jax.Array, inputs: jax.Array, train: bool = False) -> jax.Array:
        batch, height, width, _ = features.shape
        rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
        coords = jnp.broadcast_to(coordinates(rows, cols, height, width),
                                  (batch, height, width, 2)).astype(self.dtype)
        key_in = jnp.concatenate([inputs, features, coords], axis=-1)
        query = self.query(jnp.concatenate([features, coords], axis=-1))
        key, value = self.key(key_in), self.value(key_in)

        positions = height * width
        visible = jnp.tril(jnp.ones((positions, positions), bool), k=-1)  # s < t strictly
        query, key, value = (x.reshape(batch, positions, x.shape[-1]) for x in (query, key, value))
        attended = attend(query, key, value, visible, self.num_heads)
        attended = self.dropout(attended, deterministic=not train)
        return self._mix(features, attended.reshape(batch, height, width, self.value_dim))

    def _mix(self, features: jax.Array, attended: jax.Array) -> jax.Array:
        pre = self.mix_features(features) + self.mix_attention(attended)
        return features + self.mix_out(gate(pre))

    def init_cache(self, num: int, height: int, width: int) -> None:
        """Empty key and value slots for `num` grids of height x width positions."""
        positions = height * width
        self.put_variable("cache", "keys", jnp.zeros((num, positions, self.key_dim), self.dtype))
        self.put_variable("cache", "values",
                          jnp.zeros((num, positions, self.value_dim), self.dtype))
        self.put_variable("cache", "features", jnp.zeros((num, self.dim), self.dtype))

    def _coordinates(self, t, grid: tuple[int, int], num: int) -> jax.Array:
        """(num, 2) in `dtype`: the coordinates of raster position t of a `grid` (H, W)."""
        height, width = grid
        return jnp.broadcast_to(coordinates(t // width, t % width, height, width).astype(
            self.dtype), (num, 2))

    def step(self, features: jax.Array, i, j, grid: tuple[int, int], stop: int) -> jax.Array:
        """The block's output (num, dim) at (i, j) of a `grid` (H, W), from its input
        features (num, dim) there: attends to the slots before (i, j), reading the first
        stop * W only (`stop`, static: no code beyond row stop - 1 is drawn yet)."""
        width = grid[1]
        t = i * width + j
        self.put_variable("cache", "features", features)
        filled = stop * width
        visible = jnp.arange(filled)[None] < t  # (1, filled): s < t
        query = self.query(jnp.concatenate(
            [features, self._coordinates(t, grid, features.shape[0])], -1))
        attended = attend(query[:, None], self.get_variable("cache", "keys")[:, :filled],
                          self.get_variable("cache", "values")[:, :filled], visible,
                          self.num_heads)[:, 0]
        return self._mix(features, attended)

    def write(self, embedded: jax.Array, i, j, grid: tuple[int, int]) -> None:
        """The code at (i, j) is drawn: its slot gets the key and value of [its embedding
        `embedded` (num, dim), the features of the step at (i, j), coordinates]."""
        t = i * grid[1] + j
        key_in = jnp.concatenate([embedded, self.get_variable("cache", "features"),
                                  self._coordinates(t, grid, embedded.shape[0])], -1)
        for name, dense in (("keys", self.key), ("values", self.value)):
            self.put_variable("cache", name, jax.lax.dynamic_update_slice(
                self.get_variable("cache", name), dense(key_in)[:, None], (0, t, 0)))


class PixelSNAIL(GatedSteps, nn.Module):
    """PixelSNAIL prior: codes (batch, H, W) int -> logits (batch, H, W, num_classes).

    Learned embedding to `dim` channels feeding both stacks; num_blocks blocks,
    each of layers_per_block gated layers (`kernel_size`, dropout
    `dropout_rate` in training) and one causal attention block (num_heads
    heads over key_dim query/key and value_dim value channels); a head of two
    1x1 convs (to `hidden`, then to num_classes) on the horizontal stack.
    The logits at (i, j) see every earlier code (the attention), and only
    those. Logits are in nats: log_softmax gives log p(c_ij | c_<ij).
    """

    # The cached sampler loops over the rows in at most this many blocks, each a compiled loop
    # whose attention reads a static prefix of the key/value cache (sampling.row_blocks).
    row_blocks: ClassVar[int] = 4

    num_classes: int
    dim: int = 64
    num_blocks: int = 2
    layers_per_block: int = 2
    kernel_size: int = 3
    num_heads: int = 4
    key_dim: int = 32
    value_dim: int = 64
    hidden: int = 256
    dropout_rate: float = 0.0
    dtype: DTypeLike = jnp.float32

    def __post_init__(self):
        check_kernel_size(self.kernel_size)
        if self.num_blocks < 1 or self.layers_per_block < 1:
            raise ValueError(f"num_blocks and layers_per_block must be positive, got "
                             f"{self.num_blocks} and {self.layers_per_block}")
        for name in ("key_dim", "value_dim"):
            if getattr(self, name) % self.num_heads:
                raise ValueError(f"{name} ({getattr(self, name)}) must be divisible by "
                                 f"num_heads ({self.num_heads})")
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        super().__post_init__()

    def setup(self):
        self.embed = nn.Embed(self.num_classes, self.dim, dtype=self.dtype)
        self.layers = [GatedLayer(self.dim, self.kernel_size, first=(i == 0), dtype=self.dtype,
                                  dropout_rate=self.dropout_rate)
                       for i in range(self.num_blocks * self.layers_per_block)]
        self.attentions = [CausalAttentionBlock(self.dim, self.num_heads, self.key_dim,
                                                self.value_dim, self.dropout_rate, self.dtype)
                           for _ in range(self.num_blocks)]
        self.head = OutputHead(self.hidden, self.num_classes, self.dtype)

    def __call__(self, codes: jax.Array, train: bool = False) -> jax.Array:
        """Logits (batch, H, W, num_classes) float32; train=True applies dropout (rngs
        {"dropout": key})."""
        check_codes(codes)
        return self.logits(self.embed(codes), train)

    def logits(self, x: jax.Array, train: bool = False) -> jax.Array:
        """float32 logits from embedded codes x (batch, H, W, dim); differentiable in x."""
        v = h = x
        for index, layer in enumerate(self.layers):
            v, h = layer(v, h, train=train)
            if (index + 1) % self.layers_per_block == 0:
                h = self.attentions[index // self.layers_per_block](h, x, train)
        return to_float32(self.head(h))

    def init_cache(self, codes: jax.Array) -> None:
        """Empty caches for grids shaped like codes (num, H, W)."""
        num, height, width = codes.shape
        for layer in self.layers:
            layer.init_cache(num, width)
        for attention in self.attentions:
            attention.init_cache(num, height, width)

    def step(self, codes: jax.Array, i, j, stop: int | None = None) -> jax.Array:
        """float32 logits (num, num_classes) at (i, j), the codes before it written by
        `end_position`; the attention reads the cache of rows < `stop` (static, all if
        None)."""
        grid = codes.shape[1:]
        h = None
        for index, layer in enumerate(self.layers):
            h = layer.step(h, i, j)
            if (index + 1) % self.layers_per_block == 0:
                h = self.attentions[index // self.layers_per_block].step(
                    h, i, j, grid, grid[0] if stop is None else stop)
        return to_float32(self.head.at(h))

    def end_position(self, codes: jax.Array, i, j) -> None:
        """The code at (i, j) of codes (num, H, W) is drawn: its embedding enters the first
        layer's horizontal row and every attention block's keys and values."""
        embedded = self.embed(code_at(codes, i, j))
        self.layers[0].write(embedded, j)
        for attention in self.attentions:
            attention.write(embedded, i, j, codes.shape[1:])
