"""A run's TensorBoard events, written with tensorboard's own record writer and protos.

Each segment of a run (the first, and each resumption) writes a new event file in
<workdir>/tensorboard/, named by the time it opens so that TensorBoard reads the segments
in order. A segment resumed from step S starts its file with a `SessionLog.START` at step
S + 1: TensorBoard's reader then discards the points at steps S + 1 and later that a killed
segment wrote, which this one redoes, so no tag and step is shown twice and no file is
rewritten.
"""

import os
import socket
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from lvm_jax import files


def open_event_file(path: str) -> RecordWriter:
    """A record writer on a new file at `path` (O_EXCL: never an existing file or link, in a
    folder that is no link), holding the file-version event TensorBoard expects first."""
    os.makedirs(files.refuse_link(os.path.dirname(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    writer = RecordWriter(os.fdopen(fd, "wb"))
    writer.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
                 .SerializeToString())
    return writer


class Scalars:
    """The scalars of one segment of a run, resumed at `start_step` (0: a run started over),
    in an event file of its own opened with the first points: a segment that logs nothing
    (a finished run, rerun) writes no file."""

    def __init__(self, directory: str, start_step: int):
        self.directory, self.start_step = directory, start_step
        self._writer: RecordWriter | None = None

    def write(self, points: list[tuple[dict[str, float], int]]) -> None:
        """Writes each ({tag: value}, step) of `points`; flushed whenever a "test/" tag is
        among them (each evaluation, before the checkpoint that follows it)."""
        if self._writer is None:
            self._writer = open_event_file(os.path.join(
                self.directory, f"events.out.tfevents.{time.time_ns()}.{socket.gethostname()}"))
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._writer.write(event_pb2.Event(wall_time=time.time(), step=self.start_step,
                                               session_log=start).SerializeToString())
        for values, step in points:
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
                tag=tag, simple_value=value) for tag, value in values.items()])
            self._writer.write(event_pb2.Event(wall_time=time.time(), step=step,
                                               summary=summary).SerializeToString())
        if any(tag.startswith("test/") for values, _ in points for tag in values):
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
