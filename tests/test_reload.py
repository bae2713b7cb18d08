"""Reloading a run from Python (issue 26.5): `load_run`'s model takes `run.preprocess(x)`,
and raw stored images are refused in one line."""

import jax
import numpy as np
import pytest

from experiments import common, evaluate, vae
from lvm_jax import files
from lvm_jax.train import Checkpointer, initial_state


@pytest.fixture(scope="module")
def vae_workdir(tmp_path_factory):
    """A vae --quick workdir holding the untrained state at step 0, as `fit` saves it."""
    workdir = tmp_path_factory.mktemp("vae")
    config = vae.Config(quick=True)
    dataset = common.load_dataset(config)
    record = common.run_record(config, "vae", dataset.event_shape)
    loop = common.train_config(config)
    with Checkpointer(str(workdir)) as checkpointer:
        checkpointer.save(initial_state(vae.build(config, record).objective, dataset.train[:1],
                                        loop), record, {})
    files.write_json(str(workdir / "config.json"), record)
    return str(workdir)


def test_the_documented_reloading_example_runs(vae_workdir):
    run = evaluate.load_run(vae_workdir)
    assert run.dataset.test.dtype == np.uint8 and run.step == 0
    x = run.preprocess(run.dataset.test[:8])
    assert x.dtype == np.float32 and float(x.min()) >= -1 and float(x.max()) <= 1
    terms = run.model.apply({"params": run.params}, x, jax.random.key(0))
    assert terms["kl"].shape == terms["log_px_z"].shape == (8,)
    assert np.isfinite(np.asarray(terms["log_px_z"])).all()


def test_raw_uint8_images_are_refused_in_one_line(vae_workdir):
    run = evaluate.load_run(vae_workdir)
    with pytest.raises(TypeError) as err:
        run.model.apply({"params": run.params}, run.dataset.test[:8], jax.random.key(0))
    assert str(err.value) == (
        "the VAE takes preprocessed floating-point inputs, not uint8: apply it to "
        "run.preprocess(x) (experiments.load_run) or its objective's preprocess(x), "
        "e.g. uint8 images scaled to [-1, 1].")
