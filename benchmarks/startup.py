"""Whole-run wall time of each experiment's `--quick` run on a cold and on a warm
persistent compilation cache (lvm_jax.compilation_cache), lvm_jax alone.

Each run is a fresh `python -m experiments.<name> --quick` process in a fresh
workdir, so the figures include interpreter start, imports, data, compilation,
training, evaluation, figures and checkpoints. Cold: an empty cache folder (as
a first run after installing); warm: the same command again, which loads every
compiled program from that folder. `repeats` (at most 3) cold/warm pairs per
experiment, each on a new folder; medians are reported.
"""

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


def _cold_and_warm(command: str, argv_in, scratch: str, repeats: int) -> list[Row]:
    """Rows of the median cold and warm wall times of `argv_in(workdir name)`."""
    times = {"cold": [], "warm": []}
    for _ in range(repeats):
        folder = tempfile.mkdtemp(dir=scratch)
        for kind, seconds in times.items():
            seconds.append(wall_seconds(argv_in(os.path.join(folder, kind)),
                                        os.path.join(folder, "cache")))
    return [Row(benchmark=NAME, model=command, step=f"whole run, {kind} compilation cache",
                batch="", lvm_jax=statistics.median(seconds), unit="s", higher_is_better=False,
                device=device(),
                note=f"wall time of a fresh process; median of {len(seconds)}: "
                     + ", ".join(f"{s:.1f}" for s in seconds) + " s")
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
    return rows
