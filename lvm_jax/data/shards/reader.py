"""Reading a shard folder: random access to its examples, each checked as it is read.

`ShardSource(folder, split)` checks every shard against the manifest when it is
opened and each example's CRC-32 when it is read; `verify(folder)` checks every
file's SHA-256 (a full read); `fingerprint(folder)` is what identifies the
folder's data cheaply (`lvm_jax.data.identity`).
"""

import hashlib
import json
import math
import os
import threading
import tokenize
import weakref
import zlib
from collections.abc import Sequence

import numpy as np

from lvm_jax.data.shards.manifest import SPLITS, manifest_path, read_manifest, sha256
from lvm_jax.data.stream import Indexing
from lvm_jax.errors import DataError

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


def _npy_header(path: str, what: str) -> tuple[tuple[int, ...], bool, np.dtype, int, os.stat_result]:
    """(shape, fortran order, dtype, byte offset of the data, the file's stat) of the .npy
    file `path`, from its header alone; `what` names the file in errors ("shard",
    "checksum file")."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in _HEADER_READERS:
                raise ValueError(f".npy format version {version}, not 1.0 or 2.0")
            shape, fortran, dtype = _HEADER_READERS[version](f)
            return tuple(shape), fortran, dtype, f.tell(), os.fstat(f.fileno())
    except FileNotFoundError:
        raise DataError(f"{what} {path} is missing (listed in the manifest).") from None
    # numpy tokenizes and parses the header as a Python literal: its errors are theirs too.
    except (OSError, ValueError, SyntaxError, tokenize.TokenError) as err:
        corrupted = "is corrupted" if what == "checksum file" else "is not a readable .npy file"
        raise DataError(f"{what} {path} {corrupted}: its .npy header cannot be read "
                        f"({' '.join(str(err).split())[:120]}).") from err


def _file_version(stat: os.stat_result) -> tuple[int, int, int]:
    """What says a file was replaced or rewritten: its inode, size and modification time."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class ShardSource(Indexing):
    """Random access to one split of a shard folder: `len`, `source[i]` (one example),
    `read_batch(indices)` (B, ...), thread-safe.

    Opening checks the manifest (`read_manifest`) and every shard against it: present,
    a .npy of the manifest's example shape and dtype, and long enough for its count (a
    missing, truncated or mislabelled shard is a DataError naming the file, before
    training); it reads the checksum files and notes each shard's inode, size and
    modification time. A shard's file is opened for reading when it is first read: one
    replaced or rewritten since the source was opened is then a DataError naming it,
    and from then on the open file is read, whatever is renamed over its name. Each
    read checks the example's CRC-32 against the checksums read at opening (a corrupt
    or rewritten example is a DataError naming the file and the index in it).
    """

    def __init__(self, folder: str, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"a shard folder's splits are {', '.join(SPLITS)}, not {split!r}")
        entry = read_manifest(folder)["splits"][split]
        self.name = f"{folder}:{split}"
        self.shape = (entry["count"], *entry["example_shape"])
        self.dtype = entry["dtype"]
        self._example_bytes = math.prod(entry["example_shape"]) * self.dtype.itemsize
        self._paths, self._offsets, self._stats, self._crc32 = [], [], [], []
        for shard in entry["shards"]:
            path = os.path.join(folder, shard["file"])
            offset, stat = self._check_header(path, shard["count"])
            self._paths.append(path)
            self._offsets.append(offset)
            self._stats.append(_file_version(stat))
            self._crc32.append(_read_crc32(os.path.join(folder, shard["crc32_file"]),
                                           shard["count"]))
        self._starts = np.cumsum([0] + [s["count"] for s in entry["shards"]])
        self._files = [None] * len(self._paths)  # descriptors, opened on first read
        self._open_lock = threading.Lock()
        weakref.finalize(self, _close, self._files)

    def _check_header(self, path: str, count: int) -> tuple[int, os.stat_result]:
        """The byte offset of the first example of shard `path` and its stat, after checking
        it."""
        shape, fortran, dtype, offset, stat = _npy_header(path, "shard")
        expected = (count, *self.shape[1:])
        if shape != expected or dtype != self.dtype or fortran:
            raise DataError(f"shard {path}: records 0..{shape[0] - 1 if shape else 0} are "
                            f"{shape[1:]} {dtype}{' (Fortran order)' if fortran else ''}; "
                            f"the manifest says {count} records of {expected[1:]} {self.dtype}.")
        if stat.st_size < offset + count * self._example_bytes:
            complete = (stat.st_size - offset) // self._example_bytes
            raise DataError(f"shard {path} is truncated: record {complete} of {count} and those "
                            f"after it are missing ({stat.st_size} bytes).")
        return offset, stat

    def _file(self, k: int) -> int:
        if self._files[k] is None:
            with self._open_lock:
                if self._files[k] is None:
                    self._files[k] = self._open(k)
        return self._files[k]

    def _open(self, k: int) -> int:
        """A descriptor of shard k, the file that was checked when the source was opened."""
        try:
            fd = os.open(self._paths[k], os.O_RDONLY)
        except FileNotFoundError:
            raise DataError(f"shard {self._paths[k]} is missing (listed in the manifest).") from None
        if _file_version(os.fstat(fd)) != self._stats[k]:
            os.close(fd)
            raise DataError(f"shard {self._paths[k]} changed since the run opened it (replaced or "
                            "rewritten: another inode, size or modification time); rerun to "
                            "check the folder again.")
        return fd

    def read_batch(self, indices: Sequence[int]) -> np.ndarray:
        """The examples at `indices` (B,) of the split, as one array (B, ...): one positioned
        read per run of consecutive indices within a shard (a random batch: one per example;
        a slice: one per shard)."""
        indices = np.asarray(indices, np.int64)
        out = np.empty((len(indices), *self.shape[1:]), self.dtype)
        if not len(indices):
            return out
        if indices.min() < 0 or indices.max() >= len(self):
            raise IndexError(f"{self.name}: index out of range [0, {len(self)})")
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        within = indices - self._starts[shards]
        raw = out.reshape(len(indices), -1).view(np.uint8)
        runs = np.flatnonzero((np.diff(indices) != 1) | (np.diff(shards) != 0)) + 1
        for first, stop in zip([0, *runs], [*runs, len(indices)]):
            k, i = shards[first], int(within[first])
            read = os.preadv(self._file(k), [raw[first:stop]],
                             self._offsets[k] + i * self._example_bytes)
            if read != (stop - first) * self._example_bytes:
                raise DataError(f"shard {self._paths[k]} is truncated: record "
                                f"{i + read // self._example_bytes} is incomplete.")
            expected = self._crc32[k][within[first:stop]].tolist()
            for j, crc in zip(range(first, stop), expected):
                if zlib.crc32(raw[j]) != crc:
                    raise DataError(f"shard {self._paths[k]}: record {within[j]} is corrupt "
                                    "(its CRC-32 differs from the checksum file's).")
        return out


def _read_crc32(path: str, count: int) -> np.ndarray:
    """The checksums (count,) uint32 of the checksum file `path`."""
    shape, fortran, dtype, offset, stat = _npy_header(path, "checksum file")
    if shape != (count,) or dtype != np.uint32:
        raise DataError(f"checksum file {path} is corrupted: it holds {shape} {dtype}, expected "
                        f"({count},) uint32.")
    if stat.st_size < offset + 4 * count:
        raise DataError(f"checksum file {path} is corrupted: truncated to {stat.st_size} bytes.")
    return np.fromfile(path, np.uint32, count, offset=offset)


def _close(files: list) -> None:
    for fd in files:
        if fd is not None:
            os.close(fd)


def require_folder(folder: str | None) -> None:
    if folder is None:
        raise DataError("the shards dataset reads a shard folder: pass --data_dir pointing at "
                        "the folder that holds its manifest.json.")


def load(folder: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) of a shard folder, whole in memory (the memory path's reader)."""
    require_folder(folder)
    return ShardSource(folder, "train")[:], ShardSource(folder, "test")[:]


def _files(manifest: dict) -> list[tuple[str, str]]:
    """(file name, SHA-256) of every shard and checksum file that `manifest` lists."""
    return [pair for split in manifest["splits"].values() for shard in split["shards"]
            for pair in ((shard["file"], shard["sha256"]),
                         (shard["crc32_file"], shard["crc32_sha256"]))]


def verify(folder: str) -> dict[str, int]:
    """Checks every file of the folder against the SHA-256 in its manifest (a full read);
    returns the examples per split. Raises DataError naming the first file that differs."""
    manifest = read_manifest(folder)
    for split in manifest["splits"]:
        ShardSource(folder, split)  # present, headers and sizes
    for name, digest in _files(manifest):
        if sha256(os.path.join(folder, name)) != digest:
            raise DataError(f"shard file {os.path.join(folder, name)} differs from the SHA-256 "
                            "in the manifest: it is corrupt or was replaced.")
    return {name: split["count"] for name, split in manifest["splits"].items()}


def fingerprint(folder: str) -> tuple[str, str]:
    """(digest, stamp) of a shard folder, without reading a shard.

    digest: the SHA-256 of its manifest.json, which holds the SHA-256 of every shard and
    checksum file, so it names the data wherever the folder is. stamp: the SHA-256 of
    every listed file's name, size and modification time (one stat each), which changes
    when a file is replaced or rewritten, and when the folder is copied elsewhere.
    """
    require_folder(folder)
    manifest = read_manifest(folder)
    stats = []
    for name, _ in _files(manifest):
        try:
            stat = os.stat(os.path.join(folder, name))
        except FileNotFoundError:
            raise DataError(f"shard file {os.path.join(folder, name)} is missing (listed in the "
                            "manifest).") from None
        stats.append([name, stat.st_size, stat.st_mtime_ns])
    stamp = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    return sha256(manifest_path(folder)), stamp
