"""The VAE: its ELBO terms, sampling and reconstruction, on small models."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import losses
from lvm_jax.models import likelihoods, vae
from lvm_jax.models.priors import MADEFlowPrior


def small_mlp_vae(**kwargs):
    return vae.mlp_vae(3, 2, (8,), likelihoods.get("gaussian"), **kwargs)


def test_terms_are_per_example_and_the_elbo_adds_up():
    model = small_mlp_vae()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
    params = model.init(jax.random.key(0), x, jax.random.key(1))["params"]
    terms = model.apply({"params": params}, x, jax.random.key(2))
    assert all(v.shape == (5,) for k, v in terms.items() if k != "kl_groups")
    assert terms["kl_groups"].shape == (5, 2)  # one group per latent dimension
    np.testing.assert_allclose(terms["kl_groups"].sum(-1), terms["kl"], rtol=1e-6)
    loss, metrics = vae.loss_fn(model, params, x, jax.random.key(2))
    np.testing.assert_allclose(loss, -(terms["log_px_z"] - terms["kl"]).mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["neg_elbo"], metrics["recon"] + metrics["kl"], rtol=1e-6)
    # With the standard normal prior the KL term is analytic: it matches log q - log p on average.
    mean, log_var = model.apply({"params": params}, x, method=vae.VAE.encode)
    np.testing.assert_allclose(terms["kl"], losses.kl_std_normal(mean, log_var), rtol=1e-6)


def test_at_init_q_is_the_prior_and_the_decoder_is_standard_normal():
    """Zero-initialised output layers: KL = 0 and p(x|z) = N(0, I) whatever the inputs' scale."""
    model = small_mlp_vae()
    x = jnp.full((4, 3), 100.0)
    params = model.init(jax.random.key(0), x, jax.random.key(1))["params"]
    terms = model.apply({"params": params}, x, jax.random.key(2))
    np.testing.assert_allclose(terms["kl"], 0.0, atol=1e-6)
    np.testing.assert_allclose(terms["log_px_z"], losses.gaussian_log_prob(x, 0.0, 0.0), rtol=1e-6)


def test_more_samples_reduce_the_variance_of_the_loss():
    model = small_mlp_vae(prior=MADEFlowPrior(2, hidden=(8,)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    params = model.init(jax.random.key(0), x, jax.random.key(1))["params"]
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(3), p.shape), params)
    loss = jax.jit(functools.partial(vae.loss_fn, model), static_argnums=3)
    keys = jax.random.split(jax.random.key(4), 200)
    one = np.array([loss(params, x, k, 1)[0] for k in keys[:100]])
    many = np.array([loss(params, x, k, 16)[0] for k in keys[100:]])
    assert many.std() < one.std() / 2.5  # about 1/sqrt(16) of it
    assert abs(many.mean() - one.mean()) < 4 * one.std() / math.sqrt(100)


def test_image_vae_sample_reconstruct_and_shape_checks():
    model = vae.conv_vae((32, 32, 1), 16, likelihoods.get("unit_gaussian"))
    x = jnp.zeros((2, 32, 32, 1))

    @jax.jit  # one compiled call: op by op, every primitive would compile alone
    def outputs(x, key):
        params = model.init(key, x, key)
        return (model.apply(params, key, 7, method=vae.VAE.sample),
                model.apply(params, key, 3, True, method=vae.VAE.sample),
                model.apply(params, x, method=vae.VAE.reconstruct))

    # Initialisers drawn with the 'rbg' generator: threefry's compile several times slower.
    samples, noisy_samples, reconstructions = outputs(x, jax.random.key(0, impl="rbg"))
    assert samples.shape == (7, 32, 32, 1) and noisy_samples.shape == (3, 32, 32, 1)
    assert reconstructions.shape == (2, 32, 32, 1)
    with pytest.raises(ValueError, match="32x32"):
        vae.conv_vae((28, 28, 1), 16, likelihoods.get("unit_gaussian"))
    with pytest.raises(ValueError, match="unknown likelihood"):
        likelihoods.get("poisson")


def test_reference_units_and_bits_per_dim():
    # N(mu, I): recon nats = SSE / 2 + D/2 log(2 pi), so SSE = 2 recon - D log(2 pi).
    d = 3072
    metrics = {"recon": 0.5 * 210.0 + 0.5 * d * math.log(2 * math.pi), "kl": 31.5}
    ref = likelihoods.reference_units(metrics, d)
    assert ref["recon_sse"] == pytest.approx(210.0) and ref["neg_elbo_sse"] == pytest.approx(241.5)
    # A uniform density on [-1, 1]^D is uniform on [0, 255]^D: log2(255) bits/dim.
    assert float(vae.image_bits_per_dim(d * math.log(2.0), d)) == pytest.approx(math.log2(255))


def test_gaussian_likelihood_log_variance_is_bounded():
    out = jnp.stack([jnp.zeros((1, 2)), jnp.full((1, 2), -1e4)], axis=-1)
    value = likelihoods.get("gaussian").log_prob(jnp.ones((1, 2)), out)
    assert np.isfinite(value).all()


def test_beta_and_free_bits_change_the_objective_not_the_reported_elbo():
    model = small_mlp_vae()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)), jnp.float32)
    params = model.init(jax.random.key(0), x, jax.random.key(1))["params"]
    noise = np.random.default_rng(5)  # numpy's: threefry would compile a program per shape
    params = jax.tree.map(lambda p: p + 0.2 * noise.standard_normal(p.shape, np.float32), params)
    rng = jax.random.key(2)
    # One compiled objective, beta and free_bits its arguments: op by op, every primitive
    # would compile alone.
    objective = jax.jit(functools.partial(vae.loss_fn, model), static_argnums=3)
    loss = lambda beta=1.0, free_bits=0.0: objective(params, x, rng, 1, beta, free_bits)  # noqa: E731
    base, metrics = loss()
    mean, log_var = jax.jit(functools.partial(model.apply, method=vae.VAE.encode))(
        {"params": params}, x)
    kl_dims = np.asarray(losses.kl_std_normal_per_dim(mean, log_var)).mean(0)
    beta, beta_metrics = loss(beta=3.0)
    np.testing.assert_allclose(beta, metrics["recon"] + 3.0 * metrics["kl"], rtol=1e-5)
    floor = float(np.sort(kl_dims)[0] + np.sort(kl_dims)[1]) / 2  # between the two dims' KLs
    free, free_metrics = loss(free_bits=floor)
    np.testing.assert_allclose(free, metrics["recon"] + np.maximum(floor, kl_dims).sum(), rtol=1e-5)
    assert float(free) > float(base)
    for m in (beta_metrics, free_metrics):
        assert m == metrics
    # With every group under the floor the KL passes no gradient: only reconstruction trains.
    grad, recon_grad = jax.jit(lambda p: (
        jax.grad(lambda p: vae.loss_fn(model, p, x, rng, free_bits=1e3)[0])(p),
        jax.grad(lambda p: vae.loss_fn(model, p, x, rng)[1]["recon"])(p)))(params)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(recon_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_mlp_encoder_applies_relu_before_the_gaussian_head():
    """Dense-ReLU-Dense-ReLU-Dense (REFERENCE.md §1): a purely negative hidden layer gives
    the head nothing but its bias."""
    model = vae.mlp_vae(2, 2, (4,), likelihoods.get("gaussian"))
    x = jnp.ones((1, 2))
    params = model.init(jax.random.key(0), x, jax.random.key(1))["params"]
    params["trunk"]["Dense_0"]["kernel"] = -jnp.ones((2, 4))
    params["head"]["Dense_0"]["kernel"] = jnp.ones((4, 4))
    mean, _ = model.apply({"params": params}, x, method=vae.VAE.encode)
    np.testing.assert_allclose(mean, 0.0)
