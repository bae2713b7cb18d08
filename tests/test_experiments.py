"""Smoke tests of the command-line experiments on tiny runs (--quick)."""

import json

import matplotlib.image
import numpy as np
import pytest

from experiments import vae_2d, vlae


def read_summary(workdir):
    return json.loads((workdir / "summary.json").read_text())


def assert_real_figure(path):
    image = matplotlib.image.imread(str(path))
    assert image.shape[0] > 100 and image.std() > 0.05, f"{path} looks blank"


def test_vae_2d_quick_run_and_rerun(tmp_path, capsys):
    args = ["--dataset", "2", "--quick", "--no_progress", "--workdir", str(tmp_path)]
    vae_2d.main(args)
    summary = read_summary(tmp_path)
    metrics = summary["test_metrics"]
    assert set(metrics) >= {"neg_elbo", "recon", "kl", "exact_nll", "gap_to_exact_nll"}
    assert metrics["gap_to_exact_nll"] == pytest.approx(metrics["neg_elbo"] - metrics["exact_nll"])
    assert summary["units"]["neg_elbo"] == "nats per example"
    for name in summary["figures"]:
        assert_real_figure(tmp_path / name)
    assert "exact NLL" in capsys.readouterr().out
    vae_2d.main(args)  # a finished run resumes, trains nothing, and changes nothing
    assert read_summary(tmp_path) == summary


def test_vlae_quick_run_writes_metrics_in_every_unit_and_figures(tmp_path):
    vlae.main(["--quick", "--no_progress", "--workdir", str(tmp_path)])
    summary = read_summary(tmp_path)
    metrics = summary["test_metrics"]
    assert set(metrics) >= {"neg_elbo", "recon", "kl", "bits_per_dim", "recon_sse", "neg_elbo_sse"}
    assert metrics["neg_elbo_sse"] == pytest.approx(metrics["recon_sse"] + metrics["kl"])
    assert summary["config"]["prior"] == "made" and summary["config"]["experiment"] == "vlae"
    assert sorted(summary["figures"]) == ["curves.png", "interpolations.png",
                                          "reconstructions.png", "samples.png"]
    for name in summary["figures"]:
        assert_real_figure(tmp_path / name)
    assert np.isfinite(list(metrics.values())).all()


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
    assert "Traceback" not in err and not (tmp_path / "run").exists()
