"""What a run writes besides checkpoints: metrics.csv, config.json, summary.json, and the
TensorBoard events of tensorboard/ (the scalars of metrics.csv and the run's figures).

Every file is replaced atomically (write to a temporary file, then rename), so
an interrupted run never leaves one half-written, and gets the permissions of
a plain `open` under the process umask (usually 0644), so the team can read a
shared workdir. In a multi-host run every process computes the same metrics
and only process 0 writes them (`is_primary`).

JSON files hold non-finite floats as `Infinity`, `-Infinity` and `NaN`, the
tokens Python's json module reads back, so every value round-trips.

Nothing is written through a symbolic link: a link where a run's file or folder
should be (put there by someone else, perhaps to a file outside the workdir) is
refused in one line (`WorkdirError`) before anything is written. A record read
back is checked before it is trusted (`read_record`): a file that is not the
JSON object it should be is a one-line `RecordError` naming it. A full disk, a
read-only file system or a refused permission while writing is reported as the
path and its cause (`disk_error`), not as the traceback of the call that met it.
"""

import csv
import errno
import functools
import hashlib
import inspect
import io
import json
import logging
import os
import re
import socket
import tempfile
import weakref

import jax
import numpy as np
from PIL import Image

from lvm_jax.errors import RecordError, UserError, WorkdirError
from lvm_jax.train.events import EventFile, drop_events_after
from lvm_jax.train.links import open_no_follow, refuse_link

# Where a run's TensorBoard events go, inside its workdir: `tensorboard --logdir runs/`.
TENSORBOARD_DIR = "tensorboard"


def is_primary() -> bool:
    """Whether this process writes the run's files: always on one host, process 0 of several."""
    return jax.process_index() == 0


def primary_only(save):
    """Decorates a function that writes the file named by its `path` argument: on every
    process but the primary it writes nothing and returns `path`."""
    signature = inspect.signature(save)

    @functools.wraps(save)
    def wrapper(*args, **kwargs):
        if is_primary():
            return save(*args, **kwargs)
        return signature.bind(*args, **kwargs).arguments["path"]

    return wrapper


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


# The errors of a write that the user fixes outside the program (free space, remount read-
# write, grant permission); the run then resumes from its last checkpoint.
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}


# How tensorstore (orbax's writer) reports an OSError: in the text of a ValueError.
_TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def _os_error(err: BaseException) -> tuple[int, str | None, str] | None:
    """(errno, path or None, message) of `err` if it is an OSError, or tensorstore's text of
    one; else None."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno, err.filename, err.strerror
    found = _TENSORSTORE_OS_ERROR.search(str(err))
    if found:
        path = _QUOTED_PATH.search(str(err))
        code = int(found.group(1))
        return code, path and path.group(1), os.strerror(code)
    return None


def disk_error(err: BaseException) -> WorkdirError | None:
    """A one-line WorkdirError naming the path and the cause when `err`, or an exception it
    was raised from or during (orbax and threads wrap them), is an OSError of DISK_ERRORS
    (tensorstore's included); else None, also for a UserError, already one line."""
    if isinstance(err, UserError):
        return None
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        found = _os_error(err)
        if found and found[0] in DISK_ERRORS:
            code, path, message = found
            return WorkdirError(f"cannot write {path or 'into the workdir'}: {DISK_ERRORS[code]} "
                                f"({message}). Fix it and rerun the same command: the run "
                                "resumes from its last checkpoint.")
        err = err.__cause__ or err.__context__
    return None


class QuietDiskErrors(logging.Filter):
    """Drops the log records (with their tracebacks) of a disk error from orbax's threads:
    the run stops on it and names it in one line (`disk_error`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ((error is not None and disk_error(error) is not None)
                    or any(int(code) in DISK_ERRORS for code in
                           _TENSORSTORE_OS_ERROR.findall(record.getMessage())))


@primary_only
def write_atomic(path: str, content: str | bytes) -> str:
    """Writes `content` (text or bytes) to `path` whole or not at all: into a temporary file
    beside it, then renamed over it. A file that already holds `content` is left untouched,
    so that rewriting a finished run's outputs changes none of its files. A link at `path`
    is refused (`links.refuse_link`), neither replaced nor followed."""
    data = content.encode() if isinstance(content, str) else content
    refuse_link(path)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return path
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def to_json(obj) -> str:
    """The canonical JSON text of `obj`: sorted keys, tuples as lists, non-finite floats kept."""
    return json.dumps(obj, indent=2, sort_keys=True)


def write_json(path: str, obj) -> None:
    write_atomic(path, to_json(obj) + "\n")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_record(path: str, error: type[Exception] = RecordError) -> dict:
    """The JSON object in the record at `path`.

    Raises:
      `error` (RecordError by default): in one line naming `path`, when it cannot be read,
        is not UTF-8 JSON (truncated, emptied), nests too deep, holds an integer too long to
        read, or is not a JSON object.
    """
    try:
        obj = read_json(path)
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"cannot read {path}: {getattr(err, 'strerror', None) or err}.") from None
    except RecursionError:
        raise error(f"{path} is malformed: it nests too deep to be a record.") from None
    except ValueError as err:  # JSONDecodeError, or an integer of over 4300 digits
        raise error(f"{path} is malformed: {str(err)[:160]}.") from None
    if not isinstance(obj, dict):
        raise error(f"{path} is malformed: it holds a JSON {type(obj).__name__}, not an "
                    "object.")
    if _depth(obj) > MAX_RECORD_DEPTH:  # what json read, the code that walks it may not
        raise error(f"{path} is malformed: it nests too deep to be a record.")
    return obj


# The deepest nesting of lists and objects a record may hold: records nest a few levels.
MAX_RECORD_DEPTH = 64


def _depth(obj) -> int:
    """How deep lists and dicts nest in `obj` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth + 1)
            if depth + 1 <= MAX_RECORD_DEPTH:
                stack.extend((v, depth + 1) for v in
                             (value.values() if isinstance(value, dict) else value))
    return deepest


def merged(base: dict, updates: dict) -> dict:
    """`base` with `updates` merged in, recursively into the dicts both hold."""
    out = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = merged(out[key], value)
        out[key] = value
    return out


def update_json(path: str, updates: dict, replace=()) -> dict:
    """Merges `updates` into the JSON object at `path` (created if absent) and returns it.

    Nested dicts merge key by key, so a field another command wrote inside
    e.g. "test_metrics" survives an update of that dict's other fields; the
    top-level keys named in `replace` (dicts the caller owns whole) are
    replaced instead, dropping entries it no longer writes.
    """
    base = read_record(path) if os.path.exists(path) else {}
    obj = merged({k: v for k, v in base.items() if k not in replace}, updates)
    write_json(path, obj)
    return obj


def tensorboard_events(workdir: str) -> EventFile:
    """A new event file in <workdir>/tensorboard/."""
    return EventFile(os.path.join(workdir, TENSORBOARD_DIR))


def write_figures_to_tensorboard(workdir: str, figures, step: int) -> None:
    """Adds each figure file (PNG; a GIF's first frame) of `figures` to <workdir>/tensorboard/
    as an image at training step `step`, tagged figures/<file name without extension>, in an
    event file of their own, named by `step` and the figures' names. Figures already written
    under that name (a finished run, rerun) are not written again. Primary process only."""
    if not is_primary():
        return
    tags = [f"figures/{os.path.splitext(os.path.basename(path))[0]}" for path in figures]
    digest = hashlib.sha256("\n".join(tags).encode()).hexdigest()[:12]
    # "figures" sorts after the time-stamped event files of training, as it is written after.
    path = os.path.join(workdir, TENSORBOARD_DIR,
                        f"events.out.tfevents.figures.{step:012d}.{digest}.{socket.gethostname()}")
    if os.path.exists(path):
        return
    writer = EventFile(os.path.dirname(path), name=f".tmp_{os.path.basename(path)}.partial")
    try:
        for tag, figure in zip(tags, figures):
            with Image.open(figure) as image:
                writer.image(tag, np.asarray(image.convert("RGB")), step)
    finally:
        writer.close()
    os.replace(writer.path, path)  # whole or not at all


class MetricsLog:
    """metrics.csv: one row per training step and one per test evaluation.

    Columns: split ("train" or "test"), epoch, step (optimizer steps taken),
    time (seconds of training wall time), then the metrics in alphabetical order.
    The primary process also writes each metric as the TensorBoard scalar <split>/<name>
    at its step into tensorboard/ beside metrics.csv, flushed at each test evaluation.

    A resumed run checks the logged rows against the checkpoint it restores
    (`check_rows`), then drops the rows and TensorBoard events beyond it, which it
    redoes; a run that starts from scratch drops them all.
    """

    def __init__(self, path: str, metric_names, resume_step: int | None):
        self.path = path
        self.columns = ["split", "epoch", "step", "time", *sorted(metric_names)]
        self._tensorboard = None  # opened with the first rows
        logged = None
        if resume_step is not None:  # written before any checkpoint: missing, it was deleted
            if not os.path.exists(path):
                raise RecordError(f"{path} is missing: it must log every step up to the "
                                  f"checkpoint at step {resume_step} that this run resumes "
                                  "from. Restore the file, or use another --workdir to start "
                                  "over.")
            logged = check_rows(path, read_table(path), self.columns, resume_step)
        # Rows logged after the checkpoint we resume from are redone by this run.
        self.rows = [r for r in logged or [] if int(r["step"]) <= resume_step]
        if is_primary():
            drop_events_after(os.path.join(os.path.dirname(os.path.abspath(path)),
                                           TENSORBOARD_DIR), resume_step)
        torn = logged is not None and os.path.getsize(path) > 0 and not _ends_a_line(path)
        if logged is None or len(self.rows) < len(logged) or torn:  # else it is left untouched
            buf = io.StringIO()
            writer = csv.DictWriter(buf, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
            write_atomic(path, buf.getvalue())

    def test_metrics(self, step: int) -> dict[str, float] | None:
        """The logged test evaluation at `step`, or None if there is none."""
        rows = [r for r in self.rows if r["split"] == "test" and int(r["step"]) == step]
        if not rows:
            return None
        return {k: float(v) for k, v in rows[-1].items()
                if k not in ("split", "epoch", "step", "time") and v != ""}

    @staticmethod
    def read(path: str) -> list[dict]:
        """The rows of metrics.csv at `path`, as {column: text}."""
        header, *rows = read_table(path) or [[]]
        return [dict(zip(header, fields)) for fields in rows]

    def append(self, rows: list[dict]) -> None:
        if not is_primary():
            return
        with open_no_follow(self.path, "a") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerows(rows)
        self._write_scalars(rows)

    def _write_scalars(self, rows: list[dict]) -> None:
        if self._tensorboard is None:
            self._tensorboard = tensorboard_events(os.path.dirname(os.path.abspath(self.path)))
            weakref.finalize(self, self._tensorboard.close)  # fit holds the log until it returns
        for row in rows:
            self._tensorboard.scalars({f"{row['split']}/{name}": float(row[name])
                                       for name in self.columns[4:] if row.get(name) is not None},
                                      int(row["step"]))
        if any(row["split"] == "test" for row in rows):
            self._tensorboard.flush()


def _ends_a_line(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_table(path: str) -> list[list[str]]:
    """The complete lines of the CSV file at `path` as lists of fields, header first: a last
    line without its newline is the row a killed run was writing, beyond any checkpoint
    (rows are logged before the state they describe is saved), and is left out.

    Raises:
      RecordError: it cannot be read or is not UTF-8 CSV.
    """
    try:
        with open(path, newline="") as f:
            text = f.read()
        return list(csv.reader(io.StringIO(text[:text.rfind("\n") + 1])))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise RecordError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}."
                          ) from None


def check_rows(path: str, rows: list[list[str]], columns: list[str],
               resume_step: int) -> list[dict]:
    """The rows of metrics.csv (header first, as `read_table` returns them) as dicts,
    after checking them against the checkpoint at `resume_step` that a run resumes from:
    the header names `columns`; every row has a field per column, split "train" or "test",
    integer epoch and step, numbers elsewhere (NaN and infinities allowed, empty allowed
    for a metric a row lacks); no (split, step) twice; and a train row for every step
    from 1 to `resume_step`, the steps the checkpoint trained.

    Raises:
      RecordError: in one line naming `path` and the first problem found.
    """
    def refuse(problem: str):
        raise RecordError(f"{path} is malformed: {problem}. It must log every step up to the "
                          f"checkpoint at step {resume_step} that this run resumes from: "
                          "restore the file, or use another --workdir to start over.")

    if not rows or rows[0] != columns:
        refuse(f"its header is {','.join(rows[0]) if rows else 'missing (the file is empty)'}, "
               f"not {','.join(columns)}")
    seen, out = set(), []
    for line, fields in enumerate(rows[1:], start=2):
        if len(fields) != len(columns):
            refuse(f"line {line} has {len(fields)} fields, not {len(columns)}")
        row = dict(zip(columns, fields))
        try:
            step, epoch = int(row["step"]), int(row["epoch"])
            for name in columns[3:]:
                if row[name] != "" or name == "time":
                    float(row[name])
        except ValueError:
            refuse(f"line {line} holds a field that is not a number")
        if row["split"] not in ("train", "test") or step < 0 or epoch < 0:
            refuse(f"line {line} is no train or test row of a step and epoch")
        if (row["split"], step) in seen:
            refuse(f"line {line} logs {row['split']} step {step} a second time")
        seen.add((row["split"], step))
        out.append(row)
    missing = [step for step in range(1, resume_step + 1) if ("train", step) not in seen]
    if missing:
        refuse(f"it lacks the train rows of {len(missing)} step(s) from step {missing[0]}")
    return out
