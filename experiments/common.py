"""Settings, command lines, data loading and reporting shared by the experiment entry points."""

import argparse
import atexit
import contextlib
import dataclasses
import difflib
import gc
import glob
import logging
import os
import sys
from collections.abc import Callable
from typing import Literal

import jax

from experiments import configs
from lvm_jax import compilation_cache, cpu_devices, data, errors, files, interrupt
from lvm_jax import workdir as workdir_lock
from lvm_jax.models import likelihoods
from lvm_jax.train import TrainConfig

# --quick: 2 epochs of 2 steps at the default batch of 128, and enough test examples for
# every figure (the VAE's take 70).
QUICK_TRAIN, QUICK_TEST, QUICK_EPOCHS = 256, 128, 2

# The convolutional models' evaluation batch: a multiple of 8, so that it splits over as many
# CPU devices as their training batch does (`lvm_jax.cpu_devices`).
CONVOLUTIONAL_EVAL_BATCH = 512

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
    """Settings that contradict each other; `run` reports it as a one-line error."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout (its usage lines stay lines) and shows each flag's
    default. A flag whose default is None has no value to show: its help says what happens
    without it, or else the setting is off."""

    def _get_help_string(self, action):
        if action.required:
            return f"{action.help} (required)"
        if action.default is None:
            return action.help if "default" in action.help else f"{action.help} (default: off)"
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors: a bad flag or value ends the program with one
    line (exit status 2) instead of the usage, and an unknown flag that is a near miss of a
    real one (--batch-size, --learnig_rate, --epoch) names it. Abbreviations are refused like
    any unknown flag: --epoch taken for --epochs would hide a typo, and a flag added later
    would change what an abbreviation meant."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_args(self, args=None, namespace=None):
        flags, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}"
                       + "".join(f"; did you mean {hint}?" for hint in map(self._near_miss, unknown)
                                 if hint))
        return flags

    def _near_miss(self, argument: str) -> str | None:
        """The real flag `argument` (e.g. "--batch-size=32") most likely meant, or None."""
        if not argument.startswith("--"):
            return None
        name = "--" + argument[2:].split("=", 1)[0].replace("-", "_")
        flags = [flag for action in self._actions for flag in action.option_strings]
        close = difflib.get_close_matches(name, flags, n=1, cutoff=0.75)
        return close[0] if close else None

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


DATA_DIR_HELP = ("where TFDS datasets are prepared (default: TFDS's, $TFDS_DATA_DIR or "
                 "~/tensorflow_datasets); the folder of the course's .pkl files (needed for the "
                 "deepul_* datasets); or the shard folder of --dataset shards (written by "
                 "python -m lvm_jax.data.shards write)")
ImageDataset = Literal[tuple(data.IMAGE_DATASETS)]
Likelihood = Literal[tuple(sorted(likelihoods.LIKELIHOODS))]


@dataclasses.dataclass(frozen=True)
class Config(configs.Config):
    """The settings every training experiment has (DESIGN.md §5), with the REFERENCE.md
    defaults; each experiment's Config adds its own and may change a default."""

    dataset: str = configs.setting("mnist_embedded", "the data to train on")
    epochs: int = configs.setting(20, "passes over the training set (--quick overrides it)",
                                  configs.POSITIVE_INT, may_change_on_resume=True)
    batch_size: int = configs.setting(128, "examples per training step, split over the devices",
                                      configs.POSITIVE_INT)
    learning_rate: float = configs.setting(1e-3, "Adam's step size", configs.POSITIVE_FLOAT,
                                           may_change_on_resume=True)
    seed: int = configs.setting(0, "seeds initialisation, data order and sampling: a run is "
                                   "reproducible from it", configs.SEED)
    data_dir: str | None = configs.setting(None, DATA_DIR_HELP, may_change_on_resume=True)
    input: Literal["memory", "stream"] = configs.setting(
        "memory", "memory: the training set whole on the devices; stream: read while training "
                  "(grain), for data larger than memory, e.g. --dataset shards; same batches, "
                  "same numbers (docs/streaming.md)", may_change_on_resume=True)
    quick: bool = configs.setting(
        False, f"smoke test: {QUICK_TRAIN} train / {QUICK_TEST} test examples, {QUICK_EPOCHS} "
               "epoch(s); figures say they come from a smoke run")
    steps_per_call: int | None = configs.setting(
        None, "training steps compiled into one lax.scan call; default 100, or 1 for "
              "convolutional models on CPU (XLA:CPU runs convolutions inside loops many times "
              "slower, jax-ml/jax#12868)", configs.POSITIVE_INT, may_change_on_resume=True)
    grad_clip: float | None = configs.setting(
        None, "clip the global gradient norm to this before each Adam step (inf: no clipping)",
        configs.POSITIVE_OR_INF)
    ema_decay: float | None = configs.setting(
        None, "evaluate, checkpoint and sample with an exponential moving average of the "
              "parameters with this decay (e.g. 0.999); 0 turns it off", configs.DECAY_RATE)
    no_progress: bool = configs.setting(False, "hide the progress bar", may_change_on_resume=True)
    checkpoint_interval: float = configs.setting(
        60.0, "seconds at least between the checkpoints of epoch ends (0: every epoch); the "
              "last epoch, a signal and a stop on a NaN or infinite loss always save",
        configs.NON_NEGATIVE_FLOAT, may_change_on_resume=True)
    dtype: Literal["float32", "bfloat16"] = configs.setting(
        "float32", "dtype of the model's activations: bfloat16 runs the convolutions and matrix "
                   "multiplies at bfloat16 speed on GPUs and TPUs, while parameters, optimizer "
                   "state, losses and metrics stay float32 (no faster on CPU)")

    # Whether the model is convolutional: on CPU its training steps run one per compiled
    # call, split over several CPU devices (`lvm_jax.cpu_devices`) but in --quick runs.
    CONVOLUTIONAL = False


def parser(config: type[Config], experiment: str, description: str) -> argparse.ArgumentParser:
    """The command line of `experiment`: a flag for every field of `config`, then --workdir
    and --multihost, which say where and how this process runs rather than what it runs."""
    p = configs.add_flags(ArgumentParser(prog=f"python -m experiments.{experiment}",
                                                  description=description,
                                                  formatter_class=HelpFormatter), config)
    p.add_argument("--workdir", default=None,
                   help=f"output directory; default runs/{experiment}/<dataset>. Rerunning with the "
                        "same workdir resumes from its latest checkpoint.")
    p.add_argument("--multihost", action="store_true",
                   help="one process of a multi-host run (TPU pod, SLURM or Open MPI job): calls "
                        "jax.distributed.initialize(), which finds the other hosts; --workdir "
                        "must be a directory every host sees")
    return p


def trained_run_parser(config: type, command: str, description: str) -> argparse.ArgumentParser:
    """The command line of a command on a trained run (`experiments.<command>`): a flag for
    every field of `config`, and the required --workdir of the run."""
    p = configs.add_flags(ArgumentParser(prog=f"python -m experiments.{command}",
                                         description=description,
                                         formatter_class=HelpFormatter), config)
    p.add_argument("--workdir", required=True, help="the trained run's workdir")
    return p


def run(parser: argparse.ArgumentParser, config: type[Config], train_and_evaluate, argv=None):
    """Parses the command line and runs `train_and_evaluate(config, workdir)`.

    A value out of range is refused by argparse (exit status 2). Settings that contradict
    each other, and any problem with the data, the workdir or the numerics (an
    `lvm_jax.errors.UserError`), end the program with a one-line message (exit status 1)
    instead of a traceback; so does a full disk or a refused write (`files.disk_error`).
    Any other exception is a bug and keeps its traceback.

    SIGINT and SIGTERM stop the run at its next step boundary, after saving the current
    step (`lvm_jax.interrupt`): one line says what was saved, and the exit status
    is 128 + the signal's number (130, 143). A second signal ends the process at once.
    """
    compilation_cache.enable()
    # The interpreter's last garbage collections walk every object JAX, Flax and orbax made:
    # frozen at exit, they are freed by reference counting alone (0.45 s of a 6 s 2D run).
    atexit.register(gc.freeze)
    flags = parser.parse_args(argv)
    try:
        settings = configs.from_flags(config, flags)
        multihost = getattr(flags, "multihost", False)  # evaluate's parser has none
        # Both before any JAX computation, as JAX requires; multi-host runs keep the hosts'
        # devices.
        if multihost:
            jax.distributed.initialize()
        elif isinstance(settings, Config):
            split_cpu(settings)
        with quiet_disk_errors(), interrupt.handled(second_ends_process=True):
            result = train_and_evaluate(settings, flags.workdir)
            # A signal after the last step boundary: the run's files are all written whole.
            interrupt.check("the run finished, and its files are all written")
        return result
    except interrupt.Interrupted as stop:
        parser.exit(stop.exit_status, f"{parser.prog}: {stop}\n")
    except errors.UserError as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    except Exception as err:
        disk_error = files.disk_error(err)  # e.g. met while writing the figures
        if disk_error is None:
            raise
        parser.exit(1, f"{parser.prog}: error: {disk_error}\n")


class QuietDiskErrors(logging.Filter):
    """Drops the log records (with their tracebacks) of a disk error from orbax's threads:
    the run stops on it and names it in one line (`files.disk_error`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ((error is not None and files.disk_error(error) is not None)
                    or any(int(code) in files.DISK_ERRORS for code in
                           files.TENSORSTORE_OS_ERROR.findall(record.getMessage())))


@contextlib.contextmanager
def quiet_disk_errors():
    """For the `with` block, on the command line only: drops orbax's log records of a disk
    error (`QuietDiskErrors`) and the "Event loop is closed" errors of tensorstore's
    callbacks, which a save or read failing halfway (a full disk) reports as unraisable
    by the dozen, around the one line that names the failure."""
    absl, previous_hook, quiet = logging.getLogger("absl"), sys.unraisablehook, QuietDiskErrors()

    def hook(unraisable):
        traceback = unraisable.exc_traceback
        if not (unraisable.exc_type is RuntimeError and traceback is not None
                and str(unraisable.exc_value) == "Event loop is closed"
                and traceback.tb_frame.f_code.co_name == "call_soon_threadsafe"):
            previous_hook(unraisable)

    absl.addFilter(quiet)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        absl.removeFilter(quiet)
        sys.unraisablehook = previous_hook


def split_cpu(config: Config) -> int | None:
    """Splits the CPU into several JAX devices for `config`'s run (`lvm_jax.cpu_devices`), as
    the experiments do before JAX starts: for convolutional models only, and not for --quick
    runs, which are mostly compilation, longer for several devices than the split saves on
    their four steps (vae --quick: 13.7 s against 9.6). Returns the count set, or None."""
    if splits_cpu(type(config), config.quick):
        return cpu_devices.split(config.batch_size, CONVOLUTIONAL_EVAL_BATCH)
    return None


def splits_cpu(config_type: type, quick: bool) -> bool:
    """Whether runs of an experiment (its Config class) split the CPU: convolutional models,
    not --quick."""
    return getattr(config_type, "CONVOLUTIONAL", False) and not quick


# The file that names the experiment owning a workdir, written before anything else of it.
OWNER_FILE = "experiment.json"


def workdir(config: Config, experiment: str, workdir: str | None = None) -> str:
    """`workdir`, or by default runs/<experiment>/<dataset>[_quick], claimed for `experiment`:
    under the workdir's lock, refused if another experiment owns it, else its OWNER_FILE
    written; so of two experiments started on one new workdir, the second is refused before
    it writes anything, whatever the layout of their runs (stages and variants in folders).

    Raises:
      WorkdirError: the workdir holds another experiment's run (`workdir_owners`), or is in
        use; nothing in it is changed.
    """
    path = workdir or os.path.join("runs", experiment,
                                   config.dataset + ("_quick" if config.quick else ""))
    with workdir_lock.locked(path):
        others = workdir_owners(path) - {experiment}
        if others:
            raise errors.WorkdirError(
                f"the workdir {path} holds a run of {', '.join(sorted(others))}, not of "
                f"{experiment}: choose another --workdir for this {experiment} run.")
        files.write_json(os.path.join(path, OWNER_FILE), {"experiment": experiment})
    return path


# Experiments that train inside another's workdir, as its stages: their config.json names them.
STAGE_OF = {"vqvae_prior": "vqvae",
            "vqvae2_top_prior": "vqvae2", "vqvae2_bottom_prior": "vqvae2"}


def workdir_owners(path: str) -> set[str]:
    """The experiments whose runs `path` holds: its OWNER_FILE names one (`workdir`), as does
    each run's config.json, in the workdir itself (vae, vlae, vae_2d,
    lvae), a level down (vqvae's stages) or two (mlp_vae's study variants). Empty for a new
    workdir; an unreadable config.json is left to the run that reads it."""
    owners = set()
    for pattern in (OWNER_FILE, "config.json", "*/config.json", "*/*/config.json"):
        for found in sorted(glob.glob(os.path.join(glob.escape(path), pattern))):
            try:
                experiment = files.read_record(found).get("experiment")
            except errors.UserError:  # unreadable, not an object, nested too deep
                continue
            if isinstance(experiment, str):
                owners.add(STAGE_OF.get(experiment, experiment))
        if owners:
            return owners
    return owners


def load_dataset(config, name: str | None = None) -> data.Dataset:
    """Loads the dataset `config` names (or `name`), its training set streamed with
    `--input stream`; `quick` keeps a small fixed subset."""
    dataset = data.load(name or config.dataset, config.data_dir,
                        stream=getattr(config, "input", "memory") == "stream")
    return dataset.head(QUICK_TRAIN, QUICK_TEST) if config.quick else dataset


def encoding_line(dataset) -> str:
    """The line a VQ experiment prints before it encodes its data for the priors: one compiled
    call per batch, minutes at the default widths on a CPU, and nothing else would show."""
    return (f"encoding the {len(dataset.train):,} training and {len(dataset.test):,} test images "
            "into code grids for the priors")


def figure_title(title: str, config: Config, steps: int) -> str:
    """The title of a run's figures: a --quick run's say that they show a smoke run of `steps`
    training steps, not a trained model."""
    return f"{title} [--quick smoke run, {steps} steps: not a trained model]" if config.quick else title


def image_preprocess(likelihood) -> Callable:
    """How the compiled step reads stored uint8 images for `likelihood`: binarized to {-1, 1}
    for a Bernoulli (so its log-probability is an exact mass), else scaled to [-1, 1]."""
    return data.binarize_images if isinstance(likelihood, likelihoods.Bernoulli) else data.scale_images


def train_config(config: Config) -> TrainConfig:
    """The training loop's settings in `config`."""
    steps_per_call = config.steps_per_call
    if steps_per_call is None:
        steps_per_call = 1 if config.CONVOLUTIONAL and jax.default_backend() == "cpu" else 100
    return TrainConfig(epochs=QUICK_EPOCHS if config.quick else config.epochs,
                       batch_size=config.batch_size, learning_rate=config.learning_rate,
                       seed=config.seed, steps_per_call=steps_per_call,
                       eval_batch_size=(CONVOLUTIONAL_EVAL_BATCH if config.CONVOLUTIONAL
                                        else TrainConfig.eval_batch_size),
                       grad_clip_norm=config.grad_clip, ema_decay=config.ema_decay or None,
                       progress=not config.no_progress,
                       checkpoint_interval=config.checkpoint_interval)


def train_steps(loop: TrainConfig, num_train: int) -> int:
    """The optimizer steps `fit` takes with `loop` on `num_train` examples (one host)."""
    return loop.epochs * (num_train // loop.batch_size)


def run_record(config: Config, experiment: str, example_shape, data_identity=None,
               **facts) -> dict:
    """What config.json holds: the experiment (or stage) that trains there, every setting of
    `config` (`Config.record`), and the run facts no setting names: the shape of one
    training example, the data's identity (`data_identity`, a `data.DataIdentity`: a resume
    or an evaluation on other data is refused), and `facts` (e.g. the step of the codes a
    prior trained on). A resumed run must match it but `config.may_change_on_resume()`;
    `load_run` rebuilds the run from it alone. A new run fact is added here, for every
    experiment at once."""
    identity = {"data": data_identity.to_json()} if data_identity is not None else {}
    return {"experiment": experiment, **config.record(),
            "example_shape": list(example_shape), **identity, **facts}


def merged(base: dict, updates: dict) -> dict:
    """`base` with `updates` merged in, recursively into the dicts both hold."""
    out = dict(base)
    for key, value in updates.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def update_json(path: str, updates: dict, replace=()) -> dict:
    """Merges `updates` into the JSON object at `path` (created if absent) and returns it:
    nested dicts merge key by key, but the top-level keys in `replace` (dicts the caller
    owns whole) are replaced."""
    base = files.read_record(path) if os.path.exists(path) else {}
    obj = merged({k: v for k, v in base.items() if k not in replace}, updates)
    files.write_json(path, obj)
    return obj
