"""MADE: degree rules, masks, the autoregressive property and connectivity."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.nn.made import (
    MADE,
    MaskedDense,
    autoregressive_order,
    hidden_degrees,
    input_degrees,
    made_masks,
)


def perturb(variables, key, scale=0.5):
    """Adds Gaussian noise to every parameter: the zero-initialised output
    layer would otherwise make every Jacobian trivially zero."""
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def made_jacobians(model, variables, z):
    """Jacobians of shift and log_scale w.r.t. z, each (batch, D_out, D_in)."""

    def single(z_row):
        shift, log_scale = model.apply(variables, z_row[None])
        return shift[0], log_scale[0]

    return jax.jit(jax.vmap(jax.jacfwd(single)))(z)


def random_order(dim, seed):
    return tuple(int(i) for i in np.random.default_rng(seed).permutation(dim))


@pytest.mark.parametrize("dim", [1, 2, 5, 16])
@pytest.mark.parametrize("hidden", [(3,), (32, 32), (7, 20, 4)])
def test_masks_follow_degree_rules(dim, hidden):
    order = np.array(random_order(dim, seed=dim))
    masks = made_masks(order, hidden)
    assert [m.shape for m in masks] == list(zip((dim, *hidden), (*hidden, dim)))

    in_degrees = input_degrees(order)
    for k in range(dim):
        assert in_degrees[order[k]] == k + 1
    layer_degrees = [in_degrees] + [hidden_degrees(w, dim) for w in hidden] + [in_degrees]
    for degrees, width in zip(layer_degrees[1:-1], hidden):
        assert degrees.min() >= 1 and degrees.max() <= max(dim - 1, 1)
        if width >= dim - 1:
            assert set(degrees) == set(range(1, max(dim, 2)))

    for layer, mask in enumerate(masks):
        is_output = layer == len(masks) - 1
        for a, b in itertools.product(range(mask.shape[0]), range(mask.shape[1])):
            d_in, d_out = layer_degrees[layer][a], layer_degrees[layer + 1][b]
            assert mask[a, b] == (d_in < d_out if is_output else d_in <= d_out)


@pytest.mark.parametrize("dim", [2, 5, 16])
def test_mask_product_connects_exactly_the_earlier_inputs(dim):
    """With every hidden width >= D - 1, the paths through the masks link each
    output to every input before it in the order, and to nothing else."""
    order = np.array(random_order(dim, seed=dim))
    paths = np.linalg.multi_dot(made_masks(order, (dim - 1, 2 * dim)))
    position = np.argsort(order)  # position[i]: where dimension i comes in the order
    earlier = position[:, None] < position[None, :]  # [input, output]
    np.testing.assert_array_equal(paths > 0, earlier)


@pytest.mark.parametrize("dim", [1, 2, 5, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_jacobian_is_strictly_autoregressive(dim, seed):
    order = random_order(dim, seed)
    model = MADE(hidden=(32, 32), order=order)
    z = jax.random.normal(jax.random.key(seed), (4, dim))
    variables = perturb(model.init(jax.random.key(1), z), jax.random.key(2))

    for jacobian in made_jacobians(model, variables, z):
        in_order = np.asarray(jacobian)[:, order][:, :, order]  # [batch, out position, in position]
        np.testing.assert_array_equal(np.triu(np.abs(in_order).sum(axis=0)), 0.0)


def test_default_made_has_no_dead_connections():
    """Hidden (512, 512): each output depends on every earlier input."""
    dim = 16
    order = random_order(dim, seed=3)
    model = MADE(order=order)
    z = jax.random.normal(jax.random.key(0), (8, dim))
    variables = perturb(model.init(jax.random.key(1), z), jax.random.key(2), scale=0.1)

    for jacobian in made_jacobians(model, variables, z):
        in_order = np.abs(np.asarray(jacobian)[:, order][:, :, order]).sum(axis=0)
        np.testing.assert_array_equal(in_order > 0, np.tri(dim, k=-1, dtype=bool))


def test_made_starts_as_identity_and_bounds_log_scale():
    model = MADE(hidden=(32, 32), log_scale_bound=0.7)
    z = jax.random.normal(jax.random.key(0), (16, 5))
    variables = model.init(jax.random.key(1), z)
    shift, log_scale = model.apply(variables, z)
    np.testing.assert_array_equal(shift, 0.0)
    np.testing.assert_array_equal(log_scale, 0.0)

    _, log_scale = model.apply(perturb(variables, jax.random.key(2), scale=10.0), 100.0 * z)
    assert 0.6 < np.abs(log_scale).max() <= 0.7


def test_masked_dense_multiplies_kernel_by_mask():
    mask = np.random.default_rng(0).integers(0, 2, size=(4, 3)).astype(np.float32)
    layer = MaskedDense(3, mask)
    x = jax.random.normal(jax.random.key(0), (5, 4))
    params = layer.init(jax.random.key(1), x)["params"]
    expected = x @ (params["kernel"] * mask) + params["bias"]
    np.testing.assert_allclose(layer.apply({"params": params}, x), expected, rtol=1e-6)


def test_bad_input_raises():
    model = MADE(hidden=(8,))
    with pytest.raises(ValueError, match="shape"):
        model.init(jax.random.key(0), jnp.zeros((5,)))
    with pytest.raises(ValueError, match="float"):
        model.init(jax.random.key(0), jnp.zeros((2, 5), dtype=jnp.int32))
    with pytest.raises(ValueError, match="log_scale_bound"):
        MADE(log_scale_bound=0.0).init(jax.random.key(0), jnp.zeros((2, 5)))
    for order in [(0, 1, 2), (0, 1, 2, 3, 3), (1, 2, 3, 4, 5)]:
        with pytest.raises(ValueError, match="permutation"):
            MADE(hidden=(8,), order=order).init(jax.random.key(0), jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="mask"):
        MaskedDense(3, np.ones((2, 3))).init(jax.random.key(0), jnp.zeros((1, 4)))
    np.testing.assert_array_equal(autoregressive_order(None, 3), [0, 1, 2])
