"""Progress of a training run: a tqdm bar on a terminal or in a notebook, elsewhere a plain
line every `interval` seconds (a bar redrawn every step would fill a log file), both with
the rate and the time left:

    vqvae2: step 230/940, 0.52 steps/s, 22m 45s left; run (stage 1 of 3) ~1h 23m left

The rate leaves out the first call, which waits for compilation. A run of several stages
declares them with `planned`; each stage then also estimates the time the whole run has
left, counting the later stages' steps at this stage's rate (so it errs long: a prior's
steps are faster than its VQ-VAE's). `metrics_line` and `units_line` are the epoch lines a
run prints between the reports.
"""

import contextlib
import sys
import time
from collections.abc import Mapping

from tqdm.auto import tqdm

# The stages of the run being trained, in order: {progress name: steps}, set by `planned`.
_plan: dict[str, int] = {}


@contextlib.contextmanager
def planned(stages: dict[str, int]):
    """Declares, for the block, the stages a run trains in order ({name: steps}, each name
    its stage's `Progress` name: its workdir's base name)."""
    _plan.clear()
    _plan.update(stages)
    try:
        yield
    finally:
        _plan.clear()


def duration(seconds: float) -> str:
    """"1h 05m", "3m 07s", "12s"."""
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """Reports the steps done of `total` (`initial` done before: resumed), their rate and the
    time left, and notes of what the run does. `bar=False` reports notes only, `enabled=False`
    nothing (every process but the primary); `name` precedes each report."""

    def __init__(self, total: int, initial: int, name: str, bar: bool = True,
                 enabled: bool = True, interval: float = 10.0, unit: str = "step"):
        self.total, self.step, self.name, self.interval, self.unit = (total, initial, name,
                                                                      interval, unit)
        self.enabled, self.show_steps = enabled, enabled and bar
        self._bar = None
        if self.show_steps and (sys.stderr.isatty() or "ipykernel" in sys.modules):
            self._bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, desc=name)
        self._last_line = time.monotonic()
        self._timed_from = None  # (step, time) after the first call, which compiles

    def note(self, message: str) -> None:
        """One line saying what the run is doing now (e.g. compiling) or has done."""
        if self._bar is not None:
            self._bar.write(message)
        elif self.enabled:
            print(message, flush=True)

    def run_left(self, rate: float | None) -> str | None:
        """"run (stage 1 of 3) ~1h 23m left" in a `planned` run of several stages, at `rate`
        steps per second; else None."""
        if not rate or self.name not in _plan or len(_plan) < 2:
            return None
        names = list(_plan)
        later = sum(_plan[name] for name in names[names.index(self.name) + 1:])
        return (f"run (stage {names.index(self.name) + 1} of {len(names)}) "
                f"~{duration((self.total - self.step + later) / rate)} left")

    def update(self, steps: int, **fields) -> None:
        """Counts `steps` more steps; `fields` (e.g. epoch, loss) are shown beside the count."""
        self.step += steps
        self._timed_from = self._timed_from or (self.step, time.monotonic())
        if self._bar is not None:
            self._bar.update(steps)
            run_left = self.run_left(self._bar.format_dict.get("rate"))
            self._bar.set_postfix(**fields, **({"run": run_left[4:]} if run_left else {}))
        elif self.show_steps and time.monotonic() - self._last_line >= self.interval:
            self._last_line = time.monotonic()
            self.note(self._line(fields))

    def _line(self, fields: dict) -> str:
        """"vqvae2: step 230/940, 0.52 steps/s, 22m 45s left; run (stage 1 of 3) ~1h 23m
        left (epoch 1, loss 0.93)"."""
        line = f"{self.name}: {self.unit} {self.step}/{self.total}"
        done, seconds = self.step - self._timed_from[0], time.monotonic() - self._timed_from[1]
        if done > 0 and seconds > 0:
            rate = done / seconds
            line += f", {rate:.3g} {self.unit}s/s, {duration((self.total - self.step) / rate)} left"
            line += f"; {self.run_left(rate)}" if self.run_left(rate) else ""
        shown = ", ".join(f"{k} {v}" for k, v in fields.items())
        return f"{line} ({shown})" if shown else line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# The longest line of a run's notes (epoch lines and the units line wrap before it).
LINE_WIDTH = 160


def metrics_line(prefix: str, metrics: dict[str, float]) -> str:
    """`prefix` then "kl 12.6177, recon 986.1637": each metric and its value, with no unit
    (`units_line` names them once), wrapped between metrics into lines shorter than
    LINE_WIDTH."""
    items = [f"{name} {value:.4f}" for name, value in metrics.items()]
    lines = [prefix + items[0]]
    for item in items[1:]:
        if len(lines[-1]) + len(", ") + len(item) + len(",") < LINE_WIDTH:  # room for a comma
            lines[-1] += ", " + item
        else:
            lines[-1] += ","
            lines.append("    " + item)
    return "\n".join(lines)


def units_line(names, units: Mapping[str, str]) -> str | None:
    """"units: kl, recon in nats per example; ...": the metrics `names` grouped by their whole
    unit in `units` (never cut: its qualifiers say what the number is), printed once before
    the epoch lines; when one line would not be shorter than LINE_WIDTH, "units:" then a
    line "  kl, recon: nats per example" per unit. None when no metric has a unit."""
    groups = {}
    for name in names:
        unit = units.get(name)
        if unit:
            groups.setdefault(unit, []).append(name)
    if not groups:
        return None
    line = "units: " + "; ".join(f"{', '.join(group)} in {unit}" for unit, group in groups.items())
    if len(line) < LINE_WIDTH:
        return line
    return "\n  ".join(["units:", *(f"{', '.join(group)}: {unit}" for unit, group in groups.items())])

