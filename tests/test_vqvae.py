"""The VQ-VAE: architecture, BatchNorm modes, gradient routing, codes, prior and experiment."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import optax
import pytest

from experiments import common, load_run, sample, vqvae as vqvae_experiment
from lvm_jax import data, viz
from lvm_jax.errors import ConfigError
from lvm_jax.models import vqvae
from lvm_jax.nn.masked_conv import PixelCNN
from lvm_jax.nn.quantizer import VectorQuantizer
from tests.helpers import drawn_figures

K, D = 16, 8
IMAGE_SHAPE = (8, 8, 3)  # a 2x2 code grid

# Compiled once per configuration: op-by-op execution would compile every primitive.
loss_fn = jax.jit(vqvae.loss_fn, static_argnums=(0, 5))
# Initialisers drawn with the 'rbg' generator compile about 4x faster on CPU than with
# threefry (partitionable, JAX's default); the tests need parameters, not a generator.
INIT_KEY = jax.random.key(1, impl="rbg")


@pytest.fixture(scope="module")
def tiny():
    """A tiny VQ-VAE, its variables, and a batch of images in [-1, 1]."""
    model = vqvae.conv_vqvae(IMAGE_SHAPE, num_codes=K, code_dim=D)
    x = jax.random.uniform(jax.random.key(0), (6, *IMAGE_SHAPE), minval=-1.0, maxval=1.0)
    return model, jax.jit(model.init)(INIT_KEY, x), x


def _encoder(module, x):
    return module.encoder(x, False)


def _quantize_and_decode(module, z_e):
    return module.decoder(module.quantizer(z_e)["quantized"], False)


def _decoder(module, z):
    return module.decoder(z, False)


def test_reference_architecture_and_shapes(tiny):
    model, variables, x = tiny
    out = model.apply(variables, x)
    assert out["reconstruction"].shape == x.shape
    assert out["indices"].shape == (6, 2, 2) and out["quantized"].shape == (6, 2, 2, D)
    assert np.all(np.abs(out["reconstruction"]) < 1.0), "tanh output"
    assert set(variables) == {"params", "batch_stats"}

    # 32x32 RGB images, K = 128 codes of D = 256: an 8x8 grid (shapes only, no compute).
    full = vqvae.conv_vqvae((32, 32, 3))
    shapes = jax.eval_shape(full.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    codes = jax.eval_shape(functools.partial(full.apply, method=vqvae.VQVAE.encode), shapes,
                           jnp.zeros((2, 32, 32, 3)))
    assert codes.shape == (2, 8, 8) and codes.dtype == jnp.int32
    params = shapes["params"]
    assert params["quantizer"]["embeddings"].shape == (128, 256)
    kernels = lambda tree: [p.shape for p in jax.tree.leaves(tree) if p.ndim == 4]  # noqa: E731
    res_block = [(3, 3, 256, 256), (1, 1, 256, 256)]
    assert kernels(params["encoder"]) == [(4, 4, 3, 256), (4, 4, 256, 256)] + 2 * res_block
    assert kernels(params["decoder"]) == 2 * res_block + [(4, 4, 256, 256), (4, 4, 256, 3)]
    num_batch_norms = len(jax.tree.leaves(shapes["batch_stats"])) // 2  # mean and var each
    assert num_batch_norms == (1 + 2 * 2) + (2 * 2 + 2)

    with pytest.raises(ValueError, match="multiples of 4"):
        vqvae.conv_vqvae((30, 30, 3))


def test_batch_norm_statistics_change_in_training_only(tiny):
    model, variables, x = tiny
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    rng = jax.random.key(2)

    _, (_, trained) = loss_fn(model, params, state, x, rng, True)
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), trained, state)
    assert all(jax.tree.leaves(changed)), "every running statistic moves in training"
    # PyTorch's momentum: running mean <- 0.9 running mean + 0.1 batch mean (initially 0).
    _, inter = model.apply(variables, x, True, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=lambda m, _: isinstance(m, nn.Conv))
    first_conv = inter["intermediates"]["encoder"]["Conv_0"]["__call__"][0]
    np.testing.assert_allclose(trained["batch_stats"]["encoder"]["BatchNorm_0"]["mean"],
                               0.1 * first_conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)

    _, (_, evaluated) = loss_fn(model, params, state, x, rng, False)
    jax.tree.map(np.testing.assert_array_equal, evaluated, state)
    # Inference mode treats every example alone: no statistics of the test batch leak in.
    alone = model.apply(variables, x[:1])["reconstruction"]
    np.testing.assert_allclose(alone, model.apply(variables, x)["reconstruction"][:1], atol=1e-6)


def test_loss_metrics_are_means_over_elements(tiny):
    model, variables, x = tiny
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    loss, (metrics, _) = loss_fn(model, params, state, x, jax.random.key(0), False)
    out = model.apply(variables, x)
    z_e = model.apply(variables, x, method=_encoder)
    sq = np.mean((np.asarray(z_e) - np.asarray(out["codes"])) ** 2)
    np.testing.assert_allclose(metrics["recon_mse"], np.mean((out["reconstruction"] - x) ** 2),
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["codebook_loss"], sq, rtol=1e-5)
    np.testing.assert_allclose(metrics["commitment_loss"], sq, rtol=1e-5)
    np.testing.assert_allclose(metrics["vq_loss"], 2 * sq, rtol=1e-5)  # beta = 1
    np.testing.assert_allclose(loss, metrics["recon_mse"] + metrics["vq_loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["perplexity"], out["perplexity"])


def test_ema_codebook_state_updates_in_training_and_only_commitment_is_a_loss():
    model = vqvae.conv_vqvae(IMAGE_SHAPE, num_codes=K, code_dim=D, ema=True)
    x = jax.random.uniform(jax.random.key(0), (4, *IMAGE_SHAPE), minval=-1.0, maxval=1.0)
    variables = jax.jit(model.init)(INIT_KEY, x)
    params = variables.pop("params")
    assert "quantizer" not in params and set(variables) == {"batch_stats", "vq_stats"}
    _, (metrics, state) = loss_fn(model, params, variables, x, jax.random.key(2), True)
    sizes = [s["vq_stats"]["quantizer"]["cluster_size"] for s in (variables, state)]
    assert not np.allclose(*sizes)
    np.testing.assert_allclose(metrics["vq_loss"], 0.25 * metrics["commitment_loss"], rtol=1e-6)


@pytest.mark.parametrize("preset", list(vqvae.QUANTIZER_PRESETS))
def test_every_quantizer_preset_trains_and_looks_up_its_codes(preset):
    """A training step of each preset's quantizer gives finite losses and moves the codebook
    (or the projections); in inference mode lookup(indices) is the decoder input, so prior
    samples decode as the model does."""
    quantizer = vqvae.quantizer(vqvae.NUM_CODES, 32, **vqvae.QUANTIZER_PRESETS[preset])
    z_e = jax.random.normal(jax.random.key(0), (4, 2, 2, 32))
    variables = quantizer.init(INIT_KEY, z_e)
    params = variables.pop("params", {})

    def train_loss(params):
        out, state = quantizer.apply({"params": params, **variables}, z_e, True,
                                     jax.random.key(2), mutable=list(variables))
        return out["loss"].sum() + jnp.sum(jnp.sin(out["quantized"])), (out, state)

    (loss, (out, state)), grads = jax.jit(jax.value_and_grad(train_loss, has_aux=True))(params)
    assert np.isfinite(loss) and np.isfinite(out["perplexity"])
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state),
                                                      jax.tree.leaves(variables))]
    assert any(moved) or any(np.any(g != 0) for g in jax.tree.leaves(grads))

    variables = {"params": params, **state}
    out = quantizer.apply(variables, z_e)
    np.testing.assert_allclose(quantizer.apply(variables, out["indices"], method="lookup"),
                               out["quantized"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["ema_cosine_rotation", "fsq"])
def test_projected_presets_decode_their_codes_in_the_full_model(preset):
    """With a lookup projection or FSQ, decode(encode(x)) is still the reconstruction of x."""
    model = vqvae.conv_vqvae(IMAGE_SHAPE, vqvae.NUM_CODES, 32, **vqvae.QUANTIZER_PRESETS[preset])
    x = jax.random.uniform(jax.random.key(0), (4, *IMAGE_SHAPE), minval=-1.0, maxval=1.0)
    variables = jax.jit(model.init)(INIT_KEY, x)
    codes = model.apply(variables, x, method=vqvae.VQVAE.encode)
    assert codes.shape == (4, 2, 2) and codes.dtype == jnp.int32
    np.testing.assert_allclose(vqvae.decode(model, variables, codes),
                               model.apply(variables, x)["reconstruction"], rtol=1e-4, atol=1e-5)


def test_plain_preset_is_the_course_quantizer():
    assert vqvae.quantizer(K, D) == vqvae.quantizer(K, D, **vqvae.QUANTIZER_PRESETS["plain"])
    course = vqvae.quantizer(K, D)
    assert type(course) is VectorQuantizer
    assert (course.commitment_cost, course.lookup_dim) == (1.0, None)


def test_gradients_route_through_the_full_model(tiny):
    """Decoder gradient copied to z_e; codebook moved only by its term; encoder by recon and
    commitment; decoder by recon only."""
    model, variables, x = tiny

    def terms(params):
        out = model.apply({**variables, "params": params}, x)
        return {"recon": jnp.mean((out["reconstruction"] - x) ** 2),
                "codebook": out["codebook_loss"].mean(),
                "commitment": out["commitment_loss"].mean()}

    grads = jax.jit(jax.jacrev(terms))(variables["params"])  # term -> gradient of every parameter
    norms = {term: {module: float(optax.tree.norm(g)) for module, g in by_module.items()}
             for term, by_module in grads.items()}
    assert norms["recon"]["encoder"] > 0 and norms["recon"]["decoder"] > 0
    assert norms["recon"]["quantizer"] == 0
    assert norms["codebook"]["quantizer"] > 0
    assert norms["codebook"]["encoder"] == 0 and norms["codebook"]["decoder"] == 0
    assert norms["commitment"]["encoder"] > 0
    assert norms["commitment"]["decoder"] == 0 and norms["commitment"]["quantizer"] == 0

    @jax.jit
    def straight_through(variables):
        def recon_of(method):
            return lambda z: jnp.mean((model.apply(variables, z, method=method) - x) ** 2)

        z_e = model.apply(variables, x, method=_encoder)
        z_q = model.apply(variables, x)["codes"]
        g_zq = jax.grad(recon_of(_decoder))(z_q)
        _, encoder_vjp = jax.vjp(
            lambda p: model.apply({**variables, "params": p}, x, method=_encoder),
            variables["params"])
        return g_zq, jax.grad(recon_of(_quantize_and_decode))(z_e), encoder_vjp(g_zq)[0]

    g_zq, g_ze, backpropagated = straight_through(variables)
    # The gradient at the decoder input z_q reaches z_e unchanged, and the encoder's
    # parameters get exactly its backpropagation.
    np.testing.assert_allclose(g_ze, g_zq, rtol=1e-5, atol=1e-9)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7),
                 grads["recon"]["encoder"], backpropagated["encoder"])


def test_codes_are_the_nearest_codebook_vectors_and_decode_to_the_reconstruction(tiny):
    model, variables, x = tiny
    e = np.asarray(variables["params"]["quantizer"]["embeddings"], np.float64)
    z = np.asarray(model.apply(variables, x, method=_encoder), np.float64).reshape(-1, D)
    nearest = np.argmin(((z[:, None] - e[None]) ** 2).sum(-1), axis=1).reshape(6, 2, 2)

    codes = model.apply(variables, x, method=vqvae.VQVAE.encode)
    np.testing.assert_array_equal(codes, nearest)
    decoded = vqvae.decode(model, variables, codes)
    np.testing.assert_allclose(decoded, model.apply(variables, x)["reconstruction"], atol=1e-6)

    # Whole datasets: stored uint8 images, batches that do not divide N (zero-padded).
    images = np.asarray(data.unscale_images(x))
    grids = vqvae.encode_dataset(model, variables, images, 4, data.scale_images)
    assert grids.shape == (6, 2, 2) and grids.dtype == np.int32
    np.testing.assert_array_equal(
        grids, model.apply(variables, data.scale_images(images), method=vqvae.VQVAE.encode))


def test_code_statistics_over_a_dataset():
    stats = vqvae.code_statistics(np.array([[[0, 0], [1, 1]], [[0, 0], [1, 1]]]), num_codes=4)
    assert stats == {"codebook_usage": 0.5, "perplexity": pytest.approx(2.0)}
    stats = vqvae.code_statistics(np.arange(8), num_codes=8)
    assert stats == {"codebook_usage": 1.0, "perplexity": pytest.approx(8.0)}


def test_prior_loss_is_the_cross_entropy_in_nats_and_samples_decode(tiny):
    model, variables, _ = tiny
    prior = PixelCNN(K, embed_dim=4, num_residual_blocks=1, hidden=8)
    codes = jax.random.randint(jax.random.key(0), (5, 2, 2), 0, K)
    prior_params = jax.jit(prior.init)(INIT_KEY, codes)["params"]
    nll, metrics = vqvae.prior_loss_fn(prior, prior_params, codes, jax.random.key(2))
    log_p = jax.nn.log_softmax(prior.apply({"params": prior_params}, codes))
    expected = -np.mean(np.take_along_axis(np.asarray(log_p), np.asarray(codes)[..., None], -1))
    np.testing.assert_allclose(nll, expected, rtol=1e-5)
    assert metrics == {"prior_nll": nll}

    sampled, images = vqvae.sample(model, variables, prior, prior_params, jax.random.key(3), 6,
                                   (2, 2))
    assert sampled.shape == (6, 2, 2) and sampled.dtype == jnp.int32
    assert np.all((np.asarray(sampled) >= 0) & (np.asarray(sampled) < K))
    np.testing.assert_allclose(images, vqvae.decode(model, variables, sampled), atol=1e-6)


def test_experiment_quick_smoke(tmp_path, capsys):
    """`python -m experiments.vqvae --quick`: both stages, figures and summary; a second run
    with another prior reuses the VQ-VAE and adds its prior to the summary (about 30 s)."""
    workdir = str(tmp_path / "run")
    # The notebook's data (tests/test_notebook.py): its VQ-VAE and PixelCNN prior compile the
    # same programs as this run's, which the compilation cache then holds for the other.
    quick = ["--quick", "--dataset", "mnist_embedded", "--workdir", workdir, "--no_progress"]
    with drawn_figures() as drawn:
        vqvae_experiment.main(quick)
        summary = vqvae_experiment.main([*quick, "--prior", "gated"])
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f) == summary
    # Said before the encoding, which takes minutes at the default widths on a CPU.
    assert (f"encoding the {common.QUICK_TRAIN} training and {common.QUICK_TEST} test images into "
            "code grids for the priors") in capsys.readouterr().out
    metrics = summary["test_metrics"]
    for key in ("recon_mse", "vq_loss", "codebook_usage", "perplexity", "reference_loss"):
        assert np.isfinite(metrics[key]) and key in summary["units"], key
    assert set(metrics["prior_nll"]) == {"pixelcnn", "gated"}
    assert all(np.isfinite(v) for v in metrics["prior_nll"].values())
    assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= 128
    assert summary["priors"]["pixelcnn"]["vqvae_step"] == summary["priors"]["gated"]["vqvae_step"]
    assert summary["reference_results"]["pixelcnn"]["cifar10"] == {"reference_loss": 0.0474,
                                                                 "prior_nll": 2.753}
    figures = summary["figures"] + [f for p in summary["priors"].values() for f in p["figures"]]
    assert sorted(figures) == ["curves_prior_gated.png", "curves_prior_pixelcnn.png",
                               "curves_vqvae.png", "reconstructions.png", "samples_gated.png",
                               "samples_pixelcnn.png"]
    for name in figures:
        image = matplotlib.image.imread(os.path.join(workdir, name))
        assert image.shape[0] > 100 and image.std() > 0.05, f"{name} looks blank"
    for stage in ("vqvae", "prior_pixelcnn", "prior_gated"):
        assert os.path.isdir(os.path.join(workdir, stage, "checkpoints")), stage

    # The run loads from its root or any stage, with both priors, and redraws its figures.
    run = load_run(workdir)
    assert set(run.priors) == {"gated", "pixelcnn"}
    assert load_run(os.path.join(workdir, "prior_gated")).stages.keys() == run.stages.keys()
    key = jax.random.key(1)
    for prior in ("pixelcnn", "gated"):
        np.testing.assert_array_equal(run.sample(100, key, prior=prior),
                                      drawn[f"samples_{prior}.png"])
    np.testing.assert_array_equal(run.sample(4, key), run.sample(4, key, prior="pixelcnn"))
    test = run.dataset.test
    shown = viz.spread_by_contrast(test, vqvae_experiment.NUM_RECONSTRUCTIONS)
    codes = run.encode(test[shown])
    assert codes.shape == (len(shown), 8, 8) and codes.dtype == np.int32
    np.testing.assert_array_equal(run.decode(codes), drawn["reconstructions.png"][1::2])
    np.testing.assert_array_equal(run.reconstruct(test[shown]), run.decode(codes))
    with pytest.raises(ConfigError, match="^this vqvae run has no importance-weighted bound: it "
                                          "has sample, reconstruct, encode, decode.$"):
        run.evaluate(test[:2], key)
    grid = tmp_path / "gated.png"  # the command draws through the same verbs
    sample.main(["--workdir", workdir, "--num", "100", "--prior", "gated", "--out", str(grid)])
    np.testing.assert_array_equal(np.load(tmp_path / "gated.npy"), drawn["samples_gated.png"])


@pytest.mark.parametrize("flags, message", [
    (["--restart_dead_codes", "10"], "--restart_dead_codes needs --ema_codebook"),
    (["--kmeans_iters", "3"], "--kmeans_iters needs --ema_codebook"),
    (["--fsq_levels", "8", "4", "3"], "fsq levels (8, 4, 3) give 96 codes, not num_codes=128"),
    (["--lookup_dim", "64"], "lookup_dim=64 must be between 1 and code_dim=32"),
    (["--quantizer", "fsq", "--rotation_trick"],
     "--quantizer fsq with the flags given: fsq_levels has no learned codebook: rotation_trick"),
    (["--quantizer", "fsq", "--kmeans_iters", "3", "--ema_codebook"],
     "fsq_levels has no learned codebook: ema, kmeans_iters"),
])
def test_experiment_refuses_contradictory_quantizer_flags(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        vqvae_experiment.main(["--quick", "--workdir", str(tmp_path), *flags])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not os.listdir(tmp_path)
