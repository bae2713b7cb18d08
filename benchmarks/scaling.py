"""Data-parallel training on 1, 2, 4 and 8 simulated CPU devices (issue #7, item 5).

A correctness and overhead check. The simulated devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, which must be set
before JAX starts, so every device count runs in a subprocess of its own)
share the host's cores: for this small MLP more devices cannot be faster, and
the steps/s show what sharding the batch and all-reducing the gradients cost.
(Convolutional models, which one CPU device leaves partly idle, do run faster
split: `lvm_jax.cpu_devices`, measured by xla_flags.py.)

Each subprocess trains the 2D VAE of `python -m experiments.vae_2d` (MLP
128-128, 2-d latent, Gaussian decoder; Adam 1e-3, parameter EMA 0.99) on toy2d
dataset 1 with `lvm_jax.train.fit` itself, over a mesh of the first n of the 8
devices, at the same global batch of 128 (128 / n examples per device): 3
epochs (2 with --quick) of 78 steps, one compiled call per epoch as `fit` runs
an MLP. Short, because the runs drift apart: rounding differences (a sharded
batch sums its gradient in another order) grow through training, under
3e-6 nats of test loss for the first 4 epochs, about 1e-3 nats after 10
(measured on 2 CPU cores, seed 0). Rows:

* steps/s for n = 1, 2, 4, 8: `fit`'s own figure (its summary's
  train_steps_per_second: training steps over the wall time of their compiled
  calls, metrics read back included, the calls that compiled left out), the
  median over `repeats` rounds that run n = 1, 2, 4, 8 in turn.
* the final test loss (the EMA parameters' -ELBO, 100 samples per test point)
  of the 1-device run. Every other run must give the same test metrics (after
  training, and the test loss before it and after every epoch) and
  parameters up to float rounding: the note gives the largest differences,
  and the benchmark fails if a metric differs by more than `TOLERANCE`
  relative.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import jax
import numpy as np

from benchmarks.common import NUM_CORES, Row, Settings

NAME = "scaling"
SIMULATED = 8
DEVICE_COUNTS = (1, 2, 4, 8)
DATASET = "toy2d_1"
BATCH = 128
EPOCHS, QUICK_EPOCHS = 3, 2
TOLERANCE = 1e-4  # relative difference of a test metric from the 1-device run
TIMEOUT_S = 600


def train_on(num_devices: int, epochs: int, seed: int) -> dict:
    """In a process with SIMULATED devices: `fit` on the first `num_devices` of them."""
    from experiments import vae_2d
    from lvm_jax import data
    from lvm_jax.data import batching
    from lvm_jax import files
    from lvm_jax.train import TrainConfig, fit

    devices = jax.devices()
    if len(devices) != SIMULATED:
        raise RuntimeError(f"expected {SIMULATED} simulated devices, got {devices}: XLA_FLAGS "
                           "was not set before JAX started")
    dataset = data.load(DATASET)
    config = TrainConfig(epochs=epochs, batch_size=BATCH, seed=seed, ema_decay=0.99,
                         progress=False)
    with tempfile.TemporaryDirectory() as workdir:
        result = fit(vae_2d.make_objective(vae_2d.build_model()), dataset.train, dataset.test,
                     config, workdir, mesh=batching.data_mesh(devices[:num_devices]))
        test_losses = [float(r["loss"]) for r in files.read_csv(
            os.path.join(workdir, "metrics.csv")) if r["split"] == "test"]
    leaves = jax.tree.leaves(result.state.params)
    return {"steps_per_second": result.summary["train_steps_per_second"],
            # fit runs an epoch per call (steps_per_call 100 >= 78) and times every call
            # but the first, which compiles.
            "steps": result.summary["steps"],
            "timed_steps": result.summary["steps"] - len(dataset.train) // BATCH,
            "test_metrics": result.test_metrics,
            "test_loss_by_epoch": test_losses,
            "params": [np.asarray(p).ravel().tolist() for p in leaves],
            "devices_holding_params": len(leaves[0].sharding.device_set)}


def run_subprocess(num_devices: int, epochs: int, seed: int) -> dict:
    """`train_on` in a fresh Python with SIMULATED CPU devices."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={SIMULATED}"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scaling", "--devices", str(num_devices),
         "--epochs", str(epochs), "--seed", str(seed)],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        raise RuntimeError(f"training on {num_devices} simulated devices failed:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def differences(result: dict, reference: dict) -> tuple[float, float]:
    """Largest relative difference of a test metric (or of the test loss of an epoch), and
    largest absolute difference of a parameter, of `result` from `reference`."""
    pairs = [(v, reference["test_metrics"][k]) for k, v in result["test_metrics"].items()]
    pairs += list(zip(result["test_loss_by_epoch"], reference["test_loss_by_epoch"], strict=True))
    metric = max(abs(a - b) / max(1.0, abs(b)) for a, b in pairs)
    param = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) if a else 0.0
                for a, b in zip(result["params"], reference["params"]))
    return metric, param


def run(settings: Settings) -> list[Row]:
    epochs = QUICK_EPOCHS if settings.quick else EPOCHS
    runs = {n: [] for n in DEVICE_COUNTS}
    for _ in range(settings.repeats):  # rounds over the device counts: load changes hit all
        for n in DEVICE_COUNTS:
            runs[n].append(run_subprocess(n, epochs, settings.seed))
    reference = runs[1][0]
    diffs = {n: [differences(r, reference) for r in runs[n]] for n in DEVICE_COUNTS}
    worst_metric = max(m for n in DEVICE_COUNTS for m, _ in diffs[n])
    worst_param = max(p for n in DEVICE_COUNTS for _, p in diffs[n])
    if worst_metric > TOLERANCE:
        raise AssertionError(
            f"training on several devices changed the test metrics by up to {worst_metric:.3g} "
            f"(relative; tolerance {TOLERANCE:g}): " + "; ".join(
                f"{n} devices: {runs[n][0]['test_metrics']}" for n in DEVICE_COUNTS))
    for n in DEVICE_COUNTS:
        held = {r["devices_holding_params"] for r in runs[n]}
        if held != {n}:
            raise AssertionError(f"the parameters of the {n}-device run live on {held} devices")

    model = "2D VAE (MLP 128-128, toy2d 1), simulated CPU devices"
    steps = reference["steps"]
    where = f"cpu x{NUM_CORES} as {SIMULATED} devices"
    rows = []
    for n in DEVICE_COUNTS:
        per_second = statistics.median(r["steps_per_second"] for r in runs[n])
        metric, param = max(m for m, _ in diffs[n]), max(p for _, p in diffs[n])
        rows.append(Row(
            benchmark=NAME, model=model,
            step=f"fit, {n} of {SIMULATED} devices (batch {BATCH // n} per device)", batch=BATCH,
            lvm_jax=per_second, unit="steps/s", higher_is_better=True, device=where,
            note=f"fit's train_steps_per_second: the last {reference['timed_steps']} of {steps} "
                 f"steps ({epochs} epochs; the first call compiles), median of {len(runs[n])} "
                 f"runs; test loss "
                 f"{runs[n][0]['test_metrics']['loss']:.6f}, max relative metric difference "
                 f"from 1 device {metric:.2g}, max parameter difference {param:.2g}"))
    rows.append(Row(
        benchmark=NAME, model=model, step=f"final test loss after {epochs} epochs (1 device)",
        batch=BATCH, lvm_jax=reference["test_metrics"]["loss"], unit="nats per example",
        higher_is_better=False, device=where,
        note=f"-ELBO of the EMA parameters, 100 samples per test point; on 2, 4 and 8 devices "
             f"every test metric within {worst_metric:.2g} (relative; fails above "
             f"{TOLERANCE:g}) and every parameter within {worst_param:.2g} of 1 device's"))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="one device count of the scaling benchmark "
                                            "(run by it, in a process with simulated devices)")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(train_on(args.devices, args.epochs, args.seed)))


if __name__ == "__main__":
    main(sys.argv[1:])
