"""Progress of a training run: a tqdm bar on a terminal or in a notebook, a plain line now
and then elsewhere.

A text progress bar redrawn after every step fills a log file with one update
per step; when stderr is neither a terminal nor a Jupyter kernel's (where
tqdm draws a widget), the bar is replaced by a line every `interval` seconds.
"""

import sys
import time

from tqdm.auto import tqdm


class Progress:
    """Reports steps done out of `total`, and notes of what the run is doing.

    Args:
      total, initial: steps of the whole run, and those already done (resumed).
      name: shown before each report.
      bar: report the steps (a bar, or periodic lines); notes are printed regardless.
      enabled: False prints nothing at all (every process but the primary).
      interval: seconds between plain lines when there is no bar.
      unit: what a step is called.
    """

    def __init__(self, total: int, initial: int, name: str, bar: bool = True,
                 enabled: bool = True, interval: float = 30.0, unit: str = "step"):
        self.total, self.step, self.name, self.interval = total, initial, name, interval
        self.unit = unit
        self.enabled, self.show_steps = enabled, enabled and bar
        self._bar = None
        if self.show_steps and (sys.stderr.isatty() or "ipykernel" in sys.modules):
            self._bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, desc=name)
        self._last_line = time.monotonic()

    def note(self, message: str) -> None:
        """One line saying what the run is doing now (e.g. compiling) or has done."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def update(self, steps: int, **fields) -> None:
        """Counts `steps` more steps; `fields` (e.g. epoch, loss) are shown beside the count."""
        self.step += steps
        if self._bar is not None:
            self._bar.update(steps)
            self._bar.set_postfix(**fields)
        elif self.show_steps and time.monotonic() - self._last_line >= self.interval:
            self._last_line = time.monotonic()
            self.note(" ".join([f"{self.name}: {self.unit} {self.step}/{self.total}",
                                *(f"{k} {v}" for k, v in fields.items())]))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
