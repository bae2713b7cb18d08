"""Masks and receptive fields of the PixelCNN priors (their sampling: test_sampling.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.nn.masked_conv import (
    GatedPixelCNN,
    MaskedConv,
    PixelCNN,
    conv_mask,
    horizontal_mask,
)
from tests.helpers import random_variables


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _integers(high, shape, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


@pytest.mark.parametrize(
    "kernel_size, mask_type, expected",
    [
        (3, "A", [[1, 1, 1], [1, 0, 0], [0, 0, 0]]),
        (3, "B", [[1, 1, 1], [1, 1, 0], [0, 0, 0]]),
        (5, "A", [[1] * 5, [1] * 5, [1, 1, 0, 0, 0], [0] * 5, [0] * 5]),
        (5, "B", [[1] * 5, [1] * 5, [1, 1, 1, 0, 0], [0] * 5, [0] * 5]),
    ],
)
def test_conv_mask(kernel_size, mask_type, expected):
    np.testing.assert_array_equal(conv_mask(kernel_size, mask_type), np.array(expected))


@pytest.mark.parametrize(
    "kernel_size, first, expected",
    [(1, True, [[0]]), (1, False, [[1]]), (3, True, [[1, 0]]), (5, False, [[1, 1, 1]])],
)
def test_horizontal_mask(kernel_size, first, expected):
    np.testing.assert_array_equal(horizontal_mask(kernel_size, first), np.array(expected))


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_masked_conv_sees_exactly_its_mask(mask_type):
    conv = MaskedConv(features=3, kernel_size=5, mask_type=mask_type)
    x = _normal((1, 7, 7, 2), 0)
    params = random_variables(conv, x)  # random weights drawn by numpy: nothing to compile
    jac = jax.jit(jax.jacrev(lambda x: conv.apply(params, x)[0, 3, 3]))(x)  # (3, 1, 7, 7, 2)
    seen = np.abs(jac).sum(axis=(0, 1, 4))[1:6, 1:6] > 0
    np.testing.assert_array_equal(seen, conv_mask(5, mask_type).astype(bool))


def _dependence(model, params, x):
    """(H*W, H*W) bool: logits at raster position p depend on the input at q."""
    _, height, width, _ = x.shape
    jac = jax.jit(jax.jacrev(lambda x: model.apply(params, x, method=model.logits)[0]))(x)
    return (np.abs(jac).sum(axis=(2, 3, 6)) > 0).reshape(height * width, height * width)


def test_pixelcnn_is_causal_and_has_a_blind_spot():
    model = PixelCNN(num_classes=4, embed_dim=8, num_residual_blocks=2, hidden=16)
    codes = _integers(4, (1, 8, 8), 0)
    params = random_variables(model, codes)  # random weights drawn by numpy: nothing to compile
    logits = jax.jit(model.apply)(params, codes)
    assert logits.shape == (1, 8, 8, 4)

    x = _normal((1, 8, 8, 8), 2)
    dep = _dependence(model, params, x)
    assert not np.any(np.triu(dep)), "logits see the current or a later position"

    # Row i - 1 is reached only by the 7x7 type-A layer (3 columns to the right):
    # type-B 3x3 layers reach further right only by going up a row as well.
    (i, j) = (4, 2)
    seen = dep[i * 8 + j].reshape(8, 8)
    assert seen[i - 1, j + 3] and not seen[i - 1, j + 4], "blind spot at (i - 1, j + 4)"
    assert seen[i - 2, j + 4]


def test_gated_pixelcnn_sees_every_earlier_position():
    # 5x5 kernels, 3 layers: rows i - 7 .. i and columns j - 6 .. j + 6, the whole 6x6 past.
    model = GatedPixelCNN(num_classes=4, dim=8, num_layers=3, kernel_size=5, hidden=16)
    codes = _integers(4, (1, 6, 6), 0)
    params = random_variables(model, codes)  # random weights drawn by numpy: nothing to compile
    assert jax.jit(model.apply)(params, codes).shape == (1, 6, 6, 4)

    x = _normal((1, 6, 6, 8), 2)
    dep = _dependence(model, params, x)
    np.testing.assert_array_equal(dep, np.tril(np.ones((36, 36), bool), k=-1))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="mask_type"):
        MaskedConv(4, 3, "C")
    with pytest.raises(ValueError, match="odd"):
        MaskedConv(4, 4, "A")
    with pytest.raises(ValueError, match="odd"):
        GatedPixelCNN(num_classes=4, kernel_size=2)
    tiny = [
        PixelCNN(4, embed_dim=4, num_residual_blocks=1, hidden=8),
        GatedPixelCNN(4, dim=4, num_layers=1, hidden=8),
    ]
    for model in tiny:
        with pytest.raises(TypeError, match="integer"):
            model.init(jax.random.key(0), jnp.zeros((1, 4, 4)))
        with pytest.raises(ValueError, match=r"\(batch, H, W\)"):
            model.init(jax.random.key(0), jnp.zeros((4, 4), jnp.int32))
