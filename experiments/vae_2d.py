"""VAE on the 2D full-covariance Gaussian datasets (REFERENCE.md §1).

    python -m experiments.vae_2d --dataset 1

Trains an MLP VAE (hidden 128-128, 2-dim latent, Gaussian decoder with learned
variance), compares its test -ELBO with the exact NLL of the true distribution,
and plots 1000 samples with and without decoder noise over the test data.
"""

import dataclasses
import functools
import os
import sys
from typing import Literal

import jax
import numpy as np

from experiments import common, configs, runs
from lvm_jax import data, viz
from lvm_jax.models import likelihoods, vae
from lvm_jax.train import Objective, evaluate_test_set, fit

EXPERIMENT = "vae_2d"
UNITS = {"neg_elbo": "nats per example", "recon": "nats per example", "kl": "nats per example",
         "loss": "nats per example", "exact_nll": "nats per example",
         "gap_to_exact_nll": "nats per example"}


def build_model(dtype: str = "float32") -> vae.VAE:
    return vae.mlp_vae(event_dim=2, latent_dim=2, hidden=(128, 128),
                       likelihood=likelihoods.get("gaussian"), dtype=dtype)


# The single-sample -ELBO of one test point varies by about a nat with the noise, so
# the test-set mean would carry +-0.015 nats of Monte Carlo error: as large as the gap
# to the exact NLL being measured. 100 samples per point bring it under 0.002: the
# final figure. The per-epoch curve (metrics.csv) needs less, and 10 samples per point
# (+-0.005 nats) make each of its evaluations 10 times cheaper.
EVAL_SAMPLES = 100
EPOCH_EVAL_SAMPLES = 10


def make_objective(model: vae.VAE, eval_samples: int = EPOCH_EVAL_SAMPLES) -> Objective:
    """The training objective, evaluated with `eval_samples` z samples per test point."""
    return Objective.stateless(
        init=lambda rng, x: model.init(rng, x, rng),
        loss_fn=functools.partial(vae.loss_fn, model),
        eval_loss_fn=functools.partial(vae.loss_fn, model, num_samples=eval_samples), units=UNITS)


class Run(runs.VAERun):
    """A trained 2D VAE (`runs.Run`'s verbs): points are (N, 2) float32, latents the posterior
    means (N, 2); its samples.png shows `sample(1000, key)` and the decoder means
    `sample(1000, key, noise=False)`."""

    def dataset_name(self) -> str:
        return f"toy2d_{self.config.dataset}"

    def sample(self, num: int, key: jax.Array, noise: bool = True) -> np.ndarray:
        """`num` points x ~ p(x|z), z ~ p(z), the 2D VAE's samples (its learned decoder
        variance carries much of the data's spread); the decoder means at the same z with
        `noise=False`."""
        return super().sample(num, key, noise)

    def outputs(self, x) -> np.ndarray:
        return np.asarray(x)


def build(config, record: dict) -> Run:
    """The run `config` describes (its record: `common.run_record`), untrained."""
    model = build_model(config.dtype)
    example = jax.ShapeDtypeStruct((1, *record["example_shape"]), np.float32)
    return Run(config, {"": runs.Stage(record["experiment"], model, make_objective(model),
                                       example)})


@dataclasses.dataclass(frozen=True)
class Config(common.Config):
    """The 2D VAE's settings."""

    dataset: Literal["1", "2", "1b", "2b"] = configs.setting(
        "1", "the data to train on: one of the toy 2D Gaussian datasets")
    epochs: int = configs.redefault(common.Config, "epochs", 10)
    ema_decay: float | None = configs.redefault(common.Config, "ema_decay", 0.99)


def train_and_evaluate(config: Config, workdir: str | None = None) -> dict:
    """Trains (or resumes) the run `config` describes in `workdir` (default
    runs/vae_2d/<dataset>), writes its figures and summary.json, and returns the summary."""
    workdir = common.workdir(config, EXPERIMENT, workdir)
    dataset = common.load_dataset(config, f"toy2d_{config.dataset}")
    record = common.run_record(config, EXPERIMENT, dataset.train.shape[1:], dataset.identity)
    run = build(config, record)
    train_config = common.train_config(config)
    result = fit(run.objective, dataset.train, dataset.test, train_config, workdir, record,
                 config.may_change_on_resume())
    run.trained("", result.state)
    # The final figure, once: the same batches and noise as fit's evaluations, 100 samples.
    final = evaluate_test_set(make_objective(run.model, EVAL_SAMPLES), result.state, dataset.test,
                              train_config)

    exact_nll = float(np.mean(data.toy2d.exact_nll(dataset.test, config.dataset)))
    metrics = {**final, "exact_nll": exact_nll, "gap_to_exact_nll": final["neg_elbo"] - exact_nll}

    rng = jax.random.key(config.seed + 1)
    step = run.step
    title = common.figure_title(f"2D VAE, dataset {config.dataset}", config, step)
    figures = [
        viz.save_scatter(os.path.join(workdir, "samples.png"), dataset.test, {
            "samples with decoder noise": run.sample(1000, rng),
            "decoder means (no noise)": run.sample(1000, rng, noise=False)},
            title=f"{title}: 1000 samples over the test data"),
        viz.save_curves(os.path.join(workdir, "metrics.csv"), os.path.join(workdir, "curves.png"),
                        title=title),
    ]
    viz.write_figures_to_tensorboard(workdir, figures, step)
    summary = common.update_json(os.path.join(workdir, "summary.json"), {
        "test_metrics": metrics, "units": UNITS, "dataset": dataset.describe(),
        "z_samples_per_test_point": {"test_metrics": EVAL_SAMPLES,
                                     "metrics.csv test rows": EPOCH_EVAL_SAMPLES},
        "figures": [os.path.basename(f) for f in figures]})
    print(f"{title}: test -ELBO {metrics['neg_elbo']:.4f} nats (recon {metrics['recon']:.4f}, "
          f"KL {metrics['kl']:.4f}); exact NLL {exact_nll:.4f}; gap {metrics['gap_to_exact_nll']:.4f}")
    print(f"figures, metrics.csv and summary.json in {workdir}")
    return summary


def parser():
    return common.parser(Config, EXPERIMENT, __doc__)


def main(argv=None):
    return common.run(parser(), Config, train_and_evaluate, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
