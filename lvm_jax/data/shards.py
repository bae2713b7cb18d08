"""A folder of .npy shards: a dataset of any size, read one example at a time.

The format (version 1), everything in one folder:

    manifest.json                     what the folder holds, checked before any read
    train-00000-of-00004.npy          a standard .npy array (count, *example_shape), C order
    train-00000-of-00004.crc32.npy    uint32 (count,): the CRC-32 of each example's bytes
    ...
    test-00000-of-00001.npy, test-00000-of-00001.crc32.npy

manifest.json:

    {"format": "lvm_jax.shards", "version": 1,
     "splits": {"train": {"example_shape": [64, 64, 3], "dtype": "uint8", "count": 40000,
                          "shards": [{"file": "train-00000-of-00004.npy", "count": 10000,
                                      "sha256": "...", "crc32_file": "...crc32.npy",
                                      "crc32_sha256": "..."}, ...]},
                "test": {...}}}

The examples of a split are its shards' examples in order. Plain .npy files: any
tool reads them (`np.load(f, mmap_mode="r")`), and a reader fetches example i
with one positioned read (`os.preadv`) at header + i * example bytes, so that
nothing but the examples asked for enters the process's memory (a memory map
would leave every page it touched resident). The manifest's SHA-256 of each
file checks a whole folder (`verify`, a full read); the per-example CRC-32 checks
each example as it is read, so a corrupt example is reported by file and index
whatever the size of the folder.

Write one with

    python -m lvm_jax.data.shards write OUT --train train.npy --test test.npy [--per_shard N]
    python -m lvm_jax.data.shards write OUT --images train_images/ --test_images test_images/
    python -m lvm_jax.data.shards verify OUT

and train on it with `--dataset shards --data_dir OUT` (add `--input stream` when
it does not fit in memory).
"""

import argparse
import hashlib
import json
import math
import os
import sys
import threading
import weakref
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

from lvm_jax.data.stream import Indexing
from lvm_jax.errors import DataError

FORMAT, VERSION = "lvm_jax.shards", 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
# 4096 examples of 64x64x3 uint8: 50 MB per shard, a few hundred files for ImageNet 64.
DEFAULT_PER_SHARD = 4096
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def example_crc32(examples: np.ndarray) -> np.ndarray:
    """uint32 (N,): the CRC-32 of the C-order bytes of each example of `examples` (N, ...)."""
    flat = np.ascontiguousarray(examples).reshape(len(examples), -1).view(np.uint8)
    return np.fromiter((zlib.crc32(row) for row in flat), np.uint32, len(examples))


def write_split(folder: str, split: str, chunks: Iterable[np.ndarray],
                per_shard: int = DEFAULT_PER_SHARD) -> dict:
    """Writes the examples of `chunks` (arrays (n, ...) of one shape and dtype, any n) as
    shards of `per_shard` examples into `folder`, and returns the split's manifest entry.

    Holds at most one shard in memory, so a split of any size streams through it.
    Shard names carry a count of shards that is only known at the end: they are
    written as <split>-<k>.npy and renamed once all are written.
    """
    os.makedirs(folder, exist_ok=True)
    pending, shards, spec = [], [], None

    def flush(examples):
        name = f"{split}-{len(shards):05d}"
        np.save(os.path.join(folder, name + ".npy"), examples)
        np.save(os.path.join(folder, name + ".crc32.npy"), example_crc32(examples))
        shards.append({"name": name, "count": len(examples)})

    for chunk in chunks:
        chunk = np.asarray(chunk)
        if spec is None:
            spec = (chunk.shape[1:], chunk.dtype)
        if (chunk.shape[1:], chunk.dtype) != spec:
            raise DataError(f"{split}: an array of {chunk.shape[1:]} {chunk.dtype} after arrays "
                            f"of {spec[0]} {spec[1]}; every example of a split has one shape "
                            "and dtype.")
        pending.append(chunk)
        while sum(map(len, pending)) >= per_shard:
            joined = np.concatenate(pending)
            flush(joined[:per_shard])
            pending = [joined[per_shard:]]
    if pending and sum(map(len, pending)):
        flush(np.concatenate(pending))
    if not shards:
        raise DataError(f"{split}: no examples to write.")
    entries = []
    for shard in shards:
        stem = f"{shard['name']}-of-{len(shards):05d}"
        for suffix in (".npy", ".crc32.npy"):
            os.replace(os.path.join(folder, shard["name"] + suffix),
                       os.path.join(folder, stem + suffix))
        entries.append({"file": stem + ".npy", "count": shard["count"],
                        "sha256": _sha256(os.path.join(folder, stem + ".npy")),
                        "crc32_file": stem + ".crc32.npy",
                        "crc32_sha256": _sha256(os.path.join(folder, stem + ".crc32.npy"))})
    dtype = spec[1].name if np.dtype(spec[1].name) == spec[1] else spec[1].str  # "uint8"
    return {"example_shape": list(spec[0]), "dtype": dtype,
            "count": sum(e["count"] for e in entries), "shards": entries}


def write(folder: str, splits: dict[str, Iterable[np.ndarray]],
          per_shard: int = DEFAULT_PER_SHARD) -> dict:
    """Writes a shard folder: `splits` maps "train" and "test" to iterables of arrays
    (n, ...); returns the manifest, written last, so a folder with a manifest is complete.
    The folder must be new or empty: stale shards of another dataset would sit beside it."""
    if os.path.isdir(folder) and os.listdir(folder):
        raise DataError(f"{folder} is not empty: write a shard folder into a new or empty one.")
    manifest = {"format": FORMAT, "version": VERSION,
                "splits": {name: write_split(folder, name, chunks, per_shard)
                           for name, chunks in splits.items()}}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"{folder} is not a shard folder: it has no {MANIFEST}. Write one with "
                        "python -m lvm_jax.data.shards write.")
    try:
        with open(path) as f:
            manifest = json.load(f)
        if manifest["format"] != FORMAT or manifest["version"] != VERSION:
            raise ValueError(f"format {manifest['format']!r} version {manifest['version']}, "
                             f"expected {FORMAT!r} version {VERSION}")
        for split in manifest["splits"].values():
            split["example_shape"], split["dtype"] = (tuple(split["example_shape"]),
                                                      np.dtype(split["dtype"]))
            for shard in split["shards"]:
                shard["file"], shard["count"] = str(shard["file"]), int(shard["count"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{path} is not a valid shard manifest ({type(err).__name__}: "
                        f"{err}).") from err
    return manifest


class ShardSource(Indexing):
    """Random access to one split of a shard folder: `len`, `source[i]` (one example),
    `read_batch(indices)` (B, ...), thread-safe.

    Opening checks every shard against the manifest: present, a .npy of the
    manifest's example shape and dtype, and long enough for its count (a missing,
    truncated or mislabelled shard is a DataError naming the file, before training).
    Each read checks the example's CRC-32 (a corrupt example is a DataError naming
    the file and the index in it).
    """

    def __init__(self, folder: str, split: str = "train"):
        manifest = read_manifest(folder)
        if split not in manifest["splits"]:
            raise DataError(f"the shard folder {folder} has no {split!r} split (it has "
                            f"{', '.join(manifest['splits'])}).")
        entry = manifest["splits"][split]
        self.name = f"{folder}:{split}"
        self.shape = (entry["count"], *entry["example_shape"])
        self.dtype = entry["dtype"]
        self._example_bytes = math.prod(entry["example_shape"]) * self.dtype.itemsize
        self._paths, self._offsets, self._crc32 = [], [], []
        for shard in entry["shards"]:
            path = os.path.join(folder, shard["file"])
            self._paths.append(path)
            self._offsets.append(self._check_header(path, shard["count"]))
            self._crc32.append(self._read_crc32(os.path.join(folder, shard["crc32_file"]),
                                                shard["count"]))
        self._starts = np.cumsum([0] + [s["count"] for s in entry["shards"]])
        if self._starts[-1] != entry["count"]:
            raise DataError(f"{os.path.join(folder, MANIFEST)}: the {split} shards hold "
                            f"{self._starts[-1]} examples, the split says {entry['count']}.")
        self._files = [None] * len(self._paths)  # descriptors, opened on first read
        self._open_lock = threading.Lock()
        weakref.finalize(self, _close, self._files)

    def _check_header(self, path: str, count: int) -> int:
        """The byte offset of the first example of shard `path`, after checking it."""
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version not in _HEADER_READERS:
                    raise ValueError(f".npy format version {version}, not 1.0 or 2.0")
                shape, fortran, dtype = _HEADER_READERS[version](f)
                offset = f.tell()
        except FileNotFoundError:
            raise DataError(f"shard {path} is missing (listed in the manifest).") from None
        except (OSError, ValueError) as err:
            raise DataError(f"shard {path} is not a readable .npy file ({err}).") from err
        expected = (count, *self.shape[1:])
        if tuple(shape) != expected or dtype != self.dtype or fortran:
            raise DataError(f"shard {path}: records 0..{shape[0] - 1 if shape else 0} are "
                            f"{tuple(shape[1:])} {dtype}{' (Fortran order)' if fortran else ''}; "
                            f"the manifest says {count} records of {expected[1:]} {self.dtype}.")
        size = os.path.getsize(path)
        if size < offset + count * self._example_bytes:
            complete = (size - offset) // self._example_bytes
            raise DataError(f"shard {path} is truncated: record {complete} of {count} and those "
                            f"after it are missing ({size} bytes).")
        return offset

    @staticmethod
    def _read_crc32(path: str, count: int) -> np.ndarray:
        try:
            crc = np.load(path)
        except FileNotFoundError:
            raise DataError(f"checksum file {path} is missing (listed in the manifest).") from None
        except (OSError, ValueError) as err:
            raise DataError(f"checksum file {path} is unreadable ({err}).") from err
        if crc.shape != (count,) or crc.dtype != np.uint32:
            raise DataError(f"checksum file {path}: {crc.shape} {crc.dtype}, expected ({count},) "
                            "uint32.")
        return crc

    def _file(self, k: int) -> int:
        if self._files[k] is None:
            with self._open_lock:
                if self._files[k] is None:
                    try:
                        self._files[k] = os.open(self._paths[k], os.O_RDONLY)
                    except FileNotFoundError:
                        raise DataError(f"shard {self._paths[k]} is missing (listed in the "
                                        "manifest).") from None
        return self._files[k]

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


def verify(folder: str) -> dict[str, int]:
    """Checks every file of the folder against the SHA-256 in its manifest; returns the
    examples per split. Raises DataError naming the first file that differs."""
    manifest = read_manifest(folder)
    for split in manifest["splits"]:
        ShardSource(folder, split)  # present, headers and sizes
        for shard in manifest["splits"][split]["shards"]:
            for name, digest in ((shard["file"], shard["sha256"]),
                                 (shard["crc32_file"], shard["crc32_sha256"])):
                if _sha256(os.path.join(folder, name)) != digest:
                    raise DataError(f"shard file {os.path.join(folder, name)} differs from the "
                                    "SHA-256 in the manifest: it is corrupt or was replaced.")
    return {name: split["count"] for name, split in manifest["splits"].items()}


def _image_chunks(folder: str, chunk: int = 256):
    """The images of `folder` (every file pillow reads, sorted by name) as uint8 (n, H, W, C)
    arrays; all must have one size and mode."""
    from PIL import Image

    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    if not names:
        raise DataError(f"{folder} holds no images.")
    for start in range(0, len(names), chunk):
        images = []
        for name in names[start:start + chunk]:
            try:
                with Image.open(os.path.join(folder, name)) as image:
                    array = np.asarray(image)
            except OSError as err:
                raise DataError(f"{os.path.join(folder, name)} is not an image pillow "
                                f"reads ({err}).") from err
            images.append(array[..., None] if array.ndim == 2 else array)
        yield np.stack(images)


def _array_chunks(path: str, chunk: int = DEFAULT_PER_SHARD):
    """A .npy array read a chunk at a time (memory-mapped): one larger than memory works."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path} as a .npy array ({err}).") from err
    for start in range(0, len(array), chunk):
        yield np.array(array[start:start + chunk])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m lvm_jax.data.shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    w = commands.add_parser("write", help="write a shard folder from .npy arrays or image folders")
    w.add_argument("out", help="the folder to write (created)")
    for split in SPLITS:
        w.add_argument(f"--{split}", help=f"a .npy array (N, ...) of the {split} examples")
        w.add_argument(f"--{split}_images", help=f"a folder of {split} images (png, jpeg, ...)")
    w.add_argument("--per_shard", type=int, default=DEFAULT_PER_SHARD, help="examples per shard")
    v = commands.add_parser("verify", help="check every file against the manifest's SHA-256")
    v.add_argument("folder")
    flags = p.parse_args(argv)
    try:
        if flags.command == "verify":
            counts = verify(flags.folder)
            print(f"{flags.folder}: intact, " + ", ".join(f"{n} {k}" for k, n in counts.items()))
            return
        splits = {}
        for split in SPLITS:
            array, images = getattr(flags, split), getattr(flags, f"{split}_images")
            if (array is None) == (images is None):
                p.error(f"give one of --{split} and --{split}_images")
            splits[split] = _array_chunks(array) if array else _image_chunks(images)
        manifest = write(flags.out, splits, flags.per_shard)
        print(f"wrote {flags.out}: " + ", ".join(
            f"{s['count']} {name} examples of {tuple(s['example_shape'])} {s['dtype']} in "
            f"{len(s['shards'])} shard(s)" for name, s in manifest["splits"].items()))
    except DataError as err:
        p.exit(1, f"{p.prog}: error: {err}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
