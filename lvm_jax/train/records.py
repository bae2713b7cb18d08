"""What a run writes besides checkpoints: metrics.csv, config.json, summary.json, and the
TensorBoard events of tensorboard/ (the scalars of metrics.csv and the run's figures).

Every file is replaced atomically (write to a temporary file, then rename), so
an interrupted run never leaves one half-written, and gets the permissions of
a plain `open` under the process umask (usually 0644), so the team can read a
shared workdir. In a multi-host run every process computes the same metrics
and only process 0 writes them (`is_primary`).

JSON files hold non-finite floats as `Infinity`, `-Infinity` and `NaN`, the
tokens Python's json module reads back, so every value round-trips.
"""

import csv
import functools
import hashlib
import inspect
import io
import json
import os
import socket
import tempfile
import weakref

import jax
import numpy as np
from PIL import Image

from lvm_jax.train.events import EventFile

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


@primary_only
def write_atomic(path: str, content: str | bytes) -> str:
    """Writes `content` (text or bytes) to `path` whole or not at all: into a temporary file
    beside it, then renamed over it. A file that already holds `content` is left untouched,
    so that rewriting a finished run's outputs changes none of its files."""
    data = content.encode() if isinstance(content, str) else content
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
    base = read_json(path) if os.path.exists(path) else {}
    obj = merged({k: v for k, v in base.items() if k not in replace}, updates)
    write_json(path, obj)
    return obj


def tensorboard_events(workdir: str, purge_step: int | None = None) -> EventFile:
    """A new event file in <workdir>/tensorboard/; with `purge_step`, TensorBoard drops the
    events written earlier into the directory from that step on (those a resumed run redoes)."""
    writer = EventFile(os.path.join(workdir, TENSORBOARD_DIR))
    if purge_step is not None:
        writer.session_start(purge_step)
    return writer


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
    """

    def __init__(self, path: str, metric_names, resume_step: int | None):
        self.path = path
        self.columns = ["split", "epoch", "step", "time", *sorted(metric_names)]
        self._resume_step = resume_step
        self._tensorboard = None  # opened with the first rows
        logged = self.read(path) if resume_step is not None and os.path.exists(path) else None
        # Rows logged after the checkpoint we resume from are redone by this run.
        self.rows = [r for r in logged or [] if int(r["step"]) <= resume_step]
        if logged is None or len(self.rows) < len(logged):  # else the file is left untouched
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
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    def append(self, rows: list[dict]) -> None:
        if not is_primary():
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerows(rows)
        self._write_scalars(rows)

    def _write_scalars(self, rows: list[dict]) -> None:
        if self._tensorboard is None:
            resumed = None if self._resume_step is None else self._resume_step + 1
            self._tensorboard = tensorboard_events(os.path.dirname(os.path.abspath(self.path)),
                                                   purge_step=resumed)
            weakref.finalize(self, self._tensorboard.close)  # fit holds the log until it returns
        for row in rows:
            self._tensorboard.scalars({f"{row['split']}/{name}": float(row[name])
                                       for name in self.columns[4:] if row.get(name) is not None},
                                      int(row["step"]))
        if any(row["split"] == "test" for row in rows):
            self._tensorboard.flush()
