"""A run knows what data it trained on (issue 35): config.json records the data's identity,
a resume on other data is refused before anything is written, the same data moved elsewhere
resumes, and `evaluate` refuses other data or, with --other_data, records it apart."""

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest

from experiments import evaluate, vae
from lvm_jax.data import identity, shards
from lvm_jax.errors import DataError
from lvm_jax.train import checkpoint


def write_shards(folder, seed: int) -> str:
    images = np.random.default_rng(seed).integers(0, 256, (102, 32, 32, 1), np.uint8)
    shards.write(str(folder), {"train": [images[:32]], "test": [images[32:]]})  # 70 for the figures
    return str(folder)


def snapshot(folder) -> dict[str, str]:
    """Every file under `folder` -> the SHA-256 of its bytes."""
    return {os.path.relpath(os.path.join(d, name), folder):
            hashlib.sha256(open(os.path.join(d, name), "rb").read()).hexdigest()
            for d, _, names in os.walk(folder) for name in names}


def test_a_resume_compares_the_data_not_where_they_lie(tmp_path):
    a, b = write_shards(tmp_path / "a", 0), write_shards(tmp_path / "b", 1)
    moved = shutil.copytree(a, tmp_path / "moved")
    ident_a, ident_b, ident_moved = (identity.of_shards("shards", f) for f in (a, b, moved))
    saved = {"experiment": "vae", "data": ident_a.to_json()}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(DataError, match=f"holds a run of other data: the run's data are shards at "
                                        f"{re.escape(a)} .* these are shards at {re.escape(b)} "):
        checkpoint.resumed_config(str(tmp_path / "run"), {**saved, "data": ident_b.to_json()}, 4)
    now = {**saved, "data": ident_moved.to_json()}
    assert checkpoint.resumed_config(str(tmp_path / "run"), now, 4) == now


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished vae --quick run on shard folder a, and a folder b of other images."""
    root = tmp_path_factory.mktemp("identity")
    a, b = write_shards(root / "a", 0), write_shards(root / "b", 1)
    config = vae.Config(dataset="shards", data_dir=a, quick=True, batch_size=8, no_progress=True)
    vae.train_and_evaluate(config, str(root / "run"))
    return config, str(root / "run"), a, b


def test_config_json_records_the_data(trained):
    config, workdir, a, _ = trained
    with open(os.path.join(workdir, "config.json")) as f:
        recorded = json.load(f)["data"]
    assert recorded == identity.of_shards("shards", a).to_json()
    assert recorded["digest"] == hashlib.sha256(open(os.path.join(a, "manifest.json"), "rb")
                                                .read()).hexdigest()


def test_a_rerun_on_other_data_is_refused_and_changes_no_file(trained):
    config, workdir, a, b = trained
    before = snapshot(workdir)
    with pytest.raises(DataError, match=f"^the workdir {re.escape(workdir)} holds a run of other "
                                        f"data: .*shards at {re.escape(b)} "):
        vae.train_and_evaluate(config.replace(data_dir=b), workdir)
    assert snapshot(workdir) == before


def test_evaluate_refuses_other_data_or_records_it_apart(trained):
    _, workdir, a, b = trained
    summary_path = os.path.join(workdir, "summary.json")
    settings = dict(num_samples=2, batch_size=4, no_progress=True)
    with pytest.raises(DataError, match=f"these are shards at {re.escape(b)} .*--other_data"):
        evaluate.evaluate_run(evaluate.Config(data_dir=b, **settings), workdir)
    own = json.load(open(summary_path))["test_metrics"]
    evaluate.evaluate_run(evaluate.Config(data_dir=b, other_data=True, **settings), workdir)
    summary = json.load(open(summary_path))
    assert summary["test_metrics"] == own  # the run's own metrics untouched
    (name, other), = summary["other_data"].items()
    assert name == identity.of_shards("shards", b).describe()
    assert other["data"]["location"] == b
    assert {"iwae_nll", "neg_elbo_iwae_examples"} <= set(other["test_metrics"])
