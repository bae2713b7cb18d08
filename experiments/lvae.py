"""Ladder VAE (REFERENCE.md §5): a hierarchy of convolutional latents on images.

    python -m experiments.lvae --dataset mnist_embedded --latent_layers 3

Likelihood: Bernoulli on greyscale data, which are binarized inside the
compiled step (scaled to [0, 1] and thresholded at 0.5: a fixed binarization,
not the stochastic one of Larochelle's static MNIST), and PixelCNN++'s
discretized mixture of 10 logistics on RGB data scaled to [-1, 1].

Trains with Adamax at 3e-4, batch 64, REFERENCE.md §5's settings (`--optimizer adam` for Adam).

Writes into the workdir: samples.png (100 prior samples, decoder mean),
reconstructions.png (50 test images, each beside its reconstruction at the
posterior means), layer_<i>.png for every layer i (the seed's view: each row
fixes the layers above i, its columns draw layer i, the layers below take
their means), curves.png and kl_layers.png (training curves), metrics.csv,
summary.json (test -ELBO, recon, KL and the KL of each layer in nats per
example, bits/dim, and with --iwae_samples the importance-weighted NLL) and
checkpoints/.
"""

import argparse
import dataclasses
import functools
import os
import sys
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common, configs, runs
from lvm_jax import data, evaluate, viz
from lvm_jax.errors import ConfigError
from lvm_jax.models import likelihoods, lvae
from lvm_jax.train import Objective, fit

NATS = "nats per example"
INIT_EXAMPLES = 256  # training examples the data-dependent initialisation sees
LAYER_ROWS, LAYER_COLS = 6, 10
OPTIMIZERS = {"adamax": optax.adamax, "adam": optax.adam}
IWAE_BATCH = 10  # examples per compiled call, each with evaluate.default_chunk(k) samples
ELBO_SAMPLES = 100


def default_likelihood(dataset: data.Dataset) -> str:
    return "bernoulli" if dataset.event_shape[-1] == 1 else "dmol"


def default_free_bits(latent_layers: int) -> float:
    """The seed's setting: 0.5 nats per layer up to 6 layers, 1.0 deeper."""
    return 0.5 if latent_layers <= 6 else 1.0


def build_model(config, image_shape: tuple[int, int, int], likelihood: str) -> lvae.LVAE:
    """The LVAE `config` names, for images of `image_shape` and the `likelihood` resolved."""
    return lvae.LVAE(image_shape=tuple(image_shape), likelihood=likelihoods.get(likelihood),
                     num_layers=config.latent_layers, latent_channels=config.latent_channels,
                     hidden=config.hidden, blocks_per_layer=config.blocks_per_layer,
                     merge=config.merge, skip=config.skip, gated=config.gated,
                     learn_top_prior=config.learn_top_prior, data_init=config.data_init,
                     dtype=config.dtype)


def make_objective(model: lvae.LVAE, free_bits: float = 0.5,
                   init_data: np.ndarray | None = None) -> Objective:
    """The trainer's view of the model: binarized or [-1, 1] inputs, loss with free bits.

    init_data: stored training examples (N, H, W, C) to initialise on, for the
    data-dependent initialisation; None initialises on the trainer's example.
    """
    preprocess = common.image_preprocess(model.likelihood)

    def init(rng, x):
        if init_data is not None:
            x = preprocess(jnp.asarray(init_data))
        return model.init(rng, x, rng)

    units = {"neg_elbo": NATS, "recon": NATS, "kl": NATS,
             "loss": f"{NATS}, the training objective (KL of each layer clamped at free_bits)",
             "bits_per_dim": f"{evaluate.bits_per_dim_unit(model.likelihood)}, of the -ELBO",
             **{f"kl_layer_{i}": f"{NATS}, layer {i} (1 = nearest the data)"
                for i in range(1, model.num_layers + 1)}}
    return Objective.stateless(init=init, loss_fn=functools.partial(lvae.loss_fn, model,
                                                                    free_bits=free_bits),
                               preprocess=preprocess, units=units)


def iwae_metrics(run: "Run", examples: np.ndarray, num_samples: int, seed: int, progress: bool,
                 chunk: int | None = None) -> dict:
    """Importance-weighted NLL of `examples` (stored), nats per example, with its standard
    error, and their -ELBO from `ELBO_SAMPLES` samples per example, so the two compare on
    the same examples (the bound is at least the ELBO)."""
    key = jax.random.key(seed)
    nll = run.evaluate(examples, key, num_samples, chunk, IWAE_BATCH, progress)
    model, params, preprocess = run.model, run.params, run.objective.preprocess
    # The mean of the log-weights estimates the ELBO (Monte Carlo KL, as in training).
    mean_log_weight = jax.jit(lambda p, x, r: evaluate.iwae_log_weights(
        model, p, preprocess(x), r, ELBO_SAMPLES).mean(axis=0))
    elbo = np.concatenate([mean_log_weight(params, examples[i:i + IWAE_BATCH], jax.random.fold_in(key, i))
                           for i in range(0, len(examples), IWAE_BATCH)])
    return {"iwae_nll": float(nll.mean()), "iwae_nll_stderr": float(nll.std(ddof=1) / np.sqrt(len(nll))),
            "iwae_num_samples": num_samples, "iwae_num_examples": len(examples),
            "neg_elbo_iwae_examples": float(-elbo.mean())}


class Run(runs.VAERun):
    """A trained LVAE (`runs.Run`'s verbs): images are uint8 (N, H, W, C); `encode` gives the
    posterior means of every layer, flattened and concatenated (layer 1 first), which no
    single latent decodes."""

    LACKS = ("decode",)

    def decode(self, z) -> np.ndarray:
        raise self._lacks("decode", "no decoder of one latent (its layers are drawn top "
                                    "down, each given those above)")


def build(config, record: dict) -> Run:
    """The run `config` describes (its record holds the likelihood and free bits resolved
    from their defaults: `common.run_record`), untrained; the data-dependent initialisation
    is the training objective's (`make_objective`)."""
    model = build_model(config, record["example_shape"], config.likelihood)
    example = jax.ShapeDtypeStruct((1, *record["example_shape"]), np.uint8)
    return Run(config, {"": runs.Stage("lvae", model, make_objective(model, config.free_bits),
                                       example,
                                       OPTIMIZERS[config.optimizer](config.learning_rate))})


@functools.partial(jax.jit, static_argnames="model")
def layer_views(model: lvae.LVAE, variables, rng: jax.Array) -> jax.Array:
    """The per-layer views (L, rows * cols, H, W, C), layer 1 first, in one compiled call."""
    # vmap over a traced layer index: one generative pass serves every layer.
    return jax.vmap(lambda layer: model.apply(
        variables, rng, layer, LAYER_ROWS, LAYER_COLS, method=lvae.LVAE.layer_samples))(
        jnp.arange(1, model.num_layers + 1))


def save_figures(run: Run, test: np.ndarray, workdir: str, title: str) -> list[str]:
    """Samples, reconstructions, the per-layer views and the curves; `test` stored images.
    The samples are `run.sample(100, jax.random.key(seed + 1))`."""
    key = jax.random.key(run.config.seed + 1)
    model = run.model
    figures = [
        viz.save_image_grid(run.sample(100, key), os.path.join(workdir, "samples.png"),
                            title=f"{title}: 100 samples (decoder mean)"),
        viz.save_image_grid(viz.interleave_pairs(runs.to_images(run.preprocess(test)),
                                                 run.reconstruct(test)),
                            os.path.join(workdir, "reconstructions.png"),
                            title=f"{title}: test images | reconstructions"),
    ]
    views = jax.device_get(layer_views(model, run.variables[""], jax.random.fold_in(key, 1)))
    for layer, view in enumerate(views, start=1):
        figures.append(viz.save_image_grid(
            view, os.path.join(workdir, f"layer_{layer}.png"), ncols=LAYER_COLS,
            title=f"{title}: layer {layer} of {model.num_layers} (rows fix the layers above)"))
    metrics_csv = os.path.join(workdir, "metrics.csv")
    figures.append(viz.save_curves(metrics_csv, os.path.join(workdir, "curves.png"), title=title))
    figures.append(viz.save_curves(
        metrics_csv, os.path.join(workdir, "kl_layers.png"),
        names=[f"kl_layer_{i}" for i in range(1, model.num_layers + 1)], title=f"{title}: KL per layer"))
    return figures


@dataclasses.dataclass(frozen=True)
class Config(common.Config):
    """The Ladder VAE's settings."""

    CONVOLUTIONAL = True

    dataset: common.ImageDataset = configs.setting("mnist_embedded", "the data to train on")
    batch_size: int = configs.redefault(common.Config, "batch_size", 64)
    learning_rate: float = configs.setting(3e-4, "the optimizer's step size",
                                           configs.POSITIVE_FLOAT, may_change_on_resume=True)
    optimizer: Literal[tuple(OPTIMIZERS)] = configs.setting(
        "adamax", "Adamax (the seed's) or Adam, each at --learning_rate")
    latent_layers: int = configs.setting(3, "stochastic layers L", configs.POSITIVE_INT)
    free_bits: float | None = configs.setting(
        None, "nats per layer below which a layer's batch-mean KL is not penalised in training "
              "(the reported -ELBO excludes them); default 0.5 up to 6 layers, 1.0 deeper, as "
              "in the seed", configs.NON_NEGATIVE_FLOAT)
    likelihood: common.Likelihood | None = configs.setting(
        None, "p(x|z); default bernoulli (binarized data) for greyscale, dmol for RGB")
    latent_channels: int = configs.setting(32, "channels of each z_i", configs.POSITIVE_INT)
    hidden: int = configs.setting(64, "channels of the deterministic paths", configs.POSITIVE_INT)
    blocks_per_layer: int = configs.setting(
        2, "residual blocks per layer in each path (the seed uses 4)", configs.POSITIVE_INT)
    merge: Literal[tuple(lvae.MERGES)] = configs.setting(
        "learned", "how q combines the bottom-up and top-down paths below the top layer: a "
                   "learned merge (the seed's) or precision weighting (the paper's)")
    skip: bool = configs.setting(True, "condition each layer on all layers above (else on the "
                                       "one above)")
    gated: bool = configs.setting(True, "gated residual blocks")
    learn_top_prior: bool = configs.setting(True, "learn p(z_L) (else N(0, I))")
    data_init: bool = configs.setting(
        True, f"data-dependent initialisation on {INIT_EXAMPLES} training examples")
    iwae_samples: int = configs.setting(
        0, "after training, the importance-weighted test NLL with this many samples per example "
           "(e.g. 1000); 0 skips it", configs.NON_NEGATIVE_INT, may_change_on_resume=True)
    iwae_examples: int | None = configs.setting(
        None, "evaluate the importance-weighted NLL on the first this many test examples "
              "(default all)", configs.POSITIVE_INT, may_change_on_resume=True)
    iwae_chunk: int | None = configs.setting(
        None, "importance samples per compiled call, split over the devices (divides "
              f"--iwae_samples; default its largest divisor up to {evaluate.DEFAULT_CHUNK}; 100 "
              "draws the samples of docs/results.md's table)", configs.POSITIVE_INT,
        may_change_on_resume=True)

    def __post_init__(self):
        super().__post_init__()
        if self.iwae_samples:
            try:
                evaluate.resolve_chunk(self.iwae_samples, self.iwae_chunk)
            except ValueError:
                raise ConfigError(f"--iwae_chunk {self.iwae_chunk} must divide --iwae_samples "
                                  f"{self.iwae_samples}.") from None


def train_and_evaluate(config: Config, workdir: str | None = None) -> dict:
    """Trains (or resumes) the run `config` describes in `workdir` (default
    runs/lvae/<dataset>), writes its figures and summary.json, and returns the summary."""
    dataset = common.load_dataset(config)
    likelihood = config.likelihood or default_likelihood(dataset)
    free_bits = default_free_bits(config.latent_layers) if config.free_bits is None else config.free_bits
    record = common.run_record(config, "lvae", dataset.event_shape, dataset.identity,
                               likelihood=likelihood, free_bits=free_bits)
    run = build(config.replace(likelihood=likelihood, free_bits=free_bits), record)
    data.require_images(dataset, "lvae", multiple_of=run.model.size_multiple)
    workdir = common.workdir(config, "lvae", workdir)
    stage = run.stages[""]
    objective = make_objective(run.model, free_bits,
                               dataset.train[:INIT_EXAMPLES] if config.data_init else None)
    result = fit(objective, dataset.train, dataset.test, common.train_config(config), workdir,
                 record, config.may_change_on_resume(), tx=stage.tx)
    run.trained("", result.state)
    model, params = run.model, run.params
    metrics = dict(result.test_metrics)
    metrics["bits_per_dim"] = float(evaluate.image_bits_per_dim(metrics["neg_elbo"], dataset.num_dims,
                                                                model.likelihood))
    units = dict(objective.units)
    if config.iwae_samples:
        metrics.update(iwae_metrics(run, dataset.test[:config.iwae_examples], config.iwae_samples,
                                    config.seed, not config.no_progress, config.iwae_chunk))
        units.update(iwae_nll=f"{NATS}, importance-weighted bound with iwae_num_samples samples "
                              "on the first iwae_num_examples test examples",
                     iwae_nll_stderr=f"{NATS}, standard error of the mean over those examples",
                     neg_elbo_iwae_examples=f"{NATS}, -ELBO of the same examples "
                                            f"({ELBO_SAMPLES} samples each)",
                     iwae_num_samples="importance samples per example",
                     iwae_num_examples="test examples evaluated")
    layers = f"{config.latent_layers} layer{'s' if config.latent_layers > 1 else ''}"
    step = run.step
    title = common.figure_title(f"LVAE ({layers}) on {dataset.name}", config, step)
    figures = save_figures(run, dataset.test[:50], workdir, title)
    viz.write_figures_to_tensorboard(workdir, figures, step)
    kl_per_layer = [metrics[f"kl_layer_{i}"] for i in range(1, config.latent_layers + 1)]
    summary = common.update_json(os.path.join(workdir, "summary.json"), {
        "test_metrics": metrics, "units": units, "dataset": dataset.describe(),
        "kl_per_layer": kl_per_layer, "free_bits": free_bits,
        "num_parameters": int(sum(p.size for p in jax.tree.leaves(params))),
        "figures": [os.path.basename(f) for f in figures]})
    print(f"{title}: test -ELBO {metrics['neg_elbo']:.2f} nats ({metrics['bits_per_dim']:.4f} bits/dim)"
          + (f", IWAE NLL (k={config.iwae_samples}) {metrics['iwae_nll']:.2f} nats"
             if config.iwae_samples else "")
          + f", recon {metrics['recon']:.2f}, KL {metrics['kl']:.2f} = "
          + " + ".join(f"{kl:.2f}" for kl in kl_per_layer) + " (layer 1 first)")
    print(f"figures, metrics.csv and summary.json in {workdir}")
    return summary


def parser() -> argparse.ArgumentParser:
    return common.parser(Config, "lvae", __doc__)


def main(argv=None):
    return common.run(parser(), Config, train_and_evaluate, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
