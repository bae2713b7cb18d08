"""Splitting the CPU into several JAX devices (`lvm_jax.cpu_devices`).

The count must be set before JAX starts its backend, so every split runs in a
subprocess of its own.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lvm_jax import cpu_devices
from lvm_jax.errors import ConfigError
from tests.helpers import run_python


@pytest.mark.parametrize("batch_sizes, limit, expected", [
    ((128,), 8, 8), ((128, 512), 8, 8), ((128, 500), 8, 4), ((256, 512), 16, 16),
    ((64, 512), 8, 4), ((32, 512), 8, 2), ((16,), 8, 1), ((8,), 8, 1),  # >= 16 per device
    ((100,), 8, 5), ((96, 512), 8, 4), ((144,), 8, 8), ((112,), 8, 7),
    ((13 * 17, 512), 8, 1), ((128,), 3, 2), ((128,), 1, 1)])
def test_count_is_the_largest_divisor_of_the_batch_sizes_with_16_examples_per_device(
        batch_sizes, limit, expected):
    assert cpu_devices.count_for(batch_sizes, limit) == expected


@pytest.mark.parametrize("sizes, expected", [((40,), 8), ((25,), 5), ((12,), 6), ((7,), 7),
                                             ((1,), 1), ((16, 40), 8)])
def test_count_with_one_per_device_is_the_largest_divisor_up_to_the_limit(sizes, expected):
    assert cpu_devices.count_for(sizes, 8, min_per_device=1) == expected


def test_limit_reads_the_variable_and_refuses_what_is_not_a_positive_integer(monkeypatch):
    monkeypatch.delenv(cpu_devices.LIMIT_VARIABLE, raising=False)
    assert cpu_devices.limit() == cpu_devices.DEFAULT_LIMIT == 8
    monkeypatch.setenv(cpu_devices.LIMIT_VARIABLE, " 3 ")
    assert cpu_devices.limit() == 3
    for bad in ("0", "-2", "two", "2.5"):
        monkeypatch.setenv(cpu_devices.LIMIT_VARIABLE, bad)
        with pytest.raises(ConfigError, match=f"LVM_JAX_CPU_DEVICES='{bad}'.*positive integer"):
            cpu_devices.limit()


SPLIT = """
    import json
    from lvm_jax import cpu_devices
    count = cpu_devices.split(128, 512)
    import jax
    print(json.dumps({"count": count, "devices": jax.device_count(),
                      "again": cpu_devices.split(128, 512)}))
"""


@pytest.mark.parametrize("env, count, devices", [
    ({}, 8, 8),
    ({cpu_devices.LIMIT_VARIABLE: "3"}, 2, 2),  # 128 and 512 share 2, not 3
    ({cpu_devices.LIMIT_VARIABLE: "1"}, 1, 1),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, None, 3),  # the user's count
    ({"JAX_NUM_CPU_DEVICES": "5"}, None, 5),
])
def test_split_sets_the_count_before_jax_starts_and_keeps_the_users(env, count, devices):
    out = run_python(SPLIT, **env)
    assert (out["count"], out["devices"]) == (count, devices)
    assert out["again"] is None  # the backend has started: nothing changes


@pytest.mark.parametrize("experiment, flags, devices, eval_batch", [
    ("vae_2d", [], 1, 500), ("mlp_vae", [], 1, 500), ("vae", [], 8, 512), ("vlae", [], 8, 512),
    ("vqvae", [], 8, 512), ("lvae", [], 4, 512),  # the Ladder VAE trains at batch 64
    ("vlae", ["--batch_size", "32"], 2, 512),
    ("vae", ["--quick"], 1, 512)])
def test_experiments_split_for_convolutional_models_only(experiment, flags, devices, eval_batch):
    """Convolutional models split, with 16 examples or more per device, and evaluate in
    batches that split as far; a --quick run, mostly compilation, does not split."""
    out = run_python(f"""
        import json, jax
        from experiments import common, {experiment} as experiment

        def devices(config, workdir):
            return {{"devices": jax.device_count(),
                     "eval_batch": common.train_config(config).eval_batch_size}}

        print(json.dumps(common.run(experiment.parser(), experiment.Config, devices, {flags!r})))
    """)
    assert out == {"devices": devices, "eval_batch": eval_batch}


def test_a_bad_limit_ends_an_experiment_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "experiments.vae", "--epochs", "1"],
                          env={**os.environ, cpu_devices.LIMIT_VARIABLE: "many"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "python -m experiments.vae: error: LVM_JAX_CPU_DEVICES='many': expected a positive "
        "integer (1 turns the split of the CPU into several devices off)"]


def test_batchnorm_vqvae_steps_on_eight_devices_match_one():
    """Two steps give the same loss, parameters and BatchNorm statistics whatever the split:
    the gradient and the statistics are those of the whole batch."""
    out = run_python("""
        import dataclasses, json, jax, numpy as np, optax
        from experiments.vqvae import vqvae_objective
        from lvm_jax.data import batching
        from lvm_jax.models import vqvae
        from lvm_jax.train.steps import initial_state, make_train_chunk
        from lvm_jax.train import TrainConfig

        assert jax.device_count() == 8
        model = vqvae.conv_vqvae((8, 8, 3), num_codes=8, code_dim=8)
        # Initialisers drawn with the 'rbg' generator: the threefry key of the seed would make
        # compiling them most of this subprocess's time (as in test_precision.py).
        objective = dataclasses.replace(vqvae_objective(model), init=lambda rng, x: model.init(
            jax.random.key(0, impl="rbg"), x))
        images = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3), np.uint8)
        idx = np.arange(32).reshape(2, 16)
        key = jax.random.key(1)
        out = {}
        for n in (1, 8):
            mesh = batching.data_mesh(jax.devices()[:n])
            # SGD: Adam would turn the rounding noise of gradients that are zero in exact
            # arithmetic (a conv bias before BatchNorm) into steps of the learning rate.
            state = batching.put_replicated(
                initial_state(objective, images[:1], TrainConfig(seed=0), optax.sgd(0.1)), mesh)
            chunk = make_train_chunk(objective, mesh)
            for rows in idx:  # one step per call, as on CPU
                state, metrics = chunk(state, batching.put_host_shard(images, mesh),
                                       batching.put_host_indices(rows[None], mesh), key)
            out[n] = {"loss": float(metrics["loss"][0]),
                      "leaves": [np.asarray(x).ravel().tolist()
                                 for x in jax.tree.leaves((state.params, state.model_state))]}
        print(json.dumps(out))
    """, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    one, eight = out["1"], out["8"]
    assert abs(one["loss"] - eight["loss"]) <= 1e-5 * max(1.0, abs(one["loss"]))
    assert len(one["leaves"]) == len(eight["leaves"]) > 0
    for a, b in zip(one["leaves"], eight["leaves"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("run_config, flags, split", [
    ({"experiment": "vae", "quick": False}, [], 40),  # k = 1000: calls of 40 samples
    ({"experiment": "vlae", "quick": False}, ["--num_samples", "100"], 25),
    ({"experiment": "lvae", "quick": False}, ["--num_samples", "600", "--chunk", "12"], 12),
    ({"experiment": "vae", "quick": True}, [], None),
    ({"experiment": "vae_2d", "quick": False}, [], None),  # an MLP
    ({"experiment": "configs"}, [], None),  # a module without an experiment's Config
    ({"experiment": "no_such_experiment"}, [], None),  # left for load_run to report
    (["not", "a", "config"], [], None)])
def test_evaluate_splits_the_cpu_for_the_runs_whose_training_split(
        tmp_path, monkeypatch, run_config, flags, split):
    """experiments.evaluate asks for as many devices as divide a call's samples, one sample
    or more each, for convolutional runs that are not --quick."""
    from experiments import configs, evaluate
    asked = []
    monkeypatch.setattr(cpu_devices, "split", lambda *sizes, **kw: asked.append((sizes, kw)))
    (tmp_path / "config.json").write_text(json.dumps(run_config))
    config = configs.from_flags(evaluate.Config,
                                evaluate.parser().parse_args(["--workdir", "w", *flags]))
    evaluate.split_cpu(config, str(tmp_path))
    assert asked == ([] if split is None else [((split,), {"min_per_device": 1})])


def test_evaluate_splits_before_jax_starts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "vae", "quick": False}))
    out = run_python(f"""
        import json, jax
        from experiments import configs, evaluate
        config = configs.from_flags(evaluate.Config,
                                    evaluate.parser().parse_args(["--workdir", "w"]))
        count = evaluate.split_cpu(config, {str(tmp_path)!r})
        print(json.dumps({{"count": count, "devices": jax.device_count()}}))
    """)
    assert out == {"count": 8, "devices": 8}


def test_a_run_trained_on_eight_devices_loads_in_a_process_of_one(tmp_path):
    """A checkpoint of a run whose CPU was split (every default convolutional run) restores
    into a reader's `jax.eval_shape` state on a process with one device, the state it saved."""
    out = run_python(f"""
        import json, jax
        from lvm_jax.data import toy2d
        from lvm_jax.train import TrainConfig, checkpoint, fit
        from tests.helpers import tiny_objective

        assert jax.device_count() == 8
        result = fit(tiny_objective(), toy2d.sample("2", 64, 0), toy2d.sample("2", 16, 1),
                     TrainConfig(epochs=1, batch_size=16, progress=False), {str(tmp_path)!r})
        print(json.dumps({{"digest": checkpoint.state_digest(result.state)}}))
    """, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    import jax

    from lvm_jax.data import toy2d
    from lvm_jax.train import TrainConfig, checkpoint, initial_state
    from tests.helpers import tiny_objective

    assert jax.device_count() == 1
    like = jax.eval_shape(lambda: initial_state(tiny_objective(), toy2d.sample("2", 1, 0),
                                                TrainConfig(batch_size=16)))
    state, step, _ = checkpoint.restore_committed(str(tmp_path), like)
    assert step == 4 and checkpoint.state_digest(state) == out["digest"]
    assert {leaf.sharding.device_set.pop() for leaf in jax.tree.leaves(state)} == {jax.devices()[0]}
