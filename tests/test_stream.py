"""The streaming input path: shard folders, the grain pipeline, and `fit` on a stream.

The stream must give the memory path's numbers (the same batches in the same
order), resume bit for bit after SIGKILL, read each host's shard only, report
bad data in one line naming the file and index, and stop its threads.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lvm_jax import data, files
from lvm_jax.data import batching, shards, stream, toy2d
from lvm_jax.errors import CheckpointError, DataError
from lvm_jax.train import NonFiniteLossError, Objective, TrainConfig, feeds, fit, loop
from tests.helpers import tiny_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, TEST = toy2d.sample("1", 640, 0), toy2d.sample("1", 100, 1)
PER_SHARD = 100  # 640 examples: 6 shards of 100 and one of 40
# 10 steps per epoch, calls of 4, 4 and 2 steps.
CONFIG = TrainConfig(epochs=2, batch_size=64, steps_per_call=4, eval_batch_size=64, progress=False)


def write_folder(path, train=TRAIN, test=TEST) -> str:
    shards.write(str(path), {"train": [train], "test": [test]}, PER_SHARD)
    return str(path)


def rows_without_time(workdir) -> list[dict]:
    """metrics.csv's rows, less the wall-clock column."""
    return [{k: v for k, v in row.items() if k != "time"}
            for row in files.read_csv(os.path.join(workdir, "metrics.csv"))]


def params_of(result):
    return jax.tree.leaves(jax.device_get(result.state.params))


def test_a_shard_folder_holds_the_arrays_with_a_manifest(tmp_path):
    folder = write_folder(tmp_path / "d")
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert (train["count"], train["example_shape"], train["dtype"]) == (640, [2], "float32")
    assert [s["count"] for s in train["shards"]] == [100] * 6 + [40]
    assert train["shards"][0]["file"] == "train-00000-of-00007.npy"
    np.testing.assert_array_equal(np.load(tmp_path / "d" / "train-00006-of-00007.npy"),
                                  TRAIN[600:])  # plain .npy files
    source = shards.ShardSource(folder)
    np.testing.assert_array_equal(source[:], TRAIN)
    np.testing.assert_array_equal(source.read_batch([639, 0, 250, 250]), TRAIN[[639, 0, 250, 250]])
    np.testing.assert_array_equal(source[101], TRAIN[101])
    assert shards.verify(folder) == {"train": 640, "test": 100}
    with pytest.raises(DataError, match="is not empty: write a shard folder into a new or empty"):
        write_folder(tmp_path / "d")


@pytest.mark.parametrize("hosts", [1, 3])
def test_the_pipeline_reads_each_hosts_batches_in_the_memory_paths_order(hosts):
    source, steps_per_epoch, local_batch = stream.ArraySource(TRAIN, "toy"), 4, 16
    for p in range(hosts):
        shard = batching.host_shard(len(TRAIN), p, hosts)
        batches = stream.TrainBatches(source, 7, steps_per_epoch, local_batch, shard, 12)
        iterator = batches.iterator(step=2)
        for step in range(2, 12):
            epoch, offset = divmod(step, steps_per_epoch)
            order = batching.epoch_order(7, epoch, len(TRAIN), steps_per_epoch, local_batch, shard)
            np.testing.assert_array_equal(next(iterator), TRAIN[order[offset] + shard.start])
        iterator.close()


def test_stream_and_memory_give_the_same_metrics(tmp_path):
    """The same batches in the same order: metrics.csv equal to the bit (but for time), with
    calls of 4, 4 and 2 steps."""
    memory = fit(tiny_objective(), TRAIN, TEST, CONFIG, str(tmp_path / "memory"))
    streamed = fit(tiny_objective(), shards.ShardSource(write_folder(tmp_path / "d")), TEST,
                   CONFIG, str(tmp_path / "stream"))
    assert rows_without_time(tmp_path / "memory") == rows_without_time(tmp_path / "stream")
    for a, b in zip(params_of(memory), params_of(streamed)):
        np.testing.assert_array_equal(a, b)
    saved = tmp_path / "stream" / "checkpoints" / "20" / "data" / "process_0-of-1.json"
    assert json.loads(saved.read_text()) == {"next_index": 20}  # grain's own handler's file


@pytest.mark.parametrize("before, after", [("memory", "stream"), ("stream", "memory")])
def test_a_run_may_switch_input_on_resume_bit_identical(tmp_path, before, after):
    """Either way: a stream's saved iterator state is not needed by the memory path, and a
    stream resumed from a memory run's checkpoint starts at its step."""
    inputs = {"memory": TRAIN, "stream": stream.ArraySource(TRAIN, "toy")}
    full = fit(tiny_objective(), TRAIN, TEST, CONFIG, str(tmp_path / "full"))
    first = TrainConfig(**{**CONFIG.__dict__, "epochs": 1})
    fit(tiny_objective(), inputs[before], TEST, first, str(tmp_path / "run"), {"input": before},
        ["input"])
    resumed = fit(tiny_objective(), inputs[after], TEST, CONFIG, str(tmp_path / "run"),
                  {"input": after}, ["input"])
    assert resumed.summary["resumed_from_step"] == 10
    for a, b in zip(params_of(full), params_of(resumed)):
        np.testing.assert_array_equal(a, b)
    assert rows_without_time(tmp_path / "full") == rows_without_time(tmp_path / "run")
    assert resumed.summary["config"]["changes"] == [
        {"step": 10, "setting": "input", "saved": before, "now": after}]


def test_a_data_iterator_state_of_another_step_is_refused(tmp_path):
    fit(tiny_objective(), stream.ArraySource(TRAIN, "toy"), TEST,
        TrainConfig(**{**CONFIG.__dict__, "epochs": 1}), str(tmp_path))
    saved = tmp_path / "checkpoints" / "10" / "data" / "process_0-of-1.json"
    saved.write_text(json.dumps({"next_index": 7}))
    with pytest.raises(CheckpointError, match="data iterator is at step 7, its train state at "
                                              "step 10"):
        fit(tiny_objective(), stream.ArraySource(TRAIN, "toy"), TEST, CONFIG, str(tmp_path))


def test_the_last_good_state_is_saved_with_its_iterator_state(tmp_path):
    good = tiny_objective()

    def poisoned_loss(params, model_state, batch, rng, train):
        value, aux = good.loss(params, model_state, batch, rng, train)
        return jnp.where(jnp.any(batch > 1e6), jnp.nan, value), aux

    train = TRAIN.copy()
    train[batching.epoch_order(CONFIG.seed, 0, len(train), 10, 64)[6, 0]] = 1e7  # step 7's
    objective = Objective(init=good.init, loss=poisoned_loss)
    # Calls of 4 steps: the call of steps 5..8 fails at step 7; the state that began it, whose
    # own loss was finite, is saved, with the stream's iterator state at that step.
    for name, train_data in (("memory", train), ("stream", stream.ArraySource(train, "toy"))):
        with pytest.raises(NonFiniteLossError, match=r"at step 7 \(epoch 1\).*\(step 4\)"):
            fit(objective, train_data, TEST, CONFIG, str(tmp_path / name))
        assert os.listdir(tmp_path / name / "checkpoints") == ["4"]
    saved = tmp_path / "stream" / "checkpoints" / "4" / "data" / "process_0-of-1.json"
    assert json.loads(saved.read_text()) == {"next_index": 4}


KILLED_CHILD = textwrap.dedent("""
    import sys, time
    from lvm_jax.data import shards
    from lvm_jax.train import TrainConfig, fit
    from tests.helpers import tiny_objective
    from tests.test_stream import CONFIG, TEST

    class Slow(shards.ShardSource):  # time to kill it at a chosen step
        def read_batch(self, indices):
            time.sleep(float(sys.argv[3]))
            return super().read_batch(indices)

    config = TrainConfig(**{**CONFIG.__dict__, "steps_per_call": 1})
    fit(tiny_objective(), Slow(sys.argv[1]), TEST, config, sys.argv[2], {"input": "stream"})
""")


def start_child(script: str, *args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT,
                            env={**env, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def train_rows(workdir) -> int:
    path = os.path.join(workdir, "metrics.csv")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(line.startswith("train,") for line in f)


def run_until(script: str, args, workdir, rows: int, sig=signal.SIGKILL,
              timeout: float = 120) -> subprocess.Popen:
    """Starts `script`, sends `sig` once metrics.csv holds `rows` training rows, returns it."""
    proc = start_child(script, *args)
    deadline = time.monotonic() + timeout
    while train_rows(workdir) < rows and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    return proc


def test_a_stream_killed_at_two_points_resumes_bit_for_bit(tmp_path):
    folder = write_folder(tmp_path / "d")
    full = start_child(KILLED_CHILD, folder, tmp_path / "full", 0)
    killed = tmp_path / "killed"
    # Before the first checkpoint, then mid epoch 2 (20 steps, checkpoints at 10 and 20).
    for rows in (3, 14):
        proc = run_until(KILLED_CHILD, (folder, killed, 0.2), killed, rows)
        proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL
    last = start_child(KILLED_CHILD, folder, killed, 0)
    for proc in (full, last):
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert rows_without_time(killed) == rows_without_time(tmp_path / "full")
    assert [int(r["step"]) for r in rows_without_time(killed) if r["split"] == "train"] == list(
        range(1, 21))
    saved = json.loads((killed / "summary.json").read_text())
    assert saved["test_metrics"] == json.loads((tmp_path / "full" / "summary.json").read_text())[
        "test_metrics"]


def corrupt(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def header_bytes(path) -> int:
    """The offset of a .npy file's first record."""
    with open(path, "rb") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()


def test_a_missing_shard_is_one_line_naming_it(tmp_path):
    folder = write_folder(tmp_path / "d")
    os.remove(tmp_path / "d" / "train-00002-of-00007.npy")
    with pytest.raises(DataError, match=r"shard .*train-00002-of-00007\.npy is missing"):
        shards.ShardSource(folder)


def test_a_truncated_shard_names_its_first_missing_record(tmp_path):
    folder = write_folder(tmp_path / "d")
    path = tmp_path / "d" / "train-00001-of-00007.npy"
    os.truncate(path, header_bytes(path) + 5 * 8 + 3)  # 5 whole records of 8 bytes, and a bit
    with pytest.raises(DataError, match=r"train-00001-of-00007\.npy is truncated: record 5 of 100"):
        shards.ShardSource(folder)


def test_a_shard_truncated_while_read_names_the_record(tmp_path):
    source = shards.ShardSource(write_folder(tmp_path / "d"))
    np.testing.assert_array_equal(source[101], TRAIN[101])  # shard 1's file is open
    path = tmp_path / "d" / "train-00001-of-00007.npy"
    os.truncate(path, header_bytes(path) + 50 * 8)
    np.testing.assert_array_equal(source[149], TRAIN[149])
    with pytest.raises(DataError, match=r"train-00001-of-00007\.npy is truncated: record 50 is "
                                        r"incomplete"):
        source.read_batch([0, 150])


def test_a_corrupt_record_is_one_line_naming_the_file_and_index(tmp_path):
    source = shards.ShardSource(write_folder(tmp_path / "d"))
    np.testing.assert_array_equal(source[300], TRAIN[300])  # shard 3's file is open
    path = tmp_path / "d" / "train-00003-of-00007.npy"
    corrupt(path, header_bytes(path) + 7 * 8 + 2)  # rewritten in place while it is read
    np.testing.assert_array_equal(source.read_batch([306, 308]), TRAIN[[306, 308]])
    with pytest.raises(DataError, match=r"train-00003-of-00007\.npy: record 7 is corrupt") as err:
        source.read_batch([306, 307])
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"train-00003-of-00007\.npy differs from the SHA-256"):
        shards.verify(str(tmp_path / "d"))


@pytest.mark.parametrize("change", ["replace", "touch"])
def test_a_shard_changed_after_the_source_opened_is_named_not_read(tmp_path, change):
    """Replaced by other examples with consistent checksums (another inode), or its
    modification time changed as a rewrite in place changes it: the file is not the one
    checked when the run opened the folder."""
    source = shards.ShardSource(write_folder(tmp_path / "d"))
    path = tmp_path / "d" / "train-00002-of-00007.npy"
    other = TRAIN[::-1][200:300]
    if change == "replace":
        np.save(tmp_path / "new.npy", other)
        np.save(tmp_path / "d" / "train-00002-of-00007.crc32.npy", shards.example_crc32(other))
        os.replace(tmp_path / "new.npy", path)
    else:
        os.utime(path, ns=(0, 0))
    np.testing.assert_array_equal(source.read_batch([10, 350]), TRAIN[[10, 350]])  # others
    with pytest.raises(DataError, match=rf"^shard {path} changed since the run opened it"):
        source.read_batch([10, 250])


@pytest.mark.parametrize("replacement, found", [
    (np.zeros((100, 3), np.float32), r"\(3,\) float32"),
    (np.zeros((100, 2), np.float64), r"\(2,\) float64"),
])
def test_a_shard_of_the_wrong_shape_or_dtype_is_named(tmp_path, replacement, found):
    folder = write_folder(tmp_path / "d")
    np.save(tmp_path / "d" / "train-00004-of-00007.npy", replacement)
    with pytest.raises(DataError, match=r"train-00004-of-00007\.npy: records 0\.\.99 are "
                                        + found + r"; the manifest says 100 records of \(2,\) "
                                        r"float32"):
        shards.ShardSource(folder)


def test_a_record_of_the_wrong_shape_in_a_record_source_is_named():
    records = [{"image": np.zeros((4, 4), np.uint8)} for _ in range(5)]
    records[3] = {"image": np.zeros((4, 5), np.uint8)}
    source = stream.RecordSource(records, "toy records", decode=lambda r: r["image"])
    assert source.shape == (5, 4, 4)
    with pytest.raises(DataError, match=r"toy records: record 3 is \(4, 5\) uint8; record 0 and "
                                        r"the rest are \(4, 4\) uint8"):
        source.read_batch([0, 3])


def reading_threads_end(timeout: float = 5.0) -> bool:
    """Whether grain's reading threads have ended within `timeout` seconds
    (grain shuts its pool down without waiting for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [t for t in threading.enumerate() if t.name.startswith("grain")]:
            return True
        time.sleep(0.05)
    return False


def test_fit_stops_at_a_corrupt_record_with_its_data_error(tmp_path):
    """Raised in grain's reading threads, it reaches the loop as the DataError, not a hang."""
    folder = write_folder(tmp_path / "d")
    bad = int(batching.epoch_order(CONFIG.seed, 0, len(TRAIN), 10, 64)[7, 5])  # step 8's
    path = tmp_path / "d" / f"train-{bad // PER_SHARD:05d}-of-00007.npy"
    corrupt(path, header_bytes(path) + bad % PER_SHARD * 8)
    with pytest.raises(DataError, match=rf"{path.name}: record {bad % PER_SHARD} is corrupt"):
        fit(tiny_objective(), shards.ShardSource(folder), TEST, CONFIG, str(tmp_path / "run"))
    # Read ahead, it stops the run at the call that holds it (steps 5-8), not before.
    assert [int(r["step"]) for r in rows_without_time(tmp_path / "run")
            if r["split"] == "train"] == [1, 2, 3, 4]
    assert reading_threads_end()


def test_an_experiment_reports_bad_data_in_one_line(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 1), np.uint8)
    shards.write(str(tmp_path / "d"), {"train": [images[:30]], "test": [images[30:]]})
    path = tmp_path / "d" / "train-00000-of-00001.npy"
    corrupt(path, header_bytes(path) + 5)  # record 0
    proc = subprocess.run([sys.executable, "-m", "experiments.vae", "--quick", "--dataset",
                           "shards", "--data_dir", str(tmp_path / "d"), "--input", "stream",
                           "--batch_size", "8", "--workdir", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"python -m experiments.vae: error: shard {path}: record 0 is corrupt (its CRC-32 "
        "differs from the checksum file's)."]


def test_a_stream_feed_reads_the_memory_paths_batches_and_closing_stops_its_threads():
    mesh = batching.data_mesh(jax.devices()[:1])
    plan = loop.Plan(10, 1, 20, 64, slice(0, len(TRAIN)))
    feed = feeds.StreamFeed(stream.ArraySource(TRAIN, "toy"), mesh, 0, plan)
    feed.start(3, restored=False)
    assert json.loads(feeds.iterator_state(feed, 3).get_state()) == {"next_index": 3}
    rows = feeds.put(feed, feed.rows(3, 1))  # split over the mesh like the memory path's
    assert rows.sharding == NamedSharding(mesh, P(None, "data"))
    np.testing.assert_array_equal(
        np.asarray(rows)[0], TRAIN[batching.epoch_order(0, 0, len(TRAIN), 10, 64)[3]])
    feed.close()
    assert reading_threads_end()


INTERRUPTED_CHILD = textwrap.dedent("""
    import sys, time
    from lvm_jax.data import stream
    from lvm_jax.train import TrainConfig, fit
    from tests.helpers import tiny_objective
    from tests.test_stream import CONFIG, TEST, TRAIN

    class Slow(stream.ArraySource):
        def read_batch(self, indices):
            time.sleep(0.2)
            return super().read_batch(indices)

    fit(tiny_objective(), Slow(TRAIN, "slow"), TEST,
        TrainConfig(**{**CONFIG.__dict__, "epochs": 50, "steps_per_call": 1}), sys.argv[1])
""")


def test_ctrl_c_stops_a_streamed_run_and_its_reading_threads(tmp_path):
    """fit saves the current step with its iterator state (`lvm_jax.interrupt`) and
    the process ends: no reading thread holds it."""
    proc = run_until(INTERRUPTED_CHILD, (tmp_path,), tmp_path, 2, sig=signal.SIGINT)
    stopped = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - stopped < 30  # not a hang in grain's or the feed's threads
    line = stderr.strip().splitlines()[-1]
    saved = re.search(r"stopped by SIGINT: step (\d+) of 500 is saved", line)
    assert proc.returncode != 0 and saved, stderr[-3000:]
    state = tmp_path / "checkpoints" / saved[1] / "data" / "process_0-of-1.json"
    assert json.loads(state.read_text()) == {"next_index": int(saved[1])}


@pytest.mark.parametrize("name", ["toy2d_1", "mnist", "binarized_mnist", "cifar10", "shards"])
def test_a_streamed_dataset_holds_the_examples_loaded_whole(tmp_path, name):
    """The same stored examples on both paths: one reader and one preprocessing each."""
    write_folder(tmp_path)
    with tfds.testing.mock_data(num_examples=12):
        whole = data.load(name, str(tmp_path))
        streamed = data.load(name, str(tmp_path), stream=True)
        assert stream.is_source(streamed.train) and not stream.is_source(whole.train)
        np.testing.assert_array_equal(streamed.train[:], whole.train)
        np.testing.assert_array_equal(streamed.train.read_batch([3, 1]), whole.train[[3, 1]])
    np.testing.assert_array_equal(streamed.test, whole.test)
    assert (streamed.kind, streamed.event_shape) == (whole.kind, whole.event_shape)
    assert streamed.identity == whole.identity  # --input is not part of what the data are
    quick = streamed.head(5, 2)
    assert stream.is_source(quick.train) and len(quick.train) == 5 and len(quick.test) == 2
