"""How lvm_jax runs the convolutional training steps on a CPU: one JAX device against the
CPU split into several (`lvm_jax.cpu_devices`, the experiments' default), and XLA:CPU's
oneDNN and YNNPACK options on top of the split; lvm_jax alone.

Each configuration runs in its own process (XLA reads its flags and JAX makes
its devices once, at start-up) and times the image VAE (32x32x1, 32x32x3),
VLAE (32x32x3) and VQ-VAE (32x32x3) training steps at batch 128 with
image_vae.py's protocol (`fit`'s compiled step, over all of the process's
devices). The processes run in rounds, every configuration once per round,
so that a change in the machine's load hits all alike; each row gives the
median over rounds of each process's median step. The notes also give the
process's CPU seconds per step (all of XLA's threads), which a busy machine
disturbs far less than wall time: on a shared machine compare those.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.common import Row, Settings, device, measure, timer
from benchmarks.image_vae import BATCH, DATASETS, jax_model
from benchmarks.trainers import JaxSteps
from experiments import vae as vae_experiment
from experiments import vqvae as vqvae_experiment
from experiments import common
from lvm_jax import cpu_devices, data
from lvm_jax.models import vqvae

NAME = "xla_flags"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: the environment variables of the process, beside the user's.
CONFIGURATIONS = {
    "one device": {cpu_devices.LIMIT_VARIABLE: "1"},
    "default": {},
    "oneDNN custom calls": {"XLA_FLAGS": "--xla_cpu_experimental_onednn_custom_call=true"},
    "oneDNN": {"XLA_FLAGS": "--xla_cpu_use_onednn=true"},
    # Convolutions already run through YNNPACK by default; this also hands it the dots,
    # elementwise fusions and reductions.
    "YNNPACK fusions": {"XLA_FLAGS": ("--xla_cpu_experimental_ynn_fusion_type="
                                      "individual_convolution,dot,eltwise,reduce")},
}
MODELS = ("image VAE 32x32x1", "image VAE 32x32x3", "VLAE 32x32x3", "VQ-VAE 32x32x3")
MAX_ROUNDS = 2  # a round is a process per configuration: about 11 minutes on 2 cores


def model_steps(model: str):
    """JaxSteps of `model` (a name of MODELS) at batch 128."""
    channels = int(model[-1])
    dataset = data.load(DATASETS[channels])
    if model.startswith("VQ-VAE"):
        objective = vqvae_experiment.vqvae_objective(vqvae.conv_vqvae(dataset.event_shape))
    else:
        prior = "made" if model.startswith("VLAE") else "standard"
        objective = vae_experiment.make_objective(jax_model(dataset, prior))
    return JaxSteps(objective, dataset.train, BATCH, seed=0)


def _cpu_timer(step, number: int):
    """A sampler of the process's CPU seconds (all threads) per call of `step`."""

    def sample() -> float:
        tic = time.process_time()
        for _ in range(number):
            step()
        return (time.process_time() - tic) / number

    return sample


def worker(settings: Settings) -> dict[str, tuple[float, float, int]]:
    """Median (wall, CPU) seconds per step of every model, and the number of JAX devices,
    in this process's configuration."""
    common.split_cpu(vae_experiment.Config(batch_size=BATCH))  # as the experiments do
    number = 1 if settings.quick else 3
    seconds = {}
    for model in MODELS:
        steps = model_steps(model)
        seconds[model] = (measure(timer(steps.step, number), settings),
                          measure(_cpu_timer(steps.step, number), settings, warmup=0),
                          len(steps.mesh.devices.flat))
    return seconds


def run(settings: Settings) -> list[Row]:
    rounds = 1 if settings.quick else min(settings.repeats, MAX_ROUNDS)
    seconds = {name: [] for name in CONFIGURATIONS}
    for _ in range(rounds):
        for name, variables in CONFIGURATIONS.items():
            env = {**os.environ, **variables, "PYTHONPATH": REPO}
            if "XLA_FLAGS" in variables and os.environ.get("XLA_FLAGS"):
                env["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {variables['XLA_FLAGS']}"
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.xla_flags", json.dumps(settings.quick),
                 str(settings.repeats)], env=env, cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"the {name} step process failed:\n{done.stderr[-2000:]}")
            seconds[name].append(json.loads(done.stdout.splitlines()[-1]))
    rows = []
    for model in MODELS:
        default = statistics.median(r[model][0] for r in seconds["default"])
        for name, variables in CONFIGURATIONS.items():
            runs = [r[model] for r in seconds[name]]
            median = statistics.median(wall for wall, _, _ in runs)
            setting = ", ".join(f"{k}={v}" for k, v in variables.items()) or "(none)"
            rows.append(Row(
                benchmark=NAME, model=model, step=f"train step, {setting}",
                batch=BATCH, lvm_jax=BATCH / median, unit="images/s", higher_is_better=True,
                device=device(jax_devices=runs[0][2]),
                note=f"{name}; {default / median:.2f}x the default; per round: "
                     + ", ".join(f"{1e3 * wall:.0f}" for wall, _, _ in runs) + " ms per step, CPU "
                     + ", ".join(f"{1e3 * cpu:.0f}" for _, cpu, _ in runs) + " ms per step"))
    return rows


if __name__ == "__main__":
    quick, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
    print(json.dumps(worker(Settings(quick=quick, repeats=1 if quick else repeats))))
