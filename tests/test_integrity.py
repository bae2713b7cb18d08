"""Runs and files that cannot be corrupted (issue 11) and user errors in one line (issue 12.4).

Each test reproduces a way the library used to lose or falsify data: a pickle
that runs code, two runs in one workdir, a NaN "last good state", a silently
corrupted checkpoint, a resume that rewrote history, files others cannot read.
"""

import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import evaluate as evaluate_cli
from experiments import common, vae, vae_2d
from lvm_jax import data, files
from lvm_jax.data import toy2d
from lvm_jax.errors import (CheckpointError, ConfigError, NonFiniteLossError, UserError,
                            WorkdirError)
from lvm_jax.train import Checkpointer, TrainConfig, checkpoint, fit, initial_state
from lvm_jax.train.state import may_change_on_resume
from tests.helpers import tiny_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, TEST = toy2d.sample("1", 640, 0), toy2d.sample("1", 100, 1)
CONFIG = TrainConfig(epochs=2, batch_size=64, steps_per_call=4, eval_batch_size=100,
                     progress=False)


def with_config(**changes) -> TrainConfig:
    return TrainConfig(**{**CONFIG.__dict__, **changes})


# The run most tests below read or copy: one epoch, then resumed to two, with a clip of inf
# and a setting of NaN in its config (both must round-trip), under umask 027.
RESUMED_CONFIG = with_config(grad_clip_norm=float("inf"))
MAY_CHANGE = may_change_on_resume(TrainConfig)


def resumed_run_config(config: TrainConfig) -> dict:
    """What the resumed run's config.json holds: the loop's settings and a NaN setting."""
    return {**dataclasses.asdict(config), "free_bits": float("nan")}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """(workdir, the first segment's summary, the fit result, the output of both segments)."""
    workdir = tmp_path_factory.mktemp("resumed")
    old_umask = os.umask(0o027)
    try:
        first = fit(tiny_objective(), TRAIN, TEST, TrainConfig(**{**RESUMED_CONFIG.__dict__,
                                                                    "epochs": 1}),
                    str(workdir), resumed_run_config(RESUMED_CONFIG), MAY_CHANGE)
        result = fit(tiny_objective(), TRAIN, TEST, RESUMED_CONFIG, str(workdir),
                     resumed_run_config(RESUMED_CONFIG), MAY_CHANGE)
    finally:
        os.umask(old_umask)
    return workdir, first.summary, result


def copy_of(run, tmp_path):
    shutil.copytree(run[0], tmp_path / "run")
    return tmp_path / "run"


def tree_digest(directory) -> dict:
    """{relative path: sha256} of every file under `directory`."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).digest()
    return out


def one_line_error(capsys, main, argv) -> str:
    """Runs a CLI `main`, asserts it ends with status 1 and one line, and returns the line."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert done.value.code == 1, err
    assert "Traceback" not in err and len(lines) == 1 and "error: " in lines[0], err
    return lines[0]


# 11.1 ------------------------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_course_pickle_that_runs_code_is_refused_unrun(tmp_path, capsys):
    marker = tmp_path / "pwned"
    images = np.zeros((4, 32, 32, 3), np.uint8)
    (tmp_path / "svhn.pkl").write_bytes(
        pickle.dumps({"train": images, "test": images, "x": _RunsCode(marker)}))
    line = one_line_error(capsys, vae.main, ["--dataset", "deepul_svhn", "--data_dir",
                                             str(tmp_path), "--workdir", str(tmp_path / "run")])
    assert not marker.exists()  # the payload never ran
    assert f"{tmp_path / 'svhn.pkl'}" in line and f"{os.system.__module__}.system" in line
    assert not (tmp_path / "run").exists()  # refused before the workdir is claimed


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_course_pickles_of_every_protocol_still_load(tmp_path, protocol):
    rng = np.random.default_rng(0)
    arrays = {"train": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
              "test": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)}
    with open(tmp_path / "cifar10.pkl", "wb") as f:
        pickle.dump(arrays, f, protocol=protocol)
    ds = data.load("deepul_cifar10", str(tmp_path))
    np.testing.assert_array_equal(ds.train, arrays["train"])
    np.testing.assert_array_equal(ds.test, arrays["test"])


# 12.4: the pickles a 32x32 model cannot use ---------------------------------------------------

@pytest.mark.parametrize("shape, message", [
    ((0, 32, 32, 3), "holds no images"),
    ((4, 28, 28, 3), r"images of shape \(28, 28, 3\)"),
    ((4, 64, 64, 3), r"images of shape \(64, 64, 3\)"),
])
def test_unusable_course_pickle_ends_in_one_line(tmp_path, capsys, shape, message):
    images = np.zeros(shape, np.uint8)
    (tmp_path / "svhn.pkl").write_bytes(pickle.dumps({"train": images, "test": images}))
    line = one_line_error(capsys, vae.main, ["--dataset", "deepul_svhn", "--data_dir",
                                             str(tmp_path), "--workdir", str(tmp_path / "run")])
    assert "svhn.pkl['train']" in line
    assert re.search(message, line), line


# 11.2 ------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import functools, sys
    from lvm_jax.data import toy2d
    from lvm_jax.models import likelihoods, vae
    from lvm_jax import workdir
    from lvm_jax.train import Objective, TrainConfig, fit
    model = vae.mlp_vae(2, 2, (16,), likelihoods.get("gaussian"))
    objective = Objective.stateless(init=lambda rng, x: model.init(rng, x, rng),
                                    loss_fn=functools.partial(vae.loss_fn, model))
    config = TrainConfig(epochs=2, batch_size=64, steps_per_call=4, eval_batch_size=100,
                         progress=False)
    fit(objective, toy2d.sample("1", 640, 0), toy2d.sample("1", 100, 1), config, sys.argv[1])
    with workdir.locked(sys.argv[1]):  # as an experiment writing its figures
        print("trained", flush=True)
        sys.stdin.readline()  # holds the workdir until told to go
""")


def test_second_run_on_a_locked_workdir_is_refused_and_a_killed_run_frees_it(tmp_path):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, workdir], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert "trained" in iter(lambda: holder.stdout.readline().strip(), "")
        with pytest.raises(WorkdirError,
                           match=f"workdir {workdir} is in use by another run \\(process id "
                                 f"{holder.pid}\\)"):
            fit(tiny_objective(), TRAIN, TEST, with_config(seed=1), workdir)
        rows = files.read_csv(os.path.join(workdir, "metrics.csv"))
        keys = [(r["split"], r["epoch"], r["step"]) for r in rows]
        assert len(keys) == len(set(keys)) == 20 + 3
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
    again = fit(tiny_objective(), TRAIN, TEST, CONFIG, workdir)  # resumes the finished run
    assert again.summary["steps"] == 20


def test_two_experiments_started_on_one_new_workdir_run_one_and_refuse_the_other(tmp_path):
    """Started together on a new workdir, one experiment with its run at the top and one
    with its variants in folders: the workdir is claimed under its lock before either
    writes anything, so one runs and the other is refused in one line, writing nothing."""
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    commands = {"vae_2d": [], "mlp_vae": ["--study", "depth"]}
    procs = {name: subprocess.Popen([sys.executable, "-m", f"experiments.{name}", "--quick",
                                     "--no_progress", "--workdir", str(workdir), *flags],
                                    cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE) for name, flags in commands.items()}
    done = {name: (*proc.communicate(timeout=600), proc.returncode)
            for name, proc in procs.items()}
    (winner,) = [name for name, (_, _, code) in done.items() if code == 0]
    (loser,) = [name for name, (_, _, code) in done.items() if code == 1]
    line = done[loser][1].strip()
    assert "\n" not in line and (f"holds a run of {winner}, not of {loser}" in line
                                 or "is in use by another run" in line), line
    assert files.read_json(str(workdir / common.OWNER_FILE)) == {"experiment": winner}
    summary = files.read_json(str(workdir / "summary.json"))
    # The winner's summary alone, not merged with the other's (mlp_vae's has no "config").
    assert ("studies" in summary, "config" in summary) == (winner == "mlp_vae",
                                                           winner == "vae_2d")


def _writable(directory) -> bool:
    try:
        fd, path = tempfile.mkstemp(dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.remove(path)
    return True


def test_a_file_or_read_only_workdir_ends_in_one_line(tmp_path, capsys):
    argv = ["--quick", "--no_progress", "--workdir"]
    file = tmp_path / "a_file"
    file.write_text("")
    line = one_line_error(capsys, vae_2d.main, [*argv, str(file)])
    assert f"workdir {file}: it exists and is not a directory" in line
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    # root writes into a 0555 directory anyway; the kernel's /sys/kernel refuses even root.
    read_only = next((d for d in (str(read_only), "/sys/kernel")
                      if os.path.isdir(d) and not _writable(d)), None)
    if read_only is None:
        pytest.skip("no read-only directory on this machine")
    line = one_line_error(capsys, vae_2d.main, [*argv, read_only])
    assert f"cannot write into the workdir {read_only}: permission denied" in line


# 12.4: sizes -----------------------------------------------------------------------------------

def test_batch_larger_than_the_data_ends_in_one_line(tmp_path, capsys):
    line = one_line_error(capsys, vae_2d.main, ["--quick", "--no_progress", "--batch_size", "1024",
                                                "--workdir", str(tmp_path / "run")])
    assert f"batch_size 1024 exceeds the {common.QUICK_TRAIN} training examples" in line
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", common.OWNER_FILE]  # the claim


def test_batch_not_divisible_by_the_devices_ends_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "experiments.vae_2d", "--quick", "--no_progress", "--batch_size",
         "63", "--workdir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
             "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "batch_size 63 must be divisible by the 2 devices" in lines[0]


def test_every_user_error_is_one_typed_hierarchy():
    from experiments import common
    for error in (data.DataError, ConfigError, WorkdirError, CheckpointError, NonFiniteLossError,
                  common.FlagError):
        assert issubclass(error, UserError)
    assert issubclass(data.DataError, ValueError) and issubclass(ConfigError, ValueError)


# 11.3 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("learning_rate, steps_per_call", [(float("nan"), 1), (1e9, 4)])
def test_last_good_state_is_finite_and_a_lower_learning_rate_resumes(tmp_path, learning_rate,
                                                                     steps_per_call):
    workdir = str(tmp_path)
    bad = with_config(learning_rate=learning_rate, steps_per_call=steps_per_call)
    with pytest.raises(NonFiniteLossError, match="rerun the same command with a lower "
                                                 "--learning_rate") as caught:
        fit(tiny_objective(), TRAIN, TEST, bad, workdir)
    saved_step = int(str(caught.value).split("last good state (step ")[1].split(")")[0])

    objective = tiny_objective()
    with Checkpointer(workdir) as checkpointer:
        assert checkpointer.latest_step() == saved_step
        state, _, _ = checkpointer.restore(initial_state(objective, TRAIN[:1], bad))
    for leaf in jax.tree.leaves(state):
        assert np.all(np.isfinite(leaf))
    loss, _ = objective.loss(state.params, state.model_state, jnp.asarray(TRAIN[:64]),
                             jax.random.key(0), True)
    assert np.isfinite(loss)

    resumed = fit(tiny_objective(), TRAIN, TEST, with_config(learning_rate=1e-3), workdir)
    assert all(np.isfinite(v) for v in resumed.test_metrics.values())
    saved = files.read_json(os.path.join(workdir, "config.json"))
    assert saved["learning_rate"] == 1e-3
    change, = [change for change in saved["changes"] if change["setting"] == "learning_rate"]
    assert change["step"] == saved_step
    assert change["now"] == 1e-3 and (np.isnan(change["saved"]) or change["saved"] == 1e9)
    rows = files.read_csv(os.path.join(workdir, "metrics.csv"))
    keys = [(r["split"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)) == 20 + 3


# 11.4 ------------------------------------------------------------------------------------------

def test_overwritten_checkpoint_bytes_are_refused_and_nothing_changes(resumed_run, tmp_path):
    workdir = copy_of(resumed_run, tmp_path)
    step_dir = workdir / "checkpoints" / "20"
    files = [os.path.join(r, n) for r, _, names in os.walk(step_dir) for n in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(os.path.getsize(largest) // 2)
        f.write(b"\xff" * 40)
    before = tree_digest(workdir)
    with pytest.raises(CheckpointError, match=f"checkpoint {step_dir} "):
        longer = TrainConfig(**{**RESUMED_CONFIG.__dict__, "epochs": 3})
        fit(tiny_objective(), TRAIN, TEST, longer, str(workdir), resumed_run_config(longer),
            MAY_CHANGE)
    assert tree_digest(workdir) == before


def test_a_healthy_checkpoint_is_never_called_corrupted(resumed_run, tmp_path):
    """Restored through another model's target, a healthy checkpoint is named as another
    model's, never as corrupted (whose advice, deleting it, would destroy it)."""
    workdir = copy_of(resumed_run, tmp_path)
    like = initial_state(tiny_objective(), TRAIN[:1], RESUMED_CONFIG)
    other = like.replace(params={"renamed": like.params})
    with pytest.raises(CheckpointError) as caught:
        checkpoint.restore_committed(str(workdir), other)
    assert "does not match this model" in str(caught.value)
    assert "corrupted" not in str(caught.value) and "\n" not in str(caught.value)
    state, step, _ = checkpoint.restore_committed(str(workdir), like)
    assert step == 20
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(resumed_run[2].state.params)):
        np.testing.assert_array_equal(a, b)


def test_a_workdir_path_with_brackets_is_refused_in_one_line_before_any_write(tmp_path, capsys):
    """orbax's reader takes brackets for a pattern: such a path is refused up front."""
    workdir = tmp_path / "b[x]"
    line = one_line_error(capsys, vae_2d.main, ["--quick", "--no_progress", "--workdir",
                                                str(workdir)])
    assert f"the workdir {workdir} has a bracket in its path" in line
    assert not workdir.exists()


# 11.5 ------------------------------------------------------------------------------------------

def test_finished_run_rerun_changes_nothing_and_keeps_what_evaluate_wrote(tmp_path, capsys):
    argv = ["--quick", "--no_progress", "--workdir", str(tmp_path)]
    vae_2d.main(argv)
    evaluate_cli.main(["--workdir", str(tmp_path), "--num_samples", "4", "--chunk", "4",
                       "--num_examples", "16", "--no_progress"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["initial_test_metrics"] and summary["train_steps_per_second"]

    def outputs():  # {file: (sha256, mtime)}, but for the lock a run takes on the workdir
        return {path: (digest, os.stat(tmp_path / path).st_mtime_ns)
                for path, digest in tree_digest(tmp_path).items() if path != ".lock"}

    files = outputs()
    assert any(path.startswith("tensorboard/") for path in files)
    assert "s in all (IWAE pass" in capsys.readouterr().out
    # Nothing written: no new figures in TensorBoard, no file rewritten, and a learning rate
    # that can no longer change the result is not recorded as a change (issue 26.2).
    for extra in ([], ["--learning_rate", "3e-4"]):
        vae_2d.main(argv + extra)
        assert outputs() == files
        assert "holds a finished run (step 4 of 4): nothing to train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:  # a setting that changes the result: refused
        vae_2d.main(argv + ["--seed", "1"])
    assert done.value.code == 1 and "seed: saved 0, now 1" in capsys.readouterr().err
    assert outputs() == files
    assert "iwae_nll" in summary["test_metrics"] and "latent_diagnostics" in summary
    timing = summary["iwae_evaluation"]  # the whole command's time, not the IWAE pass alone
    assert timing["wall_time_seconds"] > timing["iwae_seconds"] > 0


def test_timings_add_up_over_resumed_segments(resumed_run):
    workdir, first, resumed = resumed_run
    assert resumed.summary["resumed_from_step"] == 10
    assert resumed.summary["wall_time_seconds"] > first["wall_time_seconds"]
    assert resumed.summary["initial_test_metrics"] == first["initial_test_metrics"] is not None
    rows = files.read_csv(str(workdir / "metrics.csv"))
    assert resumed.summary["wall_time_seconds"] >= max(float(r["time"]) for r in rows)


def test_fewer_epochs_than_the_checkpoint_are_refused(resumed_run, tmp_path):
    workdir = copy_of(resumed_run, tmp_path)
    before = tree_digest(workdir)
    with pytest.raises(ConfigError, match="trained for 20 steps, more than the 1 epochs \\(10 "
                                          "steps\\).*--epochs 2 or more"):
        shorter = TrainConfig(**{**RESUMED_CONFIG.__dict__, "epochs": 1})
        fit(tiny_objective(), TRAIN, TEST, shorter, str(workdir), resumed_run_config(shorter),
            MAY_CHANGE)
    assert tree_digest(workdir) == before


def test_a_different_run_is_named_before_its_epoch_count(resumed_run, tmp_path):
    """A workdir of another batch size counts its steps in other epochs: the error names the
    difference, not an --epochs that could not resume it."""
    workdir = copy_of(resumed_run, tmp_path)
    before = tree_digest(workdir)
    changed = TrainConfig(**{**RESUMED_CONFIG.__dict__, "epochs": 1, "batch_size": 128})
    with pytest.raises(CheckpointError, match="different run.*batch_size: saved 64, now 128"):
        fit(tiny_objective(), TRAIN, TEST, changed, str(workdir), resumed_run_config(changed),
            MAY_CHANGE)
    assert tree_digest(workdir) == before


def test_infinite_and_nan_settings_round_trip_through_config_json(resumed_run):
    saved = files.read_json(str(resumed_run[0] / "config.json"))  # and the resume accepted them
    assert saved["grad_clip_norm"] == float("inf") and np.isnan(saved["free_bits"])
    assert "changes" not in saved


# 11.6 ------------------------------------------------------------------------------------------

def test_outputs_get_the_umask_permissions(resumed_run):
    for name in ("config.json", "metrics.csv", "summary.json", "checkpoints/20/record/record.json"):
        assert stat.S_IMODE(os.stat(resumed_run[0] / name).st_mode) == 0o640, name


# 12.6 ------------------------------------------------------------------------------------------

def test_progress_off_a_terminal_is_a_plain_line_now_and_then(capsys):
    from lvm_jax.progress import Progress
    quiet = Progress(1000, 0, "run", interval=3600)
    for _ in range(1000):
        quiet.update(1, loss="1.0")
    quiet.close()
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""  # capsys is no terminal: no bar, no line per step
    chatty = Progress(3, 0, "run", interval=0)
    for _ in range(3):
        chatty.update(1, epoch=1)
    first, *timed = capsys.readouterr().out.splitlines()
    assert first == "run: step 1/3 (epoch 1)"  # the first call compiles: no rate yet
    assert [line.split(",")[0] for line in timed] == ["run: step 2/3", "run: step 3/3"]
    assert all(" steps/s, " in line and line.endswith(" left (epoch 1)") for line in timed)


def test_silent_phases_say_what_they_do(tmp_path, capsys):
    fit(tiny_objective(), TRAIN, TEST, with_config(epochs=1), str(tmp_path))
    out = capsys.readouterr().out
    assert "compiling the evaluation" in out and "compiling the training step" in out


def test_update_json_merges_nested_fields_and_replaces_owned_ones(tmp_path):
    path = str(tmp_path / "summary.json")
    files.write_json(path, {"test_metrics": {"iwae_nll": 1.5, "neg_elbo": 2.0},
                              "priors": {"old": 1}, "device": "cpu"})
    merged = common.update_json(path, {"test_metrics": {"neg_elbo": 1.9}, "priors": {"new": 2}},
                                 replace=("priors",))
    assert merged == {"test_metrics": {"iwae_nll": 1.5, "neg_elbo": 1.9}, "priors": {"new": 2},
                      "device": "cpu"}
    assert files.read_json(path) == merged
