"""VQ-VAE with a PixelCNN or Gated PixelCNN prior (REFERENCE.md §4), trained in two stages.

    python -m experiments.vqvae --prior pixelcnn
    python -m experiments.vqvae --prior pixelcnn gated --dataset mnist_embedded

Stage 1 trains the VQ-VAE (K = 128 codes of 256 dims, an 8x8 code grid for
32x32 images) in <workdir>/vqvae; the whole dataset is then encoded once to
code grids, and stage 2 trains each prior named by --prior on the same codes,
in <workdir>/prior_<name>. Each stage resumes from its own checkpoints, so a
later run with another --prior reuses the trained VQ-VAE; a prior trained on
the codes of an earlier VQ-VAE checkpoint is refused rather than silently
reused.

The default dataset, patches_embedded, holds RGB 32x32 photo patches: the
architecture and the official numbers are for RGB images (SVHN, CIFAR-10),
and natural-image patches are closer to those than MNIST's mostly black
digits.

Writes into the workdir: samples_<prior>.png (100 decoded prior samples),
reconstructions.png (50 test images, each beside its reconstruction),
curves_vqvae.png and curves_prior_<prior>.png (training curves of both
stages) and summary.json (test recon_mse, vq_loss, codebook_usage,
perplexity, the course's total VQ-VAE loss, prior_nll of every prior trained
on the current codes, their units, and the official results).
"""

import dataclasses
import functools
import os
import sys
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common, configs, runs
from lvm_jax import data, files, progress, viz
from lvm_jax.models import vqvae
from lvm_jax.nn import sampling
from lvm_jax.train import Objective, fit

# --quick keeps the layers and shrinks the widths: at full width one training
# step of the VQ-VAE takes seconds on a CPU.
QUICK_CODE_DIM = 32
QUICK_PRIORS = {"pixelcnn": dict(embed_dim=16, num_residual_blocks=2, hidden=64),
                "gated": dict(dim=16, num_layers=4, hidden=64)}
NUM_SAMPLES, NUM_RECONSTRUCTIONS = 100, 50

MSE = "mean squared error per element"
PER_LATENT = "mean over latent elements"
UNITS = {
    "loss": "recon_mse + vq_loss, the training objective",
    "recon_mse": f"{MSE}, images in [-1, 1]",
    "vq_loss": f"codebook term + beta * commitment term, each a {PER_LATENT} (beta * commitment "
               "alone with --ema_codebook)",
    "codebook_loss": f"codebook term ||sg(z_e) - z_q||^2, {PER_LATENT}",
    "commitment_loss": f"commitment term ||z_e - sg(z_q)||^2, {PER_LATENT}",
    "reference_loss": "recon_mse + codebook_loss + commitment_loss: the course's total test loss",
    "codebook_usage": "fraction of the K codes used over the whole test set",
    "perplexity": "codes: exp of the entropy of the code frequencies over the whole test set",
    "prior_nll": "nats per code, for each prior",
}
PRIOR_UNITS = {"loss": "nats per code", "prior_nll": "nats per code"}

# Official CS294-158 test results (REFERENCE.md §4), in the units above.
REFERENCE_RESULTS = {
    "pixelcnn": {"svhn": {"reference_loss": 0.0286, "prior_nll": 1.944},
                 "cifar10": {"reference_loss": 0.0474, "prior_nll": 2.753}},
    "gated": {"cifar10": {"reference_loss": 0.0557, "prior_nll": 2.8675}},
}


def code_dim(config) -> int:
    return QUICK_CODE_DIM if config.quick else vqvae.CODE_DIM


def quantizer_options(config) -> dict:
    """The options of `vqvae.quantizer`: the `quantizer` preset, then the settings given on
    top (a switch that is off, or a setting left unset, keeps the preset's).

    Raises FlagError for contradictory options, before any compute.
    """
    flags = {"ema": config.ema_codebook or None, "restart_after": config.restart_dead_codes,
             "kmeans_iters": config.kmeans_iters, "cosine": config.cosine or None,
             "lookup_dim": config.lookup_dim, "rotation_trick": config.rotation_trick or None,
             "fsq_levels": config.fsq_levels}
    options = {**vqvae.QUANTIZER_PRESETS[config.quantizer],
               **{name: value for name, value in flags.items() if value is not None}}
    for option, flag in (("restart_after", "--restart_dead_codes"),
                         ("kmeans_iters", "--kmeans_iters")):
        if options.get(option) and not options.get("ema"):
            raise common.FlagError(f"{flag} needs --ema_codebook: the gradient-trained codebook "
                                   "belongs to the optimizer, which the quantizer cannot move.")
    try:
        vqvae.quantizer(vqvae.NUM_CODES, code_dim(config), **options)
    except ValueError as err:
        raise common.FlagError(
            f"--quantizer {config.quantizer} with the flags given: {err}") from None
    return options


def build_model(config, image_shape: tuple[int, int, int], options: dict) -> vqvae.VQVAE:
    """The VQ-VAE `config` names (quantizer `options`), narrower with --quick."""
    return vqvae.conv_vqvae(tuple(image_shape), vqvae.NUM_CODES, code_dim(config),
                            dtype=config.dtype, **options)


def prior_model(config, name: str):
    """The prior `name` as `config` sizes it (narrower with --quick)."""
    return vqvae.PRIORS[name](vqvae.NUM_CODES, **(QUICK_PRIORS[name] if config.quick else {}),
                              dtype=config.dtype)


def vqvae_objective(model: vqvae.VQVAE) -> Objective:
    return Objective(init=model.init, loss=functools.partial(vqvae.loss_fn, model),
                     preprocess=data.scale_images, units=UNITS)


def prior_objective(prior) -> Objective:
    return Objective.stateless(init=prior.init,
                               loss_fn=functools.partial(vqvae.prior_loss_fn, prior),
                               units=PRIOR_UNITS)


# The y-axis labels of the stage-1 curves: only recon_mse is a squared error of images.
CURVE_LABELS = {"loss": "recon_mse + vq_loss (training objective)",
                "recon_mse": f"{MSE}, images in [-1, 1]",
                "vq_loss": "codebook + beta * commitment terms"}


def save_stage1_figures(workdir: str, title: str, test_images, reconstructions) -> list[str]:
    """reconstructions.png and the VQ-VAE's training curves."""
    return [
        viz.save_image_grid(viz.interleave_pairs(test_images, reconstructions),
                            os.path.join(workdir, "reconstructions.png"),
                            title=f"{title}: test images | reconstructions"),
        viz.save_curves(os.path.join(workdir, "vqvae", "metrics.csv"),
                        os.path.join(workdir, "curves_vqvae.png"),
                        names=tuple(CURVE_LABELS), unit=CURVE_LABELS,
                        title=f"{title}: stage 1, VQ-VAE", log_scale=True),
    ]


def save_prior_figures(workdir: str, title: str, prior_name: str, samples) -> list[str]:
    """samples_<prior>.png (decoded prior samples) and the prior's training curves."""
    return [
        viz.save_image_grid(samples, os.path.join(workdir, f"samples_{prior_name}.png"),
                            title=f"{title} + {prior_name}: {len(samples)} samples"),
        viz.save_curves(os.path.join(workdir, f"prior_{prior_name}", "metrics.csv"),
                        os.path.join(workdir, f"curves_prior_{prior_name}.png"),
                        names=("prior_nll",), unit=PRIOR_UNITS["prior_nll"],
                        title=f"{title}: stage 2, {prior_name} prior"),
    ]


def _timing(summary: dict) -> dict:
    return {k: summary[k] for k in ("epochs", "steps", "wall_time_seconds",
                                    "train_steps_per_second", "train_examples_per_second")}


class Run(runs.Run):
    """A trained VQ-VAE with the priors trained on its current codes (`runs.Run`'s verbs):
    images are uint8 (N, H, W, C), codes int32 grids (N, h, w); `prior=` names one of
    `priors` (default the config's first)."""

    @property
    def priors(self) -> dict[str, str]:
        """{prior name: its folder} of the priors this run holds."""
        return {folder[len("prior_"):]: folder for folder in self.stages if folder != "vqvae"}

    def sample(self, num: int, key: jax.Array, prior: str | None = None) -> np.ndarray:
        """`num` images decoded from code grids drawn from the prior, with the config's
        sampler (`lvm_jax.nn.sample_codes`)."""
        folder = runs.choose_prior(prior, self.priors, self.config.prior[0])
        stage = self.stages[folder]
        _, images = vqvae.sample(self.model, self.variables["vqvae"], stage.model,
                                 self.variables[folder]["params"], key, runs.check_count(num),
                                 stage.example.shape[1:], self.config.sampler)
        return runs.to_images(images)

    def encode(self, x) -> np.ndarray:
        """The code grids (N, h, w) int32 of stored images `x`."""
        return vqvae.encode_dataset(self.model, self.variables["vqvae"], np.asarray(x),
                                    common.CONVOLUTIONAL_EVAL_BATCH, data.scale_images)

    def decode(self, z) -> np.ndarray:
        """The images decoded from code grids `z` (N, h, w)."""
        return runs.to_images(vqvae.decode(self.model, self.variables["vqvae"], jnp.asarray(z)))

    def reconstruct(self, x) -> np.ndarray:
        """Stored images `x` encoded to codes and decoded."""
        return self.decode(self.encode(x))


def build(config, record: dict) -> Run:
    """The VQ-VAE and the priors `config` names (its record: `common.run_record`), untrained."""
    image_shape = tuple(record["example_shape"])
    model = build_model(config, image_shape, quantizer_options(config))
    images = jax.ShapeDtypeStruct((1, *image_shape), np.uint8)
    grid = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x,
                                                           method="encode")[0], images).shape
    stages = {"vqvae": runs.Stage("vqvae", model, vqvae_objective(model), images)}
    for name in config.prior:
        prior = prior_model(config, name)
        stages[f"prior_{name}"] = runs.Stage("vqvae_prior", prior, prior_objective(prior),
                                             jax.ShapeDtypeStruct(grid, np.int32))
    return Run(config, stages)


@dataclasses.dataclass(frozen=True)
class Config(common.Config):
    """The VQ-VAE's and its priors' settings; contradictory quantizer settings are refused."""

    CONVOLUTIONAL = True

    dataset: common.ImageDataset = configs.setting("patches_embedded", "the data to train on")
    prior: tuple[Literal[tuple(sorted(vqvae.PRIORS))], ...] = configs.setting(
        ("pixelcnn",), "the autoregressive prior(s) over the code grid (stage 2), each trained "
                       "on the same codes: --prior pixelcnn gated compares them",
        may_change_on_resume=True)
    prior_epochs: int = configs.setting(20, "epochs of stage 2 (--epochs sets stage 1); --quick "
                                            "runs 2", configs.POSITIVE_INT,
                                        may_change_on_resume=True)
    quantizer: Literal[tuple(vqvae.QUANTIZER_PRESETS)] = configs.setting(
        "plain", "named quantizer settings: "
                 + "; ".join(f"{name} = {options or 'the course VQ-VAE'}"
                             for name, options in vqvae.QUANTIZER_PRESETS.items())
                 + ". The settings below add to the preset")
    ema_codebook: bool = configs.setting(
        False, "learn the codebook by exponential moving averages of the encoder outputs "
               "(beta = 0.25) instead of by gradient (beta = 1, the course's VQ-VAE)")
    restart_dead_codes: int | None = configs.setting(
        None, "with --ema_codebook: move a code that no encoder output chose for this many "
              "training steps onto an encoder output of the current batch", configs.POSITIVE_INT,
        metavar="STEPS")
    kmeans_iters: int | None = configs.setting(
        None, "with --ema_codebook: the first training step sets the codebook to the k-means "
              "(k-means++ seeds, this many Lloyd iterations) of its encoder outputs",
        metavar="ITERS")
    cosine: bool = configs.setting(
        False, "l2-normalise codes and encoder outputs: nearest code by cosine similarity "
               "(ViT-VQGAN)")
    lookup_dim: int | None = configs.setting(
        None, "search the nearest code in this smaller dimension: z_e projected down, the code "
              "projected back (ViT-VQGAN's factorized codes)")
    rotation_trick: bool = configs.setting(
        False, "feed the decoder z_e rotated and rescaled onto its code, the transform held "
               "constant in backprop, instead of straight-through (Fifty et al. 2024)")
    fsq_levels: tuple[int, ...] | None = configs.setting(
        None, "finite scalar quantization with these levels per dimension, whose product must "
              "be the 128 codes, e.g. 8 4 4 (Mentzer et al. 2023)", metavar="L")
    sampler: Literal[tuple(sampling.METHODS)] = configs.setting(
        "cached", "how the prior samples are drawn: cached computes only what each new code "
                  "changes (about one pass of the network per grid); raster runs the whole "
                  "network once per code, the reference (same codes for a seed)",
        may_change_on_resume=True)

    def __post_init__(self):
        super().__post_init__()
        quantizer_options(self)



def train_and_evaluate(config: Config, workdir: str | None = None) -> dict:
    """Trains (or resumes) the VQ-VAE, then each prior, that `config` describes in `workdir`
    (default runs/vqvae/<dataset>), writes their figures and summary.json, and returns the
    summary."""
    quantizer_options(config)  # contradictory options are refused before any compute
    dataset = common.load_dataset(config)
    data.require_images(dataset, "vqvae", multiple_of=vqvae.SIZE_MULTIPLE)
    workdir = common.workdir(config, "vqvae", workdir)
    record = common.run_record(config, "vqvae", dataset.event_shape, dataset.identity)
    run = build(config, record)
    model = run.model

    loop = common.train_config(config)
    prior_loop = dataclasses.replace(loop, epochs=loop.epochs if config.quick
                                     else config.prior_epochs)
    plan = {"vqvae": common.train_steps(loop, len(dataset.train)),
            **{f"prior_{name}": common.train_steps(prior_loop, len(dataset.train))
               for name in config.prior}}
    with progress.planned(plan):
        stage1 = fit(run.objective, dataset.train, dataset.test, loop,
                     os.path.join(workdir, "vqvae"), record, config.may_change_on_resume())
        run.trained("vqvae", stage1.state)
        print(common.encoding_line(dataset), flush=True)
        train_codes, test_codes = (
            vqvae.encode_dataset(model, run.variables["vqvae"], images, loop.eval_batch_size,
                                 data.scale_images)
            for images in (dataset.train, dataset.test))

        # With --quick, both stages train the same few steps (same epochs, batch and examples).
        title = common.figure_title(f"VQ-VAE on {dataset.name}", config, run.step)
        # Test images of evenly spread contrast: the photo patches are mostly flat sky.
        shown = viz.spread_by_contrast(dataset.test, NUM_RECONSTRUCTIONS)
        figures = save_stage1_figures(workdir, title, dataset.test[shown],
                                      run.decode(test_codes[shown]))
        viz.write_figures_to_tensorboard(workdir, figures, run.step)

        # Priors trained earlier in this workdir on the same codes stay in the summary.
        summary_path = os.path.join(workdir, "summary.json")
        previous = files.read_json(summary_path) if os.path.exists(summary_path) else {}
        priors = {name: entry for name, entry in previous.get("priors", {}).items()
                  if entry["vqvae_step"] == run.step}
        for prior_name in config.prior:
            folder = f"prior_{prior_name}"
            # The codes depend on the VQ-VAE's step: a prior must not resume on another's codes.
            stage2 = fit(run.stages[folder].objective, train_codes, test_codes, prior_loop,
                         os.path.join(workdir, folder),
                         common.run_record(config, "vqvae_prior", dataset.event_shape,
                                           dataset.identity, prior=[prior_name],
                                           vqvae_step=run.step),
                         config.may_change_on_resume())
            run.trained(folder, stage2.state)
            samples = run.sample(NUM_SAMPLES, jax.random.key(config.seed + 1), prior=prior_name)
            prior_figures = save_prior_figures(workdir, title, prior_name, samples)
            viz.write_figures_to_tensorboard(workdir, prior_figures, int(stage2.state.step))
            priors[prior_name] = {"prior_nll": stage2.test_metrics["prior_nll"],
                                  "vqvae_step": run.step,
                                  "config": stage2.summary["config"],
                                  "stage": _timing(stage2.summary),
                                  "figures": [os.path.basename(f) for f in prior_figures]}

    vq = stage1.test_metrics
    # Usage and perplexity over the whole test set replace the batch means of `fit`.
    metrics = {**vq, **vqvae.code_statistics(test_codes, run.model.quantizer.num_codes),
               "reference_loss": vq["recon_mse"] + vq["codebook_loss"] + vq["commitment_loss"],
               "prior_nll": {name: entry["prior_nll"] for name, entry in priors.items()}}
    summary = common.update_json(summary_path, {
        "config": stage1.summary["config"], "test_metrics": metrics, "units": UNITS,
        "dataset": dataset.describe(), "priors": priors,
        "reference_results": {"source": "CS294-158 official solutions, REFERENCE.md §4",
                              **REFERENCE_RESULTS},
        "stage": _timing(stage1.summary), "device": stage1.summary["device"],
        "figures": [os.path.basename(f) for f in figures]},
        replace=("priors", "test_metrics"))  # priors of an older stage 1 are dropped
    print(f"{title}: test recon_mse {metrics['recon_mse']:.4f}, vq_loss {metrics['vq_loss']:.4f}, "
          f"course total {metrics['reference_loss']:.4f} = recon_mse ({MSE}) + codebook and "
          f"commitment terms ({PER_LATENT}); codebook usage "
          f"{metrics['codebook_usage']:.2f}, perplexity {metrics['perplexity']:.1f} codes; prior "
          + ", ".join(f"{name} {nll:.3f}" for name, nll in metrics["prior_nll"].items())
          + " nats per code")
    print(f"figures and summary.json in {workdir}; each stage's metrics.csv in "
          f"{os.path.join(workdir, 'vqvae')} and {os.path.join(workdir, 'prior_<name>')}")
    return summary


def parser():
    return common.parser(Config, "vqvae", __doc__)


def main(argv=None):
    return common.run(parser(), Config, train_and_evaluate, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
