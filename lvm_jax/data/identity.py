"""What data a run trained on: a dataset's name, its resolved location, and a digest of it.

`lvm_jax.data.load` gives every `Dataset` its `DataIdentity`. A run records
`identity.to_json()`; resuming or evaluating it, `mismatch(saved, dataset.identity)`
says in one line how the data differ, or returns None. The digest is what must be
equal; the location is reported, never compared: a folder or file moved or copied
elsewhere holds the same data, so a run may follow it. `--input memory` or `stream`
reads the same data and is not part of the identity.

The digest of each kind of dataset:

* a shard folder: the SHA-256 of its manifest.json, which holds the SHA-256 of every
  shard and checksum file, so it changes when any of them is rewritten by the
  writer. A file replaced behind the manifest's back changes no digest without a
  full read, so the identity also keeps a stamp, the SHA-256 of every listed file's
  name, size and modification time (one stat each): when the stamp differs, the
  files are verified against the manifest (`shards.verify`, a full read) before
  they are accepted;
* the course's pickles: the file's SHA-256, a full read of a file that the loader
  reads whole anyway (CIFAR-10's 184 MB: 0.1 to 0.2 s, about what loading it takes);
* the embedded datasets and the 2D toys: the SHA-256 of their arrays (at most 23 MB);
* a TFDS dataset: its name, version and split sizes (TFDS's own identity of a
  prepared dataset; its files are not read for it).
"""

import dataclasses
import hashlib
import os
from collections.abc import Mapping

import numpy as np

from lvm_jax.data import shards
from lvm_jax.data.shards.manifest import sha256
from lvm_jax.errors import DataError, RecordError


@dataclasses.dataclass(frozen=True)
class DataIdentity:
    """The data a dataset holds, as recorded in a run's config.json.

    Attributes:
      dataset: the registry name, e.g. "shards", "cifar10".
      location: where the data were read: an absolute path with symbolic links resolved
        (a shard folder, a pickle, a TFDS dataset's prepared folder), or the package that
        ships or generates the data.
      digest: what must be equal for the data to be the same (see the module's docstring):
        a SHA-256 in hex, or for TFDS "name/version, N train, M test".
      digest_of: what the digest covers, in words, for messages.
      stamp: a shard folder's files' names, sizes and modification times, hashed; None
        for other datasets.
    """

    dataset: str
    location: str
    digest: str
    digest_of: str
    stamp: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record) -> "DataIdentity":
        """The identity `to_json` wrote; RecordError if `record` is not one."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(record, Mapping) or set(record) != set(fields) or any(
                not isinstance(record[name], str) and not (name == "stamp" and record[name] is None)
                for name in fields):
            raise RecordError(f"the recorded data identity {record!r:.200} is malformed: "
                              f"expected an object of the strings {', '.join(fields)}.")
        return cls(**record)

    def describe(self) -> str:
        """One line, e.g. "shards at /data/a (SHA-256 of manifest.json 3f2a9b0c1d2e)"."""
        digest = self.digest[:12] if len(self.digest) == 64 else self.digest
        return f"{self.dataset} at {self.location} ({self.digest_of} {digest})"


def of_arrays(dataset: str, location: str, *arrays: np.ndarray) -> DataIdentity:
    """The identity of data held in `arrays`: the SHA-256 of each one's shape, dtype and
    C-order bytes, in order."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape} {array.dtype.str};".encode())
        digest.update(array.data)
    return DataIdentity(dataset, location, digest.hexdigest(), "SHA-256 of the arrays")


def of_file(dataset: str, path: str) -> DataIdentity:
    """The identity of data read from the file `path`: its SHA-256 (a full read)."""
    return DataIdentity(dataset, os.path.realpath(path), sha256(path),
                        "SHA-256 of the file")


def of_shards(dataset: str, folder: str) -> DataIdentity:
    """The identity of a shard folder: its manifest's SHA-256 and its files' stamp
    (`shards.fingerprint`); no shard is read."""
    digest, stamp = shards.fingerprint(folder)
    return DataIdentity(dataset, os.path.realpath(folder), digest,
                        f"SHA-256 of {shards.MANIFEST}", stamp)


def mismatch(saved: Mapping, current: DataIdentity) -> str | None:
    """Why the data of `current` are not those `saved` (a recorded `to_json()`) names, in one
    line naming both, or None when they are the same data.

    The same data: the same dataset and digest, wherever they are now. A shard folder
    whose stamp differs (its files replaced, rewritten, touched or copied elsewhere) is
    verified against its manifest first (a full read); a file that differs is then the
    reason. Raises RecordError when `saved` is not a recorded identity.
    """
    recorded = DataIdentity.from_json(saved)
    if (recorded.dataset, recorded.digest) != (current.dataset, current.digest):
        return f"the run's data are {recorded.describe()}; these are {current.describe()}."
    if current.stamp is not None and recorded.stamp != current.stamp:
        try:
            shards.verify(current.location)
        except DataError as err:
            return f"{current.describe()} changed since the run began: {err}"
    return None
