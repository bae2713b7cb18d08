"""TensorBoard event files, written directly: the few protocol-buffer fields a run needs.

An event file is a sequence of TFRecords, each a serialized `tensorboard.Event`:

    uint64 length | uint32 masked CRC-32C of length | event bytes | uint32 masked CRC-32C of bytes

and the events this module writes use only these fields (field number: type):

    Event:         1 wall_time: double, 2 step: int64, 3 file_version: string,
                   5 summary: Summary, 7 session_log: SessionLog
    Summary:       1 value: repeated Value
    Summary.Value: 1 tag: string, 2 simple_value: float, 4 image: Image
    Summary.Image: 1 height: int32, 2 width: int32, 3 colorspace: int32,
                   4 encoded_image_string: bytes (PNG)
    SessionLog:    1 status: enum (START = 1)

Written here rather than through tensorboardX, whose import also imports PyTorch
when it is installed: over a second added to every run of a small model.

A resumed run first cuts the events beyond its checkpoint out of the files
(`drop_events_after`), so that no (tag, step) is ever held twice, whatever the
point at which the earlier segment was killed; a frame cut short by the kill
is dropped with them.
"""

import io
import os
import socket
import struct
import time

import numpy as np
from PIL import Image

from lvm_jax.train.links import open_no_follow, refuse_link

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_SESSION_START = 1
_EVENT_FIELDS = {"file_version": 3, "summary": 5, "session_log": 7}


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord frames use it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """`data` framed as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", _masked_crc(length)) + data
            + struct.pack("<I", _masked_crc(data)))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    """(the varint at `at` of `data`, the index after it)."""
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def event_step(event: bytes) -> int:
    """The step (field 2) of a serialized Event; 0 when it has none, as protobuf reads it."""
    at = 0
    while at < len(event):
        key, at = _read_varint(event, at)
        field, wire_type = key >> 3, key & 7
        if field == 2 and wire_type == _VARINT:
            return _read_varint(event, at)[0]
        if wire_type == _VARINT:
            at = _read_varint(event, at)[1]
        elif wire_type == _FIXED64:
            at += 8
        elif wire_type == _FIXED32:
            at += 4
        elif wire_type == _BYTES:
            length, at = _read_varint(event, at)
            at += length
        else:
            raise ValueError(f"wire type {wire_type} in an event")
    return 0


def read_tfrecords(data: bytes) -> list[bytes]:
    """The records framed in `data`, up to the first frame that is cut short or fails its
    checksums (the tail a killed writer left)."""
    out, at = [], 0
    while at + 12 <= len(data):
        length_bytes = data[at:at + 8]
        (length,), (length_crc,) = struct.unpack("<Q", length_bytes), struct.unpack(
            "<I", data[at + 8:at + 12])
        end = at + 12 + length + 4
        if length_crc != _masked_crc(length_bytes) or end > len(data):
            break
        record = data[at + 12:end - 4]
        if struct.unpack("<I", data[end - 4:end])[0] != _masked_crc(record):
            break
        out.append(record)
        at = end
    return out


def _is_event_file(name: str) -> bool:
    return name.startswith("events.out.tfevents.")


def drop_events_after(directory: str, step: int | None) -> None:
    """Cuts every event beyond `step` (all of them for None: a run that restarts from
    scratch) out of the event files in `directory`, and a frame cut short at a file's end.
    A file left without any event but its header is removed; a file that keeps all of its
    events is left untouched. Each is rewritten whole or not at all."""
    if not os.path.isdir(refuse_link(directory)):
        return
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not _is_event_file(name) or not os.path.isfile(refuse_link(path)):
            continue
        with open(path, "rb") as f:
            data = f.read()
        frames = read_tfrecords(data)
        kept = [frame for frame in frames
                if step is not None and event_step(frame) <= step]
        if len(kept) == len(frames) and sum(len(f) + 16 for f in frames) == len(data):
            continue
        if all(frame.endswith(_FILE_VERSION) for frame in kept):  # only the header is left
            os.unlink(path)
            continue
        tmp = os.path.join(directory, f".tmp_{name}.partial")
        with open_no_follow(tmp, "ab") as f:
            f.truncate(0)
            f.write(b"".join(tfrecord(frame) for frame in kept))
        os.replace(tmp, path)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + _varint(value)


def _bytes(field: int, value: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(value)) + value


_FILE_VERSION = _bytes(_EVENT_FIELDS["file_version"], b"brain.Event:2")


def _event(step: int, **fields: bytes) -> bytes:
    """An Event at `step` now, with its other fields (file_version, summary, session_log)
    already encoded."""
    return (_key(1, _FIXED64) + struct.pack("<d", time.time()) + _int(2, step)
            + b"".join(_bytes(_EVENT_FIELDS[name], value) for name, value in fields.items()))


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class EventFile:
    """One TensorBoard event file in `directory`, named `name` or after the time in
    nanoseconds, so that TensorBoard reads a directory's files in the order they were written.

    Writes go straight to the file; every event is on disk once `flush` returns.
    """

    def __init__(self, directory: str, name: str | None = None):
        os.makedirs(refuse_link(directory), exist_ok=True)
        self.path = os.path.join(directory, name or
                                 f"events.out.tfevents.{time.time_ns()}.{socket.gethostname()}")
        self._file = open_no_follow(self.path, "ab")
        self._write(_event(0) + _FILE_VERSION)

    def _write(self, event: bytes) -> None:
        self._file.write(tfrecord(event))

    def session_start(self, step: int) -> None:
        """A SessionLog START at `step`: TensorBoard drops the events that files written
        earlier hold from `step` on (those a resumed run redoes)."""
        self._write(_event(step, session_log=_int(1, _SESSION_START)))

    def scalars(self, values: dict[str, float], step: int) -> None:
        """One event holding every {tag: value} of `values` at `step`."""
        summary = b"".join(
            _bytes(1, _bytes(1, tag.encode()) + _key(2, _FIXED32) + struct.pack("<f", value))
            for tag, value in values.items())
        self._write(_event(step, summary=summary))

    def image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        """pixels: (H, W, 3) uint8, stored as PNG."""
        height, width, channels = pixels.shape
        image = (_int(1, height) + _int(2, width) + _int(3, channels)
                 + _bytes(4, _png(pixels)))
        self._write(_event(step, summary=_bytes(1, _bytes(1, tag.encode()) + _bytes(4, image))))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
