"""What a command does with the workdir and flags it is given (issue 26.1, 26.6): a workdir
holding another experiment's run is refused unchanged; near-miss flags are named in one
line; required flags say so; curves say when points lie off their axes."""

import hashlib
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from experiments import (common, evaluate, lvae, mlp_vae, vae, vae_2d, vlae, vqvae,  # noqa: E402
                         vqvae2)
from lvm_jax import files, viz  # noqa: E402

MAINS = {"vae": vae.main, "vlae": vlae.main, "vqvae": vqvae.main, "mlp_vae": mlp_vae.main,
         "lvae": lvae.main, "vae_2d": vae_2d.main, "vqvae2": vqvae2.main}
CONFIGS = {"vae": vae.Config, "vlae": vlae.Config, "vqvae": vqvae.Config,
           "mlp_vae": mlp_vae.Config, "lvae": lvae.Config, "vae_2d": vae_2d.Config,
           "vqvae2": vqvae2.Config}
# Where each experiment's runs keep their config.json (and the experiment it names), as the
# experiments lay out their workdirs.
LAYOUTS = {"vae": {"config.json": "vae"}, "vlae": {"config.json": "vlae"},
           "lvae": {"config.json": "lvae"},
           "vqvae": {"vqvae/config.json": "vqvae", "prior_pixelcnn/config.json": "vqvae_prior"},
           "vqvae2": {"vqvae2/config.json": "vqvae2", "top_prior/config.json": "vqvae2_top_prior",
                      "bottom_prior/config.json": "vqvae2_bottom_prior"},
           "mlp_vae": {"decoders/gaussian/config.json": "mlp_vae",
                       "depth/deep/config.json": "mlp_vae"}}


def make_run(workdir, experiment: str) -> None:
    """A workdir laid out as `experiment`'s --quick run leaves it: its config.json files (as
    `common.run_record` writes them), a summary, a figure and a metrics.csv."""
    settings = CONFIGS[experiment](quick=True)
    for path, name in LAYOUTS[experiment].items():
        files.write_json(os.path.join(workdir, path),
                           common.run_record(settings, name, (32, 32, 1)))
        files.write_atomic(os.path.join(workdir, os.path.dirname(path), "metrics.csv"),
                             "split,epoch,step,time,loss\ntest,0,0,0.0,1.0\n")
    files.write_json(os.path.join(workdir, "summary.json"), {"test_metrics": {"loss": 1.0}})
    files.write_atomic(os.path.join(workdir, "samples.png"), b"\x89PNG not really")


def file_states(workdir) -> dict[str, tuple[str, int]]:
    """{path: (SHA-256, mtime in ns)} of every file under `workdir` but the lock a command
    takes on it."""
    states = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            if name != ".lock":
                with open(path, "rb") as f:
                    states[os.path.relpath(path, workdir)] = (
                        hashlib.file_digest(f, "sha256").hexdigest(), os.stat(path).st_mtime_ns)
    return states


@pytest.mark.parametrize("intruder, owner", [
    ("vqvae", "vlae"), ("vlae", "vqvae"), ("mlp_vae", "vae"), ("vae", "vqvae"),
    ("vae", "vlae"), ("vlae", "vae"),  # one layout, two experiments
    ("lvae", "mlp_vae"), ("vae_2d", "vae"), ("vqvae", "mlp_vae"),
    ("vqvae2", "vqvae"), ("vqvae", "vqvae2")])  # one layout of stages, two experiments
def test_another_experiments_workdir_is_refused_in_one_line_and_left_unchanged(
        intruder, owner, tmp_path, capsys):
    make_run(tmp_path, owner)
    before = file_states(tmp_path)
    with pytest.raises(SystemExit) as done:
        MAINS[intruder](["--quick", "--no_progress", "--workdir", str(tmp_path)])
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert err == (f"python -m experiments.{intruder}: error: the workdir {tmp_path} holds a run "
                   f"of {owner}, not of {intruder}: choose another --workdir for this "
                   f"{intruder} run.\n")
    assert file_states(tmp_path) == before


def test_evaluate_on_a_vqvae_run_is_refused_in_one_line_and_changes_nothing(tmp_path, capsys):
    make_run(tmp_path, "vqvae")
    before = file_states(tmp_path)
    with pytest.raises(SystemExit) as done:
        evaluate.main(["--workdir", str(tmp_path)])
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "runs of vqvae, vqvae_prior" in err
    assert "this evaluates runs of vae, vlae" in err
    assert file_states(tmp_path) == before


def test_the_owners_of_a_workdir_are_read_from_its_runs_config_json(tmp_path):
    assert common.workdir_owners(str(tmp_path / "new")) == set()
    for experiment in LAYOUTS:
        make_run(tmp_path / experiment, experiment)
        assert common.workdir_owners(str(tmp_path / experiment)) == {experiment}
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert common.workdir_owners(str(tmp_path / "broken")) == set()  # left to the run's reader


@pytest.mark.parametrize("flags, hint", [
    (["--batch-size", "32"], "did you mean --batch_size?"),
    (["--learnig_rate=3e-4"], "did you mean --learning_rate?"),
    (["--work-dir", "x"], "did you mean --workdir?"),
    (["--epoch", "3"], "did you mean --epochs?"),  # no abbreviation taken for the flag
    (["--colour", "red"], None),
])
def test_an_unknown_flag_is_one_line_naming_the_near_miss(flags, hint, capsys):
    with pytest.raises(SystemExit) as done:
        vae.main(flags)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "usage:" not in err
    assert err.startswith(f"python -m experiments.vae: error: unrecognized arguments: "
                          f"{' '.join(flags)}")
    assert (hint in err) if hint else "did you mean" not in err


def test_required_flags_show_as_required(capsys):
    text = evaluate.parser().format_help()
    line = " ".join(text[text.index("  --workdir WORKDIR"):].split("\n")[0].split())
    assert line == "--workdir WORKDIR the trained run's workdir (required)"
    assert "(default: None)" not in text
    with pytest.raises(SystemExit) as done:
        evaluate.main([])
    assert done.value.code == 2
    assert capsys.readouterr().err == ("python -m experiments.evaluate: error: the following "
                                       "arguments are required: --workdir (see --help)\n")


def test_curves_say_how_many_points_lie_above_their_axis(tmp_path, monkeypatch):
    fig, ax = plt.subplots()
    values = [1000.0] + [10.0 - 0.01 * i for i in range(100)]  # the step-0 evaluation, high
    assert viz.clip_to_bulk(ax, values, 97) == "1 point above the axis, up to 1000"
    assert ax.get_ylim()[1] < 1000
    # save_curves puts it under the panel's title.
    rows = ["split,epoch,step,time,neg_elbo", "test,0,0,0.0,1000.0"]
    rows += [f"train,1,{i + 1},0.0,{10.0 - 0.01 * i}" for i in range(100)]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    titles = []
    monkeypatch.setattr(viz, "_save", lambda fig, path: titles.extend(
        a.get_title() for a in fig.axes) or path)
    viz.save_curves(str(tmp_path / "metrics.csv"), str(tmp_path / "c.png"), names=("neg_elbo",))
    assert titles == ["neg_elbo\n(1 point above the axis, up to 1000)"]
    assert viz.clip_to_bulk(plt.subplots()[1], [1.0, 2.0, 3.0], 97) is None  # all in view
    assert viz.clip_to_bulk(plt.subplots()[1], [5.0, 5.0], 97) is None  # constant
    plt.close("all")
