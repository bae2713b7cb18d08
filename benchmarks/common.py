"""What every benchmark shares: settings, result rows, timing, and the machine.

Timing protocol (`compare`): each side is a *sampler*, a callable that runs
the work once and returns its own wall time in seconds (so that setup such as
initialisation can stay outside the timed region). Both sides are warmed up
first (JIT compilation, allocator and oneDNN caches), then timed in
alternation, lvm_jax then PyTorch, `repeats` times, so that a change in the
load of a shared machine hits both alike; each side reports its median.
Other lvm_jax variants (`also`, e.g. a reference algorithm) join the same
rounds, after lvm_jax's sampler.
A measurement of lvm_jax alone (`measure`, reported in a Row with
pytorch=None) keeps the same warm-up and median. `compare_in_processes` repeats a
comparison in several fresh processes and reports the median over them: on a shared
machine PyTorch's speed moves more between processes than within one.

Threads: XLA:CPU uses all cores by default. PyTorch is timed with
`torch.set_num_threads(n)` for each n in `Settings.torch_threads` (default:
the number of cores, then 1) and the faster is reported, with its thread
count: on a busy machine OpenMP's barriers can make the multi-threaded run
many times slower than a single thread, and the comparison should be against
PyTorch at its best.
"""

import dataclasses
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import flax
import jax
import jaxlib

NUM_CORES = len(os.sched_getaffinity(0))

Sampler = Callable[[], float]


def default_torch_threads() -> tuple[int, ...]:
    return (NUM_CORES, 1) if NUM_CORES > 1 else (1,)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Options of one harness run.

    Attributes:
      quick: a smoke test: fewer repeats and smaller workloads (rows say so).
      quality_epochs: epochs of the image-VAE quality comparison.
      repeats: timed repetitions per side; medians are reported.
      seed: seeds data order, initialisation and noise on both sides.
      torch_threads: PyTorch intra-op thread counts to try; the fastest is reported.
      processes: fresh processes per training-step comparison (`compare_in_processes`).
      dtype: the compute dtype of lvm_jax's models in the training-step comparisons
        ("bfloat16" for accelerators); parameters and PyTorch stay float32.
    """

    quick: bool = False
    quality_epochs: int = 5
    repeats: int = 5
    seed: int = 0
    torch_threads: tuple[int, ...] = dataclasses.field(default_factory=default_torch_threads)
    processes: int = 1
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One line of the results table (fields are keyword-only).

    Attributes:
      benchmark: registry name of the benchmark that produced it.
      model, step, batch: what was measured.
      lvm_jax, pytorch: the two measurements, in `unit`; pytorch is None for a
        measurement of lvm_jax alone (no PyTorch counterpart), whose ratio is None.
      unit: e.g. "images/s", "s", "nats per example".
      higher_is_better: direction of the unit; sets the direction of `ratio`.
      device: where each side ran, with PyTorch's thread count.
      goal: the least `ratio` the project aims for (e.g. 20.0), or None.
      note: what exactly was measured, in a sentence.
    """

    benchmark: str
    model: str
    step: str
    batch: int | str
    lvm_jax: float
    pytorch: float | None = None
    unit: str
    higher_is_better: bool
    device: str
    goal: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """lvm_jax's advantage: > 1 means lvm_jax is better (faster, or a lower loss);
        None without a PyTorch figure."""
        if self.pytorch is None:
            return None
        if self.higher_is_better:
            return self.lvm_jax / self.pytorch
        return self.pytorch / self.lvm_jax

    @property
    def goal_met(self) -> bool | None:
        ratio = self.ratio
        return None if self.goal is None or ratio is None else ratio >= self.goal

    def as_dict(self) -> dict:
        """The row as JSON values (None for an absent PyTorch figure and its ratio)."""
        met, ratio = self.goal_met, self.ratio
        return {**dataclasses.asdict(self), "lvm_jax": float(self.lvm_jax),
                "pytorch": None if self.pytorch is None else float(self.pytorch),
                "ratio": None if ratio is None else float(ratio),
                "goal_met": None if met is None else bool(met)}


def device(torch_threads: int | None = None, jax_devices: int | None = None) -> str:
    """Where both sides ran, e.g. "cpu x2 as 8 jax devices (torch 1 thread)": lvm_jax on
    `jax_devices` devices (default all of JAX's)."""
    jax_device = jax.devices()[0]
    threads = "" if torch_threads is None else f" (torch {torch_threads} thread" + (
        "s)" if torch_threads > 1 else ")")
    if jax_device.platform == "cpu":
        split = jax_devices or len(jax.devices())
        return f"cpu x{NUM_CORES}" + (f" as {split} jax devices" if split > 1 else "") + threads
    return f"jax {len(jax.devices())} x {jax_device.device_kind}; torch cpu x{NUM_CORES}{threads}"


def timer(fn: Callable[[], object], number: int = 1) -> Sampler:
    """A sampler timing `number` calls of `fn` (which must block on its result):
    returns mean seconds per call."""

    def sample() -> float:
        tic = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - tic) / number

    return sample


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Median seconds of each side; `torch_threads` is the thread count reported,
    `torch_by_threads` the median at every thread count tried, `also_seconds` the
    median of each of `compare`'s other lvm_jax samplers, `process_ratios` the ratio
    (PyTorch seconds / lvm_jax seconds) of each process of `compare_in_processes`."""

    jax_seconds: float
    torch_seconds: float
    torch_threads: int
    torch_by_threads: dict[int, float]
    also_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    process_ratios: tuple[float, ...] = ()

    def torch_note(self) -> str:
        """E.g. "PyTorch 2 threads: 1.2 s, 1 thread: 0.9 s"."""
        return "PyTorch " + ", ".join(f"{n} thread{'s' if n > 1 else ''}: {format_seconds(s)}"
                                      for n, s in self.torch_by_threads.items())

    def processes_note(self) -> str:
        """E.g. "; ratio in each of 3 processes: 0.95x, 1.02x, 0.99x" ("" for one process)."""
        if not self.process_ratios:
            return ""
        return (f"; ratio in each of {len(self.process_ratios)} processes: "
                + ", ".join(f"{r:.2f}x" for r in self.process_ratios))


def format_seconds(seconds: float) -> str:
    """E.g. "1.23 s", "45.6 ms"."""
    return f"{seconds:.3g} s" if seconds >= 1 else f"{1e3 * seconds:.3g} ms"


# A PyTorch thread count this many times slower than the best one so far is not
# timed further (its figure so far is kept for the note): on a busy machine a
# multi-threaded run can be 10x slower and would dominate the harness's time.
_DROP_SLOWER_THAN = 2.0


def compare(jax_sample: Sampler, torch_sample: Sampler, settings: Settings,
            warmup: int = 2, also: dict[str, Sampler] | None = None) -> Comparison:
    """Warms up, then times both samplers in alternation (see the module docstring), and
    the named lvm_jax samplers `also` after `jax_sample` in every round."""
    also = also or {}
    also_times = {name: [] for name in also}
    warmup_times = {threads: [] for threads in settings.torch_threads}
    torch_times = {threads: [] for threads in settings.torch_threads}

    def estimate(threads: int) -> float:
        return statistics.median(torch_times[threads] or warmup_times[threads] or [0.0])

    import torch  # here, not at the top: benchmarks.report reads results without PyTorch

    def time_torch(into: dict):
        best = min((estimate(n) for n in settings.torch_threads if estimate(n) > 0),
                   default=0.0)
        for threads in settings.torch_threads:
            if best and estimate(threads) > _DROP_SLOWER_THAN * best:
                continue
            torch.set_num_threads(threads)
            into[threads].append(torch_sample())
        torch.set_num_threads(NUM_CORES)

    for _ in range(warmup):
        jax_sample()
        for sample in also.values():
            sample()
        time_torch(warmup_times)
    jax_times = []
    for _ in range(settings.repeats):
        jax_times.append(jax_sample())
        for name, sample in also.items():
            also_times[name].append(sample())
        time_torch(torch_times)
    by_threads = {threads: estimate(threads) for threads in settings.torch_threads}
    best = min(by_threads, key=by_threads.get)
    return Comparison(statistics.median(jax_times), by_threads[best], best, by_threads,
                      {name: statistics.median(times) for name, times in also_times.items()})


def compare_in_processes(module: str, function: str, args: list, settings: Settings) -> Comparison:
    """The Comparison `module.function(*args, settings)` returns, measured in
    `settings.processes` fresh processes one after another (`benchmarks.worker`), or in this
    one if that is 1. PyTorch's step time moves by 10-25% from one process to the next on a
    shared machine, more than within one process: each side reports the median over the
    processes of its medians, and `process_ratios` the ratio in each."""
    if settings.processes == 1:
        return getattr(importlib.import_module(module), function)(*args, settings)
    spec = json.dumps([module, function, args, dataclasses.asdict(settings)])
    results = []
    for _ in range(settings.processes):
        done = subprocess.run([sys.executable, "-m", "benchmarks.worker", spec],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"a benchmarks.worker process failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.splitlines()[-1]))
    by_threads = {int(n): statistics.median(r["torch_by_threads"][n] for r in results)
                  for n in results[0]["torch_by_threads"]}
    best = min(by_threads, key=by_threads.get)
    return Comparison(statistics.median(r["jax_seconds"] for r in results), by_threads[best],
                      best, by_threads,
                      process_ratios=tuple(r["torch_seconds"] / r["jax_seconds"] for r in results))


def measure(sample: Sampler, settings: Settings, warmup: int = 2) -> float:
    """Median seconds of `sample` after `warmup` calls: `compare`'s protocol for a
    measurement of lvm_jax alone (a row without a PyTorch side)."""
    for _ in range(warmup):
        sample()
    return statistics.median(sample() for _ in range(settings.repeats))


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or the platform's description."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine and software the table was measured with."""
    import torch

    return {
        "cpu": cpu_model(),
        "cores": NUM_CORES,
        "load_average_1min": os.getloadavg()[0],
        "jax_devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
