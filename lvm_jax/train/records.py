"""The files a run writes beside its checkpoints: config.json, summary.json, metrics.csv.

JSON files are replaced atomically, metrics.csv is appended to through an O_NOFOLLOW open,
a record read back is checked before it is trusted, a full or read-only disk is one line
naming the path, and only process 0 writes: docs/records.md.
"""

import csv
import errno
import functools
import inspect
import io
import json
import os
import re
import tempfile

import jax

from lvm_jax.errors import RecordError, UserError, WorkdirError

# Where a run's TensorBoard events go, inside its workdir: `tensorboard --logdir runs/`. The
# writer (`events`, 0.1 s to import with tensorboard) is imported once a run writes there.
TENSORBOARD_DIR = "tensorboard"
# The errors of a write that the user fixes outside the program; the run then resumes.
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}
# How tensorstore (orbax's writer) reports an OSError: in the text of a ValueError.
TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')
# The deepest nesting of lists and objects a record may hold: records nest a few levels.
MAX_RECORD_DEPTH = 64


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


def disk_error(err: BaseException) -> WorkdirError | None:
    """A one-line WorkdirError naming the path and the cause when `err`, or an exception it
    was raised from or during (orbax's threads wrap them), is an OSError of DISK_ERRORS
    (tensorstore's text of one included); else None, also for a UserError."""
    seen = set()
    while err is not None and id(err) not in seen and not isinstance(err, UserError):
        seen.add(id(err))
        found = TENSORSTORE_OS_ERROR.search(str(err))
        code = err.errno if isinstance(err, OSError) else found and int(found.group(1))
        if code in DISK_ERRORS:
            path = err.filename if isinstance(err, OSError) else _QUOTED_PATH.search(str(err))
            path = path.group(1) if isinstance(path, re.Match) else path
            return WorkdirError(f"cannot write {path or 'into the workdir'}: {DISK_ERRORS[code]}"
                                f" ({os.strerror(code)}). Fix it and rerun the same command: "
                                "the run resumes from its last checkpoint.")
        err = err.__cause__ or err.__context__
    return None


def refuse_link(path: str) -> str:
    """`path`, after checking that it is no symbolic link (a workdir may be one: the user chose
    it; the files a run makes inside it may not).

    Raises:
      WorkdirError: it is a link; nothing is written through it.
    """
    if os.path.islink(path):
        raise WorkdirError(f"{path} is a symbolic link (to {os.readlink(path)}): lvm_jax writes "
                           "nothing through a link. Remove it, or use another --workdir.")
    return path


def open_no_follow(path: str, mode: str = "a"):
    """open(`path`, `mode`) for appending, refusing a symbolic link at `path` in the open
    itself (O_NOFOLLOW), so that a link put there at any time is never followed."""
    flags = os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_RDWR if "+" in mode else os.O_WRONLY
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            refuse_link(path)
        raise
    return os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""}))


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for every thread)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))


@primary_only
def write_atomic(path: str, content: str | bytes) -> str:
    """Writes `content` to `path` whole or not at all (a temporary file renamed over it). A
    file that already holds `content` is left untouched, so that rewriting a finished run's
    outputs changes none of its files; a link at `path` is refused, not replaced."""
    data = content.encode() if isinstance(content, str) else content
    if os.path.isfile(refuse_link(path)):
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
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
    """The JSON object at `path`.

    Raises:
      `error` (RecordError by default): in one line naming `path`, when it cannot be read,
        is no UTF-8 JSON, nests deeper than MAX_RECORD_DEPTH, or is no JSON object.
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
        raise error(f"{path} is malformed: it holds a JSON {type(obj).__name__}, not an object.")
    if _depth(obj) > MAX_RECORD_DEPTH:
        raise error(f"{path} is malformed: it nests too deep to be a record.")
    return obj


def _depth(obj) -> int:
    """How deep lists and dicts nest in `obj` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)) and depth < MAX_RECORD_DEPTH + 1:
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in
                         (value.values() if isinstance(value, dict) else value))
    return deepest


def merged(base: dict, updates: dict) -> dict:
    """`base` with `updates` merged in, recursively into the dicts both hold."""
    out = dict(base)
    for key, value in updates.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def update_json(path: str, updates: dict, replace=()) -> dict:
    """Merges `updates` into the JSON object at `path` (created if absent) and returns it:
    nested dicts merge key by key, but the top-level keys in `replace` (dicts the caller
    owns whole) are replaced."""
    base = read_record(path) if os.path.exists(path) else {}
    obj = merged({k: v for k, v in base.items() if k not in replace}, updates)
    write_json(path, obj)
    return obj


class MetricsLog:
    """metrics.csv: one row per training step and one per test evaluation, and the same
    values as TensorBoard scalars <split>/<metric> (`events.Scalars`).

    Columns: split ("train" or "test"), epoch, step (optimizer steps taken), time
    (seconds of training wall time), then the metrics in alphabetical order. A run
    that resumes from step S checks the rows against it (`check_rows`) and drops the
    rows beyond S, which it redoes; TensorBoard drops its points beyond S itself.
    """

    def __init__(self, path: str, metric_names, resume_step: int | None):
        self.path = path
        from lvm_jax.train import events

        self.columns = ["split", "epoch", "step", "time", *sorted(metric_names)]
        self._scalars = events.Scalars(os.path.join(os.path.dirname(path), TENSORBOARD_DIR),
                                       0 if resume_step is None else resume_step + 1)
        if resume_step is not None and not os.path.exists(path):
            raise RecordError(f"{path} is missing: it must log every step up to the checkpoint "
                              f"at step {resume_step} that this run resumes from. Restore the "
                              "file, or use another --workdir to start over.")
        text = _read_text(path) if resume_step is not None else ""
        logged = [] if resume_step is None else check_rows(path, _complete_lines(text),
                                                           self.columns, resume_step)
        self.rows = [row for row in logged if int(row["step"]) <= resume_step]
        if resume_step is None or len(self.rows) < len(logged) or _complete_lines(text) != text:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
            write_atomic(path, buffer.getvalue())

    def test_metrics(self, step: int) -> dict[str, float] | None:
        """The logged test evaluation at `step`, or None if there is none."""
        rows = [r for r in self.rows if r["split"] == "test" and int(r["step"]) == step]
        return {k: float(v) for k, v in rows[-1].items() if k in self.columns[4:] and v != ""
                } if rows else None

    @staticmethod
    def read(path: str) -> list[dict]:
        """The rows of metrics.csv at `path`, as {column: text}."""
        header, *rows = list(csv.reader(io.StringIO(_complete_lines(_read_text(path))))) or [[]]
        return [dict(zip(header, fields)) for fields in rows]

    def append(self, rows: list[dict]) -> None:
        if not is_primary():
            return
        with open_no_follow(self.path) as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerows(rows)
        self._scalars.write([({f"{row['split']}/{name}": float(row[name])
                               for name in self.columns[4:] if name in row}, int(row["step"]))
                             for row in rows])

    def close(self) -> None:
        self._scalars.close()


def _complete_lines(text: str) -> str:
    """`text` up to its last newline: a last line without one is the row a killed run was
    writing, beyond any checkpoint."""
    return text[:text.rfind("\n") + 1]


def _read_text(path: str) -> str:
    """The text of the file at `path`.

    Raises:
      RecordError: it cannot be read or is no UTF-8.
    """
    try:
        with open(path, newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}."
                          ) from None
    return text


def check_rows(path: str, text: str, columns: list[str], resume_step: int) -> list[dict]:
    """The rows of metrics.csv (its complete lines, `text`) as dicts, after checking them
    against the checkpoint at `resume_step` that a run resumes from: the header names
    `columns`; every row has a field per column, split "train" or "test", integer epoch and
    step, numbers elsewhere (a metric may be empty); no (split, step) twice; and a train row
    for every step from 1 to `resume_step`.

    Raises:
      RecordError: in one line naming `path` and the first problem found.
    """
    def refuse(problem: str):
        raise RecordError(f"{path} is malformed: {problem}. It must log every step up to the "
                          f"checkpoint at step {resume_step} that this run resumes from: "
                          "restore the file, or use another --workdir to start over.")

    try:
        header, *rows = list(csv.reader(io.StringIO(text))) or [None]
    except csv.Error as err:
        refuse(str(err))
    if header != columns:
        refuse(f"its header is {','.join(header) if header else 'missing (the file is empty)'}"
               f", not {','.join(columns)}")
    seen, out = set(), []
    for line, fields in enumerate(rows, start=2):
        if len(fields) != len(columns):
            refuse(f"line {line} has {len(fields)} fields, not {len(columns)}")
        row = dict(zip(columns, fields))
        try:
            key = (row["split"], int(row["step"]), int(row["epoch"]))
            [float(row[name]) for name in columns[3:] if row[name] != "" or name == "time"]
        except ValueError:
            refuse(f"line {line} holds a field that is not a number")
        if key[0] not in ("train", "test") or min(key[1:]) < 0:
            refuse(f"line {line} is no train or test row of a step and epoch")
        if key[:2] in seen:
            refuse(f"line {line} logs {key[0]} step {key[1]} a second time")
        seen.add(key[:2])
        out.append(row)
    missing = [step for step in range(1, resume_step + 1) if ("train", step) not in seen]
    if missing:
        refuse(f"it lacks the train rows of {len(missing)} step(s) from step {missing[0]}")
    return out
