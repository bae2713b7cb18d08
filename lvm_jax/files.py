"""The library's file layer: what every command that writes into a run's workdir relies on.

JSON records are replaced atomically, appends go through an O_NOFOLLOW open, a record read
back is checked before it is trusted, a full or read-only disk is one line naming the path,
and only process 0 writes. Training (`lvm_jax.train`), figures (`lvm_jax.viz`), evaluation,
sampling and the benchmarks write through it; it imports neither flax nor orbax, so that a
command that only draws or reads pays for neither. docs/records.md.
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


def read_text(path: str) -> str:
    try:
        with open(path, newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}."
                          ) from None


def complete_lines(text: str) -> str:
    """`text` up to its last newline: a last line without one is the row a killed run was
    writing, beyond any checkpoint."""
    return text[:text.rfind("\n") + 1]


def read_csv(path: str) -> list[dict]:
    """The rows of the CSV file at `path` (e.g. a run's metrics.csv) as {column: text}, its
    complete lines only."""
    return list(csv.DictReader(io.StringIO(complete_lines(read_text(path)))))
