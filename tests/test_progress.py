"""Progress a person can plan by (issue 34.5): the rate and the time left, for the stage and,
in a run of several stages, for the whole run; plain lines at most every `interval` s."""

import pytest

from lvm_jax.train import progress
from lvm_jax.train.progress import Progress, duration, planned


@pytest.fixture
def clock(monkeypatch):
    """A clock the test moves: `clock.now` seconds."""
    class Clock:
        now = 0.0
    monkeypatch.setattr(progress.time, "monotonic", lambda: Clock.now)
    return Clock


def test_plain_lines_give_the_rate_and_the_time_left_after_the_compiling_call(clock, capsys):
    stage = Progress(940, 0, "vqvae2", interval=10)
    clock.now = 60.0  # the first call waits for compilation: left out of the rate
    stage.update(1, epoch=1)
    clock.now = 65.0
    stage.update(1, epoch=1)  # under 10 s since the last line: no line
    clock.now = 80.0
    stage.update(9, epoch=1)  # 10 steps in 20 s
    assert capsys.readouterr().out.splitlines() == [
        "vqvae2: step 1/940 (epoch 1)",
        "vqvae2: step 11/940, 0.5 steps/s, 30m 58s left (epoch 1)"]


def test_a_planned_run_also_says_what_the_whole_run_has_left(clock, capsys):
    with planned({"vqvae2": 100, "top_prior": 50, "bottom_prior": 50}):
        top = Progress(50, 10, "top_prior", interval=0)
        top.update(10)
        clock.now = 8.0
        top.update(20)  # 2.5 steps/s: 10 steps left here, 50 in the bottom prior
    assert Progress(50, 0, "top_prior", interval=0).run_left(2.5) is None  # the plan ended
    assert capsys.readouterr().out.splitlines()[-1] == (
        "top_prior: step 40/50, 2.5 steps/s, 4s left; run (stage 2 of 3) ~24s left")


@pytest.mark.parametrize("seconds, shown", [(12.4, "12s"), (187, "3m 07s"), (3900, "1h 05m")])
def test_durations_read_at_a_glance(seconds, shown):
    assert duration(seconds) == shown
