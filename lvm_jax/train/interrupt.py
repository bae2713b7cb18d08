"""Interruptions that save: SIGINT and SIGTERM stop a run at its next step boundary.

Inside `handled()` the first signal only sets the flag `requested()` reads; `fit` reads it
between compiled calls, checkpoints the current step and raises `Interrupted`, which
`experiments.common.run` reports in one line with exit status 128 + the signal number. A
second signal ends the process (command line) or meets the caller's own handlers (a
notebook). Multi-host: `requested()` is a collective, so every host stops at the same
step. The whole behaviour: docs/interruptions.md.
"""

import contextlib
import signal
import threading

import jax
import numpy as np

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []  # the first signal's number, once one has arrived
_active = 0  # nesting depth of `handled`
_after_first: dict = {}  # signal -> the handler a second signal meets


class Interrupted(Exception):
    """A run stopped by a signal after saving what it could; `str` says what was saved.

    Attributes:
      signum: the signal's number; the process exits with status 128 + signum.
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _note(signum, frame) -> None:
    _received.append(signum)
    for sig, handler in _after_first.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def handled(second_ends_process: bool = False):
    """While active, SIGINT and SIGTERM set the flag `requested()` reads instead of ending
    the process. Re-entrant; the previous handlers come back when the outermost block
    exits. Outside the main thread (where Python cannot install handlers) it does nothing.

    Args:
      second_ends_process: after the first signal, a second one takes the default action
        and ends the process at once (a command line's choice); otherwise it meets the
        handlers that were there before (a notebook's KeyboardInterrupt). The outermost
        block decides.
    """
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = None
    if _active == 0:
        previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        _after_first.clear()
        _after_first.update({sig: signal.SIG_DFL for sig in SIGNALS} if second_ends_process
                            else previous)
        _received.clear()
        for sig in SIGNALS:
            signal.signal(sig, _note)
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        if previous is not None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def received() -> int | None:
    """The number of the first signal this process received inside `handled`, or None."""
    return _received[0] if _received else None


def requested() -> int | None:
    """The signal that asks this run to stop, on this process or any other (None if none).

    With several processes, a collective: every process must call it at the same point."""
    if jax.process_count() == 1:
        return received()
    from jax.experimental import multihost_utils  # only multi-host runs need it

    flags = multihost_utils.process_allgather(np.int32(received() or 0))
    return int(np.max(flags)) or None


def name(signum: int) -> str:
    """"SIGINT" for 2."""
    return signal.Signals(signum).name


def check(what: str) -> None:
    """Raises `Interrupted` when a signal arrived (this process only: not a collective),
    its line saying `what` is on disk, e.g. "the run finished and its files are written"."""
    signum = received()
    if signum is not None:
        raise stopped(signum, what)


def stopped(signum: int, what: str) -> Interrupted:
    """The `Interrupted` of `signum`, whose one line is "stopped by SIGINT: <what>"."""
    return Interrupted(signum, f"stopped by {name(signum)}: {what}")
