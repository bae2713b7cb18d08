"""A shard folder's manifest.json: its fields, checked as data when it is read, and its digest.

Every field is checked for its type and range before anything is read from a
shard: a wrong one is a one-line DataError naming the field (e.g.
`splits.train.shards[3].count`) and the file, never a KeyError or TypeError.
"""

import hashlib
import json
import os
import re

import numpy as np

from lvm_jax.data.dataset import example_kind
from lvm_jax.errors import DataError

FORMAT, VERSION = "lvm_jax.shards", 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256(path: str) -> str:
    """The SHA-256 of the file at `path`, in hex (a full read)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_path(folder: str) -> str:
    return os.path.join(folder, MANIFEST)


def read_manifest(folder: str) -> dict:
    """The manifest of the shard folder `folder`, checked field by field: each split's
    "example_shape" as a tuple and "dtype" as a np.dtype, the rest as written.

    Raises DataError naming the file and the first field of the wrong type or range:
    a format or version other than this reader's, splits other than train and test,
    examples that are not uint8 (H, W, 1|3) images nor floating (D,) vectors, splits
    of different example shapes or dtypes, an empty split, shard counts that do not
    add up, a shard file named with a path, a digest that is not a SHA-256.
    """
    path = manifest_path(folder)
    if not os.path.isfile(path):
        raise DataError(f"{folder} is not a shard folder: it has no {MANIFEST}. Write one with "
                        "python -m lvm_jax.data.shards write.")
    try:
        with open(path, "rb") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path} is not a readable JSON file ({err}).") from err
    return _Checker(path).manifest(manifest)


class _Checker:
    """Checks a parsed manifest field by field; each refusal names the field and the file."""

    def __init__(self, path: str):
        self.path = path

    def refuse(self, field: str, value, expected: str):
        shown = f"the {type(value).__name__} {value!r:.60}" if value is not None else "missing"
        raise DataError(f"{self.path}: {field} is {shown}; expected {expected}.")

    def get(self, record: dict, key: str, field: str, kind: type, expected: str):
        """record[key], of exactly `kind` (so no bool for an int, no 512.0 or "512")."""
        value = record.get(key)
        if type(value) is not kind:
            self.refuse(f"{field}{key}", value, expected)
        return value

    def count(self, record: dict, field: str) -> int:
        count = self.get(record, "count", field, int, "an integer of at least 1")
        if count < 1:
            self.refuse(f"{field}count", count, "an integer of at least 1")
        return count

    def file_name(self, record: dict, key: str, field: str) -> str:
        name = self.get(record, key, field, str, "a file name in the folder")
        if not name or os.path.basename(name) != name or name in (".", ".."):
            self.refuse(f"{field}{key}", name, "a file name in the folder, without a path")
        return name

    def digest(self, record: dict, key: str, field: str) -> str:
        value = self.get(record, key, field, str, "a SHA-256 of 64 hex digits")
        if not _SHA256.fullmatch(value):
            self.refuse(f"{field}{key}", value, "a SHA-256 of 64 hex digits")
        return value

    def manifest(self, manifest) -> dict:
        if type(manifest) is not dict:
            self.refuse("the manifest", manifest, "a JSON object")
        if manifest.get("format") != FORMAT:
            self.refuse("format", manifest.get("format"), repr(FORMAT))
        if manifest.get("version") != VERSION or type(manifest["version"]) is not int:
            self.refuse("version", manifest.get("version"), f"{VERSION} (this reader's)")
        splits = self.get(manifest, "splits", "", dict, f"an object of the splits "
                                                        f"{' and '.join(SPLITS)}")
        if sorted(splits) != sorted(SPLITS):
            self.refuse("splits", sorted(splits), f"the splits {' and '.join(SPLITS)}")
        checked = {name: self.split(splits[name], f"splits.{name}.") for name in SPLITS}
        train, test = (checked[name] for name in SPLITS)
        for key in ("example_shape", "dtype"):
            if train[key] != test[key]:
                self.refuse(f"splits.test.{key}", splits["test"][key],
                            f"the train split's, {splits['train'][key]}")
        return {**manifest, "splits": checked}

    def split(self, split, field: str) -> dict:
        if type(split) is not dict:
            self.refuse(field.rstrip("."), split, "an object")
        shape = self.get(split, "example_shape", field, list, "a list of positive integers")
        if not shape or any(type(n) is not int or n < 1 for n in shape):
            self.refuse(f"{field}example_shape", shape, "a list of positive integers")
        try:
            dtype = np.dtype(self.get(split, "dtype", field, str, "a NumPy dtype name"))
        except TypeError:
            self.refuse(f"{field}dtype", split["dtype"], "a NumPy dtype name, e.g. 'uint8'")
        example_kind(shape, dtype, f"{self.path}: {field.rstrip('.')}")
        count = self.count(split, field)
        entries = self.get(split, "shards", field, list, "a list of shards")
        shards = [self.shard(entry, f"{field}shards[{k}].") for k, entry in enumerate(entries)]
        if sum(shard["count"] for shard in shards) != count:
            self.refuse(f"{field}count", count,
                        f"the sum of its shards' counts, {sum(s['count'] for s in shards)}")
        return {**split, "example_shape": tuple(shape), "dtype": dtype, "shards": shards}

    def shard(self, shard, field: str) -> dict:
        if type(shard) is not dict:
            self.refuse(field.rstrip("."), shard, "an object")
        return {"file": self.file_name(shard, "file", field), "count": self.count(shard, field),
                "sha256": self.digest(shard, "sha256", field),
                "crc32_file": self.file_name(shard, "crc32_file", field),
                "crc32_sha256": self.digest(shard, "crc32_sha256", field)}
