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

Images are uint8 (H, W, 1|3), vectors floating (D,); both splits hold examples of
one shape and dtype. The examples of a split are its shards' examples in order.
Plain .npy files: any tool reads them (`np.load(f, mmap_mode="r")`), and a reader
fetches example i with one positioned read (`os.preadv`) at header + i * example
bytes, so that nothing but the examples asked for enters the process's memory (a
memory map would leave every page it touched resident). The manifest's SHA-256
of each file checks a whole folder (`verify`, a full read); the per-example
CRC-32 checks each example as it is read, so a corrupt example is reported by
file and index whatever the size of the folder.

Modules: `manifest` (the manifest, checked field by field), `writer` (`write`),
`reader` (`ShardSource`, `load`, `verify`, `fingerprint`), `cli` (the command
line, `python -m lvm_jax.data.shards write|verify`).
"""

from lvm_jax.data.shards.manifest import FORMAT, MANIFEST, SPLITS, VERSION, read_manifest
from lvm_jax.data.shards.reader import ShardSource, fingerprint, load, require_folder, verify
from lvm_jax.data.shards.writer import DEFAULT_PER_SHARD, example_crc32, write
from lvm_jax.errors import DataError

__all__ = ["DEFAULT_PER_SHARD", "FORMAT", "MANIFEST", "SPLITS", "VERSION", "DataError",
           "ShardSource", "example_crc32", "fingerprint", "load", "read_manifest",
           "require_folder", "verify", "write"]
