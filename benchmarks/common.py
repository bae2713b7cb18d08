"""What every benchmark shares: settings, result rows, timing, and the machine.

Timing protocol (`compare`): each side is a *sampler*, a callable that runs
the work once, waits for all of its outputs, and returns its own wall time in
seconds (so that setup such as initialisation can stay outside the timed
region). lvm_jax's samplers wait with `jax.block_until_ready` on every output;
PyTorch on the CPU is synchronous, so its sampler's work is done when it
returns. PyTorch may come in several configurations (`compare`'s dict, e.g.
"eager" and "torch.compile, channels_last, fused Adam"), each timed at every
thread count. All sides are warmed up first (JIT compilation, torch.compile's
compilations of forward and backward, allocator and oneDNN caches), then timed
in rounds, `repeats` of them, each side once per round in an order shuffled
every round (`shuffled_rounds`, reproducible from the settings' seed), so that
a change in the load of a shared machine, or a side's lingering caches, favour
no side; each side reports its median. Other lvm_jax variants (`also`, e.g. a
reference algorithm) join the same rounds. A measurement of lvm_jax alone
(`measure`, reported in a Row with pytorch=None) keeps the same warm-up and median.

Statistics over processes (`compare_in_processes`): on a shared machine
PyTorch's speed moves more between processes than within one, so a training
step is compared in several fresh processes; each process gives a *paired*
ratio (best PyTorch / lvm_jax, both timed in that process's rounds), and the
reported ratio is the median of these paired ratios with their range (min,
max). A goal is met only when the whole range is at or above it.

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
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import flax
import jax
import jaxlib
import numpy as np

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
      torch_device: where PyTorch runs the training-step comparisons ("cpu", or "cuda" on a
        GPU machine: benchmarks/device_check.sh).
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
    torch_device: str = "cpu"


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
      pytorch_eager: eager PyTorch's figure, in `unit`, where `pytorch` is the best of
        several PyTorch configurations (else None).
      pytorch_config: the best PyTorch configuration, e.g. "torch.compile, channels_last,
        fused Adam, 2 threads" ("" where only one was timed).
      paired_ratio: the median of the per-process paired ratios (`compare_in_processes`),
        lvm_jax's advantage over the best PyTorch configuration; None for a single pairing.
      ratio_range: (min, max) of those per-process ratios.
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
    pytorch_eager: float | None = None
    pytorch_config: str = ""
    paired_ratio: float | None = None
    ratio_range: tuple[float, float] | None = None

    @property
    def ratio(self) -> float | None:
        """lvm_jax's advantage: > 1 means lvm_jax is better (faster, or a lower loss); the
        paired median where there is one, else from the two figures; None without PyTorch."""
        if self.paired_ratio is not None:
            return self.paired_ratio
        if self.pytorch is None:
            return None
        if self.higher_is_better:
            return self.lvm_jax / self.pytorch
        return self.pytorch / self.lvm_jax

    @property
    def goal_met(self) -> bool | None:
        """ratio >= goal; with a range of per-process ratios, the whole range must be."""
        ratio = self.ratio
        if self.goal is None or ratio is None:
            return None
        return (self.ratio_range[0] if self.ratio_range else ratio) >= self.goal

    def as_dict(self) -> dict:
        """The row as JSON values (None for an absent figure, the range as a list)."""
        met, ratio = self.goal_met, self.ratio

        def number(value):
            return None if value is None else float(value)

        return {**dataclasses.asdict(self), "lvm_jax": float(self.lvm_jax),
                "pytorch": number(self.pytorch), "pytorch_eager": number(self.pytorch_eager),
                "paired_ratio": number(self.paired_ratio),
                "ratio_range": None if self.ratio_range is None else [
                    float(r) for r in self.ratio_range],
                "ratio": number(ratio), "goal_met": None if met is None else bool(met)}


def device(torch_threads: int | None = None, jax_devices: int | None = None,
           torch_device: str = "cpu") -> str:
    """Where both sides ran, e.g. "cpu x2 as 8 jax devices (torch 1 thread)": lvm_jax on
    `jax_devices` devices (default all of JAX's), PyTorch on `torch_device`."""
    jax_device = jax.devices()[0]
    threads = "" if torch_threads is None else f" (torch {torch_threads} thread" + (
        "s)" if torch_threads > 1 else ")")
    if jax_device.platform == "cpu":
        split = jax_devices or len(jax.devices())
        return f"cpu x{NUM_CORES}" + (f" as {split} jax devices" if split > 1 else "") + threads
    torch_side = (f"torch {torch_device}" if torch_device != "cpu"
                  else f"torch cpu x{NUM_CORES}{threads}")
    return f"jax {len(jax.devices())} x {jax_device.device_kind}; {torch_side}"


def timer(fn: Callable[[], object], number: int = 1) -> Sampler:
    """A sampler timing `number` calls of `fn` (which must block on its result):
    returns mean seconds per call."""

    def sample() -> float:
        tic = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - tic) / number

    return sample


EAGER = "eager"  # the name of PyTorch's default configuration in `compare`


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Median seconds of each side.

    Attributes:
      jax_seconds: lvm_jax's median.
      torch_seconds: the best PyTorch configuration's median at its best thread count.
      torch_threads: that thread count.
      torch_by_threads: {configuration: {threads: median}} at every one tried.
      also_seconds: the median of each of `compare`'s other lvm_jax samplers.
      torch_config: the name of the best PyTorch configuration.
      torch_by_config: {configuration: median at its best thread count}.
      process_ratios: the paired ratio (best PyTorch seconds / lvm_jax seconds) of each
        process (one for `compare`).
      eager_ratios: the same for eager PyTorch ("eager" configuration).
      remarks: sentences for the row's note, e.g. why torch.compile was not timed.
    """

    jax_seconds: float
    torch_seconds: float
    torch_threads: int
    torch_by_threads: dict[str, dict[int, float]]
    also_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    torch_config: str = EAGER
    torch_by_config: dict[str, float] = dataclasses.field(default_factory=dict)
    process_ratios: tuple[float, ...] = ()
    eager_ratios: tuple[float, ...] = ()
    remarks: tuple[str, ...] = ()

    def torch_note(self) -> str:
        """E.g. "PyTorch 2 threads: 1.2 s, 1 thread: 0.9 s", each configuration's thread counts
        after its name where there are several."""
        def threads(by_threads):
            return ", ".join(f"{n} thread{'s' if n > 1 else ''}: {format_seconds(s)}"
                             for n, s in by_threads.items())

        if len(self.torch_by_threads) == 1:
            return "PyTorch " + threads(next(iter(self.torch_by_threads.values())))
        return "PyTorch " + "; ".join(f"{config} {threads(by_threads)}"
                                      for config, by_threads in self.torch_by_threads.items())

    def processes_note(self) -> str:
        """E.g. "; paired ratio in each of 3 processes: 0.95x, 1.02x, 0.99x" ("" for one)."""
        if len(self.process_ratios) < 2:
            return ""
        return (f"; paired ratio in each of {len(self.process_ratios)} processes: "
                + ", ".join(f"{r:.2f}x" for r in self.process_ratios))

    def throughput_fields(self, work: float, torch_device: str = "cpu") -> dict:
        """The Row fields of a throughput comparison (`work` units per call, e.g. images per
        step, PyTorch on `torch_device`): lvm_jax, pytorch (best configuration),
        pytorch_eager, pytorch_config, paired_ratio and ratio_range (over the processes) and
        device."""
        eager = self.torch_by_config.get(EAGER)
        median, ratio_range = paired(self.process_ratios)
        threads = f"{self.torch_threads} thread{'s' if self.torch_threads > 1 else ''}"
        return dict(lvm_jax=work / self.jax_seconds, pytorch=work / self.torch_seconds,
                    pytorch_eager=None if eager is None else work / eager,
                    pytorch_config=f"{self.torch_config}, {threads}",
                    paired_ratio=median, ratio_range=ratio_range,
                    device=device(self.torch_threads, torch_device=torch_device))


def paired(ratios) -> tuple[float | None, tuple[float, float] | None]:
    """(median, (min, max)) of per-process paired ratios; (None, None) for none."""
    if not ratios:
        return None, None
    return statistics.median(ratios), (min(ratios), max(ratios))


class SameKeyDraws:
    """Timers of samplers of one distribution whose n-th calls all draw with the n-th key,
    whatever order `compare` shuffles them into; `latest[name]` holds each sampler's latest
    draw as NumPy, so that after the same number of calls their outputs compare."""

    def __init__(self, seed: int, max_calls: int = 1000):
        self.keys = jax.random.split(jax.random.key(seed), max_calls)
        self.calls: dict[str, int] = {}
        self.latest: dict[str, np.ndarray] = {}

    def timer(self, name: str, draw: Callable[[jax.Array], jax.Array]) -> Sampler:
        """A sampler of one call `draw(key)`, waited for, under `name`."""

        def sample():
            calls = self.calls.get(name, 0)
            self.latest[name] = np.asarray(jax.block_until_ready(draw(self.keys[calls])))
            self.calls[name] = calls + 1

        return timer(sample)


def format_seconds(seconds: float) -> str:
    """E.g. "1.23 s", "45.6 ms"."""
    return f"{seconds:.3g} s" if seconds >= 1 else f"{1e3 * seconds:.3g} ms"


# A PyTorch thread count this many times slower than the best one so far is not
# timed further (its figure so far is kept for the note): on a busy machine a
# multi-threaded run can be 10x slower and would dominate the harness's time.
_DROP_SLOWER_THAN = 2.0


def shuffled_rounds(sides: list[str], rounds: int, seed: int) -> list[list[str]]:
    """`rounds` orders of `sides`, each shuffled by one `random.Random(seed)`: a new order
    every round, the same orders for the same seed."""
    rng = random.Random(seed)
    return [rng.sample(sides, len(sides)) for _ in range(rounds)]


def compare(jax_sample: Sampler, torch_sample: Sampler | dict[str, Sampler], settings: Settings,
            warmup: int = 2, also: dict[str, Sampler] | None = None) -> Comparison:
    """Warms up, then times lvm_jax's sampler, the named lvm_jax samplers `also` and PyTorch's
    sampler (or each of a dict {configuration name: sampler}, at each thread count) once per
    round, in an order shuffled every round (see the module docstring)."""
    torch_samples = torch_sample if isinstance(torch_sample, dict) else {EAGER: torch_sample}
    jax_samples = {"lvm_jax": jax_sample, **(also or {})}
    sides = [f"jax:{name}" for name in jax_samples] + [f"torch:{c}" for c in torch_samples]
    jax_times = {name: [] for name in jax_samples}
    warmup_times = {c: {n: [] for n in settings.torch_threads} for c in torch_samples}
    torch_times = {c: {n: [] for n in settings.torch_threads} for c in torch_samples}

    def estimate(config: str, threads: int) -> float:
        return statistics.median(torch_times[config][threads] or warmup_times[config][threads]
                                 or [0.0])

    import torch  # here, not at the top: benchmarks.report reads results without PyTorch

    def time_torch(config: str, into: dict):
        best = min((estimate(config, n) for n in settings.torch_threads
                    if estimate(config, n) > 0), default=0.0)
        for threads in settings.torch_threads:
            if best and estimate(config, threads) > _DROP_SLOWER_THAN * best:
                continue
            torch.set_num_threads(threads)
            into[config][threads].append(torch_samples[config]())
        torch.set_num_threads(NUM_CORES)

    orders = shuffled_rounds(sides, warmup + settings.repeats, settings.seed)
    for i, order in enumerate(orders):
        timed = i >= warmup
        for side in order:
            kind, name = side.split(":", 1)
            if kind == "torch":
                time_torch(name, torch_times if timed else warmup_times)
            elif timed:
                jax_times[name].append(jax_samples[name]())
            else:
                jax_samples[name]()
    by_threads = {c: {n: estimate(c, n) for n in settings.torch_threads} for c in torch_samples}
    jax_seconds = statistics.median(jax_times.pop("lvm_jax"))
    return _comparison(jax_seconds, by_threads,
                       {name: statistics.median(times) for name, times in jax_times.items()})


def _comparison(jax_seconds: float, by_threads: dict[str, dict[int, float]],
                also_seconds: dict[str, float], process_ratios=None, eager_ratios=None,
                remarks: tuple[str, ...] = ()) -> Comparison:
    """The Comparison of these medians: the best configuration at its best thread count;
    by default one pairing, whose ratios these medians give."""
    by_config = {c: min(times.values()) for c, times in by_threads.items()}
    config = min(by_config, key=by_config.get)
    threads = min(by_threads[config], key=by_threads[config].get)
    if process_ratios is None:
        process_ratios = (by_config[config] / jax_seconds,)
        eager_ratios = (by_config[EAGER] / jax_seconds,) if EAGER in by_config else ()
    return Comparison(jax_seconds, by_config[config], threads, by_threads, also_seconds,
                      config, by_config, tuple(process_ratios), tuple(eager_ratios), remarks)


def compare_in_processes(module: str, function: str, args: list, settings: Settings) -> Comparison:
    """The Comparison `module.function(*args, settings)` returns, measured in
    `settings.processes` fresh processes one after another (`benchmarks.worker`), or in this
    one if that is 1. PyTorch's step time moves by 10-25% from one process to the next on a
    shared machine, more than within one process: each side's figure is the median over the
    processes of its medians, and `process_ratios` / `eager_ratios` hold the paired ratio of
    each process (the reported ratio is their median, `paired`)."""
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
    return merge_processes(results)


def merge_processes(results: list[dict]) -> Comparison:
    """One Comparison from several processes' (as JSON, `dataclasses.asdict`): medians over
    the processes of each figure, and every process's paired ratios."""
    by_threads = {config: {int(n): statistics.median(r["torch_by_threads"][config][n]
                                                     for r in results)
                           for n in times}
                  for config, times in results[0]["torch_by_threads"].items()}
    return _comparison(statistics.median(r["jax_seconds"] for r in results), by_threads,
                       {name: statistics.median(r["also_seconds"][name] for r in results)
                        for name in results[0]["also_seconds"]},
                       [r for result in results for r in result["process_ratios"]],
                       [r for result in results for r in result["eager_ratios"]],
                       tuple(dict.fromkeys(m for result in results for m in result["remarks"])))


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
        "torch_cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
