"""`experiments.load_run` and `python -m experiments.sample` (issue 34): every experiment's
trained run loads in one call from its workdir's records, and its verbs give what the
experiment itself drew, bit for bit. vae_2d and vlae are covered in test_experiments.py,
vqvae in test_vqvae.py and vqvae2 in test_vqvae2.py, on the runs those files train; the LVAE
experiment's one smoke run is here."""

import contextlib
import io
import json
import os
import types

import jax
import matplotlib.image
import numpy as np
import optax
import pytest

from experiments import load_run, lvae, mlp_vae, runs, sample
from lvm_jax.errors import CheckpointError, ConfigError
from tests.helpers import drawn_figures


@pytest.fixture(scope="module")
def lvae_run(tmp_path_factory):
    """A tiny LVAE --quick run (with its data-dependent initialisation and importance-weighted
    NLL), the figures it drew, the learning rates its optimizers were built with and what it
    printed: the run of every LVAE experiment test."""
    workdir = str(tmp_path_factory.mktemp("lvae") / "run")
    built, printed = [], io.StringIO()
    with pytest.MonkeyPatch.context() as patch, drawn_figures() as drawn, \
            contextlib.redirect_stdout(printed):
        patch.setitem(lvae.OPTIMIZERS, "adamax",
                      lambda rate: built.append(rate) or optax.adamax(rate))
        summary = lvae.main(["--quick", "--no_progress", "--latent_layers", "2", "--hidden", "8",
                             "--latent_channels", "4", "--blocks_per_layer", "1",
                             "--iwae_samples", "4", "--iwae_examples", "6", "--workdir", workdir])
    return types.SimpleNamespace(workdir=workdir, summary=summary, drawn=drawn, built=built,
                                 printed=printed.getvalue())


def test_an_lvae_quick_run_trains_with_adamax_and_writes_its_summary_and_figures(lvae_run):
    workdir, summary = lvae_run.workdir, lvae_run.summary
    assert lvae_run.built == [3e-4], "fit trains with the configured optimizer"
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f) == summary
    assert summary["config"]["optimizer"] == "adamax"
    assert summary["config"]["batch_size"] == 64
    metrics = summary["test_metrics"]
    assert metrics["neg_elbo"] == pytest.approx(metrics["recon"] + metrics["kl"], rel=1e-5)
    assert summary["kl_per_layer"] == [metrics["kl_layer_1"], metrics["kl_layer_2"]]
    assert sum(summary["kl_per_layer"]) == pytest.approx(metrics["kl"], rel=1e-4)
    assert summary["config"]["likelihood"] == "bernoulli" and summary["free_bits"] == 0.5
    assert summary["units"]["kl_layer_2"].startswith("nats per example")
    assert summary["units"]["bits_per_dim"].startswith("bits per dimension (binary scale)")
    assert sorted(summary["figures"]) == ["curves.png", "kl_layers.png", "layer_1.png",
                                          "layer_2.png", "reconstructions.png", "samples.png"]
    for name in summary["figures"]:
        image = matplotlib.image.imread(os.path.join(workdir, name))
        assert image.shape[0] > 100 and image.std() > 0.05, f"{name} looks blank"
    assert "test -ELBO" in lvae_run.printed


def test_an_lvae_run_redraws_its_figures_and_evaluates_its_bound_bit_for_bit(lvae_run):
    workdir, summary, drawn = lvae_run.workdir, lvae_run.summary, lvae_run.drawn
    run = load_run(workdir)
    assert run.step == summary["checkpoint_step"] and run.config.latent_layers == 2
    np.testing.assert_array_equal(run.sample(100, jax.random.key(1)), drawn["samples.png"])
    test = run.dataset.test
    np.testing.assert_array_equal(run.reconstruct(test[:50]), drawn["reconstructions.png"][1::2])
    nll = run.evaluate(test[:6], jax.random.key(0), 4, batch_size=lvae.IWAE_BATCH)
    assert float(nll.mean()) == summary["test_metrics"]["iwae_nll"]
    means = run.encode(test[:3])
    assert means.shape == (3, sum(h * w * c for h, w, c in run.model.latent_shapes()))
    with pytest.raises(ConfigError) as refused:
        run.decode(means)
    assert str(refused.value) == (
        "this lvae run has no decoder of one latent (its layers are drawn top down, each given "
        "those above): it has sample, reconstruct, encode, evaluate.")


def test_the_sample_command_writes_the_grid_and_the_runs_own_samples(lvae_run, tmp_path,
                                                                     capsys):
    workdir, drawn = lvae_run.workdir, lvae_run.drawn
    out = tmp_path / "grid.png"
    sample.main(["--workdir", workdir, "--num", "100", "--out", str(out)])
    np.testing.assert_array_equal(np.load(tmp_path / "grid.npy"), drawn["samples.png"])
    assert out.stat().st_size > 1000
    assert "100 samples of lvae" in capsys.readouterr().out
    sample.main(["--workdir", workdir, "--num", "3", "--seed", "7", "--out", str(out)])
    np.testing.assert_array_equal(np.load(tmp_path / "grid.npy"),
                                  load_run(workdir).sample(3, jax.random.key(7)))


@pytest.mark.parametrize("flags, message", [
    (["--prior", "gated"], "--prior gated: this lvae run has one prior, its model's own"),
    (["--out", "grid.jpg"], "--out grid.jpg must name a .png file"),
    (["--num", "0"], "argument --num: 0 is not a positive integer"),
])
def test_the_sample_command_refuses_in_one_line(lvae_run, flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--workdir", lvae_run.workdir, "--out", str(tmp_path / "g.png"), *flags])
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_an_mlp_vae_study_loads_by_variant(tmp_path):
    root = tmp_path / "run"
    with drawn_figures() as drawn:
        mlp_vae.main(["--quick", "--no_progress", "--study", "depth", "--workdir", str(root)])
    for variant in ("baseline", "deep"):
        run = load_run(str(root / "depth" / variant))
        assert run.sample(64, jax.random.key(1)).shape == (64, 28, 28, 1)
        np.testing.assert_array_equal(run.sample(64, jax.random.key(1)),
                                      drawn[f"{variant}_samples.png"])
        digits = run.dataset.test[:256]  # the study's z ~ q(z|x), drawn for 256 digits at once
        reconstructions = run.reconstruct(digits, jax.random.key(1))[:16]
        np.testing.assert_array_equal(reconstructions,
                                      drawn[f"{variant}_reconstructions.png"][1::2])
        assert not np.array_equal(reconstructions, run.reconstruct(digits[:16]))  # z ~ q, not E[z]
    with pytest.raises(CheckpointError) as refused:
        load_run(str(root))
    assert str(refused.value) == (
        f"{root} holds no run of its own, but the runs in {root / 'depth' / 'baseline'}, "
        f"{root / 'depth' / 'deep'}: load one of those.")


def test_a_workdir_without_a_trained_step_says_what_it_holds(lvae_run, tmp_path):
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'none'} is no run's workdir: it "
                                              "does not exist.$"):
        load_run(str(tmp_path / "none"))
    with pytest.raises(CheckpointError, match="holds no config.json, so no run: it is empty.$"):
        load_run(str(tmp_path))
    untrained = tmp_path / "untrained"
    (untrained / "checkpoints").mkdir(parents=True)
    (untrained / "config.json").write_text(
        (open(os.path.join(lvae_run.workdir, "config.json")).read()))
    (untrained / "metrics.csv").write_text("split,epoch,step,time,loss\n")
    with pytest.raises(CheckpointError) as refused:
        load_run(str(untrained))
    assert str(refused.value) == (f"{untrained} holds no trained step: it holds an empty "
                                  "checkpoints/, config.json and metrics.csv.")


def test_a_config_json_naming_no_experiment_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "glow"}))
    with pytest.raises(CheckpointError, match="names the experiment 'glow', which is none of "
                                              "vae_2d, vae, vlae, mlp_vae, lvae, vqvae, vqvae2."):
        load_run(str(tmp_path))
    assert runs.EXPERIMENTS == ("vae_2d", "vae", "vlae", "mlp_vae", "lvae", "vqvae", "vqvae2")
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "vae", "dataset": "mnist"}))
    with pytest.raises(CheckpointError, match="config.json names no example_shape: the run was "
                                              "written by an lvm_jax older than load_run"):
        load_run(str(tmp_path))
