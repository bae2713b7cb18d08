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
"""

import io
import os
import socket
import struct
import time

import numpy as np
from PIL import Image

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


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + _varint(value)


def _bytes(field: int, value: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(value)) + value


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
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, name or
                                 f"events.out.tfevents.{time.time_ns()}.{socket.gethostname()}")
        self._file = open(self.path, "ab")
        self._write(_event(0, file_version=b"brain.Event:2"))

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
