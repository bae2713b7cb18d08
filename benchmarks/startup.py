"""Whole-run wall time of each experiment's `--quick` run on a cold and on a warm
persistent compilation cache (lvm_jax.compilation_cache), lvm_jax alone.

Each run is a fresh `python -m experiments.<name> --quick` process in a fresh
workdir, so the figures include interpreter start, imports, data, compilation,
training, evaluation, figures and checkpoints. Cold: an empty cache folder (as
a first run after installing); warm: the same command again, which loads every
compiled program from that folder. `repeats` (at most 3) cold/warm pairs per
experiment, each on a new folder; medians are reported.

Then the same cold/warm pairs for whole default runs, with each run's final
test -ELBO in the row's note: the 2D VAE (`experiments.vae_2d --dataset 1`;
goals 6 s cold, 4 s warm on the idle 2-core machine) and the README's main
command (`experiments.vlae --epochs 5 --batch_size 32`; goal 75 s; one pair,
left out under --quick).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import Row, Settings, device

NAME = "startup"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = ("vae_2d", "vae", "vlae", "vqvae", "lvae", "mlp_vae")
EVALUATE_SAMPLES = 10
MAX_REPEATS = 3
# Whole default runs: (command line after `python -m`, most cold/warm pairs).
VAE_2D_RUN = (["experiments.vae_2d", "--dataset", "1"], MAX_REPEATS)
MAIN_RUN = (["experiments.vlae", "--epochs", "5", "--batch_size", "32"], 1)


def wall_seconds(argv: list[str], cache_dir: str) -> float:
    """Wall time of one run of `python -m argv` with the compilation cache in `cache_dir`."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir, "PYTHONPATH": REPO}
    env.pop("LVM_JAX_COMPILATION_CACHE", None)
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-m", *argv], env=env, cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - tic


def _quick_run(name: str, workdir: str) -> list[str]:
    return [f"experiments.{name}", "--quick", "--no_progress", "--workdir", workdir]


def _final_neg_elbo(workdir: str) -> str:
    """" (test -ELBO <value> <unit>)" from the run's summary.json; "" when it has none."""
    try:
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
        return (f" (test -ELBO {summary['test_metrics']['neg_elbo']:.4f} "
                f"{summary['units']['neg_elbo']})")
    except (OSError, KeyError, ValueError):
        return ""


def _cold_and_warm(command: str, argv_in, scratch: str, repeats: int) -> list[Row]:
    """Rows of the median cold and warm wall times of `argv_in(workdir name)`."""
    times, notes = {"cold": [], "warm": []}, {"cold": [], "warm": []}
    for _ in range(repeats):
        folder = tempfile.mkdtemp(dir=scratch)
        for kind, seconds in times.items():
            workdir = os.path.join(folder, kind)
            seconds.append(wall_seconds(argv_in(workdir), os.path.join(folder, "cache")))
            notes[kind].append(f"{seconds[-1]:.1f} s{_final_neg_elbo(workdir)}")
    return [Row(benchmark=NAME, model=command, step=f"whole run, {kind} compilation cache",
                batch="", lvm_jax=statistics.median(seconds), unit="s", higher_is_better=False,
                device=device(jax_devices=1),
                note=f"wall time of a fresh process (on the CPU devices the experiment chooses, "
                     f"lvm_jax.cpu_devices); median of {len(seconds)}: "
                     + ", ".join(notes[kind]))
            for kind, seconds in times.items()]


def run(settings: Settings) -> list[Row]:
    repeats = min(settings.repeats, MAX_REPEATS)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in EXPERIMENTS:
            rows += _cold_and_warm(f"python -m experiments.{name} --quick",
                                   lambda workdir, name=name: _quick_run(name, workdir),
                                   scratch, repeats)
        # `evaluate` reads a trained run: a VAE --quick run, trained once with a cache of its own.
        vae_run = os.path.join(scratch, "vae_for_evaluate")
        wall_seconds(_quick_run("vae", vae_run), os.path.join(scratch, "cache_for_evaluate"))
        rows += _cold_and_warm(
            f"python -m experiments.evaluate --num_samples {EVALUATE_SAMPLES} (a VAE --quick run)",
            lambda _: ["experiments.evaluate", "--workdir", vae_run, "--no_progress",
                       "--num_samples", str(EVALUATE_SAMPLES)],
            scratch, repeats)
        for argv, most in (VAE_2D_RUN,) if settings.quick else (VAE_2D_RUN, MAIN_RUN):
            rows += _cold_and_warm(f"python -m {' '.join(argv)}",
                                   lambda workdir, argv=argv: [*argv, "--no_progress",
                                                               "--workdir", workdir],
                                   scratch, min(repeats, most))
    return rows
