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
import stat

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
    followed; and refusing, before anything is written, what is not a plain file of its
    own: a hard link (writing would change the other name's file too), a FIFO or a device
    (opened without blocking, so a FIFO cannot hang the run).

    Raises:
      WorkdirError: `path` is a symbolic link, a hard link or no regular file.
    """
    flags = os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    flags |= os.O_RDWR if "+" in mode else os.O_WRONLY
    try:
        fd = os.open(refuse_link(path), flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:  # a link appeared after the check
            refuse_link(path)
        if err.errno == errno.ENXIO:  # a FIFO that no process reads
            raise WorkdirError(f"{path} is not a regular file: remove it, or use another "
                               "--workdir.") from None
        raise
    info = os.fstat(fd)
    problem = ("is not a regular file" if not stat.S_ISREG(info.st_mode) else
               f"has {info.st_nlink} hard links" if info.st_nlink > 1 else None)
    if problem:
        os.close(fd)
        raise WorkdirError(f"{path} {problem}: lvm_jax writes only files of its own. Remove "
                           "it, or use another --workdir.")
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""}))


def refuse_links_in(directory: str, inside: tuple[str, ...] = ()) -> None:
    """Refuses any symbolic link, hard-linked file, FIFO, socket or device among the entries
    of `directory` and of its folders named in `inside` (e.g. "tensorboard"), before a run
    reads or writes anything there (reading a FIFO would hang the run; appending to a hard
    link changes the other name's file): checked when the run starts, not when its last file
    (summary.json, a figure) would be written.

    Raises:
      WorkdirError: naming the first such entry.
    """
    for folder in (directory, *(os.path.join(directory, name) for name in inside)):
        if os.path.isdir(folder):  # each of `inside` is refused first as an entry of `directory`
            for name in sorted(os.listdir(folder)):
                path = refuse_link(os.path.join(folder, name))
                info = os.lstat(path)
                if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                    raise WorkdirError(f"{path} is not a regular file: remove it, or use "
                                       "another --workdir.")
                if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                    raise WorkdirError(f"{path} has {info.st_nlink} hard links: lvm_jax writes "
                                       "only files of its own. Remove it, or use another "
                                       "--workdir.")
