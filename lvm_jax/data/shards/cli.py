"""Write a shard folder from .npy arrays or folders of images, or verify one.

    python -m lvm_jax.data.shards write OUT --train train.npy --test test.npy [--per_shard N]
    python -m lvm_jax.data.shards write OUT --train_images train_dir/ --test_images test_dir/
    python -m lvm_jax.data.shards verify OUT

`write` refuses, before writing anything, an OUT that is a file, a folder that is
not empty or one whose parent is not a directory, --per_shard below 1, an empty
split, examples that are not uint8 (H, W, 1|3) images nor floating (D,) vectors,
and train and test examples of different shapes or dtypes; it writes into a
temporary folder beside OUT and renames it into place at the end. `verify` checks
every file against the manifest's SHA-256. Train on a folder with
`--dataset shards --data_dir OUT` (add `--input stream` when it does not fit in
memory).
"""

import argparse
import os

import numpy as np

from lvm_jax.data.shards.manifest import SPLITS
from lvm_jax.data.shards.reader import verify
from lvm_jax.data.shards.writer import DEFAULT_PER_SHARD, write
from lvm_jax.errors import DataError


def _image_chunks(folder: str, chunk: int = 256):
    """The images of `folder` (every file pillow reads, sorted by name) as uint8 (n, H, W, C)
    arrays; all must have one size and mode."""
    from PIL import Image

    if not os.path.isdir(folder):
        raise DataError(f"{folder} is not a folder of images.")
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
        if len({image.shape for image in images}) > 1:
            raise DataError(f"{folder} holds images of different sizes or modes "
                            f"({', '.join(sorted(map(str, {i.shape for i in images})))}): a "
                            "shard folder's images all have one shape.")
        yield np.stack(images)


def _array_chunks(path: str, chunk: int = DEFAULT_PER_SHARD):
    """A .npy array read a chunk at a time (memory-mapped): one larger than memory works."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path} as a .npy array ({err}).") from err
    if array.ndim == 0:
        raise DataError(f"{path} holds a single value, not an array of examples (N, ...).")
    for start in range(0, len(array), chunk):
        yield np.array(array[start:start + chunk])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m lvm_jax.data.shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    w = commands.add_parser("write", help="write a shard folder from .npy arrays or image folders")
    w.add_argument("out", help="the folder to write: new, or an empty one")
    for split in SPLITS:
        w.add_argument(f"--{split}", help=f"a .npy array (N, ...) of the {split} examples")
        w.add_argument(f"--{split}_images", help=f"a folder of {split} images (png, jpeg, ...)")
    w.add_argument("--per_shard", type=int, default=DEFAULT_PER_SHARD, help="examples per shard (at least 1)")
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
