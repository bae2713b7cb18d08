"""Importance-weighted evaluation of a trained VAE-style run (experiments vae, vlae, vae_2d,
mlp_vae and lvae; a VQ-VAE has no such bound: its priors report nats per code).

    python -m experiments.evaluate --workdir runs/vae/mnist_embedded [--num_samples 1000]

Reads the run's config.json, rebuilds its model with the experiment's
`build_model` (arguments taken from config.json by name; `dataset` is the
loaded Dataset; an argument with a default that an older config.json lacks
takes that default), restores the latest checkpoint and evaluates the test set.
Adds to the run's summary.json:
  test_metrics: iwae_nll and iwae_nll_stderr (nats per example),
    iwae_bits_per_dim (images), iwae_num_samples, active_units;
  latent_diagnostics: the activity Cov_x(E_q[z_u]) and, for the standard
    normal prior, the KL of each latent dimension (nats per example);
  iwae_evaluation: checkpoint step, the seconds of the IWAE pass (compilation
    excluded) and its throughput (examples x samples per second), the whole
    command's wall time, and device.
"""

import argparse
import dataclasses
import glob
import importlib
import inspect
import os
import sys
import time
import types
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common, configs
from lvm_jax import cpu_devices, data, evaluate
from lvm_jax.errors import ConfigError, RecordError, UserError
from lvm_jax.models.priors import StandardNormalPrior
from lvm_jax.train import (CheckpointError, Objective, TrainConfig, device_description,
                           initial_state, interrupt, records)
from lvm_jax.train.checkpoint import newest_record, restore_committed
from lvm_jax.train import workdir as workdir_lock

# The experiments whose models give importance weights (`evaluate.iwae_log_weights`).
EVALUATED = ("vae", "vlae", "vae_2d", "mlp_vae", "lvae")
# Experiments whose config.json does not name their model's module or dataset directly.
MODEL_MODULES = {"vlae": "vae"}  # the VLAE is experiments.vae's model with the MADE prior
DATASET_NAMES = {"vae_2d": "toy2d_{}"}  # vae_2d's --dataset picks one of the toy2d sets
NATS = "nats per example"
UNITS = {"iwae_nll": f"{NATS}, importance-weighted bound with iwae_num_samples samples",
         "iwae_nll_stderr": f"{NATS}, standard error of the mean over the test set",
         "iwae_num_samples": "importance samples per example",
         "iwae_num_examples": "test examples the IWAE bound was evaluated on (the first N)",
         "neg_elbo_iwae_examples": f"{NATS}, single-sample -ELBO of those same examples",
         "active_units": "latent dimensions with Cov_x(E_q[z_u]) > the threshold (Burda et al.)"}


class Run(NamedTuple):
    """A trained run, rebuilt: its config.json, data, model, objective, the parameters to
    evaluate and the step of their checkpoint.

    The model takes its examples as the training step did, preprocessed: stored uint8
    images scaled to [-1, 1] or binarized, MNIST digits cropped. `preprocess` does it:

        run = load_run("runs/vae/mnist_embedded")
        terms = run.model.apply({"params": run.params}, run.preprocess(run.dataset.test[:8]),
                                jax.random.key(0))  # per-example ELBO terms, nats
    """

    config: dict
    dataset: data.Dataset
    model: nn.Module
    objective: Objective
    params: Any
    step: int

    def preprocess(self, examples) -> jax.Array:
        """`examples` as stored (e.g. `dataset.test[:8]`, uint8 images) -> the model's input,
        as the training step computed it (`objective.preprocess`)."""
        return self.objective.preprocess(jnp.asarray(examples))


def load_run(workdir: str, data_dir: str | None = None) -> Run:
    """Rebuilds the run in `workdir` from its config.json and newest committed checkpoint;
    apply its model to `run.preprocess(examples)` (see `Run`).

    Safe while the run trains: it reads the newest checkpoint whose record verifies, never
    a step being written or deleted (`checkpoint.restore_committed`).

    Raises:
      CheckpointError: `workdir` holds no config.json or no checkpoint, or one that does
        not match the rebuilt model.
      RecordError: config.json is malformed, or names another experiment, dataset or model
        than the checkpoint's record.
      DataError: the run's dataset cannot be loaded.
    """
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(_no_config_message(workdir))
    config = records.read_record(config_path)
    _check_types(config_path, config, {"experiment": str})
    experiment = config["experiment"]
    if experiment not in EVALUATED:
        raise CheckpointError(_no_bound_message(workdir, [experiment]))
    _check_types(config_path, config, {"dataset": str, "train": dict})
    newest = newest_record(workdir)
    if newest is not None:  # before the config builds anything: it may name other data
        _check_same_run(config_path, config, newest[1], newest[0])
    module = importlib.import_module(f"experiments.{MODEL_MODULES.get(experiment, experiment)}")
    dataset_name = DATASET_NAMES.get(experiment, "{}").format(config["dataset"])
    flags = types.SimpleNamespace(dataset=dataset_name, data_dir=data_dir,
                                  quick=config.get("quick", False))
    dataset = common.load_dataset(flags, dataset_name)

    kwargs = {}
    for name, parameter in inspect.signature(module.build_model).parameters.items():
        if name == "dataset":
            kwargs[name] = dataset
        elif name in config:
            kwargs[name] = config[name]
        elif parameter.default is inspect.Parameter.empty:
            raise CheckpointError(
                f"{config_path} lacks {name!r}, which {module.__name__}.build_model needs.")
        # Otherwise the setting is newer than this config.json (e.g. dtype): the run used
        # its default.
    model = module.build_model(**kwargs)
    objective = module.make_objective(model)
    params, step = restore_eval_params(workdir, objective, dataset.test[:1], config["train"],
                                       expected=config)
    return Run(config, dataset, model, objective, params, step)


def _check_types(path: str, config: dict, kinds: dict[str, type]) -> None:
    """Refuses a config.json that lacks one of `kinds` ({key: type}) or holds another type."""
    for key, kind in kinds.items():
        if not isinstance(config.get(key), kind):
            raise RecordError(f"{path} is malformed: its {key!r} is "
                              f"{'missing' if key not in config else 'no ' + kind.__name__}.")


def _no_bound_message(workdir: str, experiments: list[str]) -> str:
    names = sorted(set(experiments))
    if len(names) == 1:
        held = f"a run of {names[0]}, which has"
    else:
        held = f"runs of {', '.join(names)}, which have"
    return (f"{workdir} holds {held} no importance-weighted bound: this evaluates runs of "
            f"{', '.join(EVALUATED)}.")


def _no_config_message(workdir: str) -> str:
    """Why `workdir` is no run to evaluate, naming the runs inside it (a VQ-VAE's stages, an
    MLP-VAE study's variants)."""
    inner = {os.path.dirname(path): records.read_record(path).get("experiment") for path in
             sorted(glob.glob(os.path.join(glob.escape(workdir), "**", "config.json"),
                              recursive=True))}
    evaluable = [run for run, experiment in inner.items() if experiment in EVALUATED]
    if evaluable:
        return (f"{workdir} holds no config.json of its own, but the runs in "
                f"{', '.join(evaluable)}: pass one of those as --workdir.")
    if inner:
        return _no_bound_message(workdir, list(map(str, inner.values())))
    return f"{workdir} holds no config.json: it is no training run's workdir."


def restore_eval_params(workdir: str, objective, example: np.ndarray, train_config: dict,
                        expected: dict | None = None):
    """(parameters to evaluate, step) of the newest committed checkpoint: the EMA when the run
    kept one. The restore target is the TrainState `fit` saves, built the same way.

    With `expected` (config.json's contents), refuses a checkpoint whose record keeps
    another run's settings (experiment, dataset, model; the loop's "train" settings and the
    "changes" may differ): config.json edited, or a checkpoint copied from another run.
    """
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise CheckpointError(f"{workdir} holds no checkpoints/: train the run first.")
    try:
        target = initial_state(objective, example, TrainConfig(**train_config))
    except (TypeError, ValueError) as err:
        raise RecordError(f"{os.path.join(workdir, 'config.json')} is malformed: its 'train' "
                          f"settings do not build the run ({err}).") from None

    def same_run(record: dict, step: int) -> None:
        _check_same_run(os.path.join(workdir, "config.json"), expected, record, step)

    state, step, _ = restore_committed(workdir, target,
                                       same_run if expected is not None else None)
    return state.eval_params, step


def _check_same_run(config_path: str, config: dict, record: dict, step: int) -> None:
    """Refuses config.json's contents `config` when they differ from the config that the
    checkpoint of `step` keeps in its `record` (but for the loop's settings)."""
    differ = _differences(config, record.get("config"))
    if differ:
        raise RecordError(
            f"{config_path} does not match the checkpoint of step {step} ({differ[0]}): "
            "config.json was edited, or the checkpoint is another run's. Restore config.json, "
            "or evaluate the run the checkpoint belongs to.")


def _differences(config: dict, saved: dict | None) -> list[str]:
    """"dataset: config.json 'a', checkpoint 'b'" for every setting but the loop's ("train")
    and the "changes" that differ between config.json and a checkpoint's record (none for a
    record of an older lvm_jax, which keeps no config)."""
    if saved is None:
        return []
    return [f"{key}: config.json {config.get(key)!r}, checkpoint {saved.get(key)!r}"
            for key in sorted((set(config) | set(saved)) - {"train", "changes"})
            if records.to_json(config.get(key)) != records.to_json(saved.get(key))]


def _note(message: str) -> None:
    print(message, flush=True)


@dataclasses.dataclass(frozen=True)
class Config(configs.Config):
    """The settings of an importance-weighted evaluation."""

    num_samples: int = configs.setting(1000, "importance samples k per example",
                                       configs.POSITIVE_INT)
    chunk: int | None = configs.setting(
        None, "samples per compiled call, split over the devices (divides num_samples; default "
              f"its largest divisor up to {evaluate.DEFAULT_CHUNK}); bounds the memory",
        configs.POSITIVE_INT)
    batch_size: int = configs.setting(10, "test examples per compiled call", configs.POSITIVE_INT)
    active_threshold: float = configs.setting(
        0.01, "a latent dimension is active when Cov_x(E_q[z_u]) exceeds this",
        configs.NON_NEGATIVE_FLOAT)
    num_examples: int | None = configs.setting(
        None, "evaluate the IWAE bound on the first N test examples only (default all)",
        configs.POSITIVE_INT)
    seed: int = configs.setting(0, "seeds the importance samples", configs.SEED)
    data_dir: str | None = configs.setting(None, common.DATA_DIR_HELP)
    no_progress: bool = configs.setting(False, "hide the progress bar")

    def __post_init__(self):
        super().__post_init__()
        try:
            evaluate.resolve_chunk(self.num_samples, self.chunk)
        except ValueError:
            raise ConfigError(f"--chunk {self.chunk} must divide --num_samples {self.num_samples}: "
                              "each compiled call draws --chunk of the samples.") from None


def split_cpu(config: Config, workdir: str) -> int | None:
    """Splits the CPU into several JAX devices (`lvm_jax.cpu_devices`) before JAX starts, for
    the run in `workdir` if its training split it: a convolutional model, not --quick. Each
    device then decodes its share of every call's samples (`evaluate.iwae_nll`). Returns the
    count set, or None (also when config.json is missing or names no experiment, which
    `load_run` then reports)."""
    try:
        run_config = records.read_record(os.path.join(workdir, "config.json"))
        experiment = importlib.import_module(f"experiments.{run_config['experiment']}")
    except (UserError, ValueError, TypeError, KeyError, ImportError):
        return None
    if not common.splits_cpu(getattr(experiment, "Config", None), run_config.get("quick", False)):
        return None
    return cpu_devices.split(evaluate.resolve_chunk(config.num_samples, config.chunk),
                             min_per_device=1)


def evaluate_run(config: Config, workdir: str) -> dict:
    """Evaluates the run in `workdir` and merges the results into its summary.json,
    holding the workdir's lock so that no training run writes there meanwhile."""
    split_cpu(config, workdir)
    with workdir_lock.locked(workdir, create=False):
        return _evaluate_run(config, workdir)


def _evaluate_run(config: Config, workdir: str) -> dict:
    start = time.perf_counter()
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.exists(summary_path):
        records.read_record(summary_path)  # malformed: refused before any compute
    _note(f"restoring the run in {workdir}")
    run = load_run(workdir, config.data_dir)
    dataset, model, params = run.dataset, run.model, run.params
    preprocess = run.objective.preprocess
    chunk = evaluate.resolve_chunk(config.num_samples, config.chunk)

    def iwae_nll(examples, num_samples, progress=False):
        return evaluate.iwae_nll(model, params, examples, jax.random.key(config.seed), num_samples,
                                 chunk, config.batch_size, preprocess, progress)

    # A fixed subset keeps k = 1000 affordable for convolutional models on a CPU.
    examples = dataset.test[:config.num_examples]
    # One chunk of one (padded) batch compiles every call's shapes, so the timing leaves it out.
    _note(f"compiling the importance-weighted bound (step {run.step} checkpoint)")
    iwae_nll(examples[:1], chunk)
    _note(f"IWAE bound with k={config.num_samples} on {len(examples)} test examples")
    tic = time.perf_counter()
    nll = iwae_nll(examples, config.num_samples, progress=not config.no_progress)
    seconds = time.perf_counter() - tic
    _note("latent diagnostics (active units, per-dimension KL)")
    num_active, activity = evaluate.active_units(model, params, dataset.test, config.active_threshold,
                                                 preprocess=preprocess)
    diagnostics = {"active_units_threshold": config.active_threshold,
                   "unit_activity": activity.tolist()}
    if isinstance(getattr(model, "prior", None), StandardNormalPrior):  # the LVAE has none
        diagnostics["kl_per_dim"] = evaluate.per_dim_kl(model, params, dataset.test,
                                                        preprocess=preprocess).tolist()

    metrics = {"iwae_nll": float(nll.mean()),
               "iwae_nll_stderr": float(nll.std(ddof=1) / np.sqrt(len(nll))),
               "iwae_num_samples": config.num_samples, "iwae_num_examples": len(nll),
               "active_units": num_active}
    if len(nll) < len(dataset.test):  # the -ELBO of the same examples, for a like comparison
        metrics["neg_elbo_iwae_examples"] = float(iwae_nll(examples, 1).mean())
    units = {name: unit for name, unit in UNITS.items() if name in metrics}
    if dataset.kind == "image":
        metrics["iwae_bits_per_dim"] = float(
            evaluate.image_bits_per_dim(metrics["iwae_nll"], dataset.num_dims, model.likelihood))
        units["iwae_bits_per_dim"] = evaluate.bits_per_dim_unit(model.likelihood)
    total_seconds = time.perf_counter() - start
    interrupt.check("the evaluation stopped before writing its results (summary.json is as it "
                    "was); rerun the same command to evaluate")
    summary = records.update_json(summary_path, {
        "test_metrics": metrics,
        "units": units,
        "latent_diagnostics": diagnostics,
        "iwae_evaluation": {
            "checkpoint_step": run.step, "iwae_seconds": seconds,
            "examples_x_samples_per_second": len(nll) * config.num_samples / seconds,
            "wall_time_seconds": total_seconds, "device": device_description()}})

    bits = metrics.get("iwae_bits_per_dim")
    elbo = metrics.get("neg_elbo_iwae_examples", summary["test_metrics"].get("neg_elbo"))
    print(f"{run.config['experiment']} on {dataset.name}: IWAE NLL (k={config.num_samples}) "
          f"{metrics['iwae_nll']:.3f} ± {metrics['iwae_nll_stderr']:.3f} nats"
          + (f" ({bits:.4f} bits/dim)" if bits is not None else "")
          + (f", -ELBO {elbo:.3f}" if elbo is not None else "")
          + f"; active units {num_active}/{len(activity)}; {total_seconds:.1f} s in all "
          f"(IWAE pass {seconds:.1f} s, compilation excluded)")
    return summary


def parser() -> argparse.ArgumentParser:
    p = configs.add_flags(common.ArgumentParser(prog="python -m experiments.evaluate",
                                                  description=__doc__,
                                                  formatter_class=common.HelpFormatter), Config)
    p.add_argument("--workdir", required=True, help="the training run's output directory")
    return p


def main(argv=None):
    return common.run(parser(), Config, evaluate_run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
