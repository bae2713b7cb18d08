"""What a run writes besides checkpoints: metrics.csv, config.json, summary.json.

Every file is replaced atomically (write to a temporary file, then rename), so
an interrupted run never leaves one half-written. In a multi-host run every
process computes the same metrics and only process 0 writes them (`is_primary`).
"""

import csv
import functools
import inspect
import io
import json
import math
import os
import tempfile

import jax


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


@primary_only
def write_atomic(path: str, text: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def update_json(path: str, updates: dict) -> dict:
    """Merges `updates` into the JSON object at `path` (created if absent) and returns it."""
    obj = read_json(path) if os.path.exists(path) else {}
    obj.update(updates)
    write_json(path, obj)
    return obj


class MetricsLog:
    """metrics.csv: one row per training step and one per test evaluation.

    Columns: split ("train" or "test"), epoch, step (optimizer steps taken),
    time (seconds of training wall time), then the metrics in alphabetical order.
    """

    def __init__(self, path: str, metric_names, resume_step: int | None):
        self.path = path
        self.columns = ["split", "epoch", "step", "time", *sorted(metric_names)]
        rows = self.read(path) if resume_step is not None and os.path.exists(path) else []
        # Rows logged after the checkpoint we resume from are redone by this run.
        rows = [r for r in rows if int(r["step"]) <= resume_step] if rows else []
        self.time_offset = max((float(r["time"]) for r in rows), default=0.0)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(path, buf.getvalue())

    @staticmethod
    def read(path: str) -> list[dict]:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    def append(self, rows: list[dict]) -> None:
        if not is_primary():
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerows(rows)
