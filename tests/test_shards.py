"""The shard tools refuse what the models cannot read, in one line, leaving OUT as it was.

The writer (`shards.write`, `python -m lvm_jax.data.shards write`), the manifest's
checks when a folder is read, and the command line's help and warnings.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lvm_jax.data import shards
from lvm_jax.data.shards import cli
from lvm_jax.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 1), np.uint8)
VECTORS = np.random.default_rng(1).normal(size=(12, 2)).astype(np.float32)


def tree(folder) -> dict[str, bytes | None]:
    """Every file under `folder` (relative path -> bytes; None for a folder): what a refused
    write must leave as it was."""
    found = {}
    for parent, folders, files in os.walk(folder):
        for name in folders:
            found[os.path.relpath(os.path.join(parent, name), folder)] = None
        for name in files:
            with open(os.path.join(parent, name), "rb") as f:
                found[os.path.relpath(os.path.join(parent, name), folder)] = f.read()
    return found


def refused(tmp_path, out, splits, per_shard=4, match=""):
    """Asserts that writing `splits` to `out` is one DataError matching `match` and that
    nothing under tmp_path changed; returns the message."""
    before = tree(tmp_path)
    with pytest.raises(DataError, match=match) as err:
        shards.write(str(out), splits, per_shard)
    assert "\n" not in str(err.value)
    assert tree(tmp_path) == before
    return str(err.value)


def test_a_write_into_a_file_or_under_one_is_refused(tmp_path):
    (tmp_path / "file").write_text("mine")
    splits = {"train": [IMAGES], "test": [IMAGES]}
    refused(tmp_path, tmp_path / "file", splits, match=r"file exists and is not a folder")
    refused(tmp_path, tmp_path / "file" / "out", splits,
            match=r"cannot write .*out: its parent .*file is not a directory")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.npy").write_text("stale")
    refused(tmp_path, tmp_path / "full", splits, match=r"full is not empty")


@pytest.mark.parametrize("per_shard", [0, -5, 2.0])
def test_a_shard_size_below_one_is_refused_before_writing(tmp_path, per_shard):
    refused(tmp_path, tmp_path / "out", {"train": [IMAGES], "test": [IMAGES]}, per_shard,
            match=rf"examples per shard must be an integer of at least 1, got {per_shard}")


@pytest.mark.parametrize("train, test, match", [
    (IMAGES, IMAGES[:, :4], r"train and test splits must hold examples of one shape and dtype: "
                            r"train \(8, 8, 1\) uint8, test \(4, 8, 1\) uint8"),
    (VECTORS, VECTORS.astype(np.float64), r"train \(2,\) float32, test \(2,\) float64"),
    (IMAGES.astype(np.float32), IMAGES, r"the train split: examples of shape \(8, 8, 1\) float32; "
                                        r"store images as uint8 \(H, W, C\) with C = 1 or 3"),
    (IMAGES, IMAGES.astype(np.int16), r"the test split: examples of shape \(8, 8, 1\) int16"),
    (IMAGES[..., 0], IMAGES[..., 0], r"examples of shape \(8, 8\) uint8"),
    (np.zeros((12, 8, 8, 2), np.uint8), IMAGES, r"examples of shape \(8, 8, 2\) uint8"),
    (VECTORS.astype(np.int32), VECTORS, r"examples of shape \(2,\) int32"),
    (IMAGES, IMAGES[:0], r"the test split holds no examples"),
])
def test_splits_the_models_cannot_read_are_refused_before_writing(tmp_path, train, test, match):
    (tmp_path / "out").mkdir()  # an empty OUT stays empty
    refused(tmp_path, tmp_path / "out", {"train": [train], "test": [test]}, match=match)


def test_an_array_of_another_shape_late_in_a_split_leaves_out_as_it_was(tmp_path):
    """Met after shards are written: they were written into a temporary folder, removed."""
    chunks = [IMAGES, IMAGES, IMAGES[:, :4]]
    refused(tmp_path, tmp_path / "out", {"train": chunks, "test": [IMAGES]},
            match=r"train: an array of \(4, 8, 1\) uint8 after arrays of \(8, 8, 1\) uint8")


def test_a_write_into_an_empty_folder_fills_it(tmp_path):
    (tmp_path / "out").mkdir()
    shards.write(str(tmp_path / "out"), {"train": [IMAGES], "test": [IMAGES[:3]]}, 5)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left beside it
    np.testing.assert_array_equal(shards.ShardSource(str(tmp_path / "out"), "test")[:],
                                  IMAGES[:3])


def test_the_writer_command_takes_arrays_and_image_folders(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), np.uint8)
    for split, part in (("train", images[:3]), ("test", images[3:])):
        os.makedirs(tmp_path / split)
        for i, image in enumerate(part):
            Image.fromarray(image).save(tmp_path / split / f"{i}.png")
    cli.main(["write", str(tmp_path / "a"), "--train_images", str(tmp_path / "train"),
              "--test_images", str(tmp_path / "test"), "--per_shard", "2"])
    np.testing.assert_array_equal(shards.ShardSource(str(tmp_path / "a"), "train")[:], images[:3])
    np.save(tmp_path / "train.npy", VECTORS)
    np.save(tmp_path / "test.npy", VECTORS[:5])
    cli.main(["write", str(tmp_path / "b"), "--train", str(tmp_path / "train.npy"),
              "--test", str(tmp_path / "test.npy")])
    np.testing.assert_array_equal(shards.ShardSource(str(tmp_path / "b"), "test")[:], VECTORS[:5])


def test_the_command_refuses_in_one_line_without_a_warning(tmp_path):
    """Run as `python -m`, every RuntimeWarning an error: runpy warns when the package
    imports the module it runs."""
    np.save(tmp_path / "train.npy", IMAGES)
    np.save(tmp_path / "test.npy", IMAGES)
    before = tree(tmp_path)
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m",
                           "lvm_jax.data.shards", "write", str(tmp_path / "out"), "--train",
                           str(tmp_path / "train.npy"), "--test", str(tmp_path / "test.npy"),
                           "--per_shard", "0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.splitlines() == [
        "python -m lvm_jax.data.shards: error: examples per shard must be an integer of at least "
        "1, got 0."]
    assert tree(tmp_path) == before


def test_splits_of_two_shapes_are_refused_by_the_command(tmp_path, capsys):
    np.save(tmp_path / "train.npy", IMAGES)
    np.save(tmp_path / "test.npy", IMAGES[:, :4])
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["write", str(tmp_path / "out"), "--train", str(tmp_path / "train.npy"),
                  "--test", str(tmp_path / "test.npy")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "python -m lvm_jax.data.shards: error: the train and test splits must hold examples of "
        "one shape and dtype: train (8, 8, 1) uint8, test (4, 8, 1) uint8."]
    assert tree(tmp_path) == before


def help_text(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_the_help_names_only_flags_that_exist(capsys):
    flags = {"--train", "--test", "--train_images", "--test_images", "--per_shard", "--help"}
    written = help_text(capsys, "write")
    assert all(flag in written.split() or f"[{flag}" in written for flag in flags)
    mentioned = {word.strip("[],.`") for word in help_text(capsys).split()
                 if word.startswith(("--", "[--", "`--"))}
    # The experiments' flags that the help says to train with.
    assert mentioned - flags == {"--dataset", "--data_dir", "--input"}, mentioned


@pytest.fixture
def folder(tmp_path) -> str:
    """A shard folder of 12 train images in shards of 5, 5, 2 and 12 test images."""
    shards.write(str(tmp_path / "d"), {"train": [IMAGES], "test": [IMAGES]}, 5)
    return str(tmp_path / "d")


def edit_manifest(folder: str, edit) -> str:
    path = os.path.join(folder, shards.MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)
    return path


def train_split(manifest) -> dict:
    return manifest["splits"]["train"]


@pytest.mark.parametrize("edit, message", [
    (lambda m: train_split(m)["shards"][1].pop("crc32_file"),
     "splits.train.shards[1].crc32_file is missing; expected a file name in the folder"),
    (lambda m: train_split(m).update(count=12.0),
     "splits.train.count is the float 12.0; expected an integer of at least 1"),
    (lambda m: train_split(m).update(count="12"),
     "splits.train.count is the str '12'; expected an integer of at least 1"),
    (lambda m: train_split(m).update(count=13),
     "splits.train.count is the int 13; expected the sum of its shards' counts, 12"),
    (lambda m: train_split(m)["shards"][0].update(count=True),
     "splits.train.shards[0].count is the bool True; expected an integer of at least 1"),
    (lambda m: train_split(m).update(example_shape="8,8,1"),
     "splits.train.example_shape is the str '8,8,1'; expected a list of positive integers"),
    (lambda m: train_split(m).update(example_shape=[8, 0, 1]),
     "splits.train.example_shape is the list [8, 0, 1]; expected a list of positive integers"),
    (lambda m: train_split(m).update(dtype="int16"),
     "splits.train: examples of shape (8, 8, 1) int16; store images as uint8"),
    (lambda m: train_split(m).update(dtype="no_such_type"),
     "splits.train.dtype is the str 'no_such_type'; expected a NumPy dtype name"),
    (lambda m: train_split(m)["shards"][2].update(file="../elsewhere.npy"),
     "splits.train.shards[2].file is the str '../elsewhere.npy'; expected a file name in the "
     "folder, without a path"),
    (lambda m: train_split(m)["shards"][2].update(sha256="abc"),
     "splits.train.shards[2].sha256 is the str 'abc'; expected a SHA-256 of 64 hex digits"),
    (lambda m: m["splits"].pop("test"), "splits is the list ['train']; expected the splits "
                                        "train and test"),
    (lambda m: m["splits"]["test"].update(example_shape=[4, 8, 1]),
     "splits.test.example_shape is the list [4, 8, 1]; expected the train split's, [8, 8, 1]"),
    (lambda m: m.update(version=2), "version is the int 2; expected 1 (this reader's)"),
    (lambda m: m.update(format="other"), "format is the str 'other'; expected 'lvm_jax.shards'"),
])
def test_a_manifest_field_of_the_wrong_type_or_range_is_named(folder, edit, message):
    path = edit_manifest(folder, edit)
    with pytest.raises(DataError) as err:
        shards.ShardSource(folder)
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)
    assert "\n" not in str(err.value)


def test_a_manifest_that_is_not_json_is_named(folder):
    with open(os.path.join(folder, shards.MANIFEST), "w") as f:
        f.write('{"format": ')
    with pytest.raises(DataError, match=r"manifest\.json is not a readable JSON file"):
        shards.verify(folder)


@pytest.mark.parametrize("header, message", [
    (b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (5,), }",
     r"is corrupted: it holds \(5,\) object, expected \(5,\) uint32"),
    (b"\x93NUMPY\x01\x00v\x00{'descr': '<u4', 'fortran_order': False, 'shape': (5,",
     r"is corrupted: its \.npy header cannot be read"),
    (b"not a numpy file", r"is corrupted: its \.npy header cannot be read"),
])
def test_a_corrupted_checksum_file_is_named_as_such(folder, header, message):
    path = os.path.join(folder, "train-00001-of-00003.crc32.npy")
    with open(path, "r+b") as f:
        f.write(header.ljust(128, b" ")[:127] + b"\n")
    with pytest.raises(DataError, match=rf"^checksum file {path} {message}"):
        shards.ShardSource(folder)


def test_a_folder_copied_elsewhere_reads_the_same(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "copy")
    np.testing.assert_array_equal(shards.ShardSource(str(tmp_path / "copy"))[:], IMAGES)
    assert shards.verify(str(tmp_path / "copy")) == {"train": 12, "test": 12}
