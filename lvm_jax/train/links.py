"""Writes that never follow a symbolic link out of the workdir.

A link where a run's file or folder should be (a `.lock`, `metrics.csv` or
`checkpoints/<step>` pointing elsewhere, perhaps outside the workdir) would make
the run truncate, overwrite or delete its target. Every write of the library
checks its destination first and opens files with O_NOFOLLOW, so a link that
appears in between is refused by the kernel too; a link is reported in one line
(`WorkdirError`) and nothing is written.
"""

import errno
import os

from lvm_jax.errors import WorkdirError


def refuse_link(path: str) -> str:
    """`path`, after checking that it is not a symbolic link (the workdir itself may be one:
    the user chose it; the files and folders a run makes inside it may not).

    Raises:
      WorkdirError: it is a link (nothing is written through it).
    """
    if os.path.islink(path):
        raise WorkdirError(f"{path} is a symbolic link (to {os.readlink(path)}): lvm_jax "
                           "writes nothing through a link. Remove the link, or use another "
                           "--workdir.")
    return path


def open_no_follow(path: str, mode: str):
    """open(`path`, `mode`) for writing ("a", "ab", "a+"), refusing a link at `path` in the
    same system call as the open (O_NOFOLLOW), so that no link put there in between is
    followed."""
    flags = os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_RDWR if "+" in mode else os.O_WRONLY
    try:
        fd = os.open(refuse_link(path), flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:  # a link appeared after the check
            refuse_link(path)
        raise
    return os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""}))


def refuse_links_in(directory: str, inside: tuple[str, ...] = ()) -> None:
    """Refuses any symbolic link among the entries of `directory` and of its folders named in
    `inside` (e.g. "tensorboard"), before a run writes anything there: checked when the run
    starts, not when its last file (summary.json, a figure) would be written.

    Raises:
      WorkdirError: naming the first link found.
    """
    for folder in (directory, *(os.path.join(directory, name) for name in inside)):
        if os.path.isdir(folder):  # each of `inside` is refused first as an entry of `directory`
            for name in sorted(os.listdir(folder)):
                refuse_link(os.path.join(folder, name))
