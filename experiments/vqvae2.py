"""VQ-VAE-2 (Razavi et al. 2019) with its two priors, trained in three stages.

    python -m experiments.vqvae2
    python -m experiments.vqvae2 --quantizer ema_restart --top_quantizer kmeans

Stage 1 trains the VQ-VAE-2 (K = 128 codes of 64 dims per level; on the default 32x32
patches_embedded a 16x16 bottom and an 8x8 top grid, --bottom_factor 2; the paper's layout
is --bottom_factor 4) in <workdir>/vqvae2; the whole dataset is then encoded once to both
grids. Stage 2 trains the top prior, a PixelSNAIL (gated masked convolutions and causal
self-attention), on the top grids in <workdir>/top_prior; stage 3 the bottom prior, a Gated
PixelCNN whose every layer adds features of the top codes, on the bottom grids given the top
ones in <workdir>/bottom_prior. Each stage resumes from its own checkpoints, and a prior
trained on the codes of another VQ-VAE-2 checkpoint is refused rather than reused.

Writes into the workdir: reconstructions.png (test images; reconstructions from both levels;
from the top level only; from the bottom level only, the missing level replaced by its mean
code vector), samples.png (100 samples: top grids from the top prior, bottom grids from the
bottom prior given them, decoded), code_usage.png (each level's code frequencies over the
test set), curves_<stage>.png and summary.json (test metrics with their units).
"""

import dataclasses
import functools
import math
import os
import sys
from typing import Literal

import jax
import numpy as np
import optax

from experiments import common, configs, runs
from lvm_jax import data, errors, progress, viz
from lvm_jax.models import vqvae, vqvae2
from lvm_jax.nn import ConditionalGatedPixelCNN, PixelSNAIL, sample_codes, sampling
from lvm_jax.train import FitResult, Objective, fit

# --quick keeps the layers and shrinks the widths (cosine's lookup_dim is 32, hence the
# code dimension).
QUICK_WIDTH, QUICK_CODE_DIM = 32, 32
TOP_PRIOR = dict(dim=64, num_blocks=2, layers_per_block=2, num_heads=4, key_dim=32,
                 value_dim=64, hidden=256)
BOTTOM_PRIOR = dict(dim=64, num_layers=8, hidden=256, condition_dim=64, num_condition_blocks=2)
QUICK_TOP_PRIOR = dict(dim=16, num_blocks=1, layers_per_block=2, num_heads=2, key_dim=8,
                       value_dim=16, hidden=32)
QUICK_BOTTOM_PRIOR = dict(dim=16, num_layers=3, hidden=32, condition_dim=16,
                          num_condition_blocks=1)
NUM_SAMPLES, NUM_RECONSTRUCTIONS = 100, 25
RECONSTRUCTION_COLUMNS = ("test image", "both levels", "top only", "bottom only")

MSE = "mean squared error per element"
PER_LATENT = "mean over the level's latent elements"
UNITS = {
    "loss": "recon_mse + vq_loss, the training objective",
    "recon_mse": f"{MSE}, images in [-1, 1]",
    "vq_loss": "top_vq_loss + bottom_vq_loss",
    **{f"{level}_{name}": unit for level in vqvae2.LEVELS for name, unit in {
        "vq_loss": f"codebook term + beta * commitment term, each a {PER_LATENT} (beta * "
                   "commitment alone with an EMA codebook)",
        "codebook_loss": f"||sg(z) - z_q||^2, {PER_LATENT}",
        "commitment_loss": f"||z - sg(z_q)||^2, {PER_LATENT}",
        "batch_codebook_usage": "fraction of the K codes a test batch uses, batch mean",
        "codebook_usage": "fraction of the K codes used over the whole test set",
        "perplexity": "codes: exp of the entropy of the code frequencies (per test batch, "
                      "averaged, in metrics.csv; over the whole test set in summary.json)",
        "prior_nll": "nats per code of the level's grid (the bottom prior's given the top "
                     "codes)"}.items()},
    "bits_per_image": "bits per image: (top_prior_nll * top codes + bottom_prior_nll * bottom "
                      "codes) / ln 2, the code length of both grids under the two priors",
}
PRIOR_UNITS = {"loss": "nats per code", "prior_nll": "nats per code"}
CURVE_LABELS = {"loss": "recon_mse + vq_loss (training objective)",
                "recon_mse": f"{MSE}, images in [-1, 1]",
                "top_vq_loss": "top codebook + beta * commitment terms",
                "bottom_vq_loss": "bottom codebook + beta * commitment terms"}
PRESET = Literal[tuple(vqvae.QUANTIZER_PRESETS)]
BOTTOM_FACTOR = configs.Range(int, lambda v: v in (2, 4), "2 or 4")


@dataclasses.dataclass(frozen=True)
class Config(common.Config):
    """The VQ-VAE-2's and its priors' settings."""

    CONVOLUTIONAL = True

    dataset: common.ImageDataset = configs.setting(
        "patches_embedded", "the data to train on: images whose height and width are "
                            "multiples of 8")
    bottom_factor: int = configs.setting(
        2, "downsampling of the bottom grid (the top one is twice coarser): 2 gives a 16x16 "
           "bottom and an 8x8 top grid on 32x32 images; 4 is the paper's layout for large "
           "images", BOTTOM_FACTOR)
    width: int = configs.setting(vqvae2.WIDTH, "channels of the encoders and decoders; --quick "
                                               f"uses {QUICK_WIDTH}", configs.POSITIVE_INT)
    code_dim: int = configs.setting(vqvae2.CODE_DIM, "dimension of the code vectors of both "
                                                     f"levels; --quick uses {QUICK_CODE_DIM}",
                                    configs.POSITIVE_INT)
    quantizer: PRESET = configs.setting(
        "kmeans", "named quantizer settings of experiments.vqvae, for both levels; kmeans "
                  "(EMA codebook, dead-code restarts, k-means initialisation) is the one the "
                  "codebook study recommends")
    top_quantizer: PRESET | None = configs.setting(
        None, "the top level's quantizer settings (default: --quantizer)")
    bottom_quantizer: PRESET | None = configs.setting(
        None, "the bottom level's quantizer settings (default: --quantizer)")
    prior_epochs: int = configs.setting(20, "epochs of each prior (--epochs sets stage 1); "
                                            "--quick runs 2", configs.POSITIVE_INT,
                                        may_change_on_resume=True)
    bottom_condition: Literal["top", "none"] = configs.setting(
        "top", "what conditions the bottom prior: the top codes, or none (every condition "
               "code 0: the same network, no information from the top level; trained in "
               "bottom_prior_none/)", may_change_on_resume=True)
    sampler: Literal[tuple(sampling.METHODS)] = configs.setting(
        "cached", "how the samples are drawn: cached computes only what each new code "
                  "changes; raster runs the whole network once per code (same codes for a "
                  "seed)", may_change_on_resume=True)

    def level_options(self) -> dict[str, dict]:
        """Each level's `vqvae.quantizer` options."""
        return {level: vqvae.QUANTIZER_PRESETS[getattr(self, f"{level}_quantizer")
                                               or self.quantizer]
                for level in vqvae2.LEVELS}


def build_model(config: Config, image_shape: tuple[int, int, int]) -> vqvae2.VQVAE2:
    """The VQ-VAE-2 `config` names, narrower with --quick.

    Raises ConfigError (an image size the grids do not divide, contradictory quantizer
    options) before any compute.
    """
    options = config.level_options()
    try:
        return vqvae2.conv_vqvae2(
            image_shape, vqvae2.NUM_CODES, QUICK_CODE_DIM if config.quick else config.code_dim,
            QUICK_WIDTH if config.quick else config.width, config.bottom_factor,
            top_options=options["top"], bottom_options=options["bottom"], dtype=config.dtype)
    except errors.ConfigError:
        raise
    except ValueError as err:
        raise common.FlagError(f"the quantizer settings contradict each other: {err}") from None


def pair_grids(bottom: np.ndarray, top: np.ndarray, condition: str = "top") -> np.ndarray:
    """The bottom prior's data as one array, which `fit` batches like any other:
    (N, h, w) bottom and (N, h/2, w/2) top grids -> (N, h, w, 2) int32, channel 0 the bottom
    codes, channel 1 the top codes repeated over each 2x2 block (zeros with condition
    "none")."""
    upsampled = np.repeat(np.repeat(top, 2, axis=1), 2, axis=2)
    if condition == "none":
        upsampled = np.zeros_like(upsampled)
    return np.stack([bottom, upsampled], axis=-1).astype(np.int32)


def split_pairs(pairs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`pair_grids`' inverse: (N, h, w, 2) -> (bottom (N, h, w), top (N, h/2, w/2))."""
    return pairs[..., 0], pairs[:, ::2, ::2, 1]


def top_prior_loss_fn(prior: PixelSNAIL, params, codes: jax.Array, rng: jax.Array,
                      train: bool):
    """-log p(top codes) under the PixelSNAIL in nats per code (dropout in training)."""
    logits = prior.apply({"params": params}, codes, train, rngs={"dropout": rng})
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, codes).mean()
    return nll, {"prior_nll": nll}


def bottom_prior_loss_fn(prior: ConditionalGatedPixelCNN, params, pairs: jax.Array,
                         rng: jax.Array):
    """-log p(bottom codes | top codes) in nats per bottom code; `pairs` from `pair_grids`."""
    del rng
    codes, condition = split_pairs(pairs)
    logits = prior.apply({"params": params}, codes, condition)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, codes).mean()
    return nll, {"prior_nll": nll}


def top_prior(config: Config) -> PixelSNAIL:
    return PixelSNAIL(vqvae2.NUM_CODES, **(QUICK_TOP_PRIOR if config.quick else TOP_PRIOR),
                      dtype=config.dtype)


def bottom_prior(config: Config) -> ConditionalGatedPixelCNN:
    return ConditionalGatedPixelCNN(vqvae2.NUM_CODES, vqvae2.NUM_CODES,
                                    **(QUICK_BOTTOM_PRIOR if config.quick else BOTTOM_PRIOR),
                                    dtype=config.dtype)


def top_objective(prior: PixelSNAIL) -> Objective:
    loss = functools.partial(top_prior_loss_fn, prior)
    return Objective.stateless(init=lambda rng, x: prior.init(rng, x),
                               loss_fn=functools.partial(loss, train=True),
                               eval_loss_fn=functools.partial(loss, train=False),
                               units=PRIOR_UNITS)


def bottom_objective(prior: ConditionalGatedPixelCNN) -> Objective:
    return Objective.stateless(init=lambda rng, pairs: prior.init(rng, *split_pairs(pairs)),
                               loss_fn=functools.partial(bottom_prior_loss_fn, prior),
                               units=PRIOR_UNITS)


# The folder of the bottom prior of each --bottom_condition.
BOTTOM_STAGES = {"top": "bottom_prior", "none": "bottom_prior_none"}


def bottom_stage(config: Config) -> str:
    return BOTTOM_STAGES[config.bottom_condition]


@functools.partial(jax.jit, static_argnames=("model", "top", "bottom", "num", "top_shape",
                                             "sampler"))
def sample(model: vqvae2.VQVAE2, variables, top: PixelSNAIL, top_params,
           bottom: ConditionalGatedPixelCNN, bottom_params, rng: jax.Array, num: int,
           top_shape: tuple[int, int], sampler: str = "cached"):
    """`num` images in one compiled call: top grids from the top prior, bottom grids from
    the bottom prior given them, both decoded. Returns (top (num, h, w), bottom (num, 2h,
    2w), images (num, H, W, C) in (-1, 1))."""
    top_rng, bottom_rng = jax.random.split(rng)
    top_codes = sample_codes(top, {"params": top_params}, top_rng, num, *top_shape,
                             method=sampler)
    bottom_codes = sample_codes(bottom, {"params": bottom_params}, bottom_rng, num,
                                2 * top_shape[0], 2 * top_shape[1], method=sampler,
                                condition=top_codes)
    return top_codes, bottom_codes, vqvae2.decode(model, variables, top_codes, bottom_codes)


class Run(runs.Run):
    """A trained VQ-VAE-2 with its priors (`runs.Run`'s verbs): images are uint8 (N, H, W, C),
    codes the pair of int32 grids (top (N, h, w), bottom (N, 2h, 2w)); `prior=` names the
    bottom prior by what conditions it ("top", or "none" when trained), default the
    config's."""

    @property
    def priors(self) -> dict[str, str]:
        """{bottom condition: the folder of its bottom prior} of the bottom priors this run
        holds."""
        return {name: folder for name, folder in BOTTOM_STAGES.items() if folder in self.stages}

    def sample(self, num: int, key: jax.Array, prior: str | None = None) -> np.ndarray:
        """`num` images: top grids from the top prior, bottom grids from the bottom prior
        given them, decoded; drawn with the config's sampler (`lvm_jax.nn.sample_codes`)."""
        folder = runs.choose_prior(prior, self.priors, self.config.bottom_condition)
        top = self.stages["top_prior"]
        _, _, images = sample(self.model, self.variables["vqvae2"], top.model,
                              self.variables["top_prior"]["params"], self.stages[folder].model,
                              self.variables[folder]["params"], key, runs.check_count(num),
                              top.example.shape[1:], self.config.sampler)
        return runs.to_images(images)

    def encode(self, x) -> tuple[np.ndarray, np.ndarray]:
        """The (top, bottom) code grids of stored images `x`."""
        return vqvae.encode_dataset(self.model, self.variables["vqvae2"], np.asarray(x),
                                    common.CONVOLUTIONAL_EVAL_BATCH, data.scale_images)

    def decode(self, z) -> np.ndarray:
        """The images decoded from `z` = (top, bottom) grids; a level given as None is
        decoded from its mean code vector."""
        top, bottom = z
        return runs.to_images(vqvae2.decode(self.model, self.variables["vqvae2"], top, bottom))

    def reconstruct(self, x) -> np.ndarray:
        """Stored images `x` encoded to both grids and decoded."""
        return self.decode(self.encode(x))


def build(config: Config, record: dict) -> Run:
    """The VQ-VAE-2, its top prior and the bottom prior of `config.bottom_condition` (its
    record: `common.run_record`), untrained."""
    image_shape = tuple(record["example_shape"])
    model = build_model(config, image_shape)
    images = jax.ShapeDtypeStruct((1, *image_shape), np.uint8)
    top_grid, bottom_grid = (grid.shape for grid in jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, method="encode")[0], images))
    top, bottom = top_prior(config), bottom_prior(config)
    return Run(config, {
        "vqvae2": runs.Stage("vqvae2", model, Objective(
            init=model.init, loss=functools.partial(vqvae2.loss_fn, model),
            preprocess=data.scale_images, units=UNITS), images),
        "top_prior": runs.Stage("vqvae2_top_prior", top, top_objective(top),
                                jax.ShapeDtypeStruct(top_grid, np.int32)),
        bottom_stage(config): runs.Stage("vqvae2_bottom_prior", bottom, bottom_objective(bottom),
                                         jax.ShapeDtypeStruct((*bottom_grid, 2), np.int32)),
    })


def reconstruction_columns(run: Run, images: np.ndarray) -> np.ndarray:
    """Rows of RECONSTRUCTION_COLUMNS for stored `images`, interleaved for a 4-column grid:
    uint8 (4N, H, W, C)."""
    top, bottom = run.encode(images)
    decoded = [images, run.decode((top, bottom)), run.decode((top, None)),
               run.decode((None, bottom))]
    return np.stack(decoded, axis=1).reshape(-1, *images.shape[1:])


def _timing(summary: dict) -> dict:
    return {k: summary[k] for k in ("epochs", "steps", "wall_time_seconds",
                                    "train_steps_per_second")}


@dataclasses.dataclass
class Stages:
    """The three trained stages of a run: the `run` (its models and trained variables), the
    grids the VQ-VAE-2 gives each split (`codes[split]` = (top, bottom)), and each stage's
    FitResult."""

    workdir: str
    dataset: data.Dataset
    run: Run
    codes: dict[str, tuple[np.ndarray, np.ndarray]]
    vqvae2: FitResult
    top_prior: FitResult
    bottom_prior: FitResult


def train_stages(config: Config, workdir: str | None = None) -> Stages:
    """Trains (or resumes, or reloads when finished) the three stages `config` describes in
    `workdir` (default runs/vqvae2/<dataset>)."""
    dataset = common.load_dataset(config)
    data.require_images(dataset, "vqvae2", multiple_of=vqvae2.SIZE_MULTIPLE)
    record = common.run_record(config, "vqvae2", dataset.event_shape, dataset.identity)
    run = build(config, record)
    workdir = common.workdir(config, "vqvae2", workdir)

    loop = common.train_config(config)
    prior_loop = dataclasses.replace(loop, epochs=loop.epochs if config.quick
                                     else config.prior_epochs)
    plan = {folder: common.train_steps(loop if folder == "vqvae2" else prior_loop,
                                       len(dataset.train)) for folder in run.stages}
    with progress.planned(plan):
        stage1 = fit(run.objective, dataset.train, dataset.test, loop,
                     os.path.join(workdir, "vqvae2"), record, config.may_change_on_resume())
        run.trained("vqvae2", stage1.state)
        print(common.encoding_line(dataset), flush=True)
        codes = {split: vqvae.encode_dataset(run.model, run.variables["vqvae2"], images,
                                             loop.eval_batch_size, data.scale_images)
                 for split, images in (("train", dataset.train), ("test", dataset.test))}
        bottom = bottom_stage(config)
        prior_data = {"top_prior": {split: codes[split][0] for split in codes},
                      bottom: {split: pair_grids(codes[split][1], codes[split][0],
                                                 config.bottom_condition) for split in codes}}
        results = {}
        for folder, stage in list(run.stages.items())[1:]:
            # The codes depend on the VQ-VAE-2's step: a prior must not resume on another's
            # codes.
            facts = {"vqvae2_step": run.step,
                     **({"bottom_condition": config.bottom_condition} if folder == bottom else {})}
            results[folder] = fit(stage.objective, prior_data[folder]["train"],
                                  prior_data[folder]["test"], prior_loop,
                                  os.path.join(workdir, folder),
                                  common.run_record(config, stage.experiment,
                                                    dataset.event_shape, dataset.identity,
                                                    **facts),
                                  config.may_change_on_resume())
            run.trained(folder, results[folder].state)
    return Stages(workdir, dataset, run, codes, stage1, results["top_prior"], results[bottom])


def train_and_evaluate(config: Config, workdir: str | None = None) -> dict:
    """Trains (or resumes) the three stages `config` describes in `workdir` (default
    runs/vqvae2/<dataset>), writes the figures and summary.json, and returns the summary."""
    stages = train_stages(config, workdir)
    workdir, dataset, run, codes = stages.workdir, stages.dataset, stages.run, stages.codes
    step = run.step
    title = common.figure_title(f"VQ-VAE-2 on {dataset.name}", config, step)
    test_top, test_bottom = codes["test"]
    shown = viz.spread_by_contrast(dataset.test, NUM_RECONSTRUCTIONS)
    samples = run.sample(NUM_SAMPLES, jax.random.key(config.seed + 1))
    counts = {f"{level} ({'x'.join(map(str, grid.shape[1:]))})":
              np.bincount(grid.ravel(), minlength=vqvae2.NUM_CODES)
              for level, grid in zip(vqvae2.LEVELS, codes["test"])}
    figures = [
        viz.save_image_grid(
            reconstruction_columns(run, dataset.test[shown]),
            os.path.join(workdir, "reconstructions.png"), ncols=8,
            title=f"{title}\nper test image: " + " | ".join(RECONSTRUCTION_COLUMNS)
                  + " (a missing level: its mean code vector)"),
        viz.save_image_grid(samples, os.path.join(workdir, "samples.png"),
                            title=f"{title}: {NUM_SAMPLES} samples, top prior then bottom "
                                  f"prior ({config.sampler} sampler)"),
        viz.save_code_usage(counts, os.path.join(workdir, "code_usage.png"),
                            f"{title}: code usage per level over the test set"),
        viz.save_curves(os.path.join(workdir, "vqvae2", "metrics.csv"),
                        os.path.join(workdir, "curves_vqvae2.png"), names=tuple(CURVE_LABELS),
                        unit=CURVE_LABELS, title=f"{title}: stage 1", log_scale=True),
        *(viz.save_curves(os.path.join(workdir, stage, "metrics.csv"),
                          os.path.join(workdir, f"curves_{stage}.png"), names=("prior_nll",),
                          unit=PRIOR_UNITS["prior_nll"], title=f"{title}: {stage}")
          for stage in ("top_prior", bottom_stage(config))),
    ]
    viz.write_figures_to_tensorboard(workdir, figures, step)

    metrics = {**stages.vqvae2.test_metrics}
    for level, grid in zip(vqvae2.LEVELS, codes["test"]):
        # Usage and perplexity over the whole test set replace fit's batch means.
        for name, value in vqvae.code_statistics(grid, vqvae2.NUM_CODES).items():
            metrics[f"{level}_{name}"] = value
    metrics["top_prior_nll"] = stages.top_prior.test_metrics["prior_nll"]
    metrics["bottom_prior_nll"] = stages.bottom_prior.test_metrics["prior_nll"]
    metrics["bits_per_image"] = (metrics["top_prior_nll"] * test_top[0].size
                                 + metrics["bottom_prior_nll"] * test_bottom[0].size) / math.log(2)
    summary = common.update_json(os.path.join(workdir, "summary.json"), {
        "config": stages.vqvae2.summary["config"], "test_metrics": metrics, "units": UNITS,
        "dataset": dataset.describe(), "grids": {"top": list(test_top.shape[1:]),
                                                 "bottom": list(test_bottom.shape[1:])},
        "stages": {"vqvae2": _timing(stages.vqvae2.summary),
                   "top_prior": _timing(stages.top_prior.summary),
                   bottom_stage(config): _timing(stages.bottom_prior.summary)},
        "device": stages.vqvae2.summary["device"], "figures": [os.path.basename(f) for f in figures]},
        replace=("test_metrics", "stages"))
    print(f"{title}: test recon_mse {metrics['recon_mse']:.4f} ({MSE}); codes used "
          + ", ".join(f"{level} {metrics[f'{level}_codebook_usage']:.0%} (perplexity "
                      f"{metrics[f'{level}_perplexity']:.1f})" for level in vqvae2.LEVELS)
          + f"; prior NLL top {metrics['top_prior_nll']:.3f}, bottom given top "
            f"{metrics['bottom_prior_nll']:.3f} nats per code; {metrics['bits_per_image']:.0f} "
            "bits per image")
    print(f"figures and summary.json in {workdir}")
    return summary


def parser():
    return common.parser(Config, "vqvae2", __doc__)


def main(argv=None):
    return common.run(parser(), Config, train_and_evaluate, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
