"""Progress a person can plan by (issue 34.5): the rate and the time left, for the stage and,
in a run of several stages, for the whole run; plain lines at most every `interval` s."""

import pytest

from lvm_jax import progress
from lvm_jax.progress import Progress, duration, planned


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


def test_epoch_lines_name_no_unit_and_the_units_line_names_each_once():
    units = {"kl": "nats per example", "loss": "nats per example, the training objective",
             "bits_per_dim": "bits per dimension (8-bit scale)"}
    metrics = {"kl": 1.5, "loss": 2.25, "bits_per_dim": 3.0, "count": 4.0}
    assert progress.metrics_line("test ", metrics) == ("test kl 1.5000, loss 2.2500, bits_per_dim 3.0000, "
                                                   "count 4.0000")
    assert progress.units_line(metrics, units) == (
        "units: kl in nats per example; loss in nats per example, the training objective; "
        "bits_per_dim in bits per dimension (8-bit scale)")  # each unit whole (issue 34 item 6)
    assert progress.units_line({"count": 1.0}, units) is None


def test_vqvae_epoch_lines_stay_under_160_characters():
    """The VQ-VAE's seven test metrics, each with its own unit, ran to 390 characters."""
    from experiments import vqvae

    metrics = {name: 1234.5678 for name in ("batch_codebook_usage", "codebook_loss",
                                            "commitment_loss", "loss", "perplexity", "recon_mse",
                                            "vq_loss")}
    lines = progress.metrics_line("epoch 20/20: test ", metrics).splitlines()
    assert len(lines) == 2 and all(len(line) < 160 for line in lines)
    assert lines[0].startswith("epoch 20/20: test batch_codebook_usage 1234.5678, codebook_loss")
    assert lines[1] == "    recon_mse 1234.5678, vq_loss 1234.5678" and lines[0].endswith(",")
    header = progress.units_line(metrics, vqvae.UNITS).splitlines()
    assert header[0] == "units:" and all(len(line) < 160 for line in header)
    assert f"  recon_mse: {vqvae.UNITS['recon_mse']}" in header
