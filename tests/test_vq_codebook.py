"""The codebook study (benchmarks/vq_codebook.py): ranking, table, and a --quick run."""

import json
import os

import matplotlib.image
import numpy as np

from benchmarks import vq_codebook


def _row(variant, usage, perplexity, mse):
    return {"variant": variant, "codes_used": round(128 * usage), "codebook_usage": usage,
            "perplexity": perplexity, "recon_mse": mse, "codebook_loss": 0.01,
            "commitment_loss": 0.01, "vq_loss": 0.02, "ms_per_step": 100.0, "prior_nll": 3.0,
            "code_entropy": np.log(perplexity),
            "meets_usage_goals": usage >= 0.95 and perplexity >= 64}


def test_variants_reaching_the_usage_goals_rank_first_then_by_reconstruction():
    rows = [_row("plain", 0.3, 12.8, 0.020), _row("fsq", 1.0, 100.0, 0.015),
            _row("ema", 0.97, 50.0, 0.010), _row("kmeans", 0.99, 90.0, 0.012)]
    assert [r["variant"] for r in vq_codebook.ranked(rows)] == ["kmeans", "fsq", "ema", "plain"]
    table = vq_codebook.markdown_table(rows, plain_mse=0.020).splitlines()
    assert len(table) == 2 + len(rows) and table[1].count("---") == table[0].count("|") - 1
    assert "| fsq | 128 (100%) | 100.0 | 0.0150 | -25% |" in table[3]
    assert table[2].startswith("| plain | 38 (30%) | 12.8 | 0.0200 | +0% |")


def test_step_time_is_the_median_interval_within_epochs(tmp_path):
    """Epoch boundaries (evaluation, checkpoint) and a pause of the process stay out of it."""
    path = str(tmp_path / "metrics.csv")
    rows = [("train", 1, 1, 0.0), ("train", 1, 2, 1.0), ("train", 1, 3, 1.9),
            ("train", 1, 4, 100.0),  # the process was paused for a minute and a half
            ("test", 1, 4, 101.0), ("train", 2, 5, 120.0), ("train", 2, 7, 122.2),
            ("train", 2, 8, 123.3)]
    with open(path, "w") as f:
        f.write("split,epoch,step,time,loss\n")
        f.writelines(f"{s},{e},{t},{w},0.5\n" for s, e, t, w in rows)
    # Per-step intervals 1.0, 0.9, 98.1, 1.1 (two steps in 2.2 s), 1.1.
    assert np.isclose(vq_codebook.median_step_seconds(path), 1.1)


def test_varied_patches_take_one_of_each_kind_before_a_second():
    """Three flat colours, many patches of each: three picks are one of each, darkest first."""
    colours = np.array([[200, 220, 250], [20, 60, 60], [230, 120, 40]], np.uint8)
    kinds = np.repeat(np.arange(3), [50, 200, 30])
    images = np.broadcast_to(colours[kinds][:, None, None, :], (len(kinds), 4, 4, 3)).copy()
    images[::7] += 1  # near-duplicates within a kind
    picked = vq_codebook.varied_patches(images, 3)
    assert sorted(kinds[picked]) == [0, 1, 2]
    assert list(kinds[picked]) == [1, 2, 0]  # by mean brightness
    assert len(set(vq_codebook.varied_patches(images, 10))) == 10


def test_quick_study_writes_its_table_and_figures_and_reuses_finished_variants(tmp_path, capsys):
    """One variant (FSQ, the fastest) of `python -m benchmarks.vq_codebook --quick`."""
    workdir = str(tmp_path)
    argv = ["--quick", "--only", "fsq", "--workdir", workdir, "--no_progress"]
    results = vq_codebook.main(argv)
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f) == results
    (row,) = results["rows"]
    assert results["best"] == row["variant"] == "fsq"
    assert 0 < row["codebook_usage"] <= 1 and 1 <= row["perplexity"] <= 128
    assert np.isclose(row["code_entropy"], np.log(row["perplexity"]))
    assert row["ms_per_step"] > 0 and np.isfinite(row["prior_nll"])
    assert "2 epochs (VQ-VAE) and 2 epochs (Gated PixelCNN)" in results["budget"]
    with open(os.path.join(workdir, "table.md")) as f:
        assert "| fsq |" in f.read()
    assert sorted(results["figures"]) == ["reconstructions_best3.png", "samples_best.png",
                                          "usage.png"]
    for name in results["figures"]:
        image = matplotlib.image.imread(os.path.join(workdir, name))
        assert image.shape[0] > 100 and image.std() > 0.01, f"{name} looks blank"

    capsys.readouterr()
    assert vq_codebook.main(argv)["rows"] == results["rows"]
    assert "fsq: finished earlier, reused" in capsys.readouterr().out
