"""metrics.csv and TensorBoard's scalars: a run's log of every step and evaluation.

A run resumed from a checkpoint keeps the rows up to it, after checking them; TensorBoard
drops its own points beyond it (`events.Scalars`). Files are written through `lvm_jax.files`:
docs/records.md.
"""

import csv
import io
import os

from lvm_jax import files
from lvm_jax.errors import RecordError


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
        self._scalars = events.Scalars(os.path.join(os.path.dirname(path), files.TENSORBOARD_DIR),
                                       0 if resume_step is None else resume_step + 1)
        if resume_step is not None and not os.path.exists(path):
            raise _unusable(path, "is missing", resume_step)
        text = "" if resume_step is None else files.read_text(path)
        logged = [] if resume_step is None else check_rows(
            path, files.complete_lines(text), self.columns, resume_step)
        self.rows = [row for row in logged if int(row["step"]) <= resume_step]
        if resume_step is None or self.rows != logged or files.complete_lines(text) != text:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
            files.write_atomic(path, buffer.getvalue())

    def test_metrics(self, step: int) -> dict[str, float] | None:
        """The logged test evaluation at `step`, or None if there is none."""
        rows = [r for r in self.rows if r["split"] == "test" and int(r["step"]) == step]
        return {k: float(v) for k, v in rows[-1].items() if k in self.columns[4:] and v != ""
                } if rows else None

    def append(self, rows: list[dict]) -> None:
        if not files.is_primary():
            return
        with files.naming(self.path), files.open_no_follow(self.path) as f:
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
