"""One run per workdir: an exclusive OS lock held while a run writes there.

The lock is `fcntl.flock` on <workdir>/.lock. The kernel releases it when the
holding process exits in any way, SIGKILL included, so a dead run never
leaves a stale lock; the file keeps the holder's process id for the message
a refused run prints. In a multi-host run only the primary process (the one
that writes the run's files) takes it, so the other hosts are never refused.
A `.lock` that is a symbolic link is refused before anything is written
(`links.open_no_follow`): it would truncate its target.
Within one process the lock is re-entrant: an experiment may hold its workdir
while `fit` locks the same directory.
"""

import contextlib
import errno
import fcntl
import os

from lvm_jax.errors import WorkdirError
from lvm_jax.train import records
from lvm_jax.train.links import open_no_follow

LOCK_FILE = ".lock"

_held: dict[str, list] = {}  # real path -> [open lock file, nesting depth]


def _open_locked(directory: str, shown: str):
    try:
        os.makedirs(directory, exist_ok=True)
        lock_file = open_no_follow(os.path.join(directory, LOCK_FILE), "a+")
    except WorkdirError:
        raise
    except OSError as err:
        problem = {errno.EEXIST: "it exists and is not a directory",
                   errno.ENOTDIR: "a part of its path is a file",
                   errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                   errno.EROFS: "the file system is read-only"}.get(err.errno, err.strerror)
        raise WorkdirError(f"cannot write into the workdir {shown}: {problem}. Choose "
                           "another --workdir.") from err
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise WorkdirError(f"the workdir {shown} is in use by another run (process id "
                           f"{holder}). Wait for it to finish, or choose another --workdir."
                           ) from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file


@contextlib.contextmanager
def locked(workdir: str, create: bool = True):
    """Holds the exclusive lock of `workdir` for the `with` block.

    A missing `workdir` is created, or with `create=False` left absent and unlocked:
    a command that only reads a run then fails on its own terms.

    Raises:
      WorkdirError: `workdir` is a file, cannot be written, or another process holds it.
    """
    if not records.is_primary() or not (create or os.path.isdir(workdir)):
        yield
        return
    key = os.path.realpath(workdir)
    if key not in _held:
        _held[key] = [_open_locked(key, workdir), 0]
    _held[key][1] += 1
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            _held.pop(key)[0].close()  # closing the file releases the lock
