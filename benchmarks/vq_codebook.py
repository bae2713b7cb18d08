"""Codebook study (issue 15): the VQ-VAE's quantizer presets side by side at equal budget.

    python -m benchmarks.vq_codebook [--epochs 5] [--prior_epochs 5] [--only plain fsq ...]
                                     [--workdir runs/vq_codebook] [--quick]

Each variant is one `python -m experiments.vqvae --quantizer <preset> --prior gated` run
in <workdir>/<preset> with the same data (patches_embedded), epochs, batch (128), Adam
learning rate (1e-3) and seed, and a Gated PixelCNN prior trained for the same number of
epochs on each variant's codes. A rerun skips the variants already finished at this budget
and resumes an interrupted one from its checkpoints.

Writes into the workdir:
  table.md, results.json: per variant, over the test set: codebook usage (codes used / K),
    perplexity, reconstruction MSE and its change against plain, the VQ terms, the median
    wall time of a training step, the Gated PixelCNN prior's NLL in nats per code and,
    beside it, the entropy of the code frequencies (ln perplexity, the NLL of a prior
    without context);
  usage.png: fraction of the K codes used per batch against training step, every variant;
  reconstructions_best3.png: the same varied test patches (`varied_patches`) and their
    reconstructions by the three best variants;
  samples_best.png: 100 samples of the best variant's Gated PixelCNN prior.
The best variant is the one of lowest reconstruction MSE among those that reach the
issue's usage goals (>= 95% of the codes, perplexity >= 64), or among all if none does.
A full run (not --quick) also writes the table and the figures to benchmarks/results/
(vq_codebook.md, vq_codebook/*.png).
"""

import argparse
import math
import os
import shutil
import sys

import numpy as np

from experiments import common
from experiments import vqvae as vqvae_experiment
from lvm_jax import data, files, viz
from lvm_jax.models import vqvae
from lvm_jax.train import checkpoint, device_description, initial_state

DATASET = "patches_embedded"
PRIOR = "gated"
USAGE_GOAL, PERPLEXITY_GOAL = 0.95, 64.0
NUM_SHOWN = 10
RESULTS_FILE = os.path.join(os.path.dirname(__file__), "results", "vq_codebook.md")
RESULTS_FIGURES = os.path.join(os.path.dirname(__file__), "results", "vq_codebook")


def variant_config(args, preset: str) -> vqvae_experiment.Config:
    """The experiment's config for one variant: only the preset differs between variants."""
    return vqvae_experiment.Config(dataset=DATASET, quantizer=preset, prior=(PRIOR,),
                                   epochs=args.epochs, prior_epochs=args.prior_epochs,
                                   seed=args.seed, quick=args.quick, no_progress=args.no_progress)


def variant_workdir(args, preset: str) -> str:
    return os.path.join(args.workdir, preset)


def _finished(summary_path: str, epochs: int, prior_epochs: int) -> dict | None:
    """The variant's summary if it holds both stages at this budget, else None."""
    if not os.path.exists(summary_path):
        return None
    summary = files.read_json(summary_path)
    prior = summary.get("priors", {}).get(PRIOR)
    if prior and summary["stage"]["epochs"] == epochs and prior["stage"]["epochs"] == prior_epochs:
        return summary
    return None


def budget_epochs(args) -> tuple[int, int]:
    """(VQ-VAE epochs, prior epochs) each variant trains; --quick shortens both as
    experiments.vqvae does."""
    epochs = common.train_config(variant_config(args, "plain")).epochs
    return epochs, epochs if args.quick else args.prior_epochs


def run_variant(args, preset: str) -> dict:
    """Trains (or resumes, or reuses) one variant; its summary.json."""
    workdir = variant_workdir(args, preset)
    done = _finished(os.path.join(workdir, "summary.json"), *budget_epochs(args))
    if done:
        print(f"{preset}: finished earlier, reused")
        return done
    print(f"{preset}: training")
    return vqvae_experiment.train_and_evaluate(variant_config(args, preset), workdir)


def median_step_seconds(metrics_csv: str) -> float | None:
    """Median wall seconds of one training step, from the time column of consecutive train
    rows of one epoch: unlike the stage's total, it leaves out compilation, evaluations,
    checkpoints and any pause of the process (None with fewer than two such rows)."""
    rows = [r for r in files.read_csv(metrics_csv) if r["split"] == "train"]
    intervals = [(float(b["time"]) - float(a["time"])) / (int(b["step"]) - int(a["step"]))
                 for a, b in zip(rows, rows[1:])
                 if a["epoch"] == b["epoch"] and int(b["step"]) > int(a["step"])]
    return float(np.median(intervals)) if intervals else None


def row(preset: str, summary: dict, workdir: str) -> dict:
    """The table's figures for one variant, from its summary.json and metrics.csv."""
    metrics = summary["test_metrics"]
    step_seconds = median_step_seconds(os.path.join(workdir, "vqvae", "metrics.csv"))
    return {
        "variant": preset,
        "options": {name: list(value) if isinstance(value, tuple) else value
                    for name, value in vqvae.QUANTIZER_PRESETS[preset].items()},
        "codes_used": round(metrics["codebook_usage"] * vqvae.NUM_CODES),
        "codebook_usage": metrics["codebook_usage"],
        "perplexity": metrics["perplexity"],
        "recon_mse": metrics["recon_mse"],
        "codebook_loss": metrics["codebook_loss"],
        "commitment_loss": metrics["commitment_loss"],
        "vq_loss": metrics["vq_loss"],
        "ms_per_step": 1e3 * step_seconds if step_seconds else None,
        "prior_nll": metrics["prior_nll"][PRIOR],
        "code_entropy": math.log(metrics["perplexity"]),
        "meets_usage_goals": (metrics["codebook_usage"] >= USAGE_GOAL
                              and metrics["perplexity"] >= PERPLEXITY_GOAL),
    }


def ranked(rows: list[dict]) -> list[dict]:
    """Best first: the variants meeting the usage goals, then the others, each by recon MSE."""
    return sorted(rows, key=lambda r: (not r["meets_usage_goals"], r["recon_mse"]))


def markdown_table(rows: list[dict], plain_mse: float | None) -> str:
    header = ("| variant | codes used / 128 | perplexity | recon MSE | vs plain | codebook | "
              "commitment | vq_loss | ms / step (median) | Gated PixelCNN NLL (nats/code) | "
              "code entropy ln(perplexity) (nats/code) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        change = (f"{100 * (r['recon_mse'] / plain_mse - 1):+.0f}%" if plain_mse else "")
        ms = f"{r['ms_per_step']:.0f}" if r["ms_per_step"] else ""
        lines.append(
            f"| {r['variant']} | {r['codes_used']} ({r['codebook_usage']:.0%}) | "
            f"{r['perplexity']:.1f} | {r['recon_mse']:.4f} | {change} | {r['codebook_loss']:.4f} | "
            f"{r['commitment_loss']:.4f} | {r['vq_loss']:.4f} | {ms} | {r['prior_nll']:.3f} | "
            f"{r['code_entropy']:.3f} |")
    return "\n".join(lines)


def restore_variables(args, preset: str, dataset: data.Dataset) -> tuple[vqvae.VQVAE, dict]:
    """The trained VQ-VAE of a variant and its variables, from its latest checkpoint."""
    config = variant_config(args, preset)
    model = vqvae_experiment.build_model(config, dataset.event_shape,
                                         vqvae_experiment.quantizer_options(config))
    like = initial_state(vqvae_experiment.vqvae_objective(model), dataset.train[:1],
                              common.train_config(config))
    state = checkpoint.restore_committed(os.path.join(variant_workdir(args, preset), "vqvae"),
                                         like)[0]
    return model, {"params": state.eval_params, **state.model_state}


def varied_patches(images: np.ndarray, num: int) -> np.ndarray:
    """Indices of `num` of `images` (N, H, W, C) far apart in mean colour and contrast: greedy
    farthest-point selection from the image nearest the median, shown darkest first."""
    pixels = images.astype(np.float64)
    features = np.concatenate([pixels.mean(axis=(1, 2)), pixels.std(axis=(1, 2))], axis=-1)
    chosen = [int(np.argmin(np.linalg.norm(features - np.median(features, axis=0), axis=1)))]
    distance = np.linalg.norm(features - features[chosen[0]], axis=1)
    for _ in range(min(num, len(images)) - 1):
        distance[chosen] = -np.inf  # never twice, even among identical images
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(features - features[chosen[-1]], axis=1))
    return np.asarray(sorted(chosen, key=lambda i: pixels[i].mean()))


def save_figures(args, best: list[str]) -> list[str]:
    """usage.png, reconstructions_best3.png and samples_best.png in the workdir."""
    variants = args.only
    figures = [viz.save_curve_comparison(
        {v: os.path.join(args.workdir, v, "vqvae", "metrics.csv") for v in variants},
        os.path.join(args.workdir, "usage.png"), "batch_codebook_usage",
        f"fraction of the {vqvae.NUM_CODES} codes used in a batch",
        "Codebook usage during training (train: per step; test: batch mean per epoch)")]

    dataset = common.load_dataset(variant_config(args, best[0]))
    shown = varied_patches(dataset.test, NUM_SHOWN)
    images = data.scale_images(dataset.test[shown])
    rows = [np.asarray(images)]
    for preset in best[:3]:
        model, variables = restore_variables(args, preset, dataset)
        codes = model.apply(variables, images, method=vqvae.VQVAE.encode)
        rows.append(np.asarray(vqvae.decode(model, variables, codes)))
    figures.append(viz.save_image_grid(
        np.concatenate(rows), os.path.join(args.workdir, "reconstructions_best3.png"),
        ncols=NUM_SHOWN, title="test patches; then reconstructions by " + ", ".join(best[:3])))

    samples = os.path.join(args.workdir, "samples_best.png")
    shutil.copyfile(os.path.join(args.workdir, best[0], f"samples_{PRIOR}.png"), samples)
    figures.append(samples)
    return figures


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    # The CPU split over devices as `python -m experiments.vqvae` splits it (before JAX starts).
    common.split_cpu(variant_config(args, "plain"))
    args.workdir = args.workdir or os.path.join(
        "runs", "vq_codebook" + ("_quick" if args.quick else ""))
    summaries = {preset: run_variant(args, preset) for preset in args.only}
    rows = ranked([row(preset, summary, variant_workdir(args, preset))
                   for preset, summary in summaries.items()])
    plain = summaries.get("plain")
    table = markdown_table(rows, plain["test_metrics"]["recon_mse"] if plain else None)
    best = [r["variant"] for r in rows]
    figures = save_figures(args, best)
    epochs, prior_epochs = budget_epochs(args)
    budget = (f"{DATASET}{' (--quick)' if args.quick else ''}: {epochs} epochs (VQ-VAE) and "
              f"{prior_epochs} epochs (Gated PixelCNN), batch 128, Adam 1e-3, seed "
              f"{args.seed}; test set; MSE per element, images in [-1, 1]; best first")
    text = f"{budget}\n\n{table}\n\nbest: {best[0]}\n"
    files.write_atomic(os.path.join(args.workdir, "table.md"), text)
    results = {"budget": budget, "rows": rows, "best": best[0],
               "figures": [os.path.basename(f) for f in figures],
               "device": device_description()}
    files.write_json(os.path.join(args.workdir, "results.json"), results)
    if not args.quick:
        os.makedirs(RESULTS_FIGURES, exist_ok=True)
        for figure in figures:
            shutil.copyfile(figure, os.path.join(RESULTS_FIGURES, os.path.basename(figure)))
        images = "\n".join(f"![{os.path.basename(f)}](vq_codebook/{os.path.basename(f)})"
                           for f in figures)
        files.write_atomic(RESULTS_FILE, f"# Codebook study (issue 15)\n\n`python -m "
                                           f"benchmarks.vq_codebook {' '.join(argv or [])}`\n\n"
                                           + text + "\n" + images + "\n")
    print(text + f"table, results.json and figures in {args.workdir}")
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vq_codebook", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5, help="VQ-VAE epochs of every variant")
    p.add_argument("--prior_epochs", type=int, default=5,
                   help="Gated PixelCNN epochs on every variant's codes")
    p.add_argument("--only", nargs="+", default=list(vqvae.QUANTIZER_PRESETS),
                   choices=list(vqvae.QUANTIZER_PRESETS), metavar="PRESET",
                   help=f"the variants to run, from {', '.join(vqvae.QUANTIZER_PRESETS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None,
                   help="default runs/vq_codebook (runs/vq_codebook_quick with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: each variant as experiments.vqvae --quick")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return p


if __name__ == "__main__":
    main(sys.argv[1:])
