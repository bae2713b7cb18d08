"""One run per workdir: an exclusive OS lock held while a run writes there.

The lock is `fcntl.flock` on <workdir>/.lock, the first file a run writes; the kernel
releases it when the holder exits in any way, SIGKILL included, and the file keeps the
holder's process id for the message a refused run prints. In a multi-host run only the
primary process (the one that writes the run's files) takes it.
"""

import contextlib
import errno
import fcntl
import os

from lvm_jax import files
from lvm_jax.errors import WorkdirError

LOCK_FILE = ".lock"


def check_path(workdir: str) -> str:
    """`workdir`, refused when its absolute path holds a bracket: orbax's checkpoint reader
    (tensorstore) takes it for a pattern and could not read the checkpoints back."""
    if any(c in os.path.abspath(workdir) for c in "[]"):
        raise WorkdirError(f"the workdir {workdir} has a bracket in its path, which orbax's "
                           "checkpoint reader takes for a pattern: choose a path without [ or ].")
    return workdir


@contextlib.contextmanager
def locked(workdir: str, create: bool = True):
    """Holds the exclusive lock of `workdir` for the `with` block; a missing `workdir` is
    created, or with `create=False` left absent and unlocked (a command that only reads a
    run then fails on its own terms).

    Raises:
      WorkdirError: `workdir` is a file, cannot be written, holds a bracket, or another
        process holds it.
    """
    if not files.is_primary() or not (create or os.path.isdir(workdir)):
        yield
        return
    try:
        os.makedirs(check_path(workdir), exist_ok=True)
        lock_file = files.open_no_follow(os.path.join(workdir, LOCK_FILE), "a+")
    except WorkdirError:  # an OSError too
        raise
    except OSError as err:
        problem = {errno.EEXIST: "it exists and is not a directory",
                   errno.ENOTDIR: "a part of its path is a file"}.get(
                       err.errno, files.DISK_ERRORS.get(err.errno, err.strerror))
        raise WorkdirError(f"cannot write into the workdir {workdir}: {problem}. Choose "
                           "another --workdir.") from None
    with lock_file:  # closing the file releases the lock
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            raise WorkdirError(f"the workdir {workdir} is in use by another run (process id "
                               f"{lock_file.read().strip() or 'unknown'}). Wait for it to "
                               "finish, or choose another --workdir.") from None
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        yield
