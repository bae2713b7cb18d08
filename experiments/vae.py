"""Image VAE (REFERENCE.md §2): 16-dim latent, N(mu, I) decoder, images in [-1, 1].

    python -m experiments.vae --dataset mnist_embedded

Writes into the workdir: samples.png (100 prior samples), reconstructions.png
(50 test images, each beside its reconstruction), interpolations.png (10 rows
of 10 frames between the encodings of two test images), curves.png,
metrics.csv, summary.json (test -ELBO, recon and KL in nats per example,
bits/dim, and the course's summed-squared-error units), checkpoints/ and
tensorboard/ (the scalars of metrics.csv and the figures).
`experiments.vlae` runs the same with the MADE-flow prior.
"""

import dataclasses
import functools
import os
import sys
from typing import Literal

import jax
import numpy as np

from experiments import common, configs, runs
from lvm_jax import data, evaluate, viz
from lvm_jax.models import likelihoods, vae
from lvm_jax.models.priors import MADEFlowPrior, StandardNormalPrior
from lvm_jax.train import Objective, fit

LATENT_DIM = 16
PRIORS = {"standard": StandardNormalPrior, "made": MADEFlowPrior}
Prior = Literal[tuple(sorted(PRIORS))]
NATS = "nats per example"
UNITS = {"neg_elbo": NATS, "recon": NATS, "kl": NATS, "loss": NATS,
         "recon_sse": "summed squared error per example, images in [-1, 1] (course units)",
         "neg_elbo_sse": "recon_sse + kl (course units)"}


def build_model(image_shape: tuple[int, int, int], prior: str, likelihood: str,
                dtype: str = "float32") -> vae.VAE:
    prior_settings = {"dtype": dtype} if prior == "made" else {}  # N(0, I) has no layers
    return vae.conv_vae(tuple(image_shape), LATENT_DIM, likelihoods.get(likelihood),
                        prior=PRIORS[prior](LATENT_DIM, **prior_settings), dtype=dtype)


def make_objective(model: vae.VAE, num_samples: int = 1, beta: float = 1.0,
                   free_bits: float = 0.0) -> Objective:
    """Trains on the beta / free-bits objective; evaluates the true ELBO."""
    return Objective.stateless(
        init=lambda rng, x: model.init(rng, x, rng),
        loss_fn=functools.partial(vae.loss_fn, model, num_samples=num_samples, beta=beta,
                                  free_bits=free_bits),
        eval_loss_fn=functools.partial(vae.loss_fn, model),
        preprocess=common.image_preprocess(model.likelihood), units=UNITS)


def summary_metrics(metrics: dict, num_dims: int, likelihood: str) -> dict:
    """Adds bits/dim, and the course's units for its N(mu, I) decoder, to test metrics in nats
    per example."""
    bits = evaluate.image_bits_per_dim(metrics["neg_elbo"], num_dims, likelihoods.get(likelihood))
    course = likelihoods.reference_units(metrics, num_dims) if likelihood == "unit_gaussian" else {}
    return {**metrics, "bits_per_dim": float(bits), **course}


class Run(runs.VAERun):
    """A trained image VAE or VLAE (`runs.Run`'s verbs): images are uint8 (N, H, W, C)."""

    def interpolations(self, start, end, frames: int = 10) -> np.ndarray:
        """A row of `frames` decoded frames between the encodings of each pair of stored
        images start[i], end[i]: uint8 (len(start) * frames, H, W, C), a row per pair."""
        t = np.linspace(0.0, 1.0, frames, dtype=np.float32)[None, :, None]
        z_start, z_end = self.encode(start)[:, None], self.encode(end)[:, None]
        return self.decode(((1 - t) * z_start + t * z_end).reshape(-1, z_start.shape[-1]))


def build(config, record: dict) -> Run:
    """The run `config` describes (its record: `common.run_record`), untrained."""
    model = build_model(record["example_shape"], config.prior, config.likelihood, config.dtype)
    objective = make_objective(model, config.num_samples, config.beta, config.free_bits)
    example = jax.ShapeDtypeStruct((1, *record["example_shape"]), np.uint8)
    return Run(config, {"": runs.Stage(record["experiment"], model, objective, example)})


def save_figures(run: Run, dataset: data.Dataset, workdir: str, title: str) -> list[str]:
    """The figures of REFERENCE.md §2: samples, reconstructions, interpolations, curves."""
    test = dataset.test[:70]
    return [
        viz.save_image_grid(run.sample(100, jax.random.key(run.config.seed + 1)),
                            os.path.join(workdir, "samples.png"),
                            title=f"{title}: 100 samples (decoder mean)"),
        viz.save_image_grid(viz.interleave_pairs(runs.to_images(run.preprocess(test[:50])),
                                                 run.reconstruct(test[:50])),
                            os.path.join(workdir, "reconstructions.png"),
                            title=f"{title}: test images | reconstructions"),
        viz.save_image_grid(run.interpolations(test[50:60], test[60:70]),
                            os.path.join(workdir, "interpolations.png"),
                            title=f"{title}: interpolations between test encodings"),
        viz.save_curves(os.path.join(workdir, "metrics.csv"), os.path.join(workdir, "curves.png"),
                        title=title),
    ]


@dataclasses.dataclass(frozen=True)
class Config(common.Config):
    """The image VAE's settings; `experiments.vlae` runs them with prior="made"."""

    CONVOLUTIONAL = True

    dataset: common.ImageDataset = configs.setting("mnist_embedded", "the data to train on")
    prior: Prior = configs.setting(
        "standard", "p(z): N(0, I), or the MADE autoregressive flow (VLAE)")
    likelihood: common.Likelihood = configs.setting(
        "unit_gaussian", "p(x|z): N(mu, I) as in the course (unit_gaussian), a learned diagonal "
                         "variance (gaussian), Bernoulli (images binarized at half intensity), or "
                         "the discretized mixture of 10 logistics of PixelCNN++ (dmol), a true "
                         "8-bit likelihood")
    num_samples: int = configs.setting(
        1, "reparameterised samples z ~ q(z|x) per example in training", configs.POSITIVE_INT)
    beta: float = configs.setting(1.0, "weight of the KL term (beta-VAE)", configs.POSITIVE_FLOAT)
    free_bits: float = configs.setting(
        0.0, "floor in nats on the batch-mean KL of each latent group (each dimension for "
             "N(0, I), the whole latent for the flow); the reported ELBO excludes it",
        configs.NON_NEGATIVE_FLOAT)


def train_and_evaluate(config: Config, workdir: str | None = None, experiment: str = "vae") -> dict:
    """Trains (or resumes) the run `config` describes in `workdir` (default
    runs/<experiment>/<dataset>), writes its figures and summary.json, and returns the
    summary."""
    dataset = common.load_dataset(config)
    data.require_images(dataset, experiment, size=vae.CONV_IMAGE_SIZE)
    workdir = common.workdir(config, experiment, workdir)
    record = common.run_record(config, experiment, dataset.event_shape, dataset.identity)
    run = build(config, record)
    result = fit(run.objective, dataset.train, dataset.test, common.train_config(config),
                 workdir, record, config.may_change_on_resume())
    run.trained("", result.state)
    metrics = summary_metrics(result.test_metrics, dataset.num_dims, config.likelihood)
    step = run.step
    title = common.figure_title(f"{experiment.upper()} on {dataset.name}", config, step)
    figures = save_figures(run, dataset, workdir, title)
    viz.write_figures_to_tensorboard(workdir, figures, step)
    summary = common.update_json(os.path.join(workdir, "summary.json"), {
        "test_metrics": metrics, "dataset": dataset.describe(),
        "units": {**UNITS, "bits_per_dim": evaluate.bits_per_dim_unit(run.model.likelihood)},
        "reference_results": common.REFERENCE_RESULTS.get((experiment, config.dataset)),
        "figures": [os.path.basename(f) for f in figures]})
    print(f"{title}: test -ELBO {metrics['neg_elbo']:.2f} nats ({metrics['bits_per_dim']:.3f} bits/dim), "
          f"recon {metrics['recon']:.2f}, KL {metrics['kl']:.2f}"
          + (f"; course units: -ELBO {metrics['neg_elbo_sse']:.2f} = SSE {metrics['recon_sse']:.2f} "
             f"+ KL {metrics['kl']:.2f}" if "neg_elbo_sse" in metrics else ""))
    print(f"figures, metrics.csv and summary.json in {workdir}")
    return summary


def parser():
    return common.parser(Config, "vae", __doc__)


def main(argv=None):
    return common.run(parser(), Config, train_and_evaluate, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
