"""Importance-weighted evaluation of a trained VAE-style run (experiments vae, vlae, vae_2d,
mlp_vae and lvae; a VQ-VAE has no such bound: its priors report nats per code).

    python -m experiments.evaluate --workdir runs/vae/mnist_embedded [--num_samples 1000]

Rebuilds the run from its workdir (`experiments.load_run`), and evaluates its
test set with `run.evaluate`.
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
import os
import sys
import time

import jax
import numpy as np

from experiments import common, configs, runs
from experiments.runs import load_run
from lvm_jax import cpu_devices, evaluate, files, interrupt
from lvm_jax import workdir as workdir_lock
from lvm_jax.errors import ConfigError, DataError, UserError
from lvm_jax.models.priors import StandardNormalPrior
from lvm_jax.train import CheckpointError, device_description

# The experiments whose models give importance weights (`evaluate.iwae_log_weights`).
EVALUATED = ("vae", "vlae", "vae_2d", "mlp_vae", "lvae")
NATS = "nats per example"
UNITS = {"iwae_nll": f"{NATS}, importance-weighted bound with iwae_num_samples samples",
         "iwae_nll_stderr": f"{NATS}, standard error of the mean over the test set",
         "iwae_num_samples": "importance samples per example",
         "iwae_num_examples": "test examples the IWAE bound was evaluated on (the first N)",
         "neg_elbo_iwae_examples": f"{NATS}, single-sample -ELBO of those same examples",
         "active_units": "latent dimensions with Cov_x(E_q[z_u]) > the threshold (Burda et al.)"}


def bounded_run(workdir: str, data_dir: str | None = None) -> runs.BoundRun:
    """The run in `workdir` (`experiments.load_run`), once its config.json names an
    experiment with an importance-weighted bound.

    Raises:
      CheckpointError: `workdir` holds no config.json (the message names the runs inside it
        that have a bound), names an experiment without one, or holds no trained step.
    """
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(_no_config_message(workdir))
    experiment = files.read_record(config_path).get("experiment")
    if experiment not in EVALUATED:
        raise CheckpointError(_no_bound_message(workdir, [str(experiment)]))
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise CheckpointError(f"{workdir} holds no checkpoints/: train the run first.")
    return load_run(workdir, data_dir)


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
    inner = {os.path.dirname(path): files.read_record(path).get("experiment") for path in
             sorted(glob.glob(os.path.join(glob.escape(workdir), "**", "config.json"),
                              recursive=True))}
    evaluable = [run for run, experiment in inner.items() if experiment in EVALUATED]
    if evaluable:
        return (f"{workdir} holds no config.json of its own, but the runs in "
                f"{', '.join(evaluable)}: pass one of those as --workdir.")
    if inner:
        return _no_bound_message(workdir, list(map(str, inner.values())))
    return f"{workdir} holds no config.json: it is no training run's workdir."


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
    other_data: bool = configs.setting(
        False, "evaluate on data other than the run trained on (e.g. another --data_dir): the "
               "result is written apart, under summary.json's other_data and the data's name, "
               "never beside the run's own metrics")
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
        run_config = files.read_record(os.path.join(workdir, "config.json"))
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
        files.read_record(summary_path)  # malformed: refused before any compute
    _note(f"restoring the run in {workdir}")
    run = bounded_run(workdir, config.data_dir)
    dataset, model, params = run.dataset, run.model, run.params
    other = run.other_data()
    if other and not config.other_data:
        raise DataError(f"{other} Evaluate the run on its own data, or pass --other_data to "
                        "record this evaluation apart, under the data's name.")
    preprocess = run.objective.preprocess
    chunk = evaluate.resolve_chunk(config.num_samples, config.chunk)

    def iwae_nll(examples, num_samples, progress=False):
        return run.evaluate(examples, jax.random.key(config.seed), num_samples, chunk,
                            config.batch_size, progress)

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
    # The -ELBO of the same examples, for a like comparison (the run's own is of its test set).
    if other or len(nll) < len(dataset.test):
        metrics["neg_elbo_iwae_examples"] = float(iwae_nll(examples, 1).mean())
    units = {name: unit for name, unit in UNITS.items() if name in metrics}
    if dataset.kind == "image":
        metrics["iwae_bits_per_dim"] = float(
            evaluate.image_bits_per_dim(metrics["iwae_nll"], dataset.num_dims, model.likelihood))
        units["iwae_bits_per_dim"] = evaluate.bits_per_dim_unit(model.likelihood)
    total_seconds = time.perf_counter() - start
    interrupt.check("the evaluation stopped before writing its results (summary.json is as it "
                    "was); rerun the same command to evaluate")
    results = {
        "test_metrics": metrics,
        "units": units,
        "latent_diagnostics": diagnostics,
        "iwae_evaluation": {
            "checkpoint_step": run.step, "iwae_seconds": seconds,
            "examples_x_samples_per_second": len(nll) * config.num_samples / seconds,
            "wall_time_seconds": total_seconds, "device": device_description()}}
    if other:  # apart from the run's own metrics, which are of other data
        name = dataset.identity.describe()
        results = {"other_data": {name: {**results, "data": dataset.identity.to_json()}}}
    summary = common.update_json(summary_path, results)

    bits = metrics.get("iwae_bits_per_dim")
    elbo = metrics.get("neg_elbo_iwae_examples", summary["test_metrics"].get("neg_elbo"))
    data_name = dataset.identity.describe() if other else dataset.name
    print(f"{run.experiment} on {data_name}: IWAE NLL (k={config.num_samples}) "
          f"{metrics['iwae_nll']:.3f} ± {metrics['iwae_nll_stderr']:.3f} nats"
          + (f" ({bits:.4f} bits/dim)" if bits is not None else "")
          + (f", -ELBO {elbo:.3f}" if elbo is not None else "")
          + f"; active units {num_active}/{len(activity)}; {total_seconds:.1f} s in all "
          f"(IWAE pass {seconds:.1f} s, compilation excluded)")
    return summary


def parser() -> argparse.ArgumentParser:
    return common.trained_run_parser(Config, "evaluate", __doc__)


def main(argv=None):
    return common.run(parser(), Config, evaluate_run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
