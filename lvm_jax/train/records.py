"""The files a run writes beside its checkpoints: config.json, summary.json, metrics.csv.

JSON files are replaced atomically, metrics.csv is appended to through an O_NOFOLLOW open,
a record read back is checked before it is trusted, a full or read-only disk is one line
naming the path, and only process 0 writes: docs/records.md.
"""

import contextlib
import csv
import errno
import functools
import inspect
import io
import json
import os
import re

import jax

from lvm_jax.errors import RecordError, UserError, WorkdirError

# Where a run's TensorBoard events go, inside its workdir: `tensorboard --logdir runs/`.
TENSORBOARD_DIR = "tensorboard"
# The errors of a write that the user fixes outside the program; the run then resumes.
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}
# How tensorstore (orbax's writer) reports an OSError: in the text of a ValueError.
TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")
# Records nest a few levels; a deeper one is refused before anything recurses into it.
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
            quoted = re.search(r'"(/[^"]+)"', str(err))
            path = err.filename if isinstance(err, OSError) else quoted and quoted.group(1)
            return WorkdirError(f"cannot write {path or 'into the workdir'}: {DISK_ERRORS[code]}"
                                f" ({os.strerror(code)}). Fix it and rerun the same command: "
                                "the run resumes from its last checkpoint.")
        err = err.__cause__ or err.__context__
    return None


def link_error(path: str) -> WorkdirError:
    return WorkdirError(f"{path} is a symbolic link (to {os.readlink(path)}): lvm_jax writes "
                        "nothing through a link. Remove it, or use another --workdir.")


def refuse_link(path: str) -> str:
    """`path`, after checking that it is no symbolic link (a workdir may be one: the user
    chose it; the files a run makes inside it may not)."""
    if os.path.islink(path):
        raise link_error(path)
    return path


def open_no_follow(path: str, mode: str = "a", flags: int = os.O_APPEND):
    """open(`path`, `mode`) with O_CREAT | `flags`, refusing a symbolic link at `path` in the
    open itself (O_NOFOLLOW), so that a link put there at any time is never followed."""
    flags |= os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_RDWR if "+" in mode else os.O_WRONLY
    try:
        fd = os.open(path, flags, 0o666)  # the umask applies, as to any file the user makes
    except OSError as err:
        raise link_error(path) if err.errno == errno.ELOOP else err from None
    return os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""}))


@contextlib.contextmanager
def naming(path: str):
    """Names `path` in an OSError of the block raised without a file name (a write, a flush),
    so that `disk_error` can say which file could not be written."""
    try:
        yield
    except OSError as err:
        if err.errno is not None and err.filename is None:  # not a WorkdirError's own line
            err.filename = path
        raise


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
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp_{name}.{os.getpid()}")
    try:
        with naming(path), open_no_follow(tmp, "wb", os.O_TRUNC) as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
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
        obj = None
    except ValueError as err:  # JSONDecodeError, or an integer of over 4300 digits
        raise error(f"{path} is malformed: {str(err)[:160]}.") from None
    if obj is None or _too_deep(obj):
        raise error(f"{path} is malformed: it nests too deep to be a record.")
    if not isinstance(obj, dict):
        raise error(f"{path} is malformed: it holds a JSON {type(obj).__name__}, not an object.")
    return obj


def _too_deep(obj) -> bool:
    """Whether lists and dicts nest deeper than MAX_RECORD_DEPTH in `obj`."""
    level = [obj]
    for _ in range(MAX_RECORD_DEPTH):
        level = [v for x in level if isinstance(x, (dict, list))
                 for v in (x.values() if isinstance(x, dict) else x)]
    return any(isinstance(x, (dict, list)) for x in level)


def _read_text(path: str) -> str:
    try:
        with open(path, newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}."
                          ) from None


def _complete_lines(text: str) -> str:
    """`text` up to its last newline: a last line without one is the row a killed run was
    writing, beyond any checkpoint."""
    return text[:text.rfind("\n") + 1]


class MetricsLog:
    """metrics.csv, and the same values as TensorBoard scalars <split>/<metric>.

    Columns: split ("train" or "test"), epoch, step (optimizer steps taken), time (seconds
    of training wall time), then the metrics in alphabetical order; a row per training
    step and per test evaluation. A run resumed from step S keeps the rows up to S, after
    `check_rows`; TensorBoard drops its points beyond S itself (`events.Scalars`).
    """

    def __init__(self, path: str, metric_names, resume_step: int | None):
        from lvm_jax.train import events  # tensorboard: imported once a run writes

        self.path = path
        self.columns = ["split", "epoch", "step", "time", *sorted(metric_names)]
        self._scalars = events.Scalars(os.path.join(os.path.dirname(path), TENSORBOARD_DIR),
                                       0 if resume_step is None else resume_step + 1)
        if resume_step is not None and not os.path.exists(path):
            raise _unusable(path, "is missing", resume_step)
        text = "" if resume_step is None else _read_text(path)
        logged = [] if resume_step is None else check_rows(
            path, _complete_lines(text), self.columns, resume_step)
        self.rows = [row for row in logged if int(row["step"]) <= resume_step]
        if resume_step is None or self.rows != logged or _complete_lines(text) != text:
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
        return list(csv.DictReader(io.StringIO(_complete_lines(_read_text(path)))))

    def append(self, rows: list[dict]) -> None:
        if not is_primary():
            return
        with naming(self.path), open_no_follow(self.path) as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerows(rows)
        self._scalars.write([({f"{row['split']}/{name}": float(row[name])
                               for name in self.columns[4:] if name in row}, int(row["step"]))
                             for row in rows])

    def close(self) -> None:
        self._scalars.close()


def _unusable(path: str, what: str, resume_step: int) -> RecordError:
    return RecordError(f"{path} {what}: it must log every step up to the checkpoint at step "
                       f"{resume_step} that this run resumes from. Restore the file, or use "
                       "another --workdir to start over.")


def check_rows(path: str, text: str, columns: list[str], resume_step: int) -> list[dict]:
    """The rows of metrics.csv at `path` (its complete lines, `text`), after checking them against the
    checkpoint at `resume_step` that a run resumes from: the header names `columns`; every
    row has a field per column, split "train" or "test", integer epoch and step, numbers
    elsewhere (a metric may be empty); no (split, step) twice; a train row for every step
    from 1 to `resume_step`.

    Raises:
      RecordError: in one line naming `path` and the first problem found.
    """
    def refuse(problem: str):
        raise _unusable(path, f"is malformed ({problem})", resume_step)

    try:
        header, *rows = list(csv.reader(io.StringIO(text))) or [None]
    except csv.Error as err:
        refuse(str(err))
    if header != columns:
        refuse(f"its header is {','.join(header) if header else 'missing (the file is empty)'}"
               f", not {','.join(columns)}")
    seen = set()
    for line, fields in enumerate(rows, start=2):
        if len(fields) != len(columns):
            refuse(f"line {line} has {len(fields)} fields, not {len(columns)}")
        split, epoch, step, *numbers = fields
        try:
            key = (split, int(step), int(epoch))
            [float(x) for i, x in enumerate(numbers) if x != "" or i == 0]  # time is never empty
        except ValueError:
            refuse(f"line {line} holds a field that is not a number")
        if split not in ("train", "test") or min(key[1:]) < 0:
            refuse(f"line {line} is no train or test row of a step and epoch")
        if key[:2] in seen:
            refuse(f"line {line} logs {split} step {key[1]} a second time")
        seen.add(key[:2])
    missing = [step for step in range(1, resume_step + 1) if ("train", step) not in seen]
    if missing:
        refuse(f"it lacks the train rows of {len(missing)} step(s) from step {missing[0]}")
    return [dict(zip(columns, fields)) for fields in rows]
