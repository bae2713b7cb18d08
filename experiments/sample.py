"""Samples from a trained run of any experiment, as a grid and as raw arrays.

    python -m experiments.sample --workdir runs/vae/mnist_embedded --num 64 --out grid.png
    python -m experiments.sample --workdir runs/vqvae/patches_embedded --prior gated --out g.png

Loads the run (`experiments.load_run`: its newest committed checkpoint; a VQ-VAE's or
VQ-VAE-2's root or any stage's folder), draws --num samples through the model's own prior
(`run.sample`) and writes them as an image grid to --out and as a NumPy array beside it
(--out with .npy for .png): uint8 images (num, H, W, C), or float32 points (num, 2) for
vae_2d, whose grid is a scatter plot over the test data. Without --seed the key is the one
the run drew its own samples.png with (its seed + 1), so the first samples are those.
"""

import dataclasses
import io
import os
import sys
import time

import jax
import numpy as np

from experiments import common, configs, runs
from lvm_jax import errors, files, viz


@dataclasses.dataclass(frozen=True)
class Config(configs.Config):
    """What to draw from a run."""

    num: int = configs.setting(64, "samples to draw", configs.POSITIVE_INT)
    out: str = configs.setting("samples.png", "the grid's path (.png); the raw samples go beside "
                                              "it, with .npy for .png")
    seed: int | None = configs.setting(
        None, "draw with jax.random.key(SEED) (default: the run's seed + 1, the key of its own "
              "samples figure)", configs.SEED)
    prior: str | None = configs.setting(
        None, "the trained prior to sample (vqvae: pixelcnn or gated; vqvae2: the bottom "
              "prior's condition, top or none); default the run's")

    def __post_init__(self):
        super().__post_init__()
        if not self.out.endswith(".png"):
            raise errors.ConfigError(f"--out {self.out} must name a .png file: the grid is a PNG "
                                     "image, and the raw samples go beside it as .npy.")


def draw(config: Config, workdir: str) -> dict:
    """Loads the run in `workdir`, draws `config.num` samples and writes the grid and the
    array; returns {"grid", "array", "seconds"} (seconds: loading and drawing)."""
    tic = time.perf_counter()
    run = runs.load_run(workdir)
    seed = run.config.seed + 1 if config.seed is None else config.seed
    priors = {"prior": config.prior} if config.prior is not None else {}
    if priors and not run.priors:
        raise errors.ConfigError(f"--prior {config.prior}: this {run.experiment} run has one "
                                 "prior, its model's own; --prior picks a VQ-VAE's or "
                                 "VQ-VAE-2's trained priors.")
    samples = run.sample(config.num, jax.random.key(seed), **priors)
    seconds = time.perf_counter() - tic
    title = common.figure_title(
        f"{config.num} samples of {run.experiment} ({workdir}, step {run.step}, key {seed}"
        + (f", prior {config.prior})" if config.prior else ")"), run.config, run.step)
    if samples.dtype == np.uint8:
        grid = viz.save_image_grid(samples, config.out, ncols=int(np.ceil(np.sqrt(config.num))),
                                   title=title)
    else:
        grid = viz.save_scatter(config.out, run.dataset.test, {"samples": samples}, title=title)
    buffer = io.BytesIO()
    np.save(buffer, samples)
    array = files.write_atomic(os.path.splitext(config.out)[0] + ".npy", buffer.getvalue())
    print(f"{title}: {grid} and {array} ({samples.dtype} {samples.shape}), "
          f"{seconds:.1f} s to load and draw")
    return {"grid": grid, "array": array, "seconds": seconds}


def parser():
    return common.trained_run_parser(Config, "sample", __doc__)


def main(argv=None):
    return common.run(parser(), Config, draw, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
