"""The Ladder VAE: shapes, the ELBO's bookkeeping, free bits, its reduction to a VAE, the
importance-weighted bound; the experiment's smoke run is test_load_run.py's. Tiny 8x8 models
keep it fast."""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import lvae as lvae_experiment
from lvm_jax import evaluate, losses
from lvm_jax.models import likelihoods, lvae, vae
from lvm_jax.models.priors import StandardNormalPrior

IMAGE = (8, 8, 1)
TINY = dict(latent_channels=4, hidden=8, blocks_per_layer=1)


def init_key(seed):
    """A key for `init`. XLA:CPU compiles every threefry call site separately, and the
    ~40 random initialisers of even a tiny LVAE take it 20-30 s; the "rbg" generator
    compiles in a third of that. The tests need no particular values."""
    return jax.random.key(seed, impl="rbg")


def tiny_lvae(num_layers=2, image_shape=IMAGE, likelihood="bernoulli", **kwargs) -> lvae.LVAE:
    return lvae.LVAE(image_shape, likelihoods.get(likelihood), num_layers=num_layers,
                     **{**TINY, **kwargs})


def as_floats(metrics: dict) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def perturbed(params, scale, seed=2):
    """params plus N(0, scale^2) noise (NumPy's: nothing to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.normal(size=p.shape).astype(p.dtype), params)


def binary_images(n, shape=IMAGE, seed=0):
    """(n, *shape) images in {-1, 1}, as the Bernoulli likelihood reads them."""
    return jnp.asarray(np.where(np.random.default_rng(seed).random((n, *shape)) > 0.6, 1.0, -1.0),
                       jnp.float32)


@pytest.fixture(scope="module")
def model_and_params():
    """A 2-layer model with data-dependent initialisation: (model, its parameters at init,
    parameters moved off the initialisation, the init batch). At init the zero heads make
    the top layer's q equal its p, so the tests use the moved parameters."""
    model = tiny_lvae(2, data_init=True)
    x = binary_images(64)
    params = jax.jit(model.init)(init_key(0), x, init_key(1))["params"]
    moved = perturbed(params, 0.1)
    return model, params, moved, x


@pytest.mark.parametrize("num_layers, latent_shapes, merge", [
    (1, [(1, 1, 4)], "learned"),
    (2, [(2, 2, 4), (1, 1, 4)], "learned"),
    (3, [(2, 2, 4), (1, 1, 4), (1, 1, 4)], "learned"),
    (3, [(2, 2, 4), (1, 1, 4), (1, 1, 4)], "precision"),
])
def test_shapes_for_several_depths(num_layers, latent_shapes, merge):
    """Shapes only (jax.eval_shape traces without compiling)."""
    model = tiny_lvae(num_layers, merge=merge)
    assert model.latent_shapes() == latent_shapes
    x, rng = binary_images(5), jax.random.key(0)
    variables = jax.eval_shape(model.init, rng, x, rng)

    def shape_of(*args, method):
        return jax.eval_shape(lambda v: model.apply(v, *args, method=method), variables)

    terms = shape_of(x, rng, method=lvae.LVAE.__call__)
    assert {k: v.shape for k, v in terms.items()} == {
        "log_px_z": (5,), "kl": (5,), "log_qz_x": (5,), "log_pz": (5,), "kl_layers": (5, num_layers)}
    assert shape_of(rng, 7, method=lvae.LVAE.sample).shape == (7, *IMAGE)
    assert shape_of(rng, 3, True, method=lvae.LVAE.sample).shape == (3, *IMAGE)
    assert shape_of(x, method=lvae.LVAE.reconstruct).shape == (5, *IMAGE)
    assert shape_of(rng, num_layers, 2, 3, method=lvae.LVAE.layer_samples).shape == (6, *IMAGE)
    latent_dims = sum(int(np.prod(s)) for s in latent_shapes)
    assert [a.shape for a in shape_of(x, method=lvae.LVAE.encode)] == [(5, latent_dims)] * 2


def test_default_schedule_on_32x32_and_rgb_mixture_output():
    assert lvae.downsampling_schedule(1) == (2,)
    assert lvae.downsampling_schedule(3) == (1, 1, 0)
    assert lvae.downsampling_schedule(6) == (1, 0, 0, 1, 0, 0)
    model = lvae.LVAE((32, 32, 3), likelihoods.get("dmol"), num_layers=3)
    assert model.latent_shapes() == [(8, 8, 32), (4, 4, 32), (4, 4, 32)]
    x, rng = jnp.zeros((2, 32, 32, 3)), jax.random.key(0)
    variables = jax.eval_shape(model.init, rng, x, rng)
    out = jax.eval_shape(lambda v: model.apply(v, [jnp.zeros((2, *s)) for s in model.latent_shapes()],
                                               method=lvae.LVAE.generate), variables)
    assert out.shape == (2, 32, 32, 100)  # 10 logistics x (1 + 2 * 3 + 3) per pixel


def test_bad_shapes_are_refused_before_any_compute():
    rng = jax.random.key(0)
    with pytest.raises(ValueError, match="divisible by 8"):
        jax.eval_shape(tiny_lvae(2, image_shape=(12, 12, 1)).init, rng, jnp.zeros((1, 12, 12, 1)), rng)
    with pytest.raises(ValueError, match=r"expected images \(batch, 8, 8, 1\)"):
        jax.eval_shape(tiny_lvae(2).init, rng, jnp.zeros((1, 8, 8, 3)), rng)
    with pytest.raises(ValueError, match="one downsampling entry per layer"):
        jax.eval_shape(tiny_lvae(2, downsample=(2,)).init, rng, jnp.zeros((1, *IMAGE)), rng)
    with pytest.raises(ValueError, match="merge must be one of"):
        jax.eval_shape(tiny_lvae(2, merge="sum").init, rng, jnp.zeros((1, *IMAGE)), rng)


def test_precision_weighting_is_the_normalised_product_of_the_two_gaussians():
    rng = np.random.default_rng(0)
    mean_hat, mean_p = rng.normal(size=(2, 5))
    var_hat, var_p = np.exp(rng.normal(scale=2.0, size=(2, 5)))
    q = lvae.precision_weighted(lvae.DiagNormal(jnp.asarray(mean_hat), jnp.log(var_hat)),
                                lvae.DiagNormal(jnp.asarray(mean_p), jnp.log(var_p)))
    var_q = 1.0 / (1.0 / var_hat + 1.0 / var_p)
    np.testing.assert_allclose(np.exp(q.log_var), var_q, rtol=1e-5)
    np.testing.assert_allclose(q.mean, (mean_hat / var_hat + mean_p / var_p) * var_q, rtol=1e-5)


def test_data_dependent_init_normalises_the_first_layer(model_and_params):
    model, params, _, x = model_and_params
    stem = jax.jit(lambda p: model.apply({"params": p}, x, method=lambda m, v: m.stem(v)))(params)
    np.testing.assert_allclose(stem.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(stem.std(axis=(0, 1, 2)), 1.0, rtol=1e-3)


def test_terms_add_up_and_free_bits_change_only_the_objective(model_and_params):
    model, _, params, x = model_and_params
    x, rng = x[:8], jax.random.key(3)
    terms = jax.jit(lambda p: model.apply({"params": p}, x, rng))(params)
    np.testing.assert_allclose(terms["kl"], terms["kl_layers"].sum(axis=-1), rtol=1e-6)
    np.testing.assert_allclose(terms["kl"], terms["log_qz_x"] - terms["log_pz"], rtol=1e-4, atol=1e-3)
    assert (np.abs(terms["kl_layers"]) > 1e-3).all()  # every layer carries a (Monte Carlo) KL

    loss = jax.jit(lambda p, bits: lvae.loss_fn(model, p, x, rng, free_bits=bits))
    elbo_loss, metrics = loss(params, 0.0)
    np.testing.assert_allclose(elbo_loss, metrics["neg_elbo"], rtol=1e-6)
    np.testing.assert_allclose(metrics["neg_elbo"], -(terms["log_px_z"] - terms["kl"]).mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["neg_elbo"], metrics["recon"] + metrics["kl"], rtol=1e-6)
    np.testing.assert_allclose(metrics["kl"], metrics["kl_layer_1"] + metrics["kl_layer_2"], rtol=1e-5)
    kl_1, kl_2 = sorted(float(metrics[f"kl_layer_{i}"]) for i in (1, 2))
    # Free bits between the layers' KLs clamp the smaller one only; above both, the
    # objective is recon + 2 * free_bits and has no KL gradient left.
    for bits, expected in (((kl_1 + kl_2) / 2, (kl_1 + kl_2) / 2 + kl_2), (1e4, 2e4)):
        clamped_loss, clamped_metrics = loss(params, bits)
        np.testing.assert_allclose(clamped_loss, metrics["recon"] + expected, rtol=1e-6)
        # The reported ELBO is unchanged. Plain floats: pytest 9's approx refuses a dict of arrays.
        assert as_floats(clamped_metrics) == pytest.approx(as_floats(metrics), rel=1e-6)


class _Fn(nn.Module):
    """A parameter-free module applying `fn`: here, pieces of an LVAE bound to its parameters."""

    fn: Callable

    def __call__(self, x):
        return self.fn(x)


def test_one_layer_without_skip_is_a_vae():
    """With one stochastic layer (skip has then nothing to connect) and p(z) = N(0, I), the
    LVAE is a VAE: encoder = bottom-up path + Gaussian head, decoder = top-down path.

    On an 8x8 image the latent is 1x1x4, where the LVAE's 3x3 posterior convolution is
    a dense layer (its centre tap): a `vae.VAE` built from the LVAE's bottom-up and
    top-down paths, with that tap as its GaussianHead, has the same parameters. Its
    terms at the same noise are then equal, its Monte Carlo ELBO equal, and the VAE's
    analytic KL is the mean of the LVAE's Monte Carlo KL.
    """
    lv = tiny_lvae(1, skip=False, learn_top_prior=False, downsample=(2,))
    x = binary_images(6)
    lv_vars = jax.jit(lv.init)(init_key(0), x, init_key(1))
    lv_vars = perturbed(lv_vars, 0.3)
    latent_dim = lv.latent_channels

    def trunk(images):  # bottom-up features at 1x1, flattened
        return lv.apply(lv_vars, images, method=lambda m, v: m.bottom_up(v)[-1]).reshape(len(images), -1)

    def decoder(z):  # z ~ N(0, I) enters the top layer as its noise: z_1 = 0 + 1 * z
        return lv.apply(lv_vars, [z.reshape(-1, 1, 1, latent_dim)], method=lvae.LVAE.generate)

    model = vae.VAE(trunk=_Fn(trunk), decoder=_Fn(decoder), prior=StandardNormalPrior(latent_dim),
                    likelihood=lv.likelihood, event_shape=IMAGE, latent_dim=latent_dim)
    posterior = lv_vars["params"]["top_down_layers_0"]["posterior"]
    vae_params = {"head": {"Dense_0": {"kernel": posterior["kernel"][1, 1],
                                       "bias": posterior["bias"]}}}
    assert jax.tree.structure(vae_params) == jax.tree.structure(
        jax.eval_shape(model.init, jax.random.key(0), x, jax.random.key(0))["params"])

    @jax.jit
    def both_terms(rngs):
        lv_terms = jax.vmap(lambda r: lv.apply(lv_vars, x, r))(rngs)
        # The LVAE draws layer i's noise from split(rng, L)[i]; the VAE from its key itself.
        vae_terms = jax.vmap(lambda r: model.apply({"params": vae_params}, x,
                                                   jax.random.split(r, 1)[0]))(rngs)
        return lv_terms, vae_terms, model.apply({"params": vae_params}, x, method=vae.VAE.encode)

    rngs = jax.random.split(jax.random.key(5), 400)
    lv_terms, vae_terms, (mean, log_var) = both_terms(rngs)
    for name in ("log_px_z", "log_qz_x", "log_pz"):
        np.testing.assert_allclose(lv_terms[name], vae_terms[name], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(lv_terms["kl"], vae_terms["log_qz_x"] - vae_terms["log_pz"],
                               rtol=1e-5, atol=1e-4)
    # The VAE's analytic KL is the expectation of the LVAE's Monte Carlo KL.
    mc_kl, analytic_kl = lv_terms["kl"], vae_terms["kl"][0]
    np.testing.assert_allclose(analytic_kl, losses.kl_std_normal(mean, log_var), rtol=1e-6)
    stderr = mc_kl.std(axis=0) / np.sqrt(len(rngs))
    assert np.all(np.abs(mc_kl.mean(axis=0) - analytic_kl) < 4 * stderr + 1e-3)


def test_importance_weighted_bound_is_at_least_the_elbo(model_and_params):
    model, _, params, x = model_and_params
    x, rng = x[:8], jax.random.key(7)

    @jax.jit
    def weights_and_first_terms(p):
        return (evaluate.iwae_log_weights(model, p, x, rng, 64),
                model.apply({"params": p}, x, jax.random.split(rng, 64)[0]))

    log_weights, terms = weights_and_first_terms(params)
    # Each log-weight is a single-sample ELBO: log p(x | z) - (log q - log p) at that z.
    np.testing.assert_allclose(log_weights[0], terms["log_px_z"] - terms["kl"], rtol=1e-5)
    bound = losses.iwae_bound(log_weights)
    assert np.all(bound >= log_weights.mean(axis=0))
    assert np.all(bound < log_weights.max(axis=0) + 1e-4)


def test_experiment_defaults_are_the_seeds_adamax_at_3e_4_and_batch_64():
    config = lvae_experiment.Config()
    assert (config.optimizer, config.learning_rate, config.batch_size) == ("adamax", 3e-4, 64)
    assert lvae_experiment.OPTIMIZERS["adamax"] is optax.adamax
