"""Run records that survive tampering, full disks and concurrent readers (issue 27).

Each test reproduces a way a run's records used to be trusted when they should not
have been: a link out of the workdir, records that disagree with each other,
malformed or hostile files, a full or read-only disk, a reader racing a training
run, an optimizer state that overflows while the loss stays finite. Each checks
that the program ends in one line naming the file and what is wrong, and that
nothing on disk changed.
"""

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments import configs, evaluate as evaluate_cli, vae, vae_2d
from lvm_jax import files
from lvm_jax.data import pickles
from lvm_jax.errors import (CheckpointError, ConfigError, DataError, NonFiniteLossError,
                            RecordError, UserError, WorkdirError)
from lvm_jax.train import checkpoint, events, fit, initial_state
from lvm_jax import workdir as workdir_lock
from lvm_jax.train.checkpoint import RECORD, RECORD_FILE
from lvm_jax.train.steps import non_finite_leaves
from tests.helpers import tiny_objective
from tests.test_integrity import CONFIG, TEST, TRAIN, one_line_error, tree_digest, with_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch run (checkpoints 10 and 20, summary.json), trained in one go."""
    workdir = tmp_path_factory.mktemp("finished")
    fit(tiny_objective(), TRAIN, TEST, CONFIG, str(workdir), {"experiment": "tiny"})
    return workdir


def copy_of(workdir, tmp_path):
    shutil.copytree(workdir, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def refit(workdir, config=CONFIG):
    return fit(tiny_objective(), TRAIN, TEST, config, str(workdir), {"experiment": "tiny"})


def refused_unchanged(workdir, error, match):
    """Reruns the run in `workdir` with one more epoch; asserts `error` matching `match`, in
    one line, and that no file under `workdir` changed."""
    before = tree_digest(workdir)
    with pytest.raises(error, match=match) as raised:
        refit(workdir, with_config(epochs=3))
    assert "\n" not in str(raised.value)
    assert tree_digest(workdir) == before
    return str(raised.value)


# 1. Nothing follows a link ---------------------------------------------------------------------

@pytest.mark.parametrize("dangling", [False, True])
def test_a_linked_lock_is_refused_in_one_line_and_its_target_untouched(tmp_path, capsys,
                                                                       dangling):
    outside = tmp_path / "outside.txt"
    if not dangling:
        outside.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / workdir_lock.LOCK_FILE).symlink_to(outside)
    line = one_line_error(capsys, vae_2d.main, ["--quick", "--workdir", str(run)])
    assert f"{run / '.lock'} is a symbolic link" in line
    assert (outside.read_text() == "precious\n") if not dangling else not outside.exists()
    assert sorted(os.listdir(run)) == [".lock"]


@pytest.mark.parametrize("name", ["metrics.csv", "config.json", "summary.json", "tensorboard",
                                  "checkpoints", "checkpoints/10"])
def test_a_link_where_a_record_belongs_is_refused_and_never_written_through(finished, tmp_path,
                                                                            name):
    run = copy_of(finished, tmp_path)
    target = tmp_path / "elsewhere"
    shutil.move(run / name, target)
    (run / name).symlink_to(target)
    before = tree_digest(target) if target.is_dir() else target.read_bytes()
    with pytest.raises((WorkdirError, CheckpointError), match="is a symbolic link") as raised:
        refit(run, with_config(epochs=3))
    assert "\n" not in str(raised.value) and os.path.islink(run / name)
    assert (tree_digest(target) if target.is_dir() else target.read_bytes()) == before


def test_a_deleted_metrics_csv_is_refused_on_resume(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    os.unlink(run / "metrics.csv")
    refused_unchanged(run, RecordError, "metrics.csv is missing: it must log every step up to "
                                        "the checkpoint at step 20")


def test_write_atomic_replaces_no_link_and_follows_none(tmp_path):
    target = tmp_path / "target"
    target.write_text("kept")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(WorkdirError, match="is a symbolic link"):
        files.write_atomic(str(tmp_path / "link"), "new")
    with pytest.raises(WorkdirError, match="is a symbolic link"):
        files.open_no_follow(str(tmp_path / "link"), "a")
    assert target.read_text() == "kept" and os.path.islink(tmp_path / "link")


# 2. Records checked against each other ---------------------------------------------------------

def test_swapped_step_folders_are_refused_by_their_records(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    checkpoints = run / "checkpoints"
    os.rename(checkpoints / "10", checkpoints / "x")
    os.rename(checkpoints / "20", checkpoints / "10")
    os.rename(checkpoints / "x", checkpoints / "20")
    refused_unchanged(run, CheckpointError, "records step 10 in the folder of step 20")
    like = initial_state(tiny_objective(), TRAIN[:1], CONFIG)
    with pytest.raises(CheckpointError, match="records step 10 in the folder of step 20"):
        checkpoint.restore_committed(str(run), like)


def test_a_state_of_another_step_than_its_folder_is_refused_despite_its_record(finished,
                                                                             tmp_path):
    """A record forged to name its new folder: the restored state's own step still must
    match."""
    run = copy_of(finished, tmp_path)
    checkpoints = run / "checkpoints"
    shutil.rmtree(checkpoints / "10")
    os.rename(checkpoints / "20", checkpoints / "10")
    path = checkpoints / "10" / RECORD / RECORD_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "step": 10}))
    with pytest.raises(CheckpointError, match="holds the state of step 20, not 10"):
        refit(run)


def test_the_summary_names_the_committed_checkpoint_it_describes(finished, tmp_path):
    summary = json.loads((finished / "summary.json").read_text())
    record = json.loads((finished / "checkpoints" / "20" / RECORD / RECORD_FILE).read_text())
    assert summary["checkpoint_step"] == record["step"] == 20
    assert record["config"] == summary["config"] == {"experiment": "tiny"}
    # A summary that describes another step (written before its checkpoint committed, by a
    # run killed between the two) is rewritten by the rerun; one that matches is kept.
    run = copy_of(finished, tmp_path)
    (run / "summary.json").write_text(json.dumps({**summary, "checkpoint_step": 30}))
    assert refit(run).summary["checkpoint_step"] == 20
    kept = tree_digest(run)
    refit(run)
    assert tree_digest(run) == kept


def tensorboard_points(directory) -> dict[str, list[int]]:
    """{tag: steps} of the scalars TensorBoard's own reader shows for `directory`."""
    reader = EventAccumulator(str(directory))
    reader.Reload()
    return {tag: [event.step for event in reader.Scalars(tag)]
            for tag in reader.Tags()["scalars"]}


@pytest.mark.parametrize("checkpointed", [False, True])
def test_tensorboard_never_shows_a_tag_and_step_twice_whatever_the_kill_point(tmp_path,
                                                                             checkpointed):
    """A run killed before its first checkpoint (or after it) left points beyond it, and a
    frame cut short; the rerun's SessionLog.START makes TensorBoard drop them, and no file
    is rewritten."""
    run = tmp_path / "run"
    if checkpointed:
        refit(run, with_config(epochs=1))
    killed = events.Scalars(str(run / files.TENSORBOARD_DIR), 11 if checkpointed else 0)
    killed.write([({"train/loss": 1.0, "test/loss": 2.0}, step)
                  for step in range(0 if not checkpointed else 11, 14)])
    killed.close()
    path = max((run / files.TENSORBOARD_DIR).iterdir())  # named by the time it opened
    with open(path, "ab") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00\x01")  # a frame cut short
    killed_bytes = path.read_bytes()
    refit(run)
    points = tensorboard_points(run / files.TENSORBOARD_DIR)
    assert points["train/loss"] == list(range(1, 21))
    assert points["test/loss"] == [0, 10, 20]
    assert path.read_bytes() == killed_bytes


# 3. Malformed records, hostile configs, flags and pickles --------------------------------------

MALFORMED_RECORDS = {
    "truncated": lambda text: text[:len(text) // 2],
    "empty": lambda text: "",
    "a list": lambda text: "[1, 2]",
    "not UTF-8": lambda text: "\udcff",
    "deep": lambda text: "[" * 100_000,
    "a huge integer": lambda text: "{\"step\": " + "9" * 5000 + "}",
}


@pytest.mark.parametrize("how", sorted(MALFORMED_RECORDS))
@pytest.mark.parametrize("name", ["config.json", "checkpoints/20/record/record.json"])
def test_a_malformed_record_is_one_line_naming_it_and_changes_nothing(finished, tmp_path, how,
                                                                      name):
    run = copy_of(finished, tmp_path)
    path = run / name
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(MALFORMED_RECORDS[how](path.read_text()))
    message = refused_unchanged(run, UserError, "malformed|cannot read|corrupted")
    assert str(path) in message


@pytest.mark.parametrize("how", ["deep", "a huge integer", "not UTF-8", "a list"])
def test_a_hostile_config_json_ends_the_command_in_one_line(vae_2d_run, tmp_path, capsys, how):
    run = copy_of(vae_2d_run, tmp_path)
    path = run / "config.json"
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(MALFORMED_RECORDS[how](path.read_text()))
    before = tree_digest(run)
    line = one_line_error(capsys, vae_2d.main, ["--quick", "--no_progress", "--workdir",
                                                str(run)])
    assert str(path) in line
    assert tree_digest(run) == before


@pytest.mark.parametrize("change, problem", [
    (lambda r: r.pop("digest"), "it lacks 'digest'"),
    (lambda r: r.update(extra=1), "unknown key 'extra'"),
    (lambda r: r.update(step="20"), "'step' is no int"),
    (lambda r: r.update(step=True), "'step' is no int"),
    (lambda r: r.update(digest=[]), "'digest' is no str"),
    (lambda r: r["timing"].update(elapsed_seconds="1"), "no number"),
    (lambda r: r.update(step=10), "records step 10 in the folder of step 20"),
    (lambda r: r.update(digest="0" * 64), "its state differs from the digest saved with it"),
])
def test_a_tampered_checkpoint_record_is_refused_in_one_line(finished, tmp_path, change,
                                                             problem):
    run = copy_of(finished, tmp_path)
    path = run / "checkpoints" / "20" / RECORD / RECORD_FILE
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    message = refused_unchanged(run, CheckpointError, "corrupted")
    assert problem in message and "Delete that step's folder" in message


def edit_csv(path, edit):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(edit(lines)))


@pytest.mark.parametrize("edit, problem", [
    (lambda lines: [], "header is missing"),
    (lambda lines: lines[1:], "its header is test"),
    (lambda lines: lines[:5] + lines[6:], "lacks the train rows of 1 step(s) from step 4"),
    (lambda lines: lines + lines[3:4], "a second time"),
    (lambda lines: lines[:3] + [lines[3].replace(",", ",x", 1)] + lines[4:], "not a number"),
    (lambda lines: lines[:3] + [lines[3][:8] + "\n"] + lines[4:], "fields, not"),
    (lambda lines: lines[:3] + [lines[3].replace("train", "valid")] + lines[4:],
     "no train or test row"),
])
def test_a_malformed_metrics_csv_is_one_line_and_changes_nothing(finished, tmp_path, edit,
                                                                 problem):
    run = copy_of(finished, tmp_path)
    edit_csv(run / "metrics.csv", edit)
    message = refused_unchanged(run, RecordError, "metrics.csv is malformed")
    assert problem in message


def test_a_row_torn_by_a_kill_is_dropped_and_the_run_resumes(finished, tmp_path):
    """A run killed while it appended rows leaves a last line without its newline: those
    steps lie beyond every checkpoint, so the rerun drops it and resumes."""
    run = copy_of(finished, tmp_path)
    with open(run / "metrics.csv", "a") as f:
        f.write("train,3,21,0.5,1.")
    refit(run, with_config(epochs=3))
    rows = files.read_csv(str(run / "metrics.csv"))
    logged = [(row["split"], int(row["step"])) for row in rows]
    assert len(logged) == len(set(logged))
    assert [step for split, step in logged if split == "train"] == list(range(1, 31))
    assert all(len(row) == len(rows[0]) and None not in row.values() for row in rows)


@pytest.mark.parametrize("text", ["", "{", "[]", "\"x\"", "[" * 100_000])
def test_a_malformed_summary_of_a_finished_run_is_one_line(finished, tmp_path, text):
    run = copy_of(finished, tmp_path)
    (run / "summary.json").write_text(text)
    before = tree_digest(run)
    with pytest.raises(RecordError, match="summary.json is malformed"):
        refit(run)
    assert tree_digest(run) == before


@pytest.mark.parametrize("text, problem", [
    ("[" * 100_000, "nests too deep"),
    ("{\"hidden\": " + "[" * 900 + "]" * 900 + "}", "nests too deep"),
    ("{\"seed\": " + "1" * 5000 + "}", "4300 digits"),
    ("{\"seed\": " + "1" * 50 + "}", "is not at most 4294967295"),
    ("{\"learning_rate\": " + "1" * 400 + "}", "(400 characters) is not a finite"),
    ("{\"beta\": \"1\"}", "beta='1' is not"),
    ("{\"prior\": {\"made\": 1}}", "is not one of"),
    ("[1]", "JSON list, not an object"),
    ("", "Expecting value"),
    ("{\"epochs\": NaN}", "epochs=nan is not a positive integer"),
])
def test_hostile_config_json_is_one_config_error_naming_the_file(tmp_path, text, problem):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        vae.Config.from_json(str(path))
    message = str(raised.value)
    assert str(path) in message and problem in message and "\n" not in message
    assert len(message) < 400


@pytest.mark.parametrize("flag, value", [("--seed", "4294967296"), ("--seed", "-1"),
                                         ("--seed", "9" * 5000), ("--epochs", "2147483648"),
                                         ("--learning_rate", "1" * 400)])
def test_out_of_range_flags_are_refused_before_any_file_exists(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as done:
        vae_2d.main([flag, value, "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and f"argument {flag}: " in err and len(err) < 2000
    assert not (tmp_path / "run").exists()
    assert configs.SEED.accepts(2**32 - 1) and not configs.SEED.accepts(2**32)


IMAGES = np.zeros((2, 32, 32, 3), np.uint8)
# Protocol 2 opcodes, for pickles that pickle.dumps would not write.
NDARRAY_CALL = b"\x80\x02cnumpy\nndarray\nJ\x00\xca\x9a;\x85\x85R."  # ndarray((10**9,))
HUGE_RECONSTRUCT = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
                    b"J\x00\xca\x9a;\x85c_codecs\nencode\nX\x01\x00\x00\x00bX\x06\x00\x00\x00"
                    b"latin1\x86R\x87R.")
DEEP_LISTS = (b"\x80\x02}(X\x05\x00\x00\x00train" + b"(" * 200_000 + b"l" * 200_000
              + b"X\x04\x00\x00\x00testK\x01u.")


def shape_beyond_data() -> bytes:
    """A pickle whose first array declares 9 images but holds the bytes of 2."""
    data = pickle.dumps({"train": IMAGES, "test": IMAGES}, protocol=2)
    return data.replace(b"K\x02K K K\x03", b"K\x09K K K\x03", 1)


@pytest.mark.parametrize("content, problem", [
    (NDARRAY_CALL, "calls numpy.ndarray"),
    (HUGE_RECONSTRUCT, "builds an array other than as NumPy pickles one"),
    (DEEP_LISTS, "['train'] is a list, not a NumPy array"),
    (pickle.dumps({"train": np.array([1, "a"], object), "test": IMAGES}), "dtype object"),
    (pickle.dumps({"train": np.zeros(3, [("a", "u1"), ("b", "f4")]), "test": IMAGES}),
     "not of numbers"),
    (pickle.dumps({"train": np.uint8(3), "test": IMAGES}), "is a uint8, not a NumPy array"),
    (pickle.dumps({"train": IMAGES.tolist(), "test": IMAGES}), "is a list, not"),
    (shape_beyond_data(), "more than the file's"),
    (pickle.dumps({"train": IMAGES, "test": IMAGES})[:-40], "truncated"),
    (b"", "Ran out of input"),
])
def test_malformed_course_pickles_are_one_data_error_naming_the_file(tmp_path, content,
                                                                     problem):
    path = tmp_path / "svhn.pkl"
    path.write_bytes(content)
    with pytest.raises(DataError) as raised:
        pickles.load("deepul_svhn", str(tmp_path))
    assert str(path) in str(raised.value) and problem in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_course_pickles_still_load_whole_and_filled(tmp_path, protocol):
    images = np.arange(2 * 32 * 32 * 3, dtype=np.uint32).astype(np.uint8).reshape(IMAGES.shape)
    (tmp_path / "svhn.pkl").write_bytes(pickle.dumps({"train": images, "test": images[:1]},
                                                     protocol=protocol))
    train, test = pickles.load("deepul_svhn", str(tmp_path))
    assert type(train) is np.ndarray and train.dtype == np.uint8
    np.testing.assert_array_equal(train, images)
    np.testing.assert_array_equal(test, images[:1])


@pytest.fixture(scope="module")
def vae_2d_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vae_2d") / "run"
    vae_2d.main(["--quick", "--no_progress", "--workdir", str(workdir)])
    return workdir


@pytest.mark.parametrize("key, value", [("dataset", "2"), ("experiment", "vae"),
                                        ("dtype", "bfloat16"), ("quick", False)])
def test_evaluate_refuses_a_config_that_is_not_its_checkpoints(vae_2d_run, tmp_path, capsys,
                                                               key, value):
    run = copy_of(vae_2d_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, key: value}))
    before = tree_digest(run)
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", str(run), "--num_samples", "2",
                                                      "--no_progress"])
    # An experiment whose Config refuses the other settings says so; else the checkpoint.
    assert "config.json" in line and ("does not match the checkpoint of step 4" in line
                                      or "does not rebuild the run" in line), line
    assert tree_digest(run) == before


@pytest.mark.parametrize("how", ["truncated", "a list", "deep", "a huge integer"])
@pytest.mark.parametrize("name", ["config.json", "summary.json"])
def test_evaluate_refuses_a_malformed_record_in_one_line_before_any_compute(
        vae_2d_run, tmp_path, capsys, name, how):
    run = copy_of(vae_2d_run, tmp_path)
    path = run / name
    path.write_text(MALFORMED_RECORDS[how](path.read_text()))
    before = tree_digest(run)
    line = one_line_error(capsys, evaluate_cli.main, ["--workdir", str(run), "--num_samples", "2",
                                                      "--no_progress"])
    assert f"{path} is malformed" in line, line
    assert tree_digest(run) == before


# 4. A full, read-only or forbidden disk --------------------------------------------------------

@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EROFS, "the file system is read-only"),
                                         (errno.EACCES, "permission denied")])
def test_a_refused_write_mid_run_is_one_line_naming_the_path_and_the_run_resumes(
        tmp_path, monkeypatch, code, cause):
    """summary.json cannot be written; the rerun resumes and writes it."""
    run = tmp_path / "run"
    write_json = files.write_json

    def failing(path, obj):
        if path.endswith("summary.json"):
            raise OSError(code, os.strerror(code), path)
        write_json(path, obj)

    monkeypatch.setattr(files, "write_json", failing)
    with pytest.raises(WorkdirError) as raised:
        refit(run)
    message = str(raised.value)
    assert message.startswith(f"cannot write {run / 'summary.json'}: {cause}")
    assert "rerun the same command" in message and "\n" not in message
    monkeypatch.setattr(files, "write_json", write_json)
    assert refit(run).summary["resumed_from_step"] == 20


def tmpfs(directory, size: str) -> bool:
    """Mounts a tmpfs of `size` on `directory`; False where mounting is not permitted."""
    directory.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                           str(directory)], capture_output=True).returncode == 0


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_once_there_is_space(tmp_path):
    disk = tmp_path / "disk"
    if not tmpfs(disk, "400k"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        command = [sys.executable, "-m", "experiments.vae_2d", "--quick", "--no_progress",
                   "--workdir", str(disk / "run")]
        full = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
        errors = [line for line in full.stderr.splitlines() if line.strip()]
        assert full.returncode == 1 and len(errors) == 1, full.stderr[-3000:]
        assert f"cannot write {disk / 'run'}" in errors[0]
        assert "no space left on the device (No space left on device)" in errors[0]
        subprocess.run(["mount", "-o", "remount,size=50m", str(disk)], check=True)
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((disk / "run" / "summary.json").read_text())["checkpoint_step"] == 4
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# 5. Readers while a run trains -----------------------------------------------------------------

# Loads until it has read `sys.argv[3]` steps (each new one means the trainer deleted an
# older one meanwhile: it keeps the newest two), or for `sys.argv[2]` seconds at most.
READER = textwrap.dedent("""
    import sys, time
    from experiments import evaluate
    workdir, steps, deadline = sys.argv[1], set(), time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline and len(steps) < int(sys.argv[3]):
        steps.add(evaluate.load_run(workdir).step)
    print(sorted(steps))
""")


def our_frames(stderr: str) -> list[str]:
    """The lines of `stderr` that come from lvm_jax's or the experiments' code. A read that a
    vanishing step cut short leaves tensorstore reads in flight, which orbax and asyncio
    report on stderr from their own frames ("Event loop is closed", "never retrieved"): noise
    that the command line silences (`experiments.common.quiet_disk_errors`) and the library,
    which installs no hook, does not. Only a report of ours would be a failed read."""
    return [line for line in stderr.splitlines()
            if re.search(r"/(lvm_jax|experiments)/|CheckpointError|RecordError", line)]


def test_load_run_reads_a_committed_checkpoint_while_the_run_trains(tmp_path):
    """A real training run saving a checkpoint every few tenths of a second (and deleting
    old ones) and a real reader loading the run again and again: every load succeeds, a
    step that vanishes under the reader giving way to the next newest."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    trainer = subprocess.Popen(
        [sys.executable, "-m", "experiments.vae_2d", "--epochs", "4000", "--batch_size", "1000",
         "--checkpoint_interval", "0", "--no_progress", "--workdir", str(run)], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "20").is_dir() and time.monotonic() < deadline:
            time.sleep(0.2)
        reader = subprocess.run([sys.executable, "-c", READER, str(run), "20", "8"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert trainer.poll() is None, trainer.stderr.read()[-3000:]  # still training
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    assert reader.returncode == 0 and not our_frames(reader.stderr), reader.stderr[-3000:]
    steps = json.loads(reader.stdout.strip().splitlines()[-1])
    assert len(steps) >= 3, steps  # it read several checkpoints, as they came


# 6. A non-finite optimizer state ---------------------------------------------------------------

def test_an_overflowing_adam_moment_is_named_and_the_last_finite_state_kept(tmp_path):
    """From the 6th update on, gradients are scaled by 1e30 before Adam: their square
    overflows the second moment (nu) while the loss, and the parameters, stay finite."""
    blow_up = optax.scale_by_schedule(lambda count: jnp.where(count >= 5, 1e30, 1.0))
    tx = optax.chain(blow_up, optax.adam(CONFIG.learning_rate))
    with pytest.raises(NonFiniteLossError) as raised:
        fit(tiny_objective(), TRAIN, TEST, CONFIG, str(tmp_path), tx=tx)
    message = str(raised.value)
    assert "opt_state/1/0/nu/" in message and "by step 8" in message, message
    assert "while the training loss stayed finite" in message
    assert "The last good state (step 4) is saved" in message  # the call 4..8 is not rerun
    saved = checkpoint.restore_committed(
        str(tmp_path), initial_state(tiny_objective(), TRAIN[:1], CONFIG, tx))
    assert saved[1] == 4 and int(saved[0].step) == 4 and non_finite_leaves(saved[0]) == []
