"""Writing a shard folder: every refusal before anything is written, the folder whole or absent.

The examples are written into a temporary folder beside OUT, which is renamed
into place once the manifest is written: a write refused or stopped halfway
leaves OUT exactly as it was (absent, or an empty folder).
"""

import itertools
import json
import os
import secrets
import shutil
import zlib
from collections.abc import Iterable, Iterator

import numpy as np

from lvm_jax.data.dataset import example_kind
from lvm_jax.data.shards.manifest import FORMAT, MANIFEST, SPLITS, VERSION, sha256
from lvm_jax.errors import DataError

# 4096 examples of 64x64x3 uint8: 50 MB per shard, a few hundred files for ImageNet 64.
DEFAULT_PER_SHARD = 4096


def example_crc32(examples: np.ndarray) -> np.ndarray:
    """uint32 (N,): the CRC-32 of the C-order bytes of each example of `examples` (N, ...)."""
    flat = np.ascontiguousarray(examples).reshape(len(examples), -1).view(np.uint8)
    return np.fromiter((zlib.crc32(row) for row in flat), np.uint32, len(examples))


def check_destination(folder: str) -> None:
    """Refuses an OUT that `write` cannot make: a file, a folder that is not empty, or one
    whose parent is not a directory."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise DataError(f"{folder} exists and is not a folder: choose a new folder to write the "
                        "shards into.")
    if os.path.isdir(folder) and os.listdir(folder):
        raise DataError(f"{folder} is not empty: write a shard folder into a new or empty one.")
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        raise DataError(f"cannot write {folder}: its parent {parent} is not a directory.")


def check_per_shard(per_shard) -> int:
    if type(per_shard) is not int or per_shard < 1:
        raise DataError(f"examples per shard must be an integer of at least 1, got {per_shard!r}.")
    return per_shard


def _peek(split: str, chunks: Iterable[np.ndarray]) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    """The first array of `chunks` that holds examples, and the arrays from it on: an empty
    split is refused here, before anything is written."""
    arrays = (np.asarray(chunk) for chunk in chunks)
    first = next((a for a in arrays if a.ndim == 0 or len(a)), None)
    if first is None:
        raise DataError(f"the {split} split holds no examples: every split needs at least one.")
    return first, itertools.chain([first], arrays)


def _write_split(folder: str, split: str, chunks: Iterable[np.ndarray],
                per_shard: int = DEFAULT_PER_SHARD) -> dict:
    """Writes the examples of `chunks` (arrays (n, ...) of one shape and dtype, any n) as
    shards of `per_shard` examples into the existing `folder`, and returns the split's
    manifest entry.

    Holds at most one shard in memory, so a split of any size streams through it.
    Shard names carry a count of shards that is only known at the end: they are
    written as <split>-<k>.npy and renamed once all are written.
    """
    pending, shards, spec = [], [], None

    def flush(examples):
        name = f"{split}-{len(shards):05d}"
        np.save(os.path.join(folder, name + ".npy"), examples)
        np.save(os.path.join(folder, name + ".crc32.npy"), example_crc32(examples))
        shards.append({"name": name, "count": len(examples)})

    first, arrays = _peek(split, chunks)
    spec = (first.shape[1:], first.dtype)  # `write` has checked that it can be stored
    for chunk in arrays:
        if (chunk.shape[1:], chunk.dtype) != spec:
            raise DataError(f"{split}: an array of {chunk.shape[1:]} {chunk.dtype} after arrays "
                            f"of {spec[0]} {spec[1]}; every example of a split has one shape "
                            "and dtype.")
        pending.append(chunk)
        while sum(map(len, pending)) >= per_shard:
            joined = np.concatenate(pending)
            flush(joined[:per_shard])
            pending = [joined[per_shard:]]
    if sum(map(len, pending)):
        flush(np.concatenate(pending))
    entries = []
    for shard in shards:
        stem = f"{shard['name']}-of-{len(shards):05d}"
        for suffix in (".npy", ".crc32.npy"):
            os.replace(os.path.join(folder, shard["name"] + suffix),
                       os.path.join(folder, stem + suffix))
        entries.append({"file": stem + ".npy", "count": shard["count"],
                        "sha256": sha256(os.path.join(folder, stem + ".npy")),
                        "crc32_file": stem + ".crc32.npy",
                        "crc32_sha256": sha256(os.path.join(folder, stem + ".crc32.npy"))})
    dtype = spec[1].name if np.dtype(spec[1].name) == spec[1] else spec[1].str  # "uint8"
    return {"example_shape": list(spec[0]), "dtype": dtype,
            "count": sum(e["count"] for e in entries), "shards": entries}


def write(folder: str, splits: dict[str, Iterable[np.ndarray]],
          per_shard: int = DEFAULT_PER_SHARD) -> dict:
    """Writes the shard folder `folder`: `splits` maps "train" and "test" to iterables of
    arrays (n, ...); returns the manifest.

    Refused with a DataError before anything is written: a `folder` that is a file, a
    folder that is not empty (stale shards of another dataset would sit beside the new
    ones) or whose parent is not a directory; `per_shard` below 1; splits other than
    train and test, or empty; examples that are not uint8 (H, W, 1|3) images nor
    floating (D,) vectors; splits of different example shapes or dtypes. An array of
    another shape or dtype later in a split is refused when it comes; then, as after any
    failure, the temporary folder is removed and `folder` is as it was.
    """
    check_destination(folder)
    check_per_shard(per_shard)
    if sorted(splits) != sorted(SPLITS):
        raise DataError(f"a shard folder holds the splits {' and '.join(SPLITS)}; got "
                        f"{', '.join(splits) or 'none'}.")
    peeked = {split: _peek(split, chunks) for split, chunks in splits.items()}
    specs = {split: (first.shape[1:], first.dtype) for split, (first, _) in peeked.items()}
    for split, spec in specs.items():
        example_kind(*spec, f"the {split} split")
    if specs["train"] != specs["test"]:
        raise DataError("the train and test splits must hold examples of one shape and dtype: "
                        f"train {specs['train'][0]} {specs['train'][1]}, test {specs['test'][0]} "
                        f"{specs['test'][1]}.")
    parent, name = os.path.split(os.path.abspath(folder))
    # Beside OUT, so that the rename is within one file system; os.mkdir applies the umask.
    staging = os.path.join(parent, f".{name}.{secrets.token_hex(4)}.partial")
    os.mkdir(staging)
    try:
        manifest = {"format": FORMAT, "version": VERSION,
                    "splits": {split: _write_split(staging, split, peeked[split][1], per_shard)
                               for split in SPLITS}}
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(staging, folder)  # over an empty folder too
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest

