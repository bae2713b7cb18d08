"""Priors: densities against independent computations, the flow's inverse and KL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lvm_jax import losses
from lvm_jax.models.priors import MADEFlowPrior, StandardNormalPrior

ORDER = (3, 0, 4, 1, 2)


def perturb(variables, key, scale=0.5):
    """Adds Gaussian noise to every parameter, so the flow is no longer the identity."""
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def flow(latent_dim=5, order=ORDER, scale=0.5):
    """A small MADE flow prior with perturbed parameters."""
    prior = MADEFlowPrior(latent_dim, hidden=(32, 32), order=order)
    variables = prior.init(jax.random.key(0), jnp.zeros((1, latent_dim)))
    return prior, perturb(variables, jax.random.key(1), scale)


def test_standard_normal_log_prob_matches_scipy():
    z = jax.random.normal(jax.random.key(0), (6, 4))
    log_prob = StandardNormalPrior(4).apply({}, z, method="log_prob")
    expected = stats.multivariate_normal(np.zeros(4), np.eye(4)).logpdf(np.asarray(z, np.float64))
    np.testing.assert_allclose(log_prob, expected, rtol=1e-5)


def test_standard_normal_kl_matches_closed_form():
    mean = np.random.default_rng(0).normal(size=(6, 4))
    log_var = np.random.default_rng(1).normal(size=(6, 4))
    kl = StandardNormalPrior(4).apply({}, jnp.zeros((6, 4)), mean, log_var, method="kl")
    var = np.exp(log_var)
    expected = 0.5 * np.sum(var + mean**2 - 1.0 - np.log(var), axis=1)
    np.testing.assert_allclose(kl, expected, rtol=1e-5)


def test_flow_log_det_matches_jacobian():
    prior, variables = flow()
    z = 1.5 * jax.random.normal(jax.random.key(2), (8, 5))

    def eps_of(z_row):
        return prior.apply(variables, z_row[None], method="forward")[0][0]

    jacobians = jax.jit(jax.vmap(jax.jacfwd(eps_of)))(z)
    _, expected = np.linalg.slogdet(np.asarray(jacobians, np.float64))
    _, log_det = prior.apply(variables, z, method="forward")
    np.testing.assert_allclose(log_det, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected).max() > 0.1  # the perturbed flow really rescales

    eps, _ = prior.apply(variables, z, method="forward")
    expected_log_prob = stats.norm.logpdf(np.asarray(eps, np.float64)).sum(axis=1) + expected
    np.testing.assert_allclose(prior.apply(variables, z), expected_log_prob, rtol=1e-5)


def test_jitted_sample_inverts_forward():
    prior, variables = flow()
    rng = jax.random.key(3)
    sample = jax.jit(prior.apply, static_argnums=2, static_argnames="method")
    z = sample(variables, rng, 64, method="sample")
    assert z.shape == (64, 5)

    eps, _ = prior.apply(variables, z, method="forward")
    np.testing.assert_allclose(eps, jax.random.normal(rng, (64, 5)), atol=1e-5)


def test_flow_density_integrates_to_one():
    prior, variables = flow(latent_dim=2, order=(1, 0), scale=0.3)
    axis = np.linspace(-15.0, 15.0, 601)
    z = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
    log_prob = jax.jit(prior.apply)(variables, jnp.asarray(z, jnp.float32))

    standard = stats.norm.logpdf(z).sum(axis=1)
    assert np.abs(log_prob - standard)[standard > -8].max() > 0.1  # not N(0, I)
    mass = np.exp(np.asarray(log_prob, np.float64)).sum() * (axis[1] - axis[0]) ** 2
    assert mass == pytest.approx(1.0, abs=0.01)


def test_flow_at_init_is_standard_normal_and_kl_is_unbiased():
    """At init the flow is the identity, so the single-sample KL estimate has
    the analytic KL to N(0, I) as its expectation."""
    prior = MADEFlowPrior(5, hidden=(32, 32))
    variables = prior.init(jax.random.key(0), jnp.zeros((1, 5)))
    mean = jnp.array([0.5, -1.0, 0.0, 2.0, 0.3])
    log_var = jnp.array([0.0, -1.0, 0.5, -0.3, 1.0])
    num = 20_000
    z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(jax.random.key(1), (num, 5))

    np.testing.assert_allclose(prior.apply(variables, z), losses.gaussian_log_prob(z, 0.0, 0.0), rtol=1e-6)
    kl = prior.apply(variables, z, jnp.broadcast_to(mean, z.shape), jnp.broadcast_to(log_var, z.shape), method="kl")
    expected = losses.kl_std_normal(mean[None], log_var[None])[0]
    assert abs(kl.mean() - expected) < 4.0 * kl.std() / np.sqrt(num)


def test_flow_prior_bad_input_raises():
    prior, variables = flow()
    with pytest.raises(ValueError, match=r"shape \(batch, 5\)"):
        prior.apply(variables, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"shape \(batch, 5\)"):
        prior.apply(variables, jnp.zeros((5,)))
    with pytest.raises(ValueError, match="permutation"):
        MADEFlowPrior(5, hidden=(8,), order=(0, 1, 2)).init(jax.random.key(0), jnp.zeros((1, 5)))
