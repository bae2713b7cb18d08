"""lvm_jax.losses against closed forms, SciPy and Monte Carlo estimates."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from lvm_jax import losses

RNG = np.random.default_rng(0)


def test_gaussian_log_prob_matches_scipy_and_sums_event_dims():
    x, mean = RNG.normal(size=(4, 3, 2)), RNG.normal(size=(4, 3, 2))
    log_var = RNG.normal(size=(4, 3, 2))
    expected = stats.norm.logpdf(x, mean, np.exp(0.5 * log_var)).reshape(4, -1).sum(-1)
    got = losses.gaussian_log_prob(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(log_var))
    assert got.shape == (4,)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gaussian_log_prob_broadcasts_scalar_parameters():
    x = RNG.normal(size=(5, 7))
    expected = stats.norm.logpdf(x).sum(-1)
    np.testing.assert_allclose(losses.gaussian_log_prob(jnp.asarray(x), 0.0, 0.0), expected, rtol=1e-5)


def test_bernoulli_log_prob_matches_scipy_and_is_stable():
    x = (RNG.uniform(size=(6, 10)) < 0.5).astype(np.float32)
    logits = RNG.normal(size=(6, 10)) * 3
    expected = stats.bernoulli.logpmf(x, special.expit(logits)).sum(-1)
    np.testing.assert_allclose(losses.bernoulli_log_prob(jnp.asarray(x), jnp.asarray(logits)),
                               expected, rtol=1e-5)
    extreme = losses.bernoulli_log_prob(jnp.array([[1.0, 0.0]]), jnp.array([[-100.0, 100.0]]))
    np.testing.assert_allclose(extreme, [-200.0], rtol=1e-6)


def test_kl_std_normal_closed_form_and_monte_carlo():
    mean, log_var = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
    var = np.exp(log_var)
    closed = 0.5 * (var + mean**2 - 1 - log_var).sum(-1)
    got = losses.kl_std_normal(jnp.asarray(mean), jnp.asarray(log_var))
    np.testing.assert_allclose(got, closed, rtol=1e-5)
    # Monte Carlo E_q[log q - log p] agrees within a few standard errors.
    z = mean + np.sqrt(var) * RNG.normal(size=(200_000, 3, 4))
    log_ratio = (stats.norm.logpdf(z, mean, np.sqrt(var)) - stats.norm.logpdf(z)).sum(-1)
    stderr = log_ratio.std(0) / math.sqrt(len(z))
    assert np.all(np.abs(log_ratio.mean(0) - closed) < 5 * stderr)


def test_kl_is_summed_not_averaged_over_latent_dims():
    mean, log_var = jnp.ones((2, 16)), jnp.zeros((2, 16))
    np.testing.assert_allclose(losses.kl_std_normal(mean, log_var), [8.0, 8.0])


def test_straight_through_value_and_gradient():
    z_e, z_q = jnp.array([[0.3, -1.0]]), jnp.array([[1.0, 2.0]])
    np.testing.assert_array_equal(losses.straight_through(z_e, z_q), z_q)
    grad_e = jax.grad(lambda e: jnp.sum(losses.straight_through(e, z_q) * jnp.array([2.0, 3.0])))(z_e)
    np.testing.assert_allclose(grad_e, [[2.0, 3.0]])
    grad_q = jax.grad(lambda q: jnp.sum(losses.straight_through(z_e, q)))(z_q)
    np.testing.assert_array_equal(grad_q, 0.0)


def test_vq_losses_values_and_stop_gradients():
    z_e, z_q = jnp.array([[0.0, 1.0]]), jnp.array([[1.0, 3.0]])
    codebook, commitment = losses.vq_losses(z_e, z_q)
    np.testing.assert_allclose(codebook, [5.0])
    np.testing.assert_allclose(commitment, [5.0])
    g_cb = jax.grad(lambda e, q: losses.vq_losses(e, q)[0].sum(), argnums=(0, 1))(z_e, z_q)
    g_cm = jax.grad(lambda e, q: losses.vq_losses(e, q)[1].sum(), argnums=(0, 1))(z_e, z_q)
    np.testing.assert_array_equal(g_cb[0], 0.0)  # codebook term moves only the codes
    np.testing.assert_allclose(g_cb[1], 2 * (z_q - z_e))
    np.testing.assert_allclose(g_cm[0], 2 * (z_e - z_q))  # commitment moves only the encoder
    np.testing.assert_array_equal(g_cm[1], 0.0)


def test_iwae_bound_matches_numpy_and_reduces_to_elbo():
    log_w = RNG.normal(size=(50, 3)) * 4
    expected = special.logsumexp(log_w, axis=0) - math.log(50)
    np.testing.assert_allclose(losses.iwae_bound(jnp.asarray(log_w)), expected, rtol=1e-5)
    np.testing.assert_allclose(losses.iwae_bound(jnp.asarray(log_w[:1])), log_w[0], rtol=1e-6)
    # Jensen: the bound is at least the average log-weight.
    assert np.all(np.asarray(losses.iwae_bound(jnp.asarray(log_w))) >= log_w.mean(0))


@pytest.mark.parametrize("nats, dims, bits", [(math.log(2) * 3072, 3072, 1.0), (0.0, 10, 0.0)])
def test_bits_per_dim(nats, dims, bits):
    assert losses.bits_per_dim(nats, dims) == pytest.approx(bits)
