"""Drawing code grids from the PixelCNN-family priors, in raster order.

PixelCNN, GatedPixelCNN, PixelSNAIL (self-attention) and ConditionalGatedPixelCNN
(VQ-VAE-2's bottom prior, given its condition codes).

Two samplers of the same distribution, which draw the same codes for the
same key: position t = i * width + j is drawn with
`jax.random.categorical(jax.random.fold_in(rng, t), logits)`.

  * `raster_sample`, the reference: each of the H*W steps runs the whole
    network over the whole grid and keeps one position's logits, so the work
    grows with the square of the number of positions.
  * The cached sampler (Ramachandran et al. 2017, "Fast Generation for
    Convolutional Autoregressive Models"): every masked convolution keeps the
    rows of its own input that its kernel reaches, and each step computes, in
    every layer, only the activations that the newly drawn code changes. A
    grid costs about one full pass of work, spread over H*W steps.
    Attention keeps a key/value cache: position t computes its query, key and
    value once and reads the cached keys and values of the positions before
    it: the one part whose cost per step grows, by one key per position drawn
    (the rows are looped over in a few blocks, `row_blocks`, each reading a
    static prefix of the cache, up to the block's end). A conditioned prior's
    conditioning stack runs once, before the first position; its 1x1 convs
    into every layer are precomputed too.

Why the cached sampler is exact: it applies the model's own parameters (the
tree that `model.apply` reads, masks included) to the same inputs as the full
pass. A convolution's output at one position is the dot product of its
(masked) kernel with the input window around that position, and the cache
holds exactly that window: the rows of the layer's input computed at earlier
steps, zeros where the full pass pads. Everything between convolutions (1x1
convolutions, ReLUs, gates, residual additions, the queries, keys, values
and the attention's mixing) acts on one position at a time. The attention at
t weighs the cached keys and values of s < t, exactly those the full pass's
mask leaves (the others get weight 0 in both). Only the order of the
floating-point sums differs from the full pass.
"""

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from lvm_jax.nn.masked_conv import (
    ConditionalGatedPixelCNN,
    GatedPixelCNN,
    PixelCNN,
    _check_codes,
    conv_mask,
    gate,
    horizontal_mask,
    upsampling_factors,
)
from lvm_jax.nn.pixelsnail import PixelSNAIL, attend, coordinates
from lvm_jax.nn.precision import to_float32

METHODS = ("cached", "raster")
PRIORS = (PixelCNN, GatedPixelCNN, ConditionalGatedPixelCNN, PixelSNAIL)
Prior = PixelCNN | GatedPixelCNN | ConditionalGatedPixelCNN | PixelSNAIL


def raster_sample(
    logits_fn: Callable[[jax.Array], jax.Array], rng: jax.Array, num: int, height: int, width: int
) -> jax.Array:
    """Draws `num` grids of codes in raster order; one `lax.fori_loop`, jittable.

    Each of the height * width steps runs logits_fn on the whole grid and keeps
    the logits of one position.

    Args:
      logits_fn: codes (num, height, width) int32 -> logits (num, height, width,
        K), causal in raster order, e.g. `lambda c: model.apply(params, c)`.
      rng: PRNG key; step t draws with fold_in(rng, t).
      num, height, width: static sizes of the result.
    Returns:
      (num, height, width) int32 codes; code (i, j) is a categorical draw from
      softmax(logits_fn(codes)[:, i, j]) given the codes drawn before it.
    """

    def draw(t, codes):
        i, j = t // width, t % width
        logits = logits_fn(codes)[:, i, j]
        return codes.at[:, i, j].set(_draw(rng, t, logits))

    # The zeros of positions not yet drawn never reach a causal logits_fn.
    return jax.lax.fori_loop(0, height * width, draw, jnp.zeros((num, height, width), jnp.int32))


def _draw(rng: jax.Array, t, logits: jax.Array) -> jax.Array:
    """Codes (num,) int32 of position t from its logits (num, K): the draw both samplers share."""
    return jax.random.categorical(jax.random.fold_in(rng, t), logits).astype(jnp.int32)


def sample_codes(model: Prior, variables, rng: jax.Array, num: int, height: int, width: int,
                 method: str = "cached", condition: jax.Array | None = None) -> jax.Array:
    """Draws `num` code grids from a PixelCNN-family prior in one jitted call.

    Args:
      model: a PixelCNN, GatedPixelCNN, PixelSNAIL or ConditionalGatedPixelCNN
        (any number of layers, any kernel size, any dtype).
      variables: its variables, {"params": ...}, as for `model.apply`.
      rng: PRNG key; position t = i * width + j draws with fold_in(rng, t), so
        both methods return the same codes for the same key.
      num, height, width: number of grids and their size (any, non-square too).
      method: "cached" computes only what each new code changes (module
        docstring); "raster" runs the whole network once per position
        (`raster_sample`), the reference.
      condition: for a ConditionalGatedPixelCNN only, and required there: its
        condition_codes (num, height / f, width / f) int, f integers (e.g. the
        top codes under VQ-VAE-2's bottom prior). The cached sampler runs the
        conditioning stack once, before the first position.
    Returns:
      (num, height, width) int32 codes in [0, model.num_classes).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_prior(model)
    _check_variables(model, variables)
    for name, size in (("num", num), ("height", height), ("width", width)):
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    _check_condition(model, condition, (num, height, width))
    return _sample_codes(model, variables, rng, int(num), int(height), int(width), method,
                         condition)


@functools.partial(jax.jit, static_argnames=("model", "num", "height", "width", "method"))
def _sample_codes(model, variables, rng, num, height, width, method, condition):
    if method == "raster":
        return raster_sample(lambda codes: _apply_model(model, variables, codes, condition), rng,
                             num, height, width)

    def choose(i, j, logits, codes):
        code = _draw(rng, i * width + j, logits)
        return code, codes.at[:, i, j].set(code)

    return _cached_loop(_steps(model, variables, num, height, width, condition), height, width,
                        choose, jnp.zeros((num, height, width), jnp.int32))


def cached_logits(model: Prior, variables, codes: jax.Array,
                  condition: jax.Array | None = None) -> jax.Array:
    """The logits of the cached sampler's steps when it is fed `codes` instead of drawing them.

    A test of the cache: for a causal model these equal `model.apply(variables,
    codes[, condition])` up to the order of floating-point sums.

    Args:
      model, variables: the prior and its variables.
      codes: (num, height, width) int codes, fed in raster order.
      condition: the condition codes of a ConditionalGatedPixelCNN, else None.
    Returns:
      (num, height, width, K) float32 logits.
    """
    _check_prior(model)
    _check_variables(model, variables)
    _check_codes(codes)
    _check_condition(model, condition, codes.shape)
    return _cached_logits(model, variables, codes, condition)


@functools.partial(jax.jit, static_argnames="model")
def _cached_logits(model, variables, codes, condition):
    num, height, width = codes.shape

    def choose(i, j, logits, all_logits):
        return codes[:, i, j].astype(jnp.int32), all_logits.at[:, i, j].set(logits)

    return _cached_loop(_steps(model, variables, num, height, width, condition), height, width,
                        choose, jnp.zeros((num, height, width, model.num_classes), jnp.float32))


def _apply_model(model, variables, codes, condition):
    if condition is None:
        return model.apply(variables, codes)
    return model.apply(variables, codes, condition)


def _check_prior(model) -> None:
    if not isinstance(model, PRIORS):
        raise TypeError(f"expected a PixelCNN, GatedPixelCNN, PixelSNAIL or "
                        f"ConditionalGatedPixelCNN prior, got {type(model).__name__}; "
                        f"for another causal model use raster_sample")


def _check_variables(model, variables) -> None:
    """variables must be {"params": the tree model.init makes}: a one-line ValueError names
    what differs (a bare parameter dict, another model's or size's parameters)."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        found = (f"a mapping with keys {sorted(variables)[:4]}" if isinstance(variables, Mapping)
                 else type(variables).__name__)
        raise ValueError(f"variables must be {{'params': params}}, as model.apply takes them, "
                         f"got {found}")
    expected = _parameter_shapes(model)
    found = _shapes(variables["params"])
    problems = ([f"{'/'.join(path)} has shape {found[path]}, expected {shape}"
                 for path, shape in expected.items() if found.get(path, shape) != shape]
                + [f"missing {name}" for name in _first_absent(expected, found)]
                + [f"unexpected {name}" for name in _first_absent(found, expected)])
    if problems:
        raise ValueError(f"variables['params'] do not fit this {type(model).__name__}: "
                         f"{'; '.join(problems[:3])}" + ("; ..." if len(problems) > 3 else ""))


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of a tree's leaves, e.g. {("embed", "embedding"): (128, 64)}."""
    return {tuple(str(getattr(key, "key", key)) for key in path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _first_absent(tree: dict, other: dict) -> list[str]:
    """The shortest paths of `tree` (leaf paths' prefixes) that `other` lacks, e.g.
    "layers_0/condition_vertical" for a whole missing conv, in order, once each."""
    present = {path[:k] for path in other for k in range(1, len(path) + 1)}
    absent = (next(path[:k] for k in range(1, len(path) + 1) if path[:k] not in present)
              for path in tree if path not in present)
    return ["/".join(path) for path in dict.fromkeys(absent)]


@functools.cache
def _parameter_shapes(model) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The shapes of the parameters model.init makes (the same for every grid size)."""
    grid = jax.ShapeDtypeStruct((1, 1, 1), jnp.int32)
    inputs = (grid, grid) if isinstance(model, ConditionalGatedPixelCNN) else (grid,)
    return _shapes(jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"])


def _check_condition(model, condition, shape: tuple[int, int, int]) -> None:
    """A ConditionalGatedPixelCNN needs condition codes whose grid divides (height, width);
    every other prior takes none."""
    name = type(model).__name__
    if not isinstance(model, ConditionalGatedPixelCNN):
        if condition is not None:
            raise ValueError(f"condition is for a ConditionalGatedPixelCNN; a {name} takes none")
        return
    if condition is None:
        raise ValueError("a ConditionalGatedPixelCNN needs condition= its condition codes "
                         "(num, h, w), e.g. the top codes")
    _check_codes(condition, "condition")
    upsampling_factors(tuple(shape), condition.shape)


# An attention prior's rows are sampled in at most this many blocks, unrolled in Python (each
# block its own static slice of the key/value cache, so its own compiled loop body).
MAX_ROW_BLOCKS = 4


def row_blocks(height: int, attends: bool) -> list[tuple[int, int]]:
    """The row ranges [start, stop) the cached sampler loops over, one `fori_loop` each.

    Without attention, one block: every step's work is the same. With attention,
    at most MAX_ROW_BLOCKS blocks of ceil(height / MAX_ROW_BLOCKS) rows (the last
    may be shorter): the attention at a position of a block reads the cache
    slots before the block's end, a static prefix, rather than all H*W. Its
    work at position t is then at most t + rows_per_block * W slots, and a
    grid's is about (1 + 1 / blocks) / 2 of reading every slot at every
    position, against 1/2 for a prefix exactly t long; more blocks would save
    at most a further 1 / (2 * blocks) at the price of compiling more bodies.
    """
    if not attends:
        return [(0, height)]
    size = -(-height // min(height, MAX_ROW_BLOCKS))
    return [(start, min(start + size, height)) for start in range(0, height, size)]


def _cached_loop(steps, height: int, width: int, choose, out):
    """Runs `steps` over the grid in raster order: row blocks in Python (`row_blocks`), the
    rows of a block in a `fori_loop`, columns in another.

    Args:
      steps: a _PixelCNNSteps or _GatedSteps.
      choose: (i, j, logits (num, K), out) -> (codes (num,) int32 of position
        (i, j), out): draws the codes, or feeds given ones, and records.
      out: the initial value of what `choose` records.
    Returns:
      `out` after the last position.
    """
    carry = (steps.init_cache(), out)
    for start, stop in row_blocks(height, steps.attends):
        filled = stop * width  # static: every position that a step of this block may read

        def row(i, carry, filled=filled):
            def column(j, carry):
                cache, out = carry
                logits, cache = steps.logits_at(cache, i, j, filled)
                code, out = choose(i, j, logits, out)
                return steps.write_code(cache, i, j, code), out

            cache, out = jax.lax.fori_loop(0, width, column, carry)
            return steps.next_row(cache, i), out

        carry = jax.lax.fori_loop(start, stop, row, carry)
    return carry[1]


# --- Row buffers: the cache of one layer's input -----------------------------------------------
# A buffer (num, rows, pad + width + pad, C) holds the `rows` latest rows of a layer's input,
# zero-padded left and right as the full pass pads them; its last row is the current one. It
# starts as zeros: the rows above the grid, and a current row whose later positions the
# kernels' masks never read.


def _buffer(num: int, rows: int, width: int, pad: tuple[int, int], channels: int, dtype):
    return jnp.zeros((num, rows, pad[0] + width + pad[1], channels), dtype)


def _push_row(buffer: jax.Array, row: jax.Array | None = None, pad: int = 0) -> jax.Array:
    """Drops the oldest row and appends zeros with `row` (num, width, C), if given, after
    `pad` columns: the next current row."""
    new = jnp.zeros_like(buffer[:, :1])
    if row is not None:
        new = new.at[:, 0, pad:pad + row.shape[1]].set(row)
    return jnp.concatenate([buffer[:, 1:], new], axis=1)


def _write(buffer: jax.Array, column, x: jax.Array) -> jax.Array:
    """Writes x (num, C) at padded `column` of the current row."""
    current = buffer.shape[1] - 1
    return jax.lax.dynamic_update_slice(buffer, x[:, None, None], (0, current, column, 0))


def _window(buffer: jax.Array, column, size: int) -> jax.Array:
    """(num, rows * size * C): the padded columns column .. column + size - 1 of every row."""
    window = jax.lax.dynamic_slice_in_dim(buffer, column, size, axis=2)
    return window.reshape(window.shape[0], -1)


def _row_windows(buffer: jax.Array, size: int) -> jax.Array:
    """(num, width, rows * size * C): the window of every column of the buffer's rows."""
    width = buffer.shape[2] - size + 1
    windows = jnp.stack([buffer[:, :, dx:dx + width] for dx in range(size)], axis=3)
    num, rows, _, _, channels = windows.shape
    return windows.transpose(0, 2, 1, 3, 4).reshape(num, width, rows * size * channels)


# --- Convolutions at one position, from a conv's parameters ------------------------------------


def _affine(conv: dict, dtype, mask: np.ndarray | None = None, rows: int | None = None):
    """A `nn.Conv`'s parameters as (kernel matrix, bias) acting on flattened windows.

    The kernel (kh, kw, C_in, F) is masked as flax masks it (in float32, before
    the cast to `dtype`), its first `rows` rows kept (the rows of a window that
    a raster-order mask reads: those above the centre and the centre's), and
    flattened to (rows * kw * C_in, F), the layout of `_window`.
    """
    kernel = conv["kernel"]
    if mask is not None:
        kernel = kernel * mask[:, :, None, None]
    kernel = kernel[:rows]
    kernel, bias = promote_dtype(kernel.reshape(-1, kernel.shape[-1]), conv["bias"], dtype=dtype)
    return kernel, bias


def _apply(affine, x: jax.Array) -> jax.Array:
    """x (..., rows * kw * C_in) -> (..., F): the convolution's output at x's positions."""
    kernel, bias = affine
    return x.astype(kernel.dtype) @ kernel + bias


def _head(head, x: jax.Array) -> jax.Array:
    """_OutputHead at one position: (num, C) -> float32 logits (num, K)."""
    x = _apply(head[0], jax.nn.relu(x))
    return to_float32(_apply(head[1], jax.nn.relu(x)))


def _head_affines(head: dict, dtype):
    return _affine(head["Conv_0"], dtype), _affine(head["Conv_1"], dtype)


def _steps(model, variables, num: int, height: int, width: int, condition):
    if isinstance(model, PixelCNN):
        return _PixelCNNSteps(model, variables["params"], num, width)
    return _GatedSteps(model, variables, num, height, width, condition)


class _PixelCNNSteps:
    """The PixelCNN one position at a time.

    Cache: for the 7x7 type-A input conv, a buffer of the last 4 rows of code
    embeddings; for each residual block's type-B conv, one of the last
    k//2 + 1 rows of its input. At (i, j) each layer computes its output at
    (i, j) alone: the masks read only those rows, and in the current row only
    the columns up to j (type B: the input at (i, j), written just before).
    Parameter names are flax's automatic ones, in the order PixelCNN's
    modules create them.
    """

    attends = False

    def __init__(self, model: PixelCNN, params, num: int, width: int):
        dtype = model.dtype
        self.num, self.width, self.dtype = num, width, dtype
        self.embedding = jnp.asarray(params["embed"]["embedding"], dtype)
        self.head = _head_affines(params["head"], dtype)
        k = params["input_conv"]["Conv_0"]["kernel"].shape[0]
        self.input_size = k
        self.input_conv = _affine(params["input_conv"]["Conv_0"], dtype, conv_mask(k, "A"),
                                  rows=k // 2 + 1)
        k = self.kernel_size = model.kernel_size
        self.blocks = [
            (_affine(block["Conv_0"], dtype),
             _affine(block["MaskedConv_0"]["Conv_0"], dtype, conv_mask(k, "B"), rows=k // 2 + 1),
             _affine(block["Conv_1"], dtype))
            for block in (params[f"blocks_{b}"] for b in range(model.num_residual_blocks))]

    def _buffer(self, kernel_size: int):
        c = kernel_size // 2
        return _buffer(self.num, c + 1, self.width, (c, c), self.embedding.shape[1], self.dtype)

    def init_cache(self):
        return [self._buffer(self.input_size)] + [self._buffer(self.kernel_size)
                                                  for _ in self.blocks]

    def logits_at(self, cache, i, j, filled: int):
        """float32 logits (num, K) at (i, j) of the current row i, and the updated cache
        (`filled`, the attention's cache prefix, is unused: no attention)."""
        x = _apply(self.input_conv, _window(cache[0], j, self.input_size))
        new_cache = [cache[0]]
        c = self.kernel_size // 2
        for (conv_in, masked, conv_out), buffer in zip(self.blocks, cache[1:]):
            buffer = _write(buffer, j + c, jax.nn.relu(_apply(conv_in, jax.nn.relu(x))))
            h = _apply(masked, _window(buffer, j, self.kernel_size))
            x = x + _apply(conv_out, jax.nn.relu(h))
            new_cache.append(buffer)
        return _head(self.head, x), new_cache

    def write_code(self, cache, i, j, code):
        """Records the code (num,) drawn at (i, j): its embedding enters the input conv's rows."""
        embedded = _write(cache[0], j + self.input_size // 2, self.embedding[code])
        return [embedded] + cache[1:]

    def next_row(self, cache, i):
        return [_push_row(buffer) for buffer in cache]


class _GatedSteps:
    """The Gated PixelCNN family one position at a time, the vertical stack one row at a time:
    GatedPixelCNN, ConditionalGatedPixelCNN and PixelSNAIL (the same gated layers; PixelSNAIL
    adds attention blocks to the horizontal stack, the conditional prior a conditioning term).

    Cache, per gated layer: the current row of the horizontal stack's input;
    the last k//2 + 1 rows of the vertical stack's input; and the vertical
    stack's link into the horizontal stack for the current row, 1x1(v_pre of
    the row above). At (i, j) each layer computes the horizontal stack at
    (i, j) alone. When row i is complete, each layer computes its vertical
    stack over row i (which sees row i whole, and so must wait for it) and the
    link for row i + 1. Parameter names are flax's automatic ones, in the
    order _GatedLayer creates them: vertical, horizontal, link, output 1x1.

    The conditioning features reach every layer through two 1x1 convs, which
    depend on the condition codes only: they are computed for the whole grid
    before the first position, the conditioning stack included.

    Each attention block (`_AttentionSteps`) keeps the keys and values of
    the positions drawn so far, one slot of its cache per position.
    """

    def __init__(self, model: GatedPixelCNN | ConditionalGatedPixelCNN | PixelSNAIL, variables,
                 num: int, height: int, width: int, condition: jax.Array | None):
        params, dtype = variables["params"], model.dtype
        self.num, self.width, self.dim, self.dtype = num, width, model.dim, dtype
        k = self.kernel_size = model.kernel_size
        self.embedding = jnp.asarray(params["embed"]["embedding"], dtype)
        self.head = _head_affines(params["head"], dtype)
        layers = [params[f"layers_{n}"]
                  for n in range(sum(name.startswith("layers_") for name in params))]
        self.layers = [
            (_affine(layer["Conv_0"], dtype),
             _affine(layer["Conv_1"], dtype, horizontal_mask(k, first=(index == 0))),
             _affine(layer["Conv_2"], dtype),
             _affine(layer["Conv_3"], dtype))
            for index, layer in enumerate(layers)]
        self.conditions = None
        if condition is not None:
            features = model.apply(variables, condition, (height, width), method=model.condition)
            self.conditions = [
                (_apply(_affine(layer["condition_vertical"], dtype), features),
                 _apply(_affine(layer["condition_horizontal"], dtype), features))
                for layer in layers]
        self.attentions = {}  # index of the gated layer it follows -> its steps
        if isinstance(model, PixelSNAIL):
            for block in range(model.num_blocks):
                self.attentions[(block + 1) * model.layers_per_block - 1] = _AttentionSteps(
                    model, params[f"attentions_{block}"], num, height, width)
        self.attends = bool(self.attentions)

    def init_cache(self):
        c = self.kernel_size // 2
        zeros = jnp.zeros((self.num, self.width, 2 * self.dim), self.dtype)
        return {
            "h": [_buffer(self.num, 1, self.width, (c, 0), self.dim, self.dtype)
                  for _ in self.layers],
            "v": [_buffer(self.num, c + 1, self.width, (c, c), self.dim, self.dtype)
                  for _ in self.layers],
            # Row 0's link sees the zero row that the down-shift brings in.
            "link": [_apply(link, zeros) for _, _, link, _ in self.layers],
            "attention": {index: steps.init_cache() for index, steps in self.attentions.items()},
        }

    def logits_at(self, cache, i, j, filled: int):
        """float32 logits (num, K) at (i, j) of the current row i, and the updated cache; the
        attention reads the first `filled` (static) slots of its cache."""
        c = self.kernel_size // 2
        h_buffers, attention = list(cache["h"]), dict(cache["attention"])
        h = None
        for index, (_, horizontal, _, out) in enumerate(self.layers):
            if index:  # the first layer's input is the codes' embeddings, written by write_code
                h_buffers[index] = _write(h_buffers[index], j + c, h)
            h_pre = (_apply(horizontal, _window(h_buffers[index], j, c + 1))
                     + jax.lax.dynamic_index_in_dim(cache["link"][index], j, 1, keepdims=False))
            if self.conditions is not None:
                h_pre = h_pre + self.conditions[index][1][:, i, j]
            h_out = _apply(out, gate(h_pre))
            h = h_out if index == 0 else h + h_out
            if index in self.attentions:
                h, attention[index] = self.attentions[index].features_at(attention[index], h,
                                                                         i, j, filled)
        return _head(self.head, h), {**cache, "h": h_buffers, "attention": attention}

    def write_code(self, cache, i, j, code):
        """Records the code (num,) drawn at (i, j): its embedding enters the first layer's row
        and every attention block's keys and values."""
        embedded = self.embedding[code]
        first = _write(cache["h"][0], j + self.kernel_size // 2, embedded)
        attention = {index: steps.write_code(cache["attention"][index], i, j, embedded)
                     for index, steps in self.attentions.items()}
        return {**cache, "h": [first] + cache["h"][1:], "attention": attention}

    def next_row(self, cache, i):
        """The vertical stack over the completed row i, the links for the next, empty rows."""
        c = self.kernel_size // 2
        v_row = cache["h"][0][:, 0, c:]  # the row's code embeddings, the first vertical input
        v_buffers, links = [], []
        for index, (buffer, (vertical, _, link, _)) in enumerate(zip(cache["v"], self.layers)):
            buffer = _push_row(buffer, v_row, c)
            v_pre = _apply(vertical, _row_windows(buffer, self.kernel_size))
            if self.conditions is not None:
                v_pre = v_pre + self.conditions[index][0][:, i]
            v_buffers.append(buffer)
            links.append(_apply(link, v_pre))
            v_row = gate(v_pre)
        return {**cache, "h": [_push_row(buffer) for buffer in cache["h"]], "v": v_buffers,
                "link": links}


class _AttentionSteps:
    """PixelSNAIL's `_CausalAttentionBlock` one position at a time, with a key/value cache.

    Cache: keys (num, H*W, key_dim) and values (num, H*W, value_dim), slot t
    written when the code at t is drawn, and the block's input features at the
    current position. At t the block computes its query from [features,
    coordinates], attends to the slots s < t (the others are masked, as in
    the full pass) and mixes the result into the features. It reads only a
    static prefix of the cache, the slots up to the end of t's row block
    (`row_blocks`): the slots after it are all masked, so they are skipped,
    not computed and then zeroed. Once the code at t
    is drawn, its key and value are computed from [embedding, features,
    coordinates], once.
    """

    def __init__(self, model: PixelSNAIL, params, num: int, height: int, width: int):
        dtype = model.dtype
        self.num, self.height, self.width = num, height, width
        self.dim, self.dtype = model.dim, dtype
        self.num_heads, self.key_dim, self.value_dim = (model.num_heads, model.key_dim,
                                                        model.value_dim)
        self.query, self.key, self.value, self.mix_features, self.mix_attention, self.mix_out = (
            _affine(params[name], dtype) for name in ("query", "key", "value", "mix_features",
                                                      "mix_attention", "mix_out"))
        self.positions = jnp.arange(height * width)

    def init_cache(self):
        positions = self.height * self.width
        return {"keys": jnp.zeros((self.num, positions, self.key_dim), self.dtype),
                "values": jnp.zeros((self.num, positions, self.value_dim), self.dtype),
                "features": jnp.zeros((self.num, self.dim), self.dtype)}

    def _coordinates(self, i, j) -> jax.Array:
        coords = coordinates(i, j, self.height, self.width).astype(self.dtype)
        return jnp.broadcast_to(coords, (self.num, 2))

    def features_at(self, cache, features, i, j, filled: int):
        """The block's output (num, dim) at (i, j) from its input features (num, dim), its
        attention over the first `filled` slots (static; filled > i * width + j)."""
        query = _apply(self.query, jnp.concatenate([features, self._coordinates(i, j)], -1))
        visible = self.positions[None, :filled] < i * self.width + j  # (1, filled): s < t
        attended = attend(query[:, None], cache["keys"][:, :filled],
                          cache["values"][:, :filled], visible, self.num_heads)[:, 0]
        pre = _apply(self.mix_features, features) + _apply(self.mix_attention, attended)
        return features + _apply(self.mix_out, gate(pre)), {**cache, "features": features}

    def write_code(self, cache, i, j, embedded):
        """Writes the key and value of position (i, j) from its code's embedding (num, dim)."""
        key_in = jnp.concatenate([embedded, cache["features"], self._coordinates(i, j)], -1)
        t = i * self.width + j

        def write(slots, x):
            return jax.lax.dynamic_update_slice(slots, x[:, None], (0, t, 0))

        return {**cache, "keys": write(cache["keys"], _apply(self.key, key_in)),
                "values": write(cache["values"], _apply(self.value, key_in))}
