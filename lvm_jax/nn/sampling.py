"""Drawing grids of codes from an autoregressive prior, in raster order.

Two samplers of the same distribution, which draw the same codes for the same
key: position t = i * width + j is drawn with
`jax.random.categorical(jax.random.fold_in(rng, t), logits)`.

  * `raster_sample`, the reference: each of the H*W steps runs the whole
    network over the whole grid and keeps one position's logits, so the work
    grows with the square of the number of positions.
  * The cached sampler (Ramachandran et al. 2017, "Fast Generation for
    Convolutional Autoregressive Models") calls the prior's own incremental
    step, which computes only the activations that the newly drawn code
    changes, keeping what later positions need in flax's "cache" collection
    (as the decoders of flax's examples/wmt do). It knows no model: it draws
    from any prior with the step API below, the four of lvm_jax.nn included.

The step API, each method applied with `mutable=["cache"]`:

  * `init_cache(codes, *context)`: makes the cache for grids shaped like codes
    (num, H, W) (zeros), given the inputs the prior's `__call__` takes after
    the codes (a conditioned prior's condition codes).
  * `step(codes, i, j, stop)`: float32 logits (num, K) at (i, j), given codes
    (num, H, W) whose positions before (i, j) in raster order are drawn; the
    step may read no later position. `stop` (a static int) bounds the rows
    drawn so far: those of the current block of rows (below).
  * `end_position(codes, i, j)`: the code at (i, j) is drawn: its share of the
    cache (a type-A layer's input, an attention's key and value), written now
    so that the next step starts from one chain of work (docs/design-notes.md).
  * `end_row(codes, i)`: row i is complete (work that waits for a whole row).
  * optional: a class attribute `row_blocks` (default 1), the most blocks of
    rows to loop over, each its own compiled loop whose `stop` is its last row
    + 1 (`row_blocks`); `check_context(shape, *context, name=...)`, refusing
    bad context in one line before anything is compiled.

The cached sampler is exact when the step applies the model's own parameters to
the inputs the full pass gives each position: only the order of the
floating-point sums differs (tests/test_sampling.py checks the logits of every
step against the full pass).
"""

import functools

import jax
import jax.numpy as jnp

from lvm_jax.nn.sampling_inputs import check_arguments

METHODS = ("cached", "raster")


def raster_sample(logits_fn, rng: jax.Array, num: int, height: int, width: int) -> jax.Array:
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
        return codes.at[:, i, j].set(_draw(rng, t, logits_fn(codes)[:, i, j]))

    # The zeros of positions not yet drawn never reach a causal logits_fn.
    return jax.lax.fori_loop(0, height * width, draw, jnp.zeros((num, height, width), jnp.int32))


def _draw(rng: jax.Array, t, logits: jax.Array) -> jax.Array:
    """Codes (num,) int32 of position t from its logits (num, K): the draw both samplers share."""
    return jax.random.categorical(jax.random.fold_in(rng, t), logits).astype(jnp.int32)


def sample_codes(model, variables, rng: jax.Array, num: int, height: int, width: int,
                 method: str = "cached", condition: jax.Array | None = None) -> jax.Array:
    """Draws `num` code grids from an autoregressive prior in one jitted call.

    Args:
      model: a flax module mapping codes (num, H, W) int (and `condition`, if it
        takes one) to causal logits (num, H, W, K); for method="cached", with the
        step API (module docstring): PixelCNN, GatedPixelCNN, PixelSNAIL,
        ConditionalGatedPixelCNN (any number of layers, kernel size, dtype).
      variables: its variables, {"params": ...}, as for `model.apply`.
      rng: PRNG key; position t = i * width + j draws with fold_in(rng, t), so
        both methods return the same codes for the same key.
      num, height, width: number of grids and their size (any, non-square too).
      method: "cached", the prior's incremental step; "raster", the whole
        network once per position (`raster_sample`), the reference.
      condition: the input the model takes after the codes, required where it
        takes one (a ConditionalGatedPixelCNN's condition codes (num, h, w) int,
        e.g. the top codes under VQ-VAE-2's bottom prior), else None.
    Returns:
      (num, height, width) int32 codes in [0, K).

    Every argument is checked before anything is compiled, sizes against the
    device's memory too: a one-line error names the one it cannot draw with.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    context = check_arguments(model, variables, (num, height, width), condition, method)
    return _sample_codes(model, variables, rng, int(num), int(height), int(width), method,
                         context)


@functools.partial(jax.jit, static_argnames=("model", "num", "height", "width", "method"))
def _sample_codes(model, variables, rng, num, height, width, method, context):
    if method == "raster":
        return raster_sample(lambda codes: model.apply(variables, codes, *context), rng, num,
                             height, width)

    def draw(i, j, logits, codes, out):
        return codes.at[:, i, j].set(_draw(rng, i * width + j, logits)), out

    zeros = jnp.zeros((num, height, width), jnp.int32)
    return _cached_loop(model, variables, context, zeros, draw, None)[0]


def cached_logits(model, variables, codes: jax.Array,
                  condition: jax.Array | None = None) -> jax.Array:
    """The logits of the cached sampler's steps when it is fed `codes` instead of drawing them.

    A test of a prior's step: for a causal model these equal `model.apply(variables,
    codes[, condition])` up to the order of floating-point sums.

    Args:
      model, variables, condition: as for `sample_codes`.
      codes: (num, height, width) int codes, fed in raster order.
    Returns:
      (num, height, width, K) float32 logits.
    """
    if getattr(codes, "ndim", None) != 3 or not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"codes must be an integer array (num, H, W), got {codes!r:.60}")
    context = check_arguments(model, variables, tuple(codes.shape), condition, "cached")
    return _cached_logits(model, variables, codes, context)


@functools.partial(jax.jit, static_argnames="model")
def _cached_logits(model, variables, codes, context):
    def record(i, j, logits, codes, out):
        return codes, out.at[:, i, j].set(logits)

    logits = jax.eval_shape(model.apply, variables, codes, *context)
    out = jnp.zeros(logits.shape, jnp.float32)
    return _cached_loop(model, variables, context, codes.astype(jnp.int32), record, out)[1]


def row_blocks(height: int, blocks: int) -> list[tuple[int, int]]:
    """The row ranges [start, stop) the cached sampler loops over, one `fori_loop` each: at
    most `blocks` blocks of ceil(height / blocks) rows (the last may be shorter).

    With attention, a step in a block reads the key/value slots before the block's end, a
    static prefix, rather than all H*W: its work at position t is then at most
    t + rows_per_block * W slots, and a grid's about (1 + 1 / blocks) / 2 of reading every
    slot at every position, against 1/2 for a prefix exactly t long; more blocks would save
    at most a further 1 / (2 * blocks) at the price of compiling more loop bodies.
    """
    size = -(-height // min(height, blocks))
    return [(start, min(start + size, height)) for start in range(0, height, size)]


def _cached_loop(model, variables, context, codes, record, out):
    """Runs the model's step over the grid in raster order: row blocks in Python
    (`row_blocks`), the rows of a block in a `fori_loop`, columns in another.

    Args:
      codes: (num, H, W) int32, the codes the steps read.
      record: (i, j, logits (num, K), codes, out) -> (codes, out): draws the code
        at (i, j) into codes, or records the logits into out.
      out: the initial value of what `record` records.
    Returns:
      (codes, out) after the last position.
    """

    def apply(cache, method, *args):
        return model.apply({**variables, "cache": cache}, *args, method=method,
                           mutable=["cache"])

    _, height, width = codes.shape
    _, state = model.apply(variables, codes, *context, method="init_cache", mutable=["cache"])
    carry = (state["cache"], codes, out)
    for start, stop in row_blocks(height, getattr(model, "row_blocks", 1)):

        def row(i, carry, stop=stop):
            def column(j, carry):
                cache, codes, out = carry
                logits, state = apply(cache, "step", codes, i, j, stop)
                codes, out = record(i, j, logits, codes, out)
                return apply(state["cache"], "end_position", codes, i, j)[1]["cache"], codes, out

            cache, codes, out = jax.lax.fori_loop(0, width, column, carry)
            return apply(cache, "end_row", codes, i)[1]["cache"], codes, out

        carry = jax.lax.fori_loop(start, stop, row, carry)
    return carry[1:]
