"""The VQ-VAE-2: layout and shapes, the objective, gradient routing, per-level quantizers,
and its three-stage experiment (quick run, exact resume, one-line errors)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from experiments import load_run, vqvae2 as vqvae2_experiment
from lvm_jax import data, viz
from lvm_jax.errors import ConfigError
from lvm_jax.models import vqvae, vqvae2
from tests.helpers import drawn_figures

K, D, WIDTH = 16, 8, 16
IMAGE_SHAPE = (16, 16, 3)  # bottom_factor 2: an 8x8 bottom and a 4x4 top grid
loss_fn = jax.jit(vqvae2.loss_fn, static_argnums=(0, 5))
INIT_KEY = jax.random.key(1, impl="rbg")  # compiles faster than threefry (see test_vqvae.py)


def tiny_model(num_residual_blocks=1, num_codes=K, code_dim=D, **options):
    """conv_vqvae2's layout at WIDTH channels, with `num_residual_blocks` per encoder and
    decoder instead of 2: each block adds compile time (seconds per model), not behaviour."""
    return vqvae2.conv_vqvae2(IMAGE_SHAPE, num_codes, code_dim, WIDTH, bottom_factor=2,
                              **options).clone(num_residual_blocks=num_residual_blocks)


def images(n=4, shape=IMAGE_SHAPE):
    """Images in [-1, 1] (numpy's generator: JAX's would compile a threefry program)."""
    return jnp.asarray(np.random.default_rng(0).uniform(-1.0, 1.0, (n, *shape)), jnp.float32)


@pytest.fixture(scope="module")
def tiny():
    model, x = tiny_model(), images()
    return model, jax.jit(model.init)(INIT_KEY, x), x


@pytest.mark.parametrize("shape, bottom_factor, top, bottom", [
    ((32, 32, 3), 2, (8, 8), (16, 16)),    # the experiment's default
    ((32, 32, 3), 4, (4, 4), (8, 8)),      # the paper's layout on 32x32
    ((64, 64, 3), 4, (8, 8), (16, 16)),
    ((64, 64, 1), 2, (16, 16), (32, 32)),
    ((40, 40, 3), 2, (10, 10), (20, 20)),
    ((40, 40, 3), 4, (5, 5), (10, 10)),
])
def test_code_grids_and_reconstruction_shapes(shape, bottom_factor, top, bottom):
    model = vqvae2.conv_vqvae2(shape, bottom_factor=bottom_factor)
    x = jnp.zeros((2, *shape))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(model.apply, variables, x)
    assert out["top"]["indices"].shape == (2, *top)
    assert out["bottom"]["indices"].shape == (2, *bottom)
    assert out["top"]["quantized"].shape == (2, *top, vqvae2.CODE_DIM)
    assert out["reconstruction"].shape == (2, *shape)
    assert out["reconstruction"].dtype == jnp.float32
    params = variables["params"]
    assert params["top_quantizer"]["embeddings"].shape == (vqvae2.NUM_CODES, vqvae2.CODE_DIM)
    assert params["bottom_quantizer"]["embeddings"].shape == (vqvae2.NUM_CODES, vqvae2.CODE_DIM)
    # The decoder's input: the upsampled top codes beside the bottom codes.
    assert params["decoder"]["Conv_0"]["kernel"].shape == (3, 3, 2 * vqvae2.CODE_DIM,
                                                           vqvae2.WIDTH)


@pytest.mark.parametrize("shape, bottom_factor, message", [
    ((36, 36, 3), 4, "multiples of 8, got 36x36"),
    ((32, 20, 3), 4, "multiples of 8, got 32x20"),
    ((20, 20, 3), 2, "multiples of 8, got 20x20"),  # divisible by 2 * bottom_factor only
    ((18, 18, 3), 2, "multiples of 8, got 18x18"),
])
def test_an_image_size_the_grids_do_not_divide_is_a_one_line_error(shape, bottom_factor,
                                                                   message):
    with pytest.raises(ConfigError) as error:
        vqvae2.conv_vqvae2(shape, bottom_factor=bottom_factor)
    assert message in str(error.value) and "\n" not in str(error.value)


def _latents(module, x):
    """Each level's encoder output z as quantized (float32), in inference mode."""
    features = module.bottom_encoder(x, False)
    z_top = vqvae2.to_float32(module.top_encoder(features, False))
    top = module.top_quantizer(z_top)
    return z_top, module._bottom_input(top["quantized"], features, False)


def test_loss_is_mse_plus_each_levels_codebook_and_commitment_terms():
    """The top level's gradient codebook (beta = 1) adds codebook + commitment, the bottom
    level's EMA codebook 0.25 * commitment only: a hand computation from z and z_q."""
    model = tiny_model(bottom_options=vqvae.QUANTIZER_PRESETS["ema"])
    x = images()
    variables = jax.jit(model.init)(INIT_KEY, x)
    params = variables.pop("params")
    loss, (metrics, _) = loss_fn(model, params, variables, x, jax.random.key(2), False)
    full = {"params": params, **variables}
    # One compiled call: op by op, the two passes would compile every primitive alone.
    out, latents = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, method=_latents))
                           )(full, x)
    z_top, z_bottom = (np.asarray(z) for z in latents)
    top_sq = np.mean((z_top - np.asarray(out["top"]["codes"])) ** 2)
    bottom_sq = np.mean((z_bottom - np.asarray(out["bottom"]["codes"])) ** 2)
    mse = np.mean((np.asarray(out["reconstruction"]) - np.asarray(x)) ** 2)
    np.testing.assert_allclose(metrics["recon_mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(metrics["top_commitment_loss"], top_sq, rtol=1e-5)
    np.testing.assert_allclose(metrics["bottom_codebook_loss"], bottom_sq, rtol=1e-5)
    np.testing.assert_allclose(metrics["top_vq_loss"], 2 * top_sq, rtol=1e-5)
    np.testing.assert_allclose(metrics["bottom_vq_loss"], 0.25 * bottom_sq, rtol=1e-5)
    np.testing.assert_allclose(loss, mse + 2 * top_sq + 0.25 * bottom_sq, rtol=1e-5)
    assert top_sq > 0 and bottom_sq > 0


def test_gradients_reach_both_codebooks_encoders_and_decoders(tiny):
    model, variables, x = tiny
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}

    def term(name):  # a term of the objective (the loss itself for None), as a function
        return lambda p: (lambda out: out[0] if name is None else out[1][0][name])(
            vqvae2.loss_fn(model, p, state, x, None, True))

    # The gradient of the loss and of each level's codebook term, in one compiled call.
    grads, codebook_terms = jax.jit(lambda p: (jax.grad(term(None))(p), {
        level: jax.grad(term(f"{level}_codebook_loss"))(p) for level in vqvae2.LEVELS}))(params)
    assert set(grads) == {"bottom_encoder", "top_encoder", "top_quantizer", "top_decoder",
                          "bottom_projection", "bottom_quantizer", "upsample_top", "decoder"}
    for name, grad in grads.items():
        assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grad)), name
    # Straight-through: reconstruction and commitment terms give the codebooks no gradient,
    # so each codebook moves by its own codebook term alone.
    for level, grad in codebook_terms.items():
        np.testing.assert_allclose(grads[f"{level}_quantizer"]["embeddings"],
                                   grad[f"{level}_quantizer"]["embeddings"], rtol=1e-5,
                                   atol=1e-9)


def test_codes_decode_to_the_reconstruction_and_a_missing_level_to_its_mean_code(tiny):
    model, variables, x = tiny

    @jax.jit  # one compiled call: op by op, every primitive would compile alone
    def outputs(variables, x):
        top, bottom = model.apply(variables, x, method=vqvae2.VQVAE2.encode)
        # Top only, by hand: the bottom level's K code vectors averaged, at every position.
        mean_bottom = variables["params"]["bottom_quantizer"]["embeddings"].mean(axis=0)
        by_hand = model.apply(variables, method=lambda m: m._decode(
            m.top_quantizer.lookup(top), jnp.broadcast_to(mean_bottom, (4, 8, 8, D)), False))
        return top, bottom, model.apply(variables, x)["reconstruction"], by_hand, {
            given: vqvae2.decode(model, variables, *codes) for given, codes in
            (("both", (top, bottom)), ("top", (top, None)), ("bottom", (None, bottom)))}

    top, bottom, reconstruction, by_hand, decoded = outputs(variables, x)
    assert top.shape == (4, 4, 4) and bottom.shape == (4, 8, 8) and top.dtype == jnp.int32
    np.testing.assert_allclose(decoded["both"], reconstruction, atol=1e-5)
    np.testing.assert_allclose(decoded["top"], by_hand, atol=1e-6)
    bottom_only = decoded["bottom"]
    assert bottom_only.shape == x.shape and not np.allclose(bottom_only, by_hand)


PRESETS = list(vqvae.QUANTIZER_PRESETS)


@pytest.mark.parametrize("top, bottom", list(zip(PRESETS, reversed(PRESETS))))
def test_every_quantizer_preset_applies_per_level(top, bottom):
    """A training step with a preset per level (each preset at each level across the
    cases): finite, the level's own statistics only where it has an EMA codebook, and
    decode(encode(x)) is the reconstruction."""
    # No residual blocks: the quantizers are what differs between the cases.
    model = tiny_model(0, vqvae.NUM_CODES, 32, top_options=vqvae.QUANTIZER_PRESETS[top],
                       bottom_options=vqvae.QUANTIZER_PRESETS[bottom])

    @jax.jit  # the whole case in one compiled call (each case compiles its own model)
    def step(x):
        variables = model.init(INIT_KEY, x)
        params = variables.pop("params")
        loss, (metrics, state) = vqvae2.loss_fn(model, params, variables, x, jax.random.key(2),
                                                True)
        trained = {"params": params, **state}
        codes = model.apply(trained, x, method=vqvae2.VQVAE2.encode)
        return (variables, loss, metrics, vqvae2.decode(model, trained, *codes),
                model.apply(trained, x)["reconstruction"])

    variables, loss, metrics, decoded, reconstruction = step(images())
    assert set(variables.get("vq_stats", {})) == {
        f"{level}_quantizer" for level, preset in (("top", top), ("bottom", bottom))
        if vqvae.QUANTIZER_PRESETS[preset].get("ema")}
    assert np.isfinite(loss) and all(np.isfinite(v) for v in metrics.values())
    np.testing.assert_allclose(decoded, reconstruction, rtol=1e-4, atol=1e-5)


def test_bottom_prior_pairs_hold_both_grids():
    bottom = np.arange(2 * 4 * 4).reshape(2, 4, 4)
    top = np.arange(2 * 2 * 2).reshape(2, 2, 2) + 100
    pairs = vqvae2_experiment.pair_grids(bottom, top)
    assert pairs.shape == (2, 4, 4, 2) and pairs.dtype == np.int32
    codes, condition = vqvae2_experiment.split_pairs(jnp.asarray(pairs))
    np.testing.assert_array_equal(codes, bottom)
    np.testing.assert_array_equal(condition, top)
    unconditioned = vqvae2_experiment.pair_grids(bottom, top, "none")
    np.testing.assert_array_equal(unconditioned[..., 0], bottom)
    assert not unconditioned[..., 1].any()


# The notebook's VQ-VAE-2 (tests/test_notebook.py): the compiled programs of one are in the
# compilation cache when the other runs.
QUICK = ["--quick", "--no_progress", "--dataset", "mnist_embedded"]
STAGES = ("vqvae2", "top_prior", "bottom_prior")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One uninterrupted `python -m experiments.vqvae2 --quick` (tiny), its summary and the
    arrays its figures drew (`drawn_figures`)."""
    workdir = str(tmp_path_factory.mktemp("vqvae2") / "run")
    with drawn_figures() as drawn:
        summary = vqvae2_experiment.main([*QUICK, "--workdir", workdir])
    return workdir, summary, drawn


def test_experiment_quick_runs_three_stages_and_writes_figures_and_summary(quick_run):
    workdir, summary, _ = quick_run
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f) == summary
    metrics = summary["test_metrics"]
    for key in ("recon_mse", "vq_loss", "top_codebook_usage", "bottom_perplexity",
                "top_prior_nll", "bottom_prior_nll", "bits_per_image"):
        assert np.isfinite(metrics[key]) and key in summary["units"], key
    assert summary["grids"] == {"top": [8, 8], "bottom": [16, 16]}
    np.testing.assert_allclose(
        metrics["bits_per_image"],
        (64 * metrics["top_prior_nll"] + 256 * metrics["bottom_prior_nll"]) / np.log(2))
    # Near-uniform priors after a few steps: about ln 128 nats per code.
    assert 3.0 < metrics["top_prior_nll"] < 6.0 and 3.0 < metrics["bottom_prior_nll"] < 6.0
    assert sorted(summary["figures"]) == ["code_usage.png", "curves_bottom_prior.png",
                                          "curves_top_prior.png", "curves_vqvae2.png",
                                          "reconstructions.png", "samples.png"]
    for name in summary["figures"]:
        image = matplotlib.image.imread(os.path.join(workdir, name))
        assert image.shape[0] > 100 and image.std() > 0.05, f"{name} looks blank"
    for stage in STAGES:
        assert os.path.isdir(os.path.join(workdir, stage, "checkpoints")), stage
        assert os.path.exists(os.path.join(workdir, stage, "metrics.csv")), stage


def test_the_loaded_run_redraws_the_experiments_figures_bit_for_bit(quick_run):
    workdir, summary, drawn = quick_run
    run = load_run(os.path.join(workdir, "top_prior"))  # any stage's folder loads the run
    assert run.workdir == workdir and list(run.stages) == list(STAGES)
    assert run.steps == {stage: summary["stages"][stage]["steps"] for stage in STAGES}
    np.testing.assert_array_equal(run.sample(vqvae2_experiment.NUM_SAMPLES, jax.random.key(1)),
                                  drawn["samples.png"])
    test = run.dataset.test
    shown = viz.spread_by_contrast(test, vqvae2_experiment.NUM_RECONSTRUCTIONS)
    columns = drawn["reconstructions.png"].reshape(len(shown), 4, *test.shape[1:])
    top, bottom = run.encode(test[shown])
    assert (top.shape[1:], bottom.shape[1:]) == ((8, 8), (16, 16))
    np.testing.assert_array_equal(run.reconstruct(test[shown]), columns[:, 1])
    np.testing.assert_array_equal(run.decode((top, None)), columns[:, 2])
    np.testing.assert_array_equal(run.decode((None, bottom)), columns[:, 3])
    with pytest.raises(ConfigError, match="^this run has no trained prior 'none': it has top.$"):
        run.sample(2, jax.random.key(0), prior="none")


def _latest_checkpoint(stage_dir: str) -> str:
    directory = os.path.join(stage_dir, "checkpoints")
    return os.path.join(directory, str(max(int(d) for d in os.listdir(directory)
                                           if d.isdigit())))


@pytest.mark.parametrize("interrupted", ["between_stages", "within_top_prior"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(quick_run, tmp_path,
                                                                interrupted):
    """A copy of the finished run cut back to the state a kill would leave (the priors never
    started; or the top prior's last checkpoint lost and the bottom prior never started)
    resumes to the same test metrics, bit for bit."""
    workdir, summary, _ = quick_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    os.remove(os.path.join(resumed, "summary.json"))
    shutil.rmtree(os.path.join(resumed, "bottom_prior"))
    if interrupted == "between_stages":
        shutil.rmtree(os.path.join(resumed, "top_prior"))
    else:
        shutil.rmtree(_latest_checkpoint(os.path.join(resumed, "top_prior")))
    again = vqvae2_experiment.main([*QUICK, "--workdir", resumed])
    assert again["test_metrics"] == summary["test_metrics"]
    if interrupted == "within_top_prior":
        assert again["stages"]["top_prior"]["steps"] == summary["stages"]["top_prior"]["steps"]


def test_an_image_size_the_grids_do_not_divide_is_one_line(tmp_path, monkeypatch, capsys):
    load = vqvae2_experiment.common.load_dataset

    def cropped(config):  # 28x28 crops: a multiple of 2 * --bottom_factor (4), not of 8
        full = load(config)
        return data.Dataset(full.name, full.train[:, :28, :28], full.test[:, :28, :28],
                            full.kind)

    monkeypatch.setattr(vqvae2_experiment.common, "load_dataset", cropped)
    with pytest.raises(SystemExit) as exit_info:
        vqvae2_experiment.main([*QUICK, "--workdir", str(tmp_path)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "multiples of 8, got 28x28" in err and len(err.strip().splitlines()) == 1, err
    assert not os.listdir(tmp_path)
