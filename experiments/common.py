"""Flags, data loading and reporting shared by the experiment entry points."""

import argparse
import os
from collections.abc import Callable

import jax
import numpy as np

from lvm_jax import compilation_cache
from lvm_jax import data
from lvm_jax.models import likelihoods
from lvm_jax.train import CheckpointError, NonFiniteLossError, TrainConfig

QUICK_TRAIN, QUICK_TEST = 512, 256

# Official CS294-158 test results (REFERENCE.md §2-3), in the course's units:
# recon = summed squared error of images in [-1, 1], KL in nats.
REFERENCE_RESULTS = {
    ("vae", "svhn"): {"neg_elbo_sse": 104.04, "recon_sse": 79.38, "kl": 24.66},
    ("vae", "cifar10"): {"neg_elbo_sse": 241.61, "recon_sse": 210.07, "kl": 31.54},
    ("vlae", "svhn"): {"neg_elbo_sse": 102.57, "recon_sse": 80.25, "kl": 22.31},
    ("vlae", "cifar10"): {"neg_elbo_sse": 238.92, "recon_sse": 210.33, "kl": 28.59},
}
REFERENCE_RESULTS.update({(m, f"deepul_{d}"): v for (m, d), v in list(REFERENCE_RESULTS.items())})


class FlagError(ValueError):
    """Flags that contradict each other; `run` reports it as a one-line error."""


def parser(experiment: str, description: str, datasets, default_dataset: str,
           epochs: int) -> argparse.ArgumentParser:
    """The common flags of DESIGN.md §5, with the REFERENCE.md defaults."""
    p = argparse.ArgumentParser(prog=f"python -m experiments.{experiment}", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default=default_dataset, choices=datasets)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None,
                   help=f"output directory; default runs/{experiment}/<dataset>. Rerunning with the "
                        "same workdir resumes from its latest checkpoint.")
    p.add_argument("--data_dir", default=None,
                   help="where TFDS datasets are prepared, or where the course's .pkl files are")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_TRAIN} train / {QUICK_TEST} test examples, 2 epochs")
    p.add_argument("--steps_per_call", type=int, default=None,
                   help="training steps compiled into one lax.scan call; default 100, or 1 for "
                        "convolutional models on CPU (XLA:CPU runs convolutions inside loops many "
                        "times slower, jax-ml/jax#12868)")
    p.add_argument("--grad_clip", type=float, default=None,
                   help="clip the global gradient norm to this before each Adam step")
    p.add_argument("--ema_decay", type=float, default=None,
                   help="evaluate, checkpoint and sample with an exponential moving average of "
                        "the parameters with this decay (e.g. 0.999); 0 turns it off")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the model's activations: bfloat16 runs the convolutions and "
                        "matrix multiplies at bfloat16 speed on GPUs and TPUs, while parameters, "
                        "optimizer state, losses and metrics stay float32 (no faster on CPU)")
    p.add_argument("--multihost", action="store_true",
                   help="one process of a multi-host run (TPU pod, SLURM or Open MPI job): calls "
                        "jax.distributed.initialize(), which finds the other hosts; --workdir "
                        "must be a directory every host sees")
    return p


def run(parser: argparse.ArgumentParser, train_and_evaluate, argv=None, *extra):
    """Parses flags and runs; a problem with the flags, the data, the workdir or the numerics
    ends the program with its one-line message (exit status 1) instead of a traceback."""
    compilation_cache.enable()
    args = parser.parse_args(argv)
    # Before any JAX computation, as JAX requires; evaluate's parser has no --multihost.
    if getattr(args, "multihost", False):
        jax.distributed.initialize()
    try:
        return train_and_evaluate(args, *extra)
    except (FlagError, data.DataError, CheckpointError, NonFiniteLossError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")


def workdir(args, experiment: str) -> str:
    if args.workdir:
        return args.workdir
    return os.path.join("runs", experiment, args.dataset + ("_quick" if args.quick else ""))


def load_dataset(args, name: str | None = None) -> data.Dataset:
    """Loads the dataset the flags name; --quick keeps a small fixed subset."""
    dataset = data.load(name or args.dataset, args.data_dir)
    if args.quick:
        dataset = data.Dataset(dataset.name, dataset.train[:QUICK_TRAIN], dataset.test[:QUICK_TEST],
                               dataset.kind)
    return dataset


def image_preprocess(likelihood) -> Callable:
    """How the compiled step reads stored uint8 images for `likelihood`: binarized to {-1, 1}
    for a Bernoulli (so its log-probability is an exact mass), else scaled to [-1, 1]."""
    return data.binarize_images if isinstance(likelihood, likelihoods.Bernoulli) else data.scale_images


def train_config(args, convolutional: bool) -> TrainConfig:
    steps_per_call = args.steps_per_call
    if steps_per_call is None:
        steps_per_call = 1 if convolutional and jax.default_backend() == "cpu" else 100
    return TrainConfig(epochs=2 if args.quick else args.epochs, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, seed=args.seed,
                       steps_per_call=steps_per_call, grad_clip_norm=args.grad_clip,
                       ema_decay=args.ema_decay or None,
                       progress=not args.no_progress)


def run_config(args, experiment: str, **model_settings) -> dict:
    """What identifies a run: a resumed run must match it."""
    return {"experiment": experiment, "dataset": args.dataset, "quick": bool(args.quick),
            "dtype": args.dtype, **model_settings}


def as_float(metrics: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
