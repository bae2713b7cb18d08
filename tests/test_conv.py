"""Convolutional blocks: the phase-wise transposed convolution equals PyTorch's definition,
in value, gradients and FLOPs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.nn.conv import (ConvDecoder, ConvEncoder, SubPixelConvTranspose, conv_transpose_4x4_s2,
                             depth_to_space)
from tests.helpers import random_variables


def conv_transpose_reference(x, kernel, bias):
    """PyTorch ConvTranspose2d(k=4, s=2, p=1) by its definition, a scatter, in NumPy:
    out[2i - 1 + a, 2j - 1 + b] += x[i, j] @ kernel[a, b], cropped to (2H, 2W)."""
    bsz, h, w, _ = x.shape
    out = np.zeros((bsz, 2 * h + 2, 2 * w + 2, kernel.shape[-1]))
    for a in range(4):
        for b in range(4):
            out[:, a:a + 2 * h:2, b:b + 2 * w:2] += np.einsum("nhwc,cd->nhwd", x, kernel[a, b])
    return out[:, 1:2 * h + 1, 1:2 * w + 1] + bias


@pytest.mark.parametrize("shape, features", [((2, 4, 4, 3), 5), ((1, 3, 7, 2), 4), ((2, 1, 1, 1), 1)])
def test_layer_equals_the_pytorch_definition(shape, features):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    layer = SubPixelConvTranspose(features)
    params = layer.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    expected = conv_transpose_reference(x, np.asarray(params["params"]["kernel"]),
                                        np.asarray(params["params"]["bias"]))
    np.testing.assert_allclose(layer.apply(params, x), expected, rtol=1e-4, atol=1e-4)


def lax_conv_transpose(x, kernel):
    """The same function as lax.conv_transpose with PyTorch's padding (k - 1 - p = 2)."""
    return jax.lax.conv_transpose(x, kernel[::-1, ::-1], (2, 2), ((2, 2), (2, 2)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_layer_matches_a_transposed_convolution_with_the_same_kernel():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    layer = SubPixelConvTranspose(4)
    params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32),
                          layer.init(jax.random.key(0), x))
    reference = lax_conv_transpose(x, params["params"]["kernel"])
    np.testing.assert_allclose(layer.apply(params, x), reference + params["params"]["bias"],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, features", [((2, 4, 4, 3), 5), ((1, 3, 7, 2), 4), ((2, 1, 1, 1), 1)])
def test_custom_gradients_equal_the_autodiff_of_lax_conv_transpose(shape, features):
    """The hand-written backward pass (stride-2 convolutions) is the exact adjoint."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(size=(4, 4, shape[-1], features)).astype(np.float32)
    cotangent = rng.normal(size=(shape[0], 2 * shape[1], 2 * shape[2], features)).astype(np.float32)

    def gradients(f):
        return jax.jit(jax.grad(lambda x, k: jnp.vdot(f(x, k), cotangent), argnums=(0, 1)))(
            x, kernel)

    for actual, expected in zip(gradients(conv_transpose_4x4_s2), gradients(lax_conv_transpose)):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def _xla_flops(f, *args) -> float:
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    return (cost if isinstance(cost, dict) else cost[0])["flops"]


def test_forward_and_backward_cost_the_flops_of_the_transposed_convolution():
    """XLA's cost analysis: as many FLOPs as lax.conv_transpose itself, forward and
    forward + backward (a 3x3 sub-pixel convolution to 4 * Cout would cost 2.25x)."""
    x, kernel = jnp.ones((2, 8, 6, 16)), jnp.ones((4, 4, 16, 8))
    cotangent = jnp.ones((2, 16, 12, 8))

    def with_gradients(f):
        return lambda x, k: jax.vjp(f, x, k)[1](cotangent)

    assert _xla_flops(conv_transpose_4x4_s2, x, kernel) == _xla_flops(lax_conv_transpose, x, kernel)
    assert (_xla_flops(with_gradients(conv_transpose_4x4_s2), x, kernel)
            == _xla_flops(with_gradients(lax_conv_transpose), x, kernel))


def test_bfloat16_layer_computes_in_bfloat16_with_float32_parameters():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
    layer = SubPixelConvTranspose(4, dtype=jnp.bfloat16)
    params = layer.init(jax.random.key(0), x)
    y, vjp = jax.vjp(lambda p: layer.apply(p, x), params)
    assert y.dtype == jnp.bfloat16
    (grads,) = vjp(jnp.ones_like(y))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    expected = SubPixelConvTranspose(4).apply(params, x)
    np.testing.assert_allclose(y.astype(np.float32), expected, rtol=0.05, atol=0.05)


def test_depth_to_space_places_channels_as_row_and_column_phases():
    x = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4)  # one row, two pixels, 2x2 blocks
    np.testing.assert_array_equal(depth_to_space(x, 2)[0, ..., 0], [[0, 1, 4, 5], [2, 3, 6, 7]])


def test_encoder_and_decoder_shapes_follow_the_reference_architecture():
    # Random weights in init's shapes (nothing compiled: init op by op compiled a program
    # per parameter shape), run by one compiled call each.
    x = np.zeros((3, 32, 32, 3), np.float32)
    params = random_variables(ConvEncoder(), x)
    assert jax.jit(ConvEncoder().apply)(params, x).shape == (3, 4 * 4 * 256)
    kernels = [p.shape for p in jax.tree.leaves(params) if p.ndim == 4]
    assert kernels == [(3, 3, 3, 32), (3, 3, 32, 64), (3, 3, 64, 128), (3, 3, 128, 256)]
    decoder = ConvDecoder(out_channels=3)
    dparams = random_variables(decoder, np.zeros((3, 16), np.float32))
    assert jax.jit(decoder.apply)(dparams, np.zeros((3, 16), np.float32)).shape == (3, 32, 32, 3)
    kernels = [p.shape for p in jax.tree.leaves(dparams) if p.ndim == 4]
    assert sorted(kernels) == sorted([(4, 4, 128, 128), (4, 4, 128, 64), (4, 4, 64, 32),
                                      (3, 3, 32, 3)])
    assert nn.tabulate  # flax present for users who want a table of the model
