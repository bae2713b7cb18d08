"""VQ-VAE-2's priors: PixelSNAIL (causal attention) and the top-conditioned Gated PixelCNN.

Exact causality and the receptive field on random weights, the conditioning, errors. Their
sampling: test_sampling.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.nn import ConditionalGatedPixelCNN, GatedPixelCNN, PixelCNN, PixelSNAIL
from lvm_jax.nn.pixelsnail import attend
from tests.helpers import random_variables

K, TOP_K = 6, 4
HEIGHT, WIDTH = 5, 6
PAST = np.tril(np.ones((HEIGHT * WIDTH, HEIGHT * WIDTH), bool), k=-1)  # [t, s]: s < t


def _random(model, *inputs):
    """Random variables of `model`, biases drawn too (flax starts them at zero, which would
    hide one applied at the wrong place); drawn by numpy in init's shapes, so that nothing
    compiles but the tests' own programs."""
    return random_variables(model, *inputs, bias_scale=0.3, seed=1)


def _integers(high, shape, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


def _dependence(logits_fn, x):
    """(T, T) bool over raster positions: the logits at t depend on the input x at s
    (x (1, H, W, C), the embedded codes); an exact zero gradient counts as no dependence."""
    _, height, width, _ = x.shape
    jac = jax.jit(jax.jacrev(lambda x: logits_fn(x)[0]))(x)  # (H, W, K, 1, H, W, C)
    return (np.abs(np.asarray(jac)).sum(axis=(2, 3, 6)) > 0).reshape(height * width, -1)


def _embedded(dim, seed=2):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((1, HEIGHT, WIDTH, dim)),
                       jnp.float32)


@pytest.mark.parametrize("model", [
    PixelSNAIL(K, dim=8, num_blocks=1, layers_per_block=1, num_heads=2, key_dim=4, value_dim=6,
               hidden=16),
    PixelSNAIL(K, dim=8, num_blocks=2, layers_per_block=2, kernel_size=5, num_heads=1,
               key_dim=4, value_dim=4, hidden=16),
], ids=["1block_k3_2heads", "2blocks_k5_1head"])
def test_pixelsnail_sees_exactly_every_earlier_position(model):
    """Gradient of the logits at every position t w.r.t. the input at every s: exactly 0 for
    s >= t, nonzero for every s < t (the attention reaches beyond the convolutions' field)."""
    x = _embedded(model.dim)
    variables = _random(model, jnp.zeros((1, 2, 2), jnp.int32))
    dep = _dependence(lambda x: model.apply(variables, x, method=model.logits), x)
    np.testing.assert_array_equal(dep, PAST)


def test_pixelsnail_attention_is_what_reaches_far_positions():
    """Without its attention blocks (their mixing weights zeroed) one 3x3 gated layer sees only
    the two rows above (the vertical stack: the rows i - 1 .. i of its input, shifted down one
    row) in columns j - 1 .. j + 1, and the left neighbour: the attention reaches the rest."""
    model = PixelSNAIL(K, dim=8, num_blocks=1, layers_per_block=1, num_heads=2, key_dim=4,
                       value_dim=6, hidden=16)
    variables = _random(model, jnp.zeros((1, 2, 2), jnp.int32))
    variables = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "mix_attention" in jax.tree_util.keystr(path) else x,
        variables)
    seen = _dependence(lambda x: model.apply(variables, x, method=model.logits),
                       _embedded(8))[3 * WIDTH + 3].reshape(HEIGHT, WIDTH)
    expected = np.zeros((HEIGHT, WIDTH), bool)
    expected[1:3, 2:5] = expected[3, 2] = True
    np.testing.assert_array_equal(seen, expected)


def test_pixelsnail_dropout_only_in_training():
    model = PixelSNAIL(K, dim=8, num_blocks=1, layers_per_block=1, num_heads=2, key_dim=4,
                       value_dim=6, hidden=16, dropout_rate=0.5)
    codes = _integers(K, (2, HEIGHT, WIDTH), 3)
    variables = random_variables(model, codes)
    # Compiled (op by op, every primitive would compile alone); train and the key traced.
    apply = jax.jit(lambda train, key: model.apply(variables, codes, train=train,
                                                   rngs={"dropout": key}), static_argnums=0)
    logits = jax.jit(lambda: model.apply(variables, codes))()
    assert logits.shape == (2, HEIGHT, WIDTH, K) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, apply(False, jax.random.key(0)))
    train = [apply(True, jax.random.key(seed)) for seed in (0, 1)]
    assert not np.allclose(train[0], logits) and not np.allclose(train[0], train[1])
    # Dropout masks positions independently but never mixes them: still causal.
    dep = _dependence(lambda x: model.apply(variables, x, True, method=model.logits,
                                            rngs={"dropout": jax.random.key(0)}), _embedded(8))
    assert not np.any(dep & ~PAST)


def test_attend_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 4, d)), jnp.float32) for d in (6, 6, 4))
    visible = np.tril(np.ones((4, 4), bool), k=-1)
    out = np.asarray(attend(q, k, v, visible, num_heads=2))
    expected = np.zeros((2, 4, 4))
    for head in range(2):
        qh, kh, vh = (np.asarray(a)[..., head * a.shape[-1] // 2:(head + 1) * a.shape[-1] // 2]
                      for a in (q, k, v))
        for t in range(1, 4):
            scores = qh[:, t, None] @ kh[:, :t].transpose(0, 2, 1) / np.sqrt(3)  # (2, 1, t)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            expected[:, t, head * 2:(head + 1) * 2] = (weights @ vh[:, :t])[:, 0]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)  # row 0: nothing visible, 0


CONDITIONAL = ConditionalGatedPixelCNN(K, TOP_K, dim=8, num_layers=3, hidden=16,
                                       condition_dim=8, num_condition_blocks=1)


def _conditional_variables():
    return _random(CONDITIONAL, jnp.zeros((1, 2, 2), jnp.int32), jnp.zeros((1, 1, 1), jnp.int32))


def test_conditional_prior_is_causal_in_the_codes_and_has_no_blind_spot():
    """Causal in the bottom codes whatever the top codes: like GatedPixelCNN, 5x5 kernels in 3
    layers see the whole 5x6 past, and nothing else."""
    model = CONDITIONAL.clone(kernel_size=5)
    variables = _random(model, jnp.zeros((1, 2, 2), jnp.int32), jnp.zeros((1, 1, 1), jnp.int32))
    top = _integers(TOP_K, (1, HEIGHT, WIDTH // 2), 4)
    condition = jax.jit(lambda top: model.apply(variables, top, (HEIGHT, WIDTH),
                                                method=model.condition))(top)
    assert condition.shape == (1, HEIGHT, WIDTH, 8)
    dep = _dependence(lambda x: model.apply(variables, x, condition, method=model.logits),
                      _embedded(8))
    np.testing.assert_array_equal(dep, PAST)


def test_conditional_prior_uses_every_top_code():
    """The logits at each bottom position change with the top code above it (a 2x upsampling:
    top (i, j) covers bottom rows 2i, 2i + 1 and columns 2j, 2j + 1) and every top code
    changes some logits, the first position's included."""
    variables = _conditional_variables()
    codes = _integers(K, (1, 4, 6), 3)
    top = np.asarray(_integers(TOP_K, (1, 2, 3), 4))
    apply = jax.jit(lambda top: CONDITIONAL.apply(variables, codes, top))  # one program
    logits = np.asarray(apply(top))
    assert logits.shape == (1, 4, 6, K) and logits.dtype == np.float32
    for i in range(2):
        for j in range(3):
            other = top.copy()
            other[0, i, j] = (top[0, i, j] + 1) % TOP_K
            changed = np.abs(np.asarray(apply(other)) - logits)
            assert np.all(changed[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(-1) > 1e-4)
    first = top.copy()
    first[0, 0, 0] = (top[0, 0, 0] + 1) % TOP_K
    assert not np.allclose(apply(first)[0, 0, 0], logits[0, 0, 0])


def test_gated_layer_without_condition_keeps_gated_pixelcnn_parameters():
    """The conditioned prior's layers add only the named condition convs to GatedPixelCNN's."""
    codes = jnp.zeros((1, 2, 2), jnp.int32)
    # The parameters' names and shapes: init traced (jax.eval_shape), not run.
    plain = jax.eval_shape(GatedPixelCNN(K, dim=8, num_layers=2, hidden=16).init,
                           jax.random.key(0), codes)
    conditioned = jax.eval_shape(CONDITIONAL.clone(num_layers=2).init, jax.random.key(0), codes,
                                 jnp.zeros((1, 1, 1), jnp.int32))
    assert sorted(plain["params"]["layers_1"]) == ["horizontal", "link", "out", "vertical"]
    assert sorted(conditioned["params"]["layers_1"]) == [
        "condition_horizontal", "condition_vertical", "horizontal", "link", "out", "vertical"]


@pytest.mark.parametrize("model", [
    PixelCNN(K, embed_dim=8, num_residual_blocks=2, hidden=16),
    GatedPixelCNN(K, dim=8, num_layers=2, hidden=16),
    PixelSNAIL(K, dim=8, num_blocks=2, layers_per_block=1, num_heads=2, key_dim=4,
               value_dim=4, hidden=16),
    CONDITIONAL], ids=lambda model: type(model).__name__)
def test_every_submodule_has_an_explicit_name(model):
    """No flax automatic name (Conv_0, Dense_1, ...) in a prior's parameters: the step API and
    the PyTorch twins address each by its name, which adding a layer cannot re-index."""
    grid = jnp.zeros((1, 2, 2), jnp.int32)
    inputs = (grid, grid[:, :1, :1]) if model is CONDITIONAL else (grid,)
    params = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]  # traced, not run
    names = {str(getattr(key, "key", key)) for path, _ in
             jax.tree_util.tree_flatten_with_path(params)[0] for key in path}
    assert {"embed", "head"} <= names
    assert not [name for name in names if re.fullmatch(r"[A-Z]\w*_\d+", name)]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        PixelSNAIL(K, num_heads=3, key_dim=8)
    with pytest.raises(ValueError, match="odd"):
        PixelSNAIL(K, kernel_size=4)
    with pytest.raises(ValueError, match="dropout_rate"):
        PixelSNAIL(K, dropout_rate=1.0)
    with pytest.raises(ValueError, match="positive"):
        PixelSNAIL(K, num_blocks=0)
    with pytest.raises(ValueError, match="odd"):
        ConditionalGatedPixelCNN(K, TOP_K, kernel_size=2)
    codes = jnp.zeros((1, 4, 6), jnp.int32)
    with pytest.raises(TypeError, match="codes must be an integer array"):
        PixelSNAIL(K).init(jax.random.key(0), codes.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"codes must have shape \(batch, H, W\)"):
        PixelSNAIL(K).init(jax.random.key(0), codes[0])
    init = lambda top: CONDITIONAL.init(jax.random.key(0), codes, top)
    with pytest.raises(TypeError, match="condition_codes must be an integer array"):
        init(jnp.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match=r"condition_codes must have shape \(batch, H, W\)"):
        init(jnp.zeros((2, 3), jnp.int32))
    for top in (jnp.zeros((1, 3, 3), jnp.int32), jnp.zeros((2, 2, 3), jnp.int32)):
        with pytest.raises(ValueError, match=r"divides theirs by an integer") as error:
            init(top)
        assert "\n" not in str(error.value)
