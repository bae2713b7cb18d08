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


# Shape and dtype checks (trace time): B = 4 examples of D = 3 dimensions.
B, D = 4, 3
X = jnp.asarray(RNG.normal(size=(B, D)), jnp.float32)


@pytest.mark.parametrize("call, message", [
    (lambda: losses.bernoulli_log_prob(X, jnp.zeros((B, 1, D))),
     "bernoulli_log_prob: logits has shape (4, 1, 3) but x has shape (4, 3)"),
    (lambda: losses.bernoulli_log_prob(X, jnp.zeros((5, B, D))),
     "bernoulli_log_prob: logits has shape (5, 4, 3) but x has shape (4, 3)"),
    (lambda: losses.bernoulli_log_prob(X, jnp.zeros((B, 1))),  # per element: no broadcast at all
     "bernoulli_log_prob: logits has shape (4, 1) but x has shape (4, 3)"),
    (lambda: losses.kl_std_normal(X, jnp.zeros((B, 1, D))),
     "kl_std_normal: log_var has shape (4, 1, 3) but mean has shape (4, 3)"),
    (lambda: losses.kl_std_normal_per_dim(X, jnp.zeros((1, D))),  # the batch axis never broadcasts
     "kl_std_normal_per_dim: log_var has shape (1, 3) but mean has shape (4, 3)"),
    (lambda: losses.gaussian_log_prob(X, jnp.zeros((D,)), 0.0),  # nor does a missing batch axis
     "gaussian_log_prob: mean has shape (3,) but x has shape (4, 3)"),
    (lambda: losses.gaussian_log_prob(X, 0.0, jnp.zeros((B, 2))),
     "gaussian_log_prob: log_var has shape (4, 2) but x has shape (4, 3)"),
    (lambda: losses.vq_losses(jnp.zeros((B, 1, 1, 16)), jnp.zeros((B, 8, 8, 16))),
     "vq_losses: z_q has shape (4, 8, 8, 16) but z_e has shape (4, 1, 1, 16)"),
    (lambda: losses.straight_through(jnp.zeros((B, 16)), jnp.zeros((1, 16))),
     "straight_through: z_q has shape (1, 16) but z_e has shape (4, 16)"),
    (lambda: losses.discretized_logistic_mixture_log_prob(
        jnp.zeros((B, 2, 2, 3), jnp.uint8), jnp.zeros((B, 2, 2, 10))),
     "discretized_logistic_mixture_log_prob: x has dtype uint8; it must be floating point"),
    (lambda: losses.discretized_logistic_mixture_log_prob(jnp.zeros((B, 2, 2, 3)),
                                                          jnp.zeros((B, 2, 1, 10))),
     "discretized_logistic_mixture_log_prob: params has shape (4, 2, 1, 10) but x has shape (4, 2, 2, 3)"),
    (lambda: losses.logistic_mixture_params(jnp.zeros((B, 10), jnp.int32), 3),
     "logistic_mixture_params: params has dtype int32"),
    (lambda: losses.logistic_mixture_locations(jnp.zeros((B, 3, 2)), jnp.zeros((B, 3, 1)),
                                               jnp.zeros((B, 3, 1))),
     "logistic_mixture_locations: coeffs has shape (4, 3, 1) but means has shape (4, 3, 2)"),
    (lambda: losses.logistic_mixture_locations(jnp.zeros((B, 3, 2)), jnp.zeros((B, 3, 2)),
                                               jnp.zeros((B, 2, 1))),
     "logistic_mixture_locations: x has shape (4, 2, 1) but means has shape (4, 3, 2)"),
    (lambda: losses.gaussian_log_prob(jnp.zeros((B, D), jnp.int32), 0.0, 0.0),
     "gaussian_log_prob: x has dtype int32"),
    (lambda: losses.bernoulli_log_prob(jnp.ones((B, D), jnp.uint8), jnp.zeros((B, D))),
     "bernoulli_log_prob: x has dtype uint8"),
    (lambda: losses.kl_std_normal(jnp.zeros(()), 0.0),
     "kl_std_normal: mean has shape (); it needs a leading batch axis"),
    (lambda: losses.iwae_bound(jnp.zeros((0, B))),
     "iwae_bound: log_weights has shape (0, 4); it must be (k, batch) with k >= 1"),
    (lambda: losses.iwae_bound(jnp.zeros((10, B, 1))),
     "iwae_bound: log_weights has shape (10, 4, 1); it must be (k, batch)"),
    (lambda: losses.iwae_bound(jnp.zeros((10,))),
     "iwae_bound: log_weights has shape (10,); it must be (k, batch)"),
    (lambda: losses.iwae_bound(jnp.zeros((10, B), jnp.int32)), "iwae_bound: log_weights has dtype int32"),
    (lambda: losses.bits_per_dim(1.0, 0), "bits_per_dim: num_dims is 0; it must be at least 1"),
    (lambda: losses.bits_per_dim(1.0, 3072.0), "bits_per_dim: num_dims is 3072.0; it must be a "
                                               "Python integer"),
    (lambda: losses.bits_per_dim(1.0, True), "bits_per_dim: num_dims is True; it must be a Python "
                                             "integer"),
    (lambda: jax.jit(losses.bits_per_dim)(jnp.ones(B), 3), "bits_per_dim: num_dims is "),
    (lambda: losses.discretized_logistic_mixture_log_prob(jnp.zeros(2), jnp.zeros(30)),
     "discretized_logistic_mixture_log_prob: x has shape (2,); it must be (batch, ..., C)"),
])
def test_mis_shaped_or_integer_arguments_are_refused_with_both_shapes(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value).startswith(message)


def test_bits_per_dim_under_jit_takes_num_dims_as_a_static_argument():
    with pytest.raises(ValueError, match="a Python integer \\(under jax.jit, a static argument\\)"):
        jax.jit(losses.bits_per_dim)(jnp.ones(B), 3)
    bits = jax.jit(losses.bits_per_dim, static_argnums=1)(jnp.full(B, 2 * np.log(2.0)), 2)
    np.testing.assert_allclose(bits, np.ones(B), rtol=1e-6)


def test_checks_run_at_trace_time_under_jit():
    with pytest.raises(ValueError, match=r"bernoulli_log_prob: logits has shape \(4, 1, 3\)"):
        jax.jit(losses.bernoulli_log_prob)(X, jnp.zeros((B, 1, D)))


def test_documented_event_broadcasts_equal_the_explicit_arrays():
    mean, log_var = jnp.asarray(RNG.normal(size=(B, D))), jnp.asarray(RNG.normal(size=(B, 1)))
    full = jnp.broadcast_to(log_var, (B, D))
    np.testing.assert_allclose(losses.gaussian_log_prob(X, mean, log_var),
                               losses.gaussian_log_prob(X, mean, full), rtol=1e-6)
    np.testing.assert_allclose(losses.gaussian_log_prob(X, 0.5, -1.0),
                               losses.gaussian_log_prob(X, jnp.full((B, D), 0.5), jnp.full((B, D), -1.0)),
                               rtol=1e-6)
    np.testing.assert_allclose(losses.kl_std_normal(mean, log_var), losses.kl_std_normal(mean, full),
                               rtol=1e-6)
    np.testing.assert_allclose(losses.kl_std_normal(mean, 0.0), 0.5 * jnp.square(mean).sum(-1), rtol=1e-6)
    assert losses.kl_std_normal_per_dim(mean, log_var).shape == (B, D)


def per_example_calls(batch):
    """Every per-example function of lvm_jax.losses on a batch of `batch` examples."""
    images = jnp.zeros((batch, 2, 2, 3))
    z = jnp.zeros((batch, 2, 2, 4))
    return {
        "gaussian_log_prob": lambda: losses.gaussian_log_prob(jnp.zeros((batch, D)), 0.0, 0.0),
        "bernoulli_log_prob": lambda: losses.bernoulli_log_prob(jnp.zeros((batch, D)), jnp.zeros((batch, D))),
        "kl_std_normal": lambda: losses.kl_std_normal(jnp.zeros((batch, D)), jnp.zeros((batch, D))),
        "vq_codebook": lambda: losses.vq_losses(z, z)[0],
        "vq_commitment": lambda: losses.vq_losses(z, z)[1],
        "iwae_bound": lambda: losses.iwae_bound(jnp.zeros((5, batch))),
        "dmol": lambda: losses.discretized_logistic_mixture_log_prob(images, jnp.zeros((batch, 2, 2, 20))),
    }


@pytest.mark.parametrize("name", sorted(per_example_calls(0)))
def test_an_empty_batch_gives_an_empty_result(name):
    result = per_example_calls(0)[name]()
    assert result.shape == (0,)
    assert per_example_calls(2)[name]().shape == (2,)
