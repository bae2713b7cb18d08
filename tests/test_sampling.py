"""Sampling the PixelCNN-family priors: the cached sampler against the full pass and the raster
loop, for PixelCNN, Gated PixelCNN, PixelSNAIL (attention) and the conditioned Gated PixelCNN."""

import functools
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from lvm_jax.nn import ConditionalGatedPixelCNN, GatedPixelCNN, PixelCNN, PixelSNAIL, sample_codes
from lvm_jax.nn.masked_conv import MaskedConv, code_at
from lvm_jax.nn.pixelsnail import CausalAttentionBlock
from lvm_jax.nn import sampling
from lvm_jax.nn.sampling import cached_logits, raster_sample, row_blocks

K, TOP_K = 5, 3
# Tiny priors over K codes: kernel sizes 1, 3 and 5; 1 to 4 layers or blocks; 1 or 2 attention
# blocks of 1 or 2 heads; conditioned on TOP_K codes.
PRIORS = {
    "pixelcnn_k3_2blocks": PixelCNN(K, embed_dim=8, num_residual_blocks=2, hidden=16),
    "pixelcnn_k5_3blocks": PixelCNN(K, embed_dim=8, num_residual_blocks=3, hidden=16,
                                    kernel_size=5),
    "pixelcnn_k1_1block": PixelCNN(K, embed_dim=8, num_residual_blocks=1, hidden=16,
                                   kernel_size=1),
    "gated_k3_3layers": GatedPixelCNN(K, dim=8, num_layers=3, hidden=16),
    "gated_k5_2layers": GatedPixelCNN(K, dim=8, num_layers=2, hidden=16, kernel_size=5),
    "gated_k1_4layers": GatedPixelCNN(K, dim=8, num_layers=4, hidden=16, kernel_size=1),
    "snail_k3_2blocks": PixelSNAIL(K, dim=8, num_blocks=2, layers_per_block=1, num_heads=2,
                                   key_dim=4, value_dim=6, hidden=16),
    "snail_k5_1block_2layers": PixelSNAIL(K, dim=8, num_blocks=1, layers_per_block=2,
                                          kernel_size=5, num_heads=1, key_dim=4, value_dim=4,
                                          hidden=16),
    "conditional_k3_3layers": ConditionalGatedPixelCNN(K, TOP_K, dim=8, num_layers=3, hidden=16,
                                                       condition_dim=8, num_condition_blocks=1),
    "conditional_k5_2layers": ConditionalGatedPixelCNN(K, TOP_K, dim=8, num_layers=2, hidden=16,
                                                       kernel_size=5, condition_dim=6,
                                                       num_condition_blocks=2),
}


def _drawn(model, *inputs, bias_scale=0.0, seed=0):
    """Variables of `model` in the shapes its init gives, drawn by numpy at the scales of
    flax's initialisers (kernels LeCun normal, embeddings normal with variance 1 / features)
    and biases N(0, bias_scale^2). Nothing is compiled: flax's own init compiles a program
    of seconds for every prior (an erf_inv per parameter), and what these tests need is
    random weights."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        fan_in = leaf.shape[-1] if "embedding" in name else int(np.prod(leaf.shape[:-1]))
        scale = bias_scale if leaf.ndim == 1 else 1 / np.sqrt(fan_in)
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(
        draw, jax.eval_shape(model.init, jax.random.key(0), *inputs))


@functools.cache
def _variables(name: str):
    """Variables of PRIORS[name], with biases drawn too (flax starts them at zero, which would
    hide a bias applied at the wrong place)."""
    grid = jnp.zeros((1, 1, 1), jnp.int32)
    model = PRIORS[name]
    return _drawn(model, *((grid, grid) if _conditioned(model) else (grid,)), bias_scale=0.3,
                  seed=1)


def _conditioned(model) -> bool:
    return isinstance(model, ConditionalGatedPixelCNN)


def _codes(grid=(5, 7), num=3):
    """Random codes (num, *grid) in [0, K)."""
    return jnp.asarray(np.random.default_rng(2).integers(0, K, (num, *grid)), jnp.int32)


def _condition(model, grid=(5, 7), num=3):
    """For a conditioned prior, random top codes (num, h, w) in [0, TOP_K), each side of the
    grid halved where even (an upsampling by 2) and kept where odd (by 1); else None."""
    if not _conditioned(model):
        return None
    top_grid = tuple(size // 2 if size % 2 == 0 else size for size in grid)
    return jnp.asarray(np.random.default_rng(5).integers(0, TOP_K, (num, *top_grid)), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)  # op by op, every primitive would compile alone
def _apply(model, variables, codes, condition):
    return model.apply(variables, codes, *(() if condition is None else (condition,)))


def _assert_close(actual, expected, rtol):
    """Equal to `rtol` relative to the largest |expected| (logits near 0 have no relative scale)."""
    expected = np.asarray(expected, np.float32)
    np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=rtol,
                               atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize(
    "name, grid",
    [(name, (5, 7)) for name in PRIORS]
    + [(name, grid) for name in ("pixelcnn_k3_2blocks", "gated_k3_3layers", "snail_k3_2blocks",
                                 "conditional_k3_3layers")
       for grid in ((1, 4), (4, 1))]
    + [("conditional_k5_2layers", (4, 6))],
    ids=lambda value: value if isinstance(value, str) else "x".join(map(str, value)))
def test_cached_logits_equal_the_full_pass(name, grid):
    """Teacher-forced: fed fixed codes, the cached steps give the full pass's logits everywhere."""
    model = PRIORS[name]
    variables, codes, condition = _variables(name), _codes(grid), _condition(model, grid)
    expected = _apply(model, variables, codes, condition)
    assert np.ptp(np.asarray(expected)) > 0.2  # logits that vary: a real comparison
    _assert_close(cached_logits(model, variables, codes, condition), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["pixelcnn_k3_2blocks", "gated_k5_2layers", "snail_k3_2blocks",
                                  "snail_k5_1block_2layers", "conditional_k3_3layers"])
def test_cached_and_raster_samplers_draw_the_same_codes(name):
    model = PRIORS[name]
    variables, condition = _variables(name), _condition(PRIORS[name], (4, 6), num=8)
    sample = functools.partial(sample_codes, model, variables, num=8, height=4, width=6,
                               condition=condition)
    cached = sample(rng=jax.random.key(7))
    raster = sample(rng=jax.random.key(7), method="raster")
    assert cached.shape == (8, 4, 6) and cached.dtype == jnp.int32
    assert len(np.unique(np.asarray(cached))) == K  # draws, not a constant grid
    np.testing.assert_array_equal(cached, raster)
    assert not np.array_equal(cached, sample(rng=jax.random.key(8)))


def test_conditioned_samples_follow_the_condition():
    """The same key under other top codes draws other codes (the conditioning is used; with
    random weights it moves some logits only a little, so a fraction of the draws change)."""
    name = "conditional_k3_3layers"
    model, variables = PRIORS[name], _variables(name)
    top = _condition(model, (4, 6), num=8)
    draw = lambda top: np.asarray(sample_codes(model, variables, jax.random.key(7), 8, 4, 6,
                                               condition=top))
    assert np.mean(draw(top) != draw((top + 1) % TOP_K)) > 0.05


@pytest.mark.parametrize("name", ["pixelcnn_k3_2blocks", "gated_k3_3layers", "snail_k3_2blocks",
                                  "conditional_k3_3layers"])
def test_bfloat16_cached_sampling(name):
    """bfloat16 priors (float32 parameters) sample, and their cached logits are the full pass's
    to bfloat16 precision."""
    model = PRIORS[name]
    variables, codes, condition = _variables(name), _codes(), _condition(model)
    low = model.clone(dtype=jnp.bfloat16)
    logits = cached_logits(low, variables, codes, condition)
    assert logits.dtype == jnp.float32
    _assert_close(logits, _apply(low, variables, codes, condition), rtol=3e-2)
    _assert_close(logits, _apply(model, variables, codes, condition), rtol=5e-2)
    sampled = np.asarray(sample_codes(low, variables, jax.random.key(3), 4, 5, 7,
                                      condition=_condition(model, num=4)))
    assert sampled.shape == (4, 5, 7) and sampled.dtype == np.int32
    assert sampled.min() >= 0 and sampled.max() < K


def test_row_blocks_cover_the_grid_in_at_most_the_blocks_asked():
    assert row_blocks(32, 1) == [(0, 32)]
    assert row_blocks(32, 4) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert row_blocks(5, 4) == [(0, 2), (2, 4), (4, 5)]
    assert row_blocks(3, 4) == [(0, 1), (1, 2), (2, 3)]


def test_cached_attention_reads_only_the_filled_rows_of_its_cache():
    """On an 8x3 grid (row blocks of 2 rows), each step's attention scores cover the cache up
    to the end of its block, 6, 12, 18 or 24 slots, not all 24 at every step."""
    model = PRIORS["snail_k3_2blocks"]  # 2 heads
    jaxpr = str(jax.make_jaxpr(lambda v, key: sample_codes(model, v, key, 2, 8, 3))(
        _variables("snail_k3_2blocks"), jax.random.key(0)))
    score_slots = {int(slots) for slots in
                   re.findall(r"f32\[2,2,1,(\d+)\] = dot_general", jaxpr)}  # (num, heads, 1, S)
    assert score_slots == {6, 12, 18, 24}


@pytest.mark.parametrize("name", ["pixelcnn_k3_2blocks", "gated_k3_3layers", "snail_k3_2blocks",
                                  "conditional_k3_3layers"])
def test_cached_sampler_runs_no_convolution(name):
    """The cached loop works position by position (matrix products of cached windows); only
    the raster loop runs convolutions over the whole grid. The conditioned prior's cached
    sampler runs its conditioning stack's convolutions, once, before the loop."""
    model = PRIORS[name]
    variables, condition = _variables(name), _condition(model, (4, 4), num=2)

    def jaxpr(method):
        return str(jax.make_jaxpr(lambda v, key: sample_codes(model, v, key, 2, 4, 4, method,
                                                              condition))(
            variables, jax.random.key(0)))

    convolutions = 0
    if condition is not None:
        stack = jax.make_jaxpr(lambda v: model.apply(v, condition, (4, 4),
                                                     method=model.condition))(variables)
        convolutions = str(stack).count("conv_general_dilated")
        assert convolutions == 2  # its one residual block's 3x3 and 1x1
    assert jaxpr("cached").count("conv_general_dilated") == convolutions
    assert "conv_general_dilated" in jaxpr("raster")


def test_raster_sample_reproduces_known_conditionals():
    """Column 0 ~ a fixed distribution per row; every later code copies its left neighbour."""
    p = jnp.array([[0.1, 0.6, 0.3], [0.5, 0.0, 0.5], [0.2, 0.2, 0.6]])
    height, width, num = 3, 4, 4000

    def logits_fn(codes):
        left = jnp.pad(codes, ((0, 0), (0, 0), (1, 0)))[:, :, :-1]
        copy = 30.0 * jax.nn.one_hot(left, 3)
        first = jnp.broadcast_to(jnp.log(p)[None, :, None], copy[:, :, :1].shape)
        return copy.at[:, :, :1].set(first)

    sample = jax.jit(functools.partial(raster_sample, logits_fn, num=num, height=height, width=width))
    codes = np.asarray(sample(jax.random.key(0)))
    assert codes.shape == (num, height, width) and codes.dtype == np.int32
    np.testing.assert_array_equal(codes, np.repeat(codes[:, :, :1], width, axis=2))
    freq = np.stack([np.bincount(codes[:, i, 0], minlength=3) / num for i in range(height)])
    np.testing.assert_allclose(freq, p, atol=0.03)  # 4 standard errors


def _checkerboards():
    """The two 6x6 checkerboards of codes 1 and 2, (2, 6, 6) int32."""
    parity = np.indices((6, 6)).sum(0) % 2
    return jnp.asarray(np.stack([1 + parity, 2 - parity]), jnp.int32)


def _train(model, *inputs, steps=300):
    """Parameters after `steps` of Adam on the mean NLL (nats per code) of inputs[0] given the
    rest, and the last loss."""
    params = _drawn(model, *inputs)
    optimizer = optax.adam(3e-3)

    @jax.jit
    def train_step(params, opt_state):
        def nll(params):
            logits = model.apply(params, *inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, inputs[0]).mean()

        loss, grads = jax.value_and_grad(nll)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    for _ in range(steps):
        params, opt_state, loss = train_step(params, opt_state)
    return params, loss


@pytest.mark.parametrize("model_cls", [PixelCNN, GatedPixelCNN, PixelSNAIL])
def test_trained_prior_samples_its_training_patterns(model_cls):
    """Trained on the two 6x6 checkerboards of codes 1 and 2, it samples only those, with
    either method."""
    patterns = _checkerboards()
    model = {
        PixelCNN: lambda: PixelCNN(num_classes=3, embed_dim=16, num_residual_blocks=2, hidden=32),
        GatedPixelCNN: lambda: GatedPixelCNN(num_classes=3, dim=16, num_layers=3, hidden=32),
        PixelSNAIL: lambda: PixelSNAIL(num_classes=3, dim=16, num_blocks=1, layers_per_block=2,
                                       num_heads=2, key_dim=8, value_dim=16, hidden=32),
    }[model_cls]()
    params, loss = _train(model, patterns)
    # Only the first code is uncertain: log 2 nats over 36 positions.
    assert loss < np.log(2) / 36 + 0.01

    codes = sample_codes(model, params, jax.random.key(1), 16, 6, 6)
    np.testing.assert_array_equal(codes, sample_codes(model, params, jax.random.key(1), 16, 6, 6,
                                                      method="raster"))
    matches = np.all(np.asarray(codes)[:, None] == np.asarray(patterns)[None], axis=(2, 3))
    assert np.all(matches.any(axis=1)), "every sample is one of the training patterns"
    assert np.all(matches.any(axis=0)), "both patterns are sampled"


def test_trained_conditional_prior_samples_the_pattern_its_condition_names():
    """Trained on checkerboard 0 under a 3x3 top grid of 0s and checkerboard 1 under 1s, every
    code is certain given the top codes (the first too), and the samples follow them."""
    patterns = _checkerboards()
    top = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32)[:, None, None], (2, 3, 3))
    model = ConditionalGatedPixelCNN(3, 2, dim=16, num_layers=3, hidden=32, condition_dim=8,
                                     num_condition_blocks=1)
    params, loss = _train(model, patterns, top)
    assert loss < 0.01

    condition = jnp.asarray(np.repeat(np.arange(2), 8), jnp.int32)[:, None, None] + jnp.zeros(
        (1, 3, 3), jnp.int32)
    codes = sample_codes(model, params, jax.random.key(1), 16, 6, 6, condition=condition)
    np.testing.assert_array_equal(codes, sample_codes(model, params, jax.random.key(1), 16, 6, 6,
                                                      method="raster", condition=condition))
    np.testing.assert_array_equal(codes, np.repeat(np.asarray(patterns), 8, axis=0))


def test_bad_arguments_are_rejected():
    name = "pixelcnn_k3_2blocks"
    model, variables = PRIORS[name], _variables(name)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="method must be one of"):
        sample_codes(model, variables, key, 2, 3, 3, method="beam")
    with pytest.raises(ValueError, match="height must be a positive int"):
        sample_codes(model, variables, key, 2, 0, 3)
    with pytest.raises(TypeError, match="model must be a flax Module"):
        sample_codes(object(), variables, key, 2, 3, 3)
    with pytest.raises(TypeError, match="a Dense has no step API .* draw with method='raster'"):
        sample_codes(nn.Dense(3), variables, key, 2, 3, 3)
    for bad in (variables["params"], {"batch_stats": {}}, [variables]):
        with pytest.raises(ValueError, match=r"variables must be \{'params': params\}") as error:
            sample_codes(model, bad, key, 2, 3, 3)
        assert "\n" not in str(error.value)
    other = _variables("pixelcnn_k5_3blocks")  # 5x5 kernels and a third block
    with pytest.raises(ValueError, match=r"variables\['params'\] do not fit this PixelCNN: "
                                         r"blocks_0/masked/conv/kernel has shape "
                                         r"\(5, 5, 8, 8\), expected \(3, 3, 8, 8\); ") as error:
        sample_codes(model, other, key, 2, 3, 3)
    assert str(error.value).endswith("unexpected blocks_2")
    with pytest.raises(ValueError, match="missing condition_stack; missing "
                                         "layers_0/condition_horizontal; missing "
                                         "layers_0/condition_vertical; ...$"):
        sample_codes(PRIORS["conditional_k3_3layers"], _variables("gated_k3_3layers"), key, 2, 4,
                     6, condition=jnp.zeros((2, 2, 3), jnp.int32))
    with pytest.raises(ValueError, match="condition is for a prior that takes an input after "
                                         "the codes; a PixelCNN takes none"):
        sample_codes(model, variables, key, 2, 4, 6, condition=jnp.zeros((2, 2, 3), jnp.int32))
    name = "conditional_k3_3layers"
    model, variables = PRIORS[name], _variables(name)
    with pytest.raises(ValueError, match="a ConditionalGatedPixelCNN needs condition= its "
                                         "condition_codes"):
        sample_codes(model, variables, key, 2, 4, 6)
    with pytest.raises(ValueError, match="divides theirs by an integer"):
        sample_codes(model, variables, key, 2, 4, 6, condition=jnp.zeros((2, 3, 3), jnp.int32))
    with pytest.raises(TypeError, match="condition must be an integer array"):
        sample_codes(model, variables, key, 2, 4, 6, condition=jnp.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="condition .* divides theirs by an integer"):
        cached_logits(model, variables, _codes((4, 6)), jnp.zeros((1, 2, 3), jnp.int32))


def _one_line_error(error_type, match, *args, **kwargs):
    with pytest.raises(error_type, match=match) as error:
        sample_codes(*args, **kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("bad", [999, TOP_K, -1])
def test_condition_codes_out_of_range_are_refused(bad):
    """Out-of-range top codes would index the conditioning embedding out of bounds (flax
    clamps or zeroes them silently): refused, naming the range."""
    name = "conditional_k3_3layers"
    condition = jnp.zeros((2, 2, 3), jnp.int32).at[1, 0, 2].set(bad)
    low, high = min(bad, 0), max(bad, 0)
    _one_line_error(ValueError, rf"condition must lie in \[0, {TOP_K}\) \(num_condition_"
                                rf"classes\), got values in \[{low}, {high}\]",
                    PRIORS[name], _variables(name), jax.random.key(0), 2, 4, 6,
                    condition=condition)


def test_malformed_conditions_and_sizes_are_refused_in_one_line():
    key = jax.random.key(0)
    model, variables = PRIORS["conditional_k3_3layers"], _variables("conditional_k3_3layers")
    _one_line_error(ValueError, r"condition \(2, 0, 0\) must have the batch of codes .* a "
                                r"non-empty grid", model, variables, key, 2, 4, 6,
                    condition=jnp.zeros((2, 0, 0), jnp.int32))
    _one_line_error(TypeError, "condition must be an array, got list", model, variables, key,
                    2, 4, 6, condition=[[[0, 1, 2], [0, 1, 2]]] * 2)
    model, variables = PRIORS["snail_k3_2blocks"], _variables("snail_k3_2blocks")
    _one_line_error(ValueError, "num must be a positive int, got True", model, variables, key,
                    True, 4, 6)
    for height, width in ((50000, 50000), (2**31, 1)):
        _one_line_error(ValueError, r"height \* width must be at most 2\*\*31 - 1 positions",
                        model, variables, key, 1, height, width)


@pytest.mark.parametrize("method", ["cached", "raster"])
def test_sizes_beyond_memory_are_refused_before_compiling(method):
    """A million 1000x1000 grids hold 4e12 bytes of codes alone: a MemoryError naming the
    bytes, not an abort inside XLA."""
    name = "gated_k3_3layers"
    _one_line_error(MemoryError, r"num, height and width ask for at least [\d,]+ bytes of "
                                 r"arrays, more than the [\d,]+ bytes",
                    PRIORS[name], _variables(name), jax.random.key(0), 10**6, 1000, 1000,
                    method=method)


class _ConvAttentionPrior(nn.Module):
    """A prior that sampling.py has never seen: two 5x5 masked convolutions (type A, then B)
    and a causal attention block, each layer's own step composed into the prior's step."""

    num_classes: int
    dim: int = 8

    row_blocks = 2  # the attention reads the key/value cache in 2 blocks of rows

    def setup(self):
        self.embed = nn.Embed(self.num_classes, self.dim)
        self.conv_a = MaskedConv(self.dim, 5, "A")
        self.conv_b = MaskedConv(self.dim, 5, "B")
        self.attention = CausalAttentionBlock(self.dim, num_heads=2, key_dim=4, value_dim=6,
                                              dropout_rate=0.0, dtype=jnp.float32)
        self.head = nn.Dense(self.num_classes)

    def __call__(self, codes):
        x = self.embed(codes)
        return self.head(self.attention(self.conv_b(nn.relu(self.conv_a(x))), x))

    def init_cache(self, codes):
        num, height, width = codes.shape
        self.conv_a.init_cache(num, width, self.dim)
        self.conv_b.init_cache(num, width, self.dim)
        self.attention.init_cache(num, height, width)

    def step(self, codes, i, j, stop):
        h = self.conv_b.step(nn.relu(self.conv_a.step(None, j)), j)
        return self.head(self.attention.step(h, i, j, codes.shape[1:], stop))

    def end_position(self, codes, i, j):
        embedded = self.embed(code_at(codes, i, j))
        self.conv_a.write(embedded, j)
        self.attention.write(embedded, i, j, codes.shape[1:])

    def end_row(self, codes, i):
        self.conv_a.end_row()
        self.conv_b.end_row()


def test_a_new_prior_with_the_step_api_samples_exactly_without_touching_the_sampler():
    model = _ConvAttentionPrior(K)
    variables = _drawn(model, jnp.zeros((1, 5, 7), jnp.int32), bias_scale=0.3)
    codes = _codes()
    expected = _apply(model, variables, codes, None)
    assert np.ptp(np.asarray(expected)) > 0.2
    _assert_close(cached_logits(model, variables, codes), expected, rtol=1e-5)
    cached = sample_codes(model, variables, jax.random.key(7), 8, 5, 7)
    assert len(np.unique(np.asarray(cached))) == K
    np.testing.assert_array_equal(cached, sample_codes(model, variables, jax.random.key(7), 8,
                                                       5, 7, method="raster"))


def test_the_sampler_knows_no_model():
    """sampling.py imports no prior, tests no type and indexes no parameter: a loop over the
    step API in at most 200 lines."""
    source = inspect.getsource(sampling)
    assert len(source.splitlines()) <= 200
    assert not re.search(r"masked_conv|pixelsnail|isinstance|\[\"(params|kernel)|Conv_", source)
