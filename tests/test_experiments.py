"""Smoke tests of the command-line experiments on tiny runs (--quick)."""

import json
import math

import jax
import matplotlib.image
import numpy as np
import pytest

from experiments import common, evaluate, load_run, lvae, mlp_vae, vae, vae_2d, vlae, vqvae
from lvm_jax import files, viz
from tests.helpers import drawn_figures

PARSERS = {"vae_2d": vae_2d.parser, "vae": vae.parser,
           "vlae": vlae.parser, "vqvae": vqvae.parser, "lvae": lvae.parser,
           "mlp_vae": mlp_vae.parser, "evaluate": evaluate.parser}
MAINS = {"vae_2d": vae_2d.main, "vae": vae.main, "vlae": vlae.main, "vqvae": vqvae.main,
         "lvae": lvae.main, "mlp_vae": mlp_vae.main}


def read_summary(workdir):
    return json.loads((workdir / "summary.json").read_text())


def assert_real_figure(path):
    image = matplotlib.image.imread(str(path))
    assert image.shape[0] > 100 and image.std() > 0.05, f"{path} looks blank"


def test_vae_2d_quick_run_and_rerun_and_its_loaded_run(tmp_path, capsys):
    args = ["--dataset", "2", "--quick", "--no_progress", "--workdir", str(tmp_path)]
    with drawn_figures() as drawn:
        vae_2d.main(args)
    summary = read_summary(tmp_path)
    metrics = summary["test_metrics"]
    assert set(metrics) >= {"neg_elbo", "recon", "kl", "exact_nll", "gap_to_exact_nll"}
    assert metrics["gap_to_exact_nll"] == pytest.approx(metrics["neg_elbo"] - metrics["exact_nll"])
    assert summary["units"]["neg_elbo"] == "nats per example"
    # The final figure draws 100 z samples per point, the per-epoch curve 10: two estimates
    # of the same -ELBO, a few hundredths of a nat apart at most.
    assert summary["z_samples_per_test_point"] == {"test_metrics": 100, "metrics.csv test rows": 10}
    last_epoch = [r for r in files.read_csv(str(tmp_path / "metrics.csv")) if r["split"] == "test"][-1]
    assert float(last_epoch["neg_elbo"]) != metrics["neg_elbo"]
    assert float(last_epoch["neg_elbo"]) == pytest.approx(metrics["neg_elbo"], abs=0.05)
    for name in summary["figures"]:
        assert_real_figure(tmp_path / name)
    assert "exact NLL" in capsys.readouterr().out
    vae_2d.main(args)  # a finished run resumes, trains nothing, and changes nothing
    assert read_summary(tmp_path) == summary

    # The loaded run draws the figure's points bit for bit, with the experiment's key.
    run = load_run(str(tmp_path))
    key = jax.random.key(summary["config"]["seed"] + 1)
    scatter = drawn["samples.png"]
    np.testing.assert_array_equal(run.sample(1000, key), scatter["samples with decoder noise"])
    np.testing.assert_array_equal(run.sample(1000, key, noise=False),
                                  scatter["decoder means (no noise)"])
    points = run.dataset.test[:5]
    z = run.encode(points)
    assert z.shape == (5, 2) and run.decode(z).shape == (5, 2)
    np.testing.assert_allclose(run.reconstruct(points), run.decode(z), rtol=1e-6, atol=1e-6)


def test_vlae_quick_run_writes_metrics_in_every_unit_and_figures_its_run_redraws(tmp_path):
    with drawn_figures() as drawn:
        vlae.main(["--quick", "--no_progress", "--workdir", str(tmp_path)])
    summary = read_summary(tmp_path)
    metrics = summary["test_metrics"]
    assert set(metrics) >= {"neg_elbo", "recon", "kl", "bits_per_dim", "recon_sse", "neg_elbo_sse"}
    assert metrics["neg_elbo_sse"] == pytest.approx(metrics["recon_sse"] + metrics["kl"])
    assert summary["units"]["bits_per_dim"] == "bits per dimension (8-bit scale)"
    columns = set(files.read_csv(str(tmp_path / "metrics.csv"))[0]) - {"split", "epoch", "step"}
    assert columns <= set(summary["units"]), "every metrics.csv column has a unit"
    assert summary["config"]["prior"] == "made" and summary["config"]["experiment"] == "vlae"
    assert sorted(summary["figures"]) == ["curves.png", "interpolations.png",
                                          "reconstructions.png", "samples.png"]
    for name in summary["figures"]:
        assert_real_figure(tmp_path / name)
    assert np.isfinite(list(metrics.values())).all()

    # Every verb of the loaded run gives the figures' images bit for bit.
    run = load_run(str(tmp_path))
    test = run.dataset.test
    np.testing.assert_array_equal(run.sample(100, jax.random.key(1)), drawn["samples.png"])
    np.testing.assert_array_equal(run.reconstruct(test[:50]), drawn["reconstructions.png"][1::2])
    # Two compiled calls against one: equal to a rounding of the last float bit.
    np.testing.assert_allclose(run.decode(run.encode(test[:50])), run.reconstruct(test[:50]),
                               atol=1)
    np.testing.assert_array_equal(run.interpolations(test[50:60], test[60:70]),
                                  drawn["interpolations.png"])
    assert run.sample(3, jax.random.key(1)).dtype == np.uint8


def test_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as done:
        vlae.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--dataset", "--epochs", "--batch_size", "--learning_rate", "--seed", "--workdir",
                 "--quick", "--prior"):
        assert flag in out
    with pytest.raises(SystemExit) as done:
        vlae.main(["--dataset", "imagenet"])
    assert done.value.code == 2
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err


def test_missing_data_file_ends_with_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        vlae.main(["--dataset", "deepul_cifar10", "--data_dir", str(tmp_path),
                   "--workdir", str(tmp_path / "run")])
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert "error: deepul_cifar10: data file" in err and "cifar10.pkl not found" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # the data are loaded before the workdir is claimed


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_explains_every_flag_and_shows_its_default(name):
    p = PARSERS[name]()
    for action in p._actions:
        assert action.help, f"{name}: {action.option_strings} has no help text"
    text = p.format_help()
    if name != "evaluate":
        assert "(default: 20)" in text or "(default: 10)" in text  # the epochs
        # A None default shows as off (--grad_clip or --ema_decay) unless the help says more.
        assert "(default: off)" in text and "(default: None)" not in text
    # The docstring's usage line stays a line of its own, not run into the prose.
    assert f"\n    python -m experiments.{name}" in text


def test_the_twenty_epoch_default_is_visible(capsys):
    with pytest.raises(SystemExit):
        vae.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS passes over the training set (--quick overrides it) (default: 20)" in out


@pytest.mark.parametrize("name, flags, message", [
    ("vae", ["--epochs", "-1"], "argument --epochs: -1 is not a positive integer"),
    ("vae", ["--epochs", "0"], "argument --epochs: 0 is not a positive integer"),
    ("vae", ["--batch_size", "0"], "argument --batch_size: 0 is not a positive integer"),
    ("vae", ["--batch_size", "-5"], "argument --batch_size: -5 is not a positive integer"),
    ("vae", ["--batch_size", "1.5"], "argument --batch_size: '1.5' is not a positive integer"),
    ("vae", ["--learning_rate", "-1"], "argument --learning_rate: -1 is not a finite positive number"),
    ("vae", ["--learning_rate", "nan"], "argument --learning_rate: nan is not a finite positive number"),
    ("vae", ["--learning_rate", "inf"], "argument --learning_rate: inf is not a finite positive number"),
    ("vae", ["--seed", "-3"], "argument --seed: -3 is not a non-negative integer"),
    ("vae", ["--beta", "0"], "argument --beta: 0 is not a finite positive number"),
    ("vae", ["--free_bits", "-0.5"], "argument --free_bits: -0.5 is not a finite non-negative number"),
    ("vae", ["--num_samples", "0"], "argument --num_samples: 0 is not a positive integer"),
    ("vae", ["--grad_clip", "0"], "argument --grad_clip: 0 is not a positive number (inf allowed)"),
    ("vae", ["--grad_clip", "nan"], "argument --grad_clip: nan is not a positive number (inf allowed)"),
    ("vae", ["--ema_decay", "1"], "argument --ema_decay: 1 is not a decay rate in [0, 1)"),
    ("vae", ["--ema_decay", "-0.1"], "argument --ema_decay: -0.1 is not a decay rate in [0, 1)"),
    ("vae", ["--steps_per_call", "0"], "argument --steps_per_call: 0 is not a positive integer"),
    ("vae_2d", ["--epochs", "-1"], "argument --epochs: -1 is not a positive integer"),
    ("vqvae", ["--prior_epochs", "0"], "argument --prior_epochs: 0 is not a positive integer"),
    ("vqvae", ["--restart_dead_codes", "0"], "argument --restart_dead_codes: 0 is not a positive integer"),
    ("lvae", ["--latent_layers", "0"], "argument --latent_layers: 0 is not a positive integer"),
    ("lvae", ["--free_bits", "-1"], "argument --free_bits: -1 is not a finite non-negative number"),
    ("lvae", ["--iwae_samples", "-1"], "argument --iwae_samples: -1 is not a non-negative integer"),
    ("lvae", ["--iwae_examples", "0"], "argument --iwae_examples: 0 is not a positive integer"),
    ("lvae", ["--iwae_chunk", "0"], "argument --iwae_chunk: 0 is not a positive integer"),
    ("mlp_vae", ["--latent_dim", "0"], "argument --latent_dim: 0 is not a positive integer"),
])
def test_out_of_range_flags_are_argparse_errors_before_anything_runs(name, flags, message, tmp_path,
                                                                     capsys):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        MAINS[name](flags + ["--quick", "--workdir", str(workdir)])
    assert done.value.code == 2
    assert message in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.parametrize("flags, message", [
    (["--num_samples", "0"], "argument --num_samples: 0 is not a positive integer"),
    (["--chunk", "-1"], "argument --chunk: -1 is not a positive integer"),
    (["--batch_size", "0"], "argument --batch_size: 0 is not a positive integer"),
    (["--num_examples", "0"], "argument --num_examples: 0 is not a positive integer"),
    (["--active_threshold", "-1"], "argument --active_threshold: -1 is not a finite non-negative number"),
])
def test_evaluate_flags_are_range_checked(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        evaluate.main(["--workdir", str(tmp_path)] + flags)
    assert done.value.code == 2 and message in capsys.readouterr().err


def test_lvae_refuses_an_iwae_chunk_that_does_not_divide_the_samples(tmp_path, capsys):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        lvae.main(["--iwae_samples", "100", "--iwae_chunk", "40", "--quick", "--workdir",
                   str(workdir)])
    assert done.value.code == 1 and not workdir.exists()
    assert capsys.readouterr().err.strip().endswith(
        "error: --iwae_chunk 40 must divide --iwae_samples 100.")


def test_evaluate_refuses_a_chunk_that_does_not_divide_the_samples(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        evaluate.main(["--workdir", str(tmp_path), "--num_samples", "100", "--chunk", "40"])
    assert done.value.code == 1
    assert capsys.readouterr().err.strip().endswith(
        "error: --chunk 40 must divide --num_samples 100: each compiled call draws --chunk of "
        "the samples.")


def test_boundary_values_are_accepted():
    args = PARSERS["vae"]().parse_args(["--grad_clip", "inf", "--ema_decay", "0", "--free_bits", "0",
                                        "--seed", "0", "--learning_rate", "1e-4"])
    assert args.grad_clip == math.inf and args.ema_decay == 0.0 and args.free_bits == 0.0
    assert PARSERS["lvae"]().parse_args(["--iwae_samples", "0"]).iwae_samples == 0


def test_quick_figure_titles_say_they_show_a_smoke_run():
    quick, full = vae.Config(quick=True), vae.Config()
    assert common.figure_title("VAE", quick, 8) == "VAE [--quick smoke run, 8 steps: not a trained model]"
    assert common.figure_title("VAE", full, 8) == "VAE"


def test_images_spread_by_contrast_skip_a_flat_majority():
    rng = np.random.default_rng(0)
    flat = np.full((90, 4, 4, 3), 128, np.uint8)  # sky
    busy = (rng.random((10, 4, 4, 3)) * 255 * np.linspace(0.1, 1, 10)[:, None, None, None]).astype(np.uint8)
    images = np.concatenate([flat[:45], busy, flat[45:]])
    shown = viz.spread_by_contrast(images, 6)
    contrast = images.reshape(100, -1).std(axis=1)
    assert len(set(shown.tolist())) == 6 and np.all(np.diff(contrast[shown]) >= 0)
    assert contrast[shown[0]] == 0 and shown[-1] == np.argmax(contrast)
    assert np.sum(contrast[shown] == 0) == 1  # one flat image, not five
    np.testing.assert_array_equal(viz.spread_by_contrast(images, 6), shown)
