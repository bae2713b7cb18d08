"""Interruptions (issue 26.3): SIGINT and SIGTERM save the current step and say so in one line.

The module's handlers are tested in this process; whole runs in real subprocesses,
each signalled at a phase found by waiting for a line on its stdout or a row in its
metrics.csv, then resumed by the same command and compared with an uninterrupted run
bit for bit.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lvm_jax import files, interrupt
from lvm_jax.train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny experiment run through `common.run`, as the real ones are: 4 epochs of 10 steps of
# the 2-d MLP VAE, one step per compiled call; it prints the SHA-256 of its parameters last.
TINY = textwrap.dedent("""
    import dataclasses, hashlib, sys
    import jax, numpy as np
    from experiments import common
    from lvm_jax.data import toy2d
    from lvm_jax.train import TrainConfig, fit
    from tests.helpers import tiny_objective

    def train_and_evaluate(config, workdir):
        loop = TrainConfig(epochs=config.epochs, batch_size=64, steps_per_call=1,
                           eval_batch_size=100, progress=False)
        result = fit(tiny_objective(), toy2d.sample("1", 640, 0), toy2d.sample("1", 100, 1),
                     loop, workdir, {"experiment": "tiny"})
        leaves = jax.tree.leaves(jax.device_get(result.state.params))
        print("params", hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in leaves))
              .hexdigest(), flush=True)

    common.run(common.parser(common.Config, "tiny", "tiny"), common.Config, train_and_evaluate,
               sys.argv[1:])
""")
EPOCHS, STEPS = 4, 40


def start(workdir, *flags) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    return subprocess.Popen([sys.executable, "-c", TINY, "--epochs", str(EPOCHS), "--workdir",
                             str(workdir), *flags], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**env, "JAX_PLATFORMS": "cpu",
                                                         "PYTHONPATH": ROOT})


def finish(proc) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def wait_for_line(proc, text: str) -> list[str]:
    """Reads `proc`'s stdout up to the first line containing `text`; returns the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"the run ended without printing {text!r}: {lines}")


def wait_until(proc, ready, what: str) -> None:
    """Polls `ready()` until it holds, failing with `what` if `proc` ends first."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return
        time.sleep(0.005)
    raise AssertionError(f"{what} before the run ended")


def wait_for_train_rows(proc, workdir, rows: int) -> None:
    """Waits until `workdir`'s metrics.csv holds `rows` training rows."""
    path = os.path.join(workdir, "metrics.csv")
    wait_until(proc, lambda: os.path.exists(path) and sum(
        r["split"] == "train" for r in files.read_csv(path)) >= rows,
        f"no {rows} training rows")


def params_digest(out: str) -> str:
    return re.search(r"^params (\w+)$", out, re.M).group(1)


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(parameters' digest, metrics.csv rows without their times) of the run uninterrupted."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    code, out, err = finish(start(workdir))
    assert code == 0, err
    return params_digest(out), without_time(files.read_csv(str(workdir / "metrics.csv")))


def assert_stopped(proc, signum, workdir) -> int:
    """The stopped run's one line, status and verified checkpoint; returns its step."""
    code, out, err = finish(proc)
    assert code == 128 + signum, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    line = err.strip()
    match = re.fullmatch(rf"python -m experiments.tiny: stopped by {signal.Signals(signum).name}: "
                         rf"step (\d+) of {STEPS} is saved in (\S+); rerun the same command to "
                         "resume from it", line)
    assert match, line
    step, directory = int(match.group(1)), match.group(2)
    assert directory == os.path.join(workdir, "checkpoints", str(step))
    assert checkpoint.read_record(directory, step)["step"] == step  # committed with its record
    rows = files.read_csv(os.path.join(workdir, "metrics.csv"))
    assert max(int(r["step"]) for r in rows) == step  # the log stops where the checkpoint does
    return step


def test_signals_at_every_phase_save_and_the_run_resumes_bit_identical(tmp_path, uninterrupted):
    """One run stopped three times, each stop resumed by the same command: SIGINT during the
    first evaluation, SIGINT during the compilation of the training step, SIGTERM mid
    training; it ends with the uninterrupted run's parameters and metrics, and a rerun
    finds it finished."""
    workdir = str(tmp_path)
    proc = start(workdir)
    wait_for_line(proc, "evaluating the initial model")
    proc.send_signal(signal.SIGINT)
    assert assert_stopped(proc, signal.SIGINT, workdir) == 0

    proc = start(workdir)
    wait_for_line(proc, "compiling the training step")
    proc.send_signal(signal.SIGINT)
    step = assert_stopped(proc, signal.SIGINT, workdir)
    assert 0 < step < 15

    proc = start(workdir)
    assert f"resuming from step {step} of {STEPS}" in "".join(wait_for_line(proc, "resuming"))
    wait_for_train_rows(proc, workdir, 15)
    proc.send_signal(signal.SIGTERM)
    assert 15 <= assert_stopped(proc, signal.SIGTERM, workdir) < STEPS

    code, out, err = finish(start(workdir))
    assert code == 0, err
    assert params_digest(out) == uninterrupted[0]
    assert without_time(files.read_csv(os.path.join(workdir, "metrics.csv"))) == uninterrupted[1]
    code, out, _ = finish(start(workdir))
    assert code == 0 and f"holds a finished run (step {STEPS} of {STEPS}): nothing to train" in out


# The module itself, in this process and in a bare subprocess. -------------------------------

@pytest.mark.parametrize("second_ends_process", [True, False])
def test_first_signal_sets_the_flag_and_arms_the_second(second_ends_process):
    """The command line's second signal meets the default action (the process ends); called
    from Python, it meets the handlers from before (a notebook's KeyboardInterrupt)."""
    before = {sig: signal.getsignal(sig) for sig in interrupt.SIGNALS}
    with interrupt.handled(second_ends_process):
        assert interrupt.received() is None
        interrupt.check("nothing")  # no signal: returns
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
        assert interrupt.received() == signal.SIGTERM == interrupt.requested()
        armed = {sig: signal.getsignal(sig) for sig in interrupt.SIGNALS}
        assert armed == ({sig: signal.SIG_DFL for sig in interrupt.SIGNALS}
                         if second_ends_process else before)
        with pytest.raises(interrupt.Interrupted, match="^stopped by SIGTERM: step 3 is saved$"
                           ) as stop:
            interrupt.check("step 3 is saved")
        assert stop.value.exit_status == 143
    assert {sig: signal.getsignal(sig) for sig in interrupt.SIGNALS} == before


def test_nested_blocks_share_one_flag_and_restore_on_the_outermost_exit():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a process started in the background
    with interrupt.handled():
        with interrupt.handled():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        assert interrupt.received() == signal.SIGINT  # the inner exit kept it
    assert signal.getsignal(signal.SIGINT) == before
    with interrupt.handled():
        assert interrupt.received() is None  # a new outermost block starts afresh


def test_a_second_signal_ends_the_process_at_once():
    waiter = textwrap.dedent("""
        import time
        from lvm_jax import interrupt
        with interrupt.handled(second_ends_process=True):
            print("ready", flush=True)
            while interrupt.received() is None:
                time.sleep(0.01)
            print("noted", flush=True)
            time.sleep(60)  # a slow save: the second signal must not wait for it
    """)
    proc = subprocess.Popen([sys.executable, "-c", waiter], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                                         "PYTHONPATH": ROOT})
    wait_for_line(proc, "ready")
    proc.send_signal(signal.SIGINT)
    wait_for_line(proc, "noted")
    tic = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == -signal.SIGINT  # killed by the signal's default action
    assert time.monotonic() - tic < 5


def run_module(module: str, *flags) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    return subprocess.Popen([sys.executable, "-m", f"experiments.{module}", *flags], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})


def test_signals_while_writing_figures_and_evaluating_leave_whole_files(tmp_path):
    """vae_2d signalled (SIGTERM) once fit has written summary.json: the last results are
    always completed (docs/interruptions.md), every figure whole and named in the summary,
    then one line saying so and 143; a rerun finds a finished run. Then experiments.evaluate
    signalled during its IWAE pass: one line, summary.json untouched."""
    workdir = str(tmp_path / "run")
    proc = run_module("vae_2d", "--quick", "--no_progress", "--workdir", workdir)
    # Not on the last epoch line: a signal there may stop fit before it writes the summary.
    wait_until(proc, lambda: os.path.exists(os.path.join(workdir, "summary.json")),
               "no summary.json")
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 143 and err.strip() == ("python -m experiments.vae_2d: stopped by SIGTERM: "
                                           "the run finished, and its files are all written"), err
    summary = files.read_json(os.path.join(workdir, "summary.json"))
    assert summary["figures"]
    for figure in summary["figures"]:  # whole PNGs
        with open(os.path.join(workdir, figure), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    code, out, err = finish(run_module("vae_2d", "--quick", "--no_progress", "--workdir", workdir))
    assert code == 0, err
    assert "holds a finished run (step 4 of 4)" in out

    with open(os.path.join(workdir, "summary.json"), "rb") as f:
        before = f.read()
    proc = run_module("evaluate", "--workdir", workdir, "--num_samples", "5000", "--chunk", "100",
                      "--batch_size", "1", "--no_progress")
    wait_for_line(proc, "IWAE bound with k=5000")
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 143 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("python -m experiments.evaluate: stopped by SIGTERM: the importance-"
                          "weighted bound stopped at batch ")
    with open(os.path.join(workdir, "summary.json"), "rb") as f:
        assert f.read() == before
