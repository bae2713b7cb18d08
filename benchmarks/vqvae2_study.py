"""What the hierarchy buys (issue 23): the VQ-VAE-2 against a single-level VQ-VAE at equal steps.

    python -m benchmarks.vqvae2_study [--quick] [--epochs 10] [--prior_epochs 10]
                                      [--width 128] [--code_dim 64] [--workdir runs/vqvae2_study]

On patches_embedded (32x32 RGB), with the same batch (128), Adam learning rate (1e-3), seed,
epochs, widths, K = 128 codes per grid and quantizer preset (kmeans, the codebook study's
recommendation):

  * VQ-VAE-2: `python -m experiments.vqvae2` (8x8 top and 16x16 bottom grids) with its
    PixelSNAIL top prior and top-conditioned Gated PixelCNN bottom prior, in <workdir>/vqvae2;
    then the same bottom prior network trained with every condition code 0
    (--bottom_condition none: conditioning switched off), and the conditioned prior itself
    evaluated with the condition codes zeroed;
  * single level: one 16x16 grid from the same encoder and decoder blocks (`StridedEncoder`,
    `StridedDecoder`, downsampling by 2) and a Gated PixelCNN prior of the bottom prior's
    size, in <workdir>/single_level.

Reported on the test set: reconstruction MSE, codes used and perplexity per grid (and on
the training set; on a training subset of the test set's size, which separates a small
sample from a shift between the splits; and on a training strip as narrow as the test set,
columns STRIP of each photo, cut as the splits are: it separates a narrow strip of content,
whose overlapping patches repeat the same few textures, from a shift between the splits),
each prior's NLL in nats per code, and the total bits per image (top NLL * 64 +
bottom-given-top NLL * 256, or the single-level prior's NLL * 256, over ln 2), with the
usage goals (>= 95% of the codes, perplexity >= K / 2 per level).
Writes <workdir>/results.{md,json} and benchmarks/results/vqvae2_study.{md,json}, with the
command and the machine's load (`uptime`) before and after.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import optax

from experiments import common
from experiments import vqvae as vqvae_experiment
from experiments import vqvae2 as vqvae2_experiment
from lvm_jax import data, files, interrupt
from lvm_jax.data import embedded
from lvm_jax.models import vqvae, vqvae2
from lvm_jax.nn.conv import StridedDecoder, StridedEncoder
from lvm_jax.nn.masked_conv import GatedPixelCNN
from lvm_jax.train import Objective, fit

DATASET, PRESET, K = "patches_embedded", "kmeans", vqvae2.NUM_CODES
USAGE_GOAL, PERPLEXITY_GOAL = 0.95, 0.5 * K
# The test set is the photos' right 128 columns (512-640); the training strip beside it, as
# narrow and as many patches, from training pixels only.
STRIP = (384, 512)
RESULTS = os.path.join(os.path.dirname(__file__), "results", "vqvae2_study")
# --quick: the same layers, narrower, and fewer epochs: a check of the pipeline and a first
# look at the numbers, not the study.
QUICK = dict(epochs=2, prior_epochs=2, width=64, code_dim=32)


def study_config(args, bottom_condition: str = "top") -> vqvae2_experiment.Config:
    sizes = QUICK if args.quick else dict(epochs=args.epochs, prior_epochs=args.prior_epochs,
                                          width=args.width, code_dim=args.code_dim)
    return vqvae2_experiment.Config(dataset=DATASET, quantizer=PRESET,
                                    bottom_condition=bottom_condition, seed=args.seed,
                                    no_progress=args.no_progress, **sizes)


def single_level_model(config: vqvae2_experiment.Config) -> vqvae.VQVAE:
    """One 16x16 grid of K codes on 32x32 images from the VQ-VAE-2's blocks."""
    return vqvae.VQVAE(
        StridedEncoder(config.width, 2, out_features=config.code_dim),
        vqvae.quantizer(K, config.code_dim, **vqvae.QUANTIZER_PRESETS[config.quantizer]),
        StridedDecoder(config.width, 3, 2, tanh=True))


@functools.partial(jax.jit, static_argnames="prior")
def _nll(prior, params, codes, condition):
    logits = prior.apply({"params": params}, codes, condition)
    return optax.softmax_cross_entropy_with_integer_labels(logits, codes).mean(axis=(1, 2))


def nll_zeroed_condition(stages: vqvae2_experiment.Stages, batch: int = 100) -> float:
    """The trained bottom prior's test NLL (nats per code) with every condition code 0."""
    bottom, top = stages.codes["test"][1], np.zeros_like(stages.codes["test"][0])
    params = stages.bottom_prior.state.eval_params
    prior = stages.run.stages["bottom_prior"].model
    per_example = [np.asarray(_nll(prior, params, bottom[i:i + batch], top[i:i + batch]))
                   for i in range(0, len(bottom), batch)]
    return float(np.concatenate(per_example).mean())


def strip_codes(model, variables) -> tuple[np.ndarray, ...]:
    """The code grids of the training strip's patches (columns STRIP of each photo)."""
    grids = vqvae.encode_dataset(model, variables, embedded.photo_strip_patches(*STRIP),
                                 preprocess=data.scale_images)
    return grids if isinstance(grids, tuple) else (grids,)


def usage(codes: dict, level: int, seed: int) -> dict:
    """Codes used and perplexity of one grid on test, train, a train subset of the test
    set's size, and the training strip (`codes["train_strip"]`)."""
    test, train = codes["test"][level], codes["train"][level]
    subset = np.random.default_rng(seed).choice(len(train), len(test), replace=False)
    return {"vectors_test": int(test.size),
            **{f"{name}_{split}": value for split, grids in
               (("test", test), ("train", train), ("train_subset", train[subset]),
                ("train_strip", codes["train_strip"][level]))
               for name, value in vqvae.code_statistics(grids, K).items()}}


def hierarchical(args) -> dict:
    workdir = os.path.join(args.workdir, "vqvae2")
    summary = vqvae2_experiment.train_and_evaluate(study_config(args), workdir)
    stages = vqvae2_experiment.train_stages(study_config(args), workdir)  # finished: reloads
    unconditioned = vqvae2_experiment.train_stages(study_config(args, "none"), workdir)
    metrics = summary["test_metrics"]
    codes = {**stages.codes, "train_strip": strip_codes(stages.run.model, stages.run.variables["vqvae2"])}
    return {
        "recon_mse": metrics["recon_mse"],
        "levels": {level: usage(codes, i, args.seed)
                   for i, level in enumerate(vqvae2.LEVELS)},
        "top_prior_nll": metrics["top_prior_nll"],
        "bottom_prior_nll": metrics["bottom_prior_nll"],
        "bottom_prior_nll_condition_zeroed": nll_zeroed_condition(stages),
        "bottom_prior_nll_trained_unconditioned":
            unconditioned.bottom_prior.test_metrics["prior_nll"],
        "bits_per_image": metrics["bits_per_image"],
        "steps": summary["stages"]["vqvae2"]["steps"],
        "prior_steps": summary["stages"]["top_prior"]["steps"],
        "seconds": {stage: timing["wall_time_seconds"]
                    for stage, timing in summary["stages"].items()}
                   | {"bottom_prior_none":
                      unconditioned.bottom_prior.summary["wall_time_seconds"]},
    }


def single_level(args) -> dict:
    config = study_config(args)
    dataset = common.load_dataset(config)
    model = single_level_model(config)
    loop = common.train_config(config)
    workdir = os.path.join(args.workdir, "single_level")
    settings = dict(width=config.width, code_dim=config.code_dim, quantizer=config.quantizer)
    stage1 = fit(Objective(init=model.init, loss=functools.partial(vqvae.loss_fn, model),
                           preprocess=data.scale_images, units=vqvae_experiment.UNITS),
                 dataset.train, dataset.test, loop, os.path.join(workdir, "vqvae"),
                 common.run_config(config, "vqvae2_study_single_level", **settings))
    variables = {"params": stage1.state.eval_params, **stage1.state.model_state}
    codes = {split: (vqvae.encode_dataset(model, variables, images, loop.eval_batch_size,
                                          data.scale_images),)
             for split, images in (("train", dataset.train), ("test", dataset.test))}
    codes["train_strip"] = strip_codes(model, variables)
    sizes = vqvae2_experiment.BOTTOM_PRIOR
    prior = GatedPixelCNN(K, dim=sizes["dim"], num_layers=sizes["num_layers"],
                          hidden=sizes["hidden"])
    prior_loop = dataclasses.replace(loop, epochs=config.prior_epochs)
    stage2 = fit(vqvae_experiment.prior_objective(prior), codes["train"][0], codes["test"][0],
                 prior_loop, os.path.join(workdir, "prior"),
                 common.run_config(config, "vqvae2_study_single_level_prior", **settings,
                                   vqvae_step=int(stage1.state.step)))
    nll = stage2.test_metrics["prior_nll"]
    return {"recon_mse": stage1.test_metrics["recon_mse"],
            "levels": {"single (16x16)": usage(codes, 0, args.seed)},
            "prior_nll": nll, "bits_per_image": nll * codes["test"][0][0].size / math.log(2),
            "steps": int(stage1.state.step), "prior_steps": int(stage2.state.step),
            "seconds": {"vqvae": stage1.summary["wall_time_seconds"],
                        "prior": stage2.summary["wall_time_seconds"]}}


def goals(levels: dict) -> dict:
    return {name: {"usage": level["codebook_usage_test"] >= USAGE_GOAL,
                   "perplexity": level["perplexity_test"] >= PERPLEXITY_GOAL}
            for name, level in levels.items()}


def table(results: dict) -> str:
    h, s = results["vqvae2"], results["single_level"]
    lines = [
        "# What the hierarchy buys (issue 23, item 5)", "",
        f"`{results['command']}`", "",
        f"{results['setting']}", "",
        f"Machine: {results['device']}; load before: `{results['uptime_before']}`; after: "
        f"`{results['uptime_after']}`", "",
        "| model | recon MSE (per element, [-1, 1]) | prior NLL (nats per code) | "
        "bits per image | VQ steps | prior steps |",
        "|---|---|---|---|---|---|",
        f"| single level, 16x16, K={K} | {s['recon_mse']:.4f} | {s['prior_nll']:.3f} | "
        f"{s['bits_per_image']:.0f} | {s['steps']} | {s['prior_steps']} |",
        f"| VQ-VAE-2, 8x8 + 16x16, K={K} per level | {h['recon_mse']:.4f} | top "
        f"{h['top_prior_nll']:.3f}, bottom given top {h['bottom_prior_nll']:.3f} | "
        f"{h['bits_per_image']:.0f} | {h['steps']} | {h['prior_steps']} (each) |", "",
        "Bottom prior (16x16 grid), test NLL in nats per code:", "",
        "| conditioning | NLL |", "|---|---|",
        f"| top codes (as trained) | {h['bottom_prior_nll']:.3f} |",
        f"| same trained network, condition codes zeroed at test time | "
        f"{h['bottom_prior_nll_condition_zeroed']:.3f} |",
        f"| same network trained with every condition code 0 (conditioning off) | "
        f"{h['bottom_prior_nll_trained_unconditioned']:.3f} |", "",
        f"Code usage per grid (goals: >= {USAGE_GOAL:.0%} of the codes, perplexity >= "
        f"{PERPLEXITY_GOAL:.0f}); the train subset has as many grids as the test set, drawn "
        f"from all training columns; the train strip as many, from columns {STRIP[0]}-"
        f"{STRIP[1]} of each photo (as narrow as the test set's {STRIP[1]}-640):", "",
        "| grid | vectors (test) | used: test | train strip | train subset | train | "
        "perplexity: test | train strip | train subset | train | goals met (test) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in (s, h):
        met = goals(model["levels"])
        for name, level in model["levels"].items():
            lines.append(
                f"| {name} | {level['vectors_test']} | {level['codebook_usage_test']:.0%} | "
                f"{level['codebook_usage_train_strip']:.0%} | "
                f"{level['codebook_usage_train_subset']:.0%} | "
                f"{level['codebook_usage_train']:.0%} | {level['perplexity_test']:.1f} | "
                f"{level['perplexity_train_strip']:.1f} | "
                f"{level['perplexity_train_subset']:.1f} | {level['perplexity_train']:.1f} | "
                f"{'yes' if all(met[name].values()) else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    args.workdir = args.workdir or os.path.join("runs", "vqvae2_study" + ("_quick" if args.quick
                                                                          else ""))
    common.split_cpu(study_config(args))
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = {"command": "python -m benchmarks.vqvae2_study " + " ".join(argv or sys.argv[1:]),
               "setting": ("--quick: a reduced study (" + ", ".join(f"{k} {v}" for k, v in
                                                                    QUICK.items()) + ")"
                           if args.quick else f"{args.epochs} epochs (VQ), {args.prior_epochs} "
                                              f"epochs (each prior), width {args.width}, "
                                              f"code_dim {args.code_dim}")
                          + f"; {DATASET}, batch 128, Adam 1e-3, seed {args.seed}, quantizer "
                            f"preset {PRESET} at every grid",
               "uptime_before": uptime_before,
               "vqvae2": hierarchical(args), "single_level": single_level(args)}
    results["uptime_after"] = subprocess.run(["uptime"], capture_output=True,
                                             text=True).stdout.strip()
    results["device"] = files.read_json(os.path.join(args.workdir, "vqvae2", "vqvae2",
                                                       "summary.json"))["device"]
    markdown = table(results)
    for base in (os.path.join(args.workdir, "results"), RESULTS):
        os.makedirs(os.path.dirname(base), exist_ok=True)
        files.write_atomic(base + ".md", markdown.encode())
        files.write_atomic(base + ".json", json.dumps(results, indent=2).encode())
    print(markdown)
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vqvae2_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10, help="VQ-VAE epochs of both models")
    p.add_argument("--prior_epochs", type=int, default=10, help="epochs of every prior")
    p.add_argument("--width", type=int, default=vqvae2.WIDTH,
                   help="channels of the encoders and decoders of both models")
    p.add_argument("--code_dim", type=int, default=vqvae2.CODE_DIM,
                   help="dimension of the code vectors of both models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None,
                   help="default runs/vqvae2_study (runs/vqvae2_study_quick with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a reduced study: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return p


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except interrupt.Interrupted as stop:  # saved at a step boundary: one line, 130 or 143
        parser().exit(stop.exit_status, f"python -m benchmarks.vqvae2_study: {stop}\n")
