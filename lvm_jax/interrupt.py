"""Interruptions that save: SIGINT and SIGTERM stop a run at its next step boundary.

Inside `handled()` the first signal only sets the flag `requested()` reads; `fit` reads it
between compiled calls, checkpoints the current step and raises `Interrupted`, which
`experiments.common.run` reports in one line with exit status 128 + the signal number. A
second signal ends the process (command line) or meets the caller's own handlers (a
notebook). docs/interruptions.md.
"""

import contextlib
import signal
import threading

import jax
import numpy as np

SIGNALS = (signal.SIGINT, signal.SIGTERM)

# The first signal's number once one arrived; the handlers a second signal meets; how many
# `handled` blocks are open. Signal handlers can only reach module state.
_received: list[int] = []
_after_first: dict = {}
_depth = [0]


class Interrupted(Exception):
    """A run stopped by signal `signum` after saving what it could; `str` says what was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


def _note(signum, frame) -> None:
    _received.append(signum)
    for sig, handler in _after_first.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def handled(second_ends_process: bool = False):
    """While active, SIGINT and SIGTERM set the flag `requested()` reads instead of ending
    the process; the previous handlers come back when the outermost block exits, which
    decides what a second signal meets: the default action with `second_ends_process` (a
    command line), else the handlers there before (a notebook's KeyboardInterrupt). Outside
    the main thread, where Python installs no handlers, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS} if _depth[0] == 0 else None
    if previous is not None:
        _after_first.clear()
        _after_first.update(dict.fromkeys(SIGNALS, signal.SIG_DFL) if second_ends_process
                            else previous)
        _received.clear()
        for sig in SIGNALS:
            signal.signal(sig, _note)
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)


def received() -> int | None:
    """The number of the first signal this process received inside `handled`, or None."""
    return _received[0] if _received else None


def requested() -> int | None:
    """The signal that asks this run to stop, on this process or any other (None if none):
    with several processes a collective, so that every host stops at the same step."""
    if jax.process_count() == 1:
        return received()
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(received() or 0)))) or None


def stopped(signum: int, what: str) -> Interrupted:
    """The `Interrupted` of `signum`, whose one line is "stopped by SIGINT: <what>"."""
    return Interrupted(signum, f"stopped by {signal.Signals(signum).name}: {what}")


def check(what: str) -> None:
    """Raises `stopped(signal, what)` when a signal arrived (this process only: no collective),
    `what` saying what is on disk, e.g. "the run finished and its files are written"."""
    if received() is not None:
        raise stopped(received(), what)
