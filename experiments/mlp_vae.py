"""MLP VAE studies on MNIST (seeds 001 and 004).

    python -m experiments.mlp_vae                  # both studies
    python -m experiments.mlp_vae --study decoders

* decoders (seed 001, Kingma & Welling 2014): one hidden layer of 400 ReLU
  units, a 20-dim latent, L = 5 samples per example; three decoders side by
  side: Bernoulli (binarized digits), Gaussian with learned diagonal variance,
  and the identity-covariance Gaussian N(mu, I).
* depth (seed 004): a baseline whose encoder and decoder have no hidden layer
  against a deeper MLP VAE (512-256 hidden), same latent size and decoder
  N(mu, I): parameter counts, ELBO curves, a reconstruction tableau, the
  histogram of per-dimension KL (collapsed dimensions), 64 prior samples, and
  the limiting-distribution chain decode -> sample -> encode -> sample, 100
  steps from 64 prior draws, as an animated GIF.

Digits are 28x28 (the embedded 32x32 digits are cropped back), flattened to
784 dimensions in [-1, 1]; the Bernoulli decoder sees them binarized at 0.5.
"""

import dataclasses
import functools
import io
import os
import sys
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from experiments import common, configs, runs
from lvm_jax import data, evaluate, files, progress, viz
from lvm_jax.models import likelihoods, vae
from lvm_jax.train import FitResult, Objective, fit

EXPERIMENT = "mlp_vae"
NATS = "nats per example"
COLLAPSE_NATS = 0.01  # a latent dimension whose average KL is below this carries no information
UNITS = {"neg_elbo": NATS, "recon": NATS, "kl": NATS, "loss": NATS,
         "bits_per_dim": "bits per dimension: binary scale for the Bernoulli decoder (binarized "
                         "digits), 8-bit scale for the Gaussian ones",
         "parameters": "count",
         "collapsed_dims": f"latent dimensions with average KL < {COLLAPSE_NATS} nats"}
DECODERS = {"bernoulli": "Bernoulli (binarized)", "gaussian": "Gaussian, learned variance",
            "unit_gaussian": "Gaussian N(mu, I)"}
DEPTHS = {"baseline": (), "deep": (512, 256)}


def digits_784(x_uint8, binarize: bool):
    """uint8 (N, 32, 32, 1) -> float (N, 784) in [-1, 1]; {-1, 1} when binarized."""
    x = (data.binarize_images if binarize else data.scale_images)(x_uint8)
    return x[:, 2:30, 2:30, 0].reshape(x_uint8.shape[0], 784)


def build_model(likelihood: str, hidden, latent_dim: int, dtype: str = "float32") -> vae.VAE:
    return vae.mlp_vae(784, latent_dim, tuple(hidden), likelihoods.get(likelihood), dtype=dtype)


def make_objective(model: vae.VAE, num_samples: int = 1) -> Objective:
    binarize = isinstance(model.likelihood, likelihoods.Bernoulli)
    return Objective.stateless(
        init=lambda rng, x: model.init(rng, x, rng),
        loss_fn=functools.partial(vae.loss_fn, model, num_samples=num_samples),
        preprocess=functools.partial(digits_784, binarize=binarize), units=UNITS)


def count_parameters(params) -> int:
    return int(sum(p.size for p in jax.tree.leaves(params)))


class Run(runs.VAERun):
    """A trained variant of a study (`runs.Run`'s verbs): digits are uint8 (N, 28, 28, 1)
    images, latents the posterior means (N, latent_dim)."""

    def outputs(self, x) -> np.ndarray:
        return runs.to_images(to_images(x))


def build(config, record: dict) -> Run:
    """The variant `record` describes (its decoder's likelihood, hidden layers and training
    samples per example are run facts), untrained."""
    model = build_model(record["likelihood"], record["hidden"], config.latent_dim, config.dtype)
    example = jax.ShapeDtypeStruct((1, *record["example_shape"]), np.uint8)
    return Run(config, {"": runs.Stage(EXPERIMENT, model,
                                       make_objective(model, record["num_samples"]), example)})


def train_variant(config, dataset, workdir, likelihood, hidden,
                  num_samples) -> tuple[Run, FitResult]:
    """Trains (or resumes) one variant in `workdir`: its run and its FitResult."""
    record = common.run_record(config, EXPERIMENT, dataset.event_shape, dataset.identity,
                               likelihood=likelihood, hidden=list(hidden),
                               num_samples=num_samples)
    run = build(config, record)
    result = fit(run.objective, dataset.train, dataset.test, common.train_config(config),
                 workdir, record, config.may_change_on_resume())
    return run.trained("", result.state), result


def to_images(x_flat) -> np.ndarray:
    return np.asarray(x_flat).reshape(-1, 28, 28, 1)


def decoder_study(config, dataset, root) -> dict:
    rows, panels = {}, []
    test = dataset.test[:16]
    for name in DECODERS:
        workdir = os.path.join(root, "decoders", name)
        run, result = train_variant(config, dataset, workdir, name, (400,), num_samples=5)
        panels.append(viz.interleave_pairs(run.outputs(run.preprocess(test)),
                                           run.reconstruct(test)))
        metrics = dict(result.test_metrics)
        metrics["bits_per_dim"] = float(evaluate.image_bits_per_dim(
            metrics["neg_elbo"], 784, run.model.likelihood))
        rows[name] = metrics
    title = common.figure_title("original | reconstruction; rows of 4 pairs: "
                                + ", then ".join(DECODERS.values()), config, int(result.state.step))
    figure = viz.save_image_grid(np.concatenate(panels), os.path.join(root, "decoders.png"), ncols=8,
                                 title=title)
    viz.write_figures_to_tensorboard(root, [figure], int(result.state.step))
    return {"metrics": rows, "figure": os.path.basename(figure)}


def limiting_chain(model, params, rng, num=64, steps=100) -> np.ndarray:
    """Decoder means mu_t of the chain z -> mu = d(z) -> x ~ p(x|z) -> z ~ q(z|x), (steps, num, 784)."""
    variables = {"params": params}

    def step(z, key):
        noise_key, latent_key = jax.random.split(key)
        out = model.apply(variables, z, method=vae.VAE.decode)
        x = model.likelihood.sample(noise_key, out)
        mean, log_var = model.apply(variables, x, method=vae.VAE.encode)
        z_next = mean + jnp.exp(0.5 * log_var) * jax.random.normal(latent_key, mean.shape)
        return z_next, model.likelihood.mean(out)

    z0 = jax.random.normal(rng, (num, model.latent_dim))
    _, means = jax.jit(lambda z, keys: jax.lax.scan(step, z, keys))(
        z0, jax.random.split(jax.random.fold_in(rng, 1), steps))
    return np.asarray(means)


@files.primary_only
def save_gif(frames: np.ndarray, path: str) -> str:
    """(T, 64, 784) decoder means -> an animated GIF of the 8x8 tableau, 10 frames per second."""
    images = [Image.fromarray(viz.image_grid(data.unscale_images(to_images(f)), 8).squeeze(-1))
              for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=100,
                   loop=0)
    return files.write_atomic(path, buffer.getvalue())


def depth_study(config, dataset, root) -> dict:
    rows, curves = {}, {}
    rng = jax.random.key(config.seed + 1)
    for name, hidden in DEPTHS.items():
        workdir = os.path.join(root, "depth", name)
        run, result = train_variant(config, dataset, workdir, "unit_gaussian", hidden, 1)
        model, params = run.model, run.params
        title = common.figure_title(name, config, int(result.state.step))
        digits = dataset.test[:256]  # fewer with --quick
        kl_dims = np.asarray(evaluate.per_dim_kl(model, params, digits,
                                                 preprocess=run.objective.preprocess))
        figures = [
            viz.save_image_grid(viz.interleave_pairs(run.outputs(run.preprocess(digits[:16])),
                                                     run.reconstruct(digits, rng)[:16]),
                                os.path.join(root, f"{name}_reconstructions.png"), ncols=8,
                                title=f"{title}: test digits | reconstructions (z ~ q)"),
            viz.save_image_grid(run.sample(64, rng), os.path.join(root, f"{name}_samples.png"),
                                ncols=8, title=f"{title}: decoded prior samples"),
            viz.save_histogram(kl_dims, os.path.join(root, f"{name}_kl_histogram.png"),
                               threshold=COLLAPSE_NATS,
                               title=f"{title}: KL per latent dimension ({len(digits)} test digits)"),
            save_gif(limiting_chain(model, params, rng), os.path.join(root, f"{name}_chain.gif")),
        ]
        viz.write_figures_to_tensorboard(root, figures, int(result.state.step))
        rows[name] = {**result.test_metrics, "parameters": count_parameters(params),
                      "collapsed_dims": int(np.sum(kl_dims < COLLAPSE_NATS)),
                      "figures": [os.path.basename(f) for f in figures]}
        curves[name] = os.path.join(workdir, "metrics.csv")
    figure = viz.save_curve_comparison(curves, os.path.join(root, "depth_elbo_curves.png"),
                                       name="neg_elbo", unit=NATS,
                                       title=common.figure_title(
                                           "test -ELBO: baseline vs deep MLP VAE", config,
                                           int(result.state.step)))
    viz.write_figures_to_tensorboard(root, [figure], int(result.state.step))
    return {"metrics": rows, "figure": os.path.basename(figure)}


STUDIES = {"decoders": decoder_study, "depth": depth_study}


@dataclasses.dataclass(frozen=True)
class Config(common.Config):
    """The MLP VAE studies' settings."""

    dataset: Literal["mnist_embedded", "mnist"] = configs.setting("mnist_embedded",
                                                                  "the data to train on")
    # A learned-variance Gaussian on digits is unbounded above (constant background pixels
    # let the variance shrink without limit); unclipped, its gradient norms reach 1e5 and
    # the test -ELBO swings by 1000 nats between epochs.
    grad_clip: float | None = configs.redefault(common.Config, "grad_clip", 1000.0)
    study: Literal["all", "decoders", "depth"] = configs.setting(
        "all", "which study to run: the three decoders (seed 001), the two depths (seed 004), "
               "or both", may_change_on_resume=True)
    latent_dim: int = configs.setting(20, "latent dimensions", configs.POSITIVE_INT)


def train_and_evaluate(config: Config, workdir: str | None = None) -> dict:
    """Runs (or resumes) the studies `config` names under `workdir` (default
    runs/mlp_vae/<dataset>), writes their figures and summary.json, and returns the summary."""
    dataset = common.load_dataset(config)
    data.require_images(dataset, EXPERIMENT, size=(32, 32), channels=(1,))  # MNIST digits
    root = common.workdir(config, EXPERIMENT, workdir)
    chosen = ("decoders", "depth") if config.study == "all" else (config.study,)
    variants = {"decoders": DECODERS, "depth": DEPTHS}
    steps = common.train_steps(common.train_config(config), len(dataset.train))
    studies = {}
    with progress.planned({variant: steps for study in chosen for variant in variants[study]}):
        for study in chosen:
            studies[study] = STUDIES[study](config, dataset, root)
    summary = common.update_json(os.path.join(root, "summary.json"), {
        "studies": studies, "units": UNITS, "dataset": dataset.describe(),
        "model_input": "the central 28x28 crop of each digit, 784 dimensions"})
    print(common.figure_title(f"MLP VAE studies on {dataset.name}", config, steps) + ":")
    for study, result in studies.items():
        for variant, metrics in result["metrics"].items():
            extra = "".join(f", {k} {metrics[k]}" for k in ("parameters", "collapsed_dims") if k in metrics)
            print(f"{study}/{variant}: test -ELBO {metrics['neg_elbo']:.2f} nats "
                  f"(recon {metrics['recon']:.2f}, KL {metrics['kl']:.2f}){extra}")
    print(f"figures and summary.json in {root}; each model's metrics.csv in "
          f"{os.path.join(root, '<study>', '<variant>')}")
    return summary


def parser():
    return common.parser(Config, EXPERIMENT, __doc__)


def main(argv=None):
    return common.run(parser(), Config, train_and_evaluate, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
