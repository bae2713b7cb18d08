"""Flags, data loading and reporting shared by the experiment entry points."""

import argparse
import math
import os
from collections.abc import Callable

import jax
import numpy as np

from lvm_jax import compilation_cache, data, errors
from lvm_jax.models import likelihoods
from lvm_jax.train import TrainConfig

# --quick: 2 epochs of 2 steps at the default batch of 128, and enough test examples for
# every figure (the VAE's take 70).
QUICK_TRAIN, QUICK_TEST, QUICK_EPOCHS = 256, 128, 2

# Official CS294-158 test results (REFERENCE.md §2-3), in the course's units:
# recon = summed squared error of images in [-1, 1], KL in nats.
REFERENCE_RESULTS = {
    ("vae", "svhn"): {"neg_elbo_sse": 104.04, "recon_sse": 79.38, "kl": 24.66},
    ("vae", "cifar10"): {"neg_elbo_sse": 241.61, "recon_sse": 210.07, "kl": 31.54},
    ("vlae", "svhn"): {"neg_elbo_sse": 102.57, "recon_sse": 80.25, "kl": 22.31},
    ("vlae", "cifar10"): {"neg_elbo_sse": 238.92, "recon_sse": 210.33, "kl": 28.59},
}
REFERENCE_RESULTS.update({(m, f"deepul_{d}"): v for (m, d), v in list(REFERENCE_RESULTS.items())})


class FlagError(errors.ConfigError):
    """Flags that contradict each other; `run` reports it as a one-line error."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout (its usage lines stay lines) and shows each flag's
    default. A flag whose default is None has no value to show: its help says what happens
    without it, or else the setting is off."""

    def _get_help_string(self, action):
        if action.default is None and not action.required:
            return action.help if "default" in action.help else f"{action.help} (default: off)"
        return super()._get_help_string(action)


def _checked(cast: type, holds: Callable[[float], bool], requirement: str) -> Callable[[str], float]:
    """An argparse `type=` that parses with `cast` and refuses values for which `holds` is
    false, so that argparse reports the flag before any compute or file write (exit status 2)."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {requirement}") from None
        if not holds(value):
            raise argparse.ArgumentTypeError(f"{text} is not {requirement}")
        return value

    parse.__name__ = requirement
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _checked(float, lambda v: 0 < v < math.inf, "a finite positive number")
non_negative_float = _checked(float, lambda v: 0 <= v < math.inf, "a finite non-negative number")
# inf is a valid clip norm: no clipping.
positive_or_inf = _checked(float, lambda v: v > 0, "a positive number (inf allowed)")
decay_rate = _checked(float, lambda v: 0 <= v < 1, "a decay rate in [0, 1)")

DATA_DIR_HELP = ("where TFDS datasets are prepared (default: TFDS's, $TFDS_DATA_DIR or "
                 "~/tensorflow_datasets), or where the course's .pkl files are (needed for the "
                 "deepul_* datasets)")


def parser(experiment: str, description: str, datasets, default_dataset: str,
           epochs: int) -> argparse.ArgumentParser:
    """The common flags of DESIGN.md §5, with the REFERENCE.md defaults."""
    p = argparse.ArgumentParser(prog=f"python -m experiments.{experiment}", description=description,
                                formatter_class=HelpFormatter)
    p.add_argument("--dataset", default=default_dataset, choices=datasets, help="the data to train on")
    p.add_argument("--epochs", type=positive_int, default=epochs,
                   help="passes over the training set (--quick overrides it)")
    p.add_argument("--batch_size", type=positive_int, default=128,
                   help="examples per training step, split over the devices")
    p.add_argument("--learning_rate", type=positive_float, default=1e-3, help="Adam's step size")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seeds initialisation, data order and sampling: a run is reproducible "
                        "from it")
    p.add_argument("--workdir", default=None,
                   help=f"output directory; default runs/{experiment}/<dataset>. Rerunning with the "
                        "same workdir resumes from its latest checkpoint.")
    p.add_argument("--data_dir", default=None,
                   help=DATA_DIR_HELP)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_TRAIN} train / {QUICK_TEST} test examples, "
                        f"{QUICK_EPOCHS} epoch(s); figures say they come from a smoke run")
    p.add_argument("--steps_per_call", type=positive_int, default=None,
                   help="training steps compiled into one lax.scan call; default 100, or 1 for "
                        "convolutional models on CPU (XLA:CPU runs convolutions inside loops many "
                        "times slower, jax-ml/jax#12868)")
    p.add_argument("--grad_clip", type=positive_or_inf, default=None,
                   help="clip the global gradient norm to this before each Adam step (inf: no "
                        "clipping)")
    p.add_argument("--ema_decay", type=decay_rate, default=None,
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
    (an `lvm_jax.errors.UserError`) ends the program with its one-line message (exit status
    1) instead of a traceback. Any other exception is a bug and keeps its traceback."""
    compilation_cache.enable()
    args = parser.parse_args(argv)
    # Before any JAX computation, as JAX requires; evaluate's parser has no --multihost.
    if getattr(args, "multihost", False):
        jax.distributed.initialize()
    try:
        return train_and_evaluate(args, *extra)
    except errors.UserError as err:
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


def figure_title(title: str, args, steps: int) -> str:
    """The title of a run's figures: a --quick run's say that they show a smoke run of `steps`
    training steps, not a trained model."""
    return f"{title} [--quick smoke run, {steps} steps: not a trained model]" if args.quick else title


def image_preprocess(likelihood) -> Callable:
    """How the compiled step reads stored uint8 images for `likelihood`: binarized to {-1, 1}
    for a Bernoulli (so its log-probability is an exact mass), else scaled to [-1, 1]."""
    return data.binarize_images if isinstance(likelihood, likelihoods.Bernoulli) else data.scale_images


def train_config(args, convolutional: bool) -> TrainConfig:
    steps_per_call = args.steps_per_call
    if steps_per_call is None:
        steps_per_call = 1 if convolutional and jax.default_backend() == "cpu" else 100
    return TrainConfig(epochs=QUICK_EPOCHS if args.quick else args.epochs, batch_size=args.batch_size,
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
