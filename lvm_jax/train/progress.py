"""Progress of a training run: a tqdm bar on a terminal or in a notebook, a plain line now
and then elsewhere, both with the rate and the time left.

A text progress bar redrawn after every step fills a log file with one update
per step; when stderr is neither a terminal nor a Jupyter kernel's (where
tqdm draws a widget), the bar is replaced by a line every `interval` seconds:

    vqvae2: step 230/940, 0.52 steps/s, 22m 45s left; run (stage 1 of 3) ~1h 23m left

The rate leaves out the first call, which waits for compilation. A run of several stages
(the VQ-VAE's and its priors', the MLP-VAE studies' variants) declares them with `planned`;
each stage's progress then also estimates the time the whole run has left: this stage's,
plus the steps of the stages after it at this stage's rate (their own rates are unknown
until they run: a prior's steps are usually faster than its VQ-VAE's, so the estimate
errs long).
"""

import contextlib
import sys
import time

from tqdm.auto import tqdm

# The stages of the run being trained, in order: {progress name: steps}, set by `planned`.
_plan: dict[str, int] = {}


@contextlib.contextmanager
def planned(stages: dict[str, int]):
    """Declares, for the block, the stages a run trains in order ({name: steps}, each name
    the `Progress` name of its stage: its workdir's base name), so that each stage's
    progress estimates the time the whole run has left."""
    _plan.clear()
    _plan.update(stages)
    try:
        yield
    finally:
        _plan.clear()


def duration(seconds: float) -> str:
    """"1h 05m", "3m 07s", "12s"."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """Reports steps done out of `total`, their rate and the time left, and notes of what the
    run is doing.

    Args:
      total, initial: steps of the whole stage, and those already done (resumed).
      name: shown before each report; the stage's name in a `planned` run.
      bar: report the steps (a bar, or periodic lines); notes are printed regardless.
      enabled: False prints nothing at all (every process but the primary).
      interval: seconds between plain lines when there is no bar.
      unit: what a step is called.
    """

    def __init__(self, total: int, initial: int, name: str, bar: bool = True,
                 enabled: bool = True, interval: float = 10.0, unit: str = "step"):
        self.total, self.step, self.name, self.interval = total, initial, name, interval
        self.unit = unit
        self.enabled, self.show_steps = enabled, enabled and bar
        self._bar = None
        if self.show_steps and (sys.stderr.isatty() or "ipykernel" in sys.modules):
            self._bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, desc=name)
        self._last_line = time.monotonic()
        self._timed_from = None  # (step, time) after the first call, which compiles

    def note(self, message: str) -> None:
        """One line saying what the run is doing now (e.g. compiling) or has done."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def rate(self) -> float | None:
        """Steps per second since the first call, or None before a second one."""
        if self._timed_from is None:
            return None
        step, since = self._timed_from
        seconds = time.monotonic() - since
        return (self.step - step) / seconds if self.step > step and seconds > 0 else None

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
        if self._timed_from is None:
            self._timed_from = (self.step, time.monotonic())
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
        rate = self.rate()
        if rate:
            line += (f", {rate:.3g} {self.unit}s/s, "
                     f"{duration((self.total - self.step) / rate)} left")
            run_left = self.run_left(rate)
            line += f"; {run_left}" if run_left else ""
        shown = ", ".join(f"{k} {v}" for k, v in fields.items())
        return f"{line} ({shown})" if shown else line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
