"""Experiment configs (issue 16): checked frozen dataclasses, the command lines generated from
them, config.json read back, and the TensorBoard events every run writes."""

import csv
import dataclasses
import io
import json
import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments import common, configs, evaluate, lvae, mlp_vae, vae, vae_2d, vlae, vqvae
from lvm_jax import errors, files, viz
from lvm_jax.train import records

MODULES = {"vae": vae, "vlae": vlae, "vae_2d": vae_2d, "vqvae": vqvae, "lvae": lvae,
           "mlp_vae": mlp_vae, "evaluate": evaluate}
REQUIRED = {"evaluate": ["--workdir", "runs/vae/mnist_embedded"]}  # the flags without a default


def parsed(name: str, flags=()):
    module = MODULES[name]
    return configs.from_flags(module.Config,
                              module.parser().parse_args([*REQUIRED.get(name, []), *flags]))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_config_defaults_equal_the_command_line_defaults(name):
    assert parsed(name) == MODULES[name].Config()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_help_shows_every_field_with_its_help(name):
    module = MODULES[name]
    text = " ".join(module.parser().format_help().split())
    for field in dataclasses.fields(module.Config):
        assert f"--{field.name}" in text, field.name
        assert " ".join(field.metadata["help"].split()) in text, field.name


def test_experiment_defaults_differ_where_the_reference_says():
    assert vlae.Config().prior == "made" and vae.Config().prior == "standard"
    assert vae_2d.Config().epochs == 10 and vae_2d.Config().ema_decay == 0.99
    assert mlp_vae.Config().grad_clip == 1000.0 and vqvae.Config().dataset == "patches_embedded"
    assert isinstance(vlae.Config(), vae.Config)


def test_flags_of_every_kind_build_the_config():
    assert parsed("vqvae", ["--prior", "pixelcnn", "gated", "--fsq_levels", "8", "4", "4",
                            "--quantizer", "plain", "--quick"]) == vqvae.Config(
        prior=("pixelcnn", "gated"), fsq_levels=(8, 4, 4), quick=True)
    assert parsed("lvae", ["--no-skip", "--likelihood", "dmol", "--free_bits", "0"]) == lvae.Config(
        skip=False, likelihood="dmol", free_bits=0.0)
    assert parsed("vae", ["--grad_clip", "inf", "--ema_decay", "0"]) == vae.Config(
        grad_clip=math.inf, ema_decay=0.0)


@pytest.mark.parametrize("make, message", [
    (lambda: vae.Config(epochs=0), "experiments.vae.Config: epochs=0 is not a positive integer."),
    (lambda: vae.Config(epochs=2.5), "epochs=2.5 is not a positive integer."),
    (lambda: vae.Config(batch_size=True), "batch_size=True is not a positive integer."),
    (lambda: vae.Config(learning_rate=math.nan), "learning_rate=nan is not a finite positive number."),
    (lambda: vae.Config(ema_decay=1.0), "ema_decay=1.0 is not a decay rate in [0, 1)."),
    (lambda: vae.Config(grad_clip=0.0), "grad_clip=0.0 is not a positive number (inf allowed)."),
    (lambda: vae.Config(dataset="imagenet"), "dataset='imagenet' is not one of mnist_embedded, patches_embedded, "),
    (lambda: vae.Config(prior="flow"), "prior='flow' is not one of made, standard."),
    (lambda: vae.Config(data_dir=3), "data_dir=3 is not a str."),
    (lambda: vae_2d.Config(dataset="3"), "dataset='3' is not one of 1, 2, 1b, 2b."),
    (lambda: lvae.Config(skip="no"), "experiments.lvae.Config: skip='no' is not True or False."),
    (lambda: lvae.Config(iwae_examples=0), "iwae_examples=0 is not a positive integer."),
    (lambda: vqvae.Config(prior=()), "prior=() is not one or more values."),
    (lambda: vqvae.Config(prior="gated"), "prior='gated' is not one or more values."),
    (lambda: vqvae.Config(prior=("gated", "glow")), "prior=('gated', 'glow') is not one of gated, "
                                                    "pixelcnn."),
    (lambda: vqvae.Config(restart_dead_codes=10), "--restart_dead_codes needs --ema_codebook"),
    (lambda: vqvae.Config(quantizer="fsq", rotation_trick=True),
     "fsq_levels has no learned codebook: rotation_trick"),
    (lambda: mlp_vae.Config(study="width"), "study='width' is not one of all, decoders, depth."),
    (lambda: evaluate.Config(chunk=0), "experiments.evaluate.Config: chunk=0 is not a positive "
                                       "integer."),
    (lambda: vae.Config().replace(beta=-1.0), "beta=-1.0 is not a finite positive number."),
])
def test_configs_refuse_bad_values_in_one_line(make, message):
    with pytest.raises(errors.ConfigError) as refused:
        make()
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_lists_become_tuples_so_configs_stay_hashable_and_comparable():
    config = vqvae.Config(prior=["pixelcnn", "gated"], fsq_levels=[8, 4, 4], quantizer="fsq")
    assert config.prior == ("pixelcnn", "gated") and config.fsq_levels == (8, 4, 4)
    assert hash(config) == hash(vqvae.Config(prior=("pixelcnn", "gated"), fsq_levels=(8, 4, 4),
                                             quantizer="fsq"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3


def test_vqvae_quantizer_settings_survive_config_json():
    config = vqvae.Config(quantizer="cosine", ema_codebook=True, restart_dead_codes=5,
                          kmeans_iters=3, quick=True, seed=4, prior=("gated", "pixelcnn"))
    saved = json.loads(files.to_json(common.run_record(config, "vqvae", (32, 32, 3))))
    loaded = vqvae.Config.from_saved(saved)
    assert vqvae.quantizer_options(loaded) == vqvae.quantizer_options(config)
    assert (loaded.quick, loaded.seed, loaded.dataset) == (True, 4, "patches_embedded")
    assert loaded.prior == ("gated", "pixelcnn")
    assert vqvae.Config.from_saved({**saved, "prior": ["gated"]}).prior == ("gated",)


def test_config_json_is_the_configs_record_plus_run_facts():
    """Every setting is in config.json under its own name, and the config's own list says
    which of them a resume may change (the one list: `may_change_on_resume`)."""
    config = lvae.Config(quick=True, latent_layers=2, iwae_samples=10, optimizer="adam")
    record = common.run_record(config, "lvae", (32, 32, 1), free_bits=0.5)
    assert lvae.Config.may_change_on_resume() == (
        "epochs", "learning_rate", "data_dir", "input", "steps_per_call", "no_progress",
        "checkpoint_interval", "iwae_samples", "iwae_examples", "iwae_chunk")
    assert set(record) == {f.name for f in dataclasses.fields(lvae.Config)} | {"experiment",
                                                                              "example_shape"}
    assert (record["latent_layers"], record["optimizer"], record["free_bits"]) == (2, "adam", 0.5)
    assert record["example_shape"] == [32, 32, 1] and record["experiment"] == "lvae"
    assert lvae.Config.from_saved(json.loads(files.to_json(record))) == config.replace(free_bits=0.5)


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's own reader: {tag: [(step, value), ...]} of the event files in `logdir`."""
    events = EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}, events


def test_event_files_read_back_through_tensorboard_bit_for_bit(tmp_path):
    """lvm_jax's event files against TensorBoard's reader: scalars as float32 (a step past 32
    bits), a figure pixel for pixel."""
    from PIL import Image

    from lvm_jax.train import events as event_files

    writer = event_files.Scalars(str(tmp_path / files.TENSORBOARD_DIR), 0)
    writer.write([({"train/loss": 1.25, "train/kl": -3e-8}, 3), ({"train/loss": 2 ** 40}, 2 ** 35)])
    writer.close()
    pixels = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "noise.png")
    viz.write_figures_to_tensorboard(str(tmp_path), [str(tmp_path / "noise.png")], 3)
    scalars, accumulated = read_scalars(str(tmp_path / files.TENSORBOARD_DIR))
    assert scalars == {"train/loss": [(3, 1.25), (2 ** 35, 2.0 ** 40)],
                       "train/kl": [(3, np.float32(-3e-8))]}
    (image,) = accumulated.Images("figures/noise")
    assert (image.step, image.height, image.width) == (3, 7, 5)
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    np.testing.assert_array_equal(decoded, pixels)


def test_a_run_from_its_config_writes_tensorboard_events_that_match_metrics_csv(tmp_path):
    config = vae_2d.Config(dataset="2", quick=True, epochs=2, steps_per_call=100, no_progress=True)
    summary = vae_2d.train_and_evaluate(config, str(tmp_path))

    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    scalars, events = read_scalars(str(tmp_path / files.TENSORBOARD_DIR))
    metric_names = [name for name in rows[0] if name not in ("split", "epoch", "step", "time")]
    logged = {f"{row['split']}/{name}": [] for row in rows for name in metric_names if row[name]}
    for row in rows:
        for name in metric_names:
            if row[name]:  # grad_norm is a training metric: its test cells are empty
                logged[f"{row['split']}/{name}"].append((int(row["step"]), float(row[name])))
    assert set(scalars) == set(logged) and {"train/loss", "test/neg_elbo"} <= set(logged)
    for tag, expected in logged.items():
        assert len(expected) > 1 and [s for s, _ in scalars[tag]] == [s for s, _ in expected], tag
        # TensorBoard stores float32.
        np.testing.assert_allclose([v for _, v in scalars[tag]], [v for _, v in expected],
                                   rtol=1e-6, err_msg=tag)
    step = int(rows[-1]["step"])
    assert {f"figures/{name[:-4]}" for name in summary["figures"]} == set(events.Tags()["images"])
    image = events.Images("figures/samples")[-1]
    assert image.step == step and image.width > 100 and image.height > 100

    assert vae_2d.Config.from_json(str(tmp_path / "config.json")) == config  # every setting


def test_a_resumed_log_replaces_the_scalars_it_redoes_and_only_the_primary_writes(
        tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.csv")
    rows = [{"split": "train", "epoch": 1, "step": s, "time": 0.0, "loss": float(s)}
            for s in (1, 2, 3, 4)]
    log = records.MetricsLog(path, ["loss"], None)
    log.append(rows)
    log.append([{"split": "test", "epoch": 1, "step": 4, "time": 0.0, "loss": 9.0}])  # flushes
    del log
    resumed = records.MetricsLog(path, ["loss"], resume_step=2)
    resumed.append([{**row, "loss": -row["loss"]} for row in rows[2:]])
    resumed.append([{"split": "test", "epoch": 1, "step": 4, "time": 0.0, "loss": 7.0}])
    scalars, _ = read_scalars(str(tmp_path / files.TENSORBOARD_DIR))
    assert scalars == {"train/loss": [(1, 1.0), (2, 2.0), (3, -3.0), (4, -4.0)],
                       "test/loss": [(4, 7.0)]}

    monkeypatch.setattr(files, "is_primary", lambda: False)
    other = tmp_path / "other"
    records.MetricsLog(str(other / "metrics.csv"), ["loss"], None).append(rows)
    viz.write_figures_to_tensorboard(str(other), [], 4)
    assert not other.exists()
