"""The generic trainer: logs, checkpoints, resumption, failures and bad input."""

import collections
import functools
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import files
from lvm_jax.data import batching, toy2d
from lvm_jax.models import likelihoods, vae
from lvm_jax.train import (Checkpointer, CheckpointError, NonFiniteLossError, Objective,
                           TrainConfig, checkpoint, evaluate_test_set, fit, initial_state, steps)
from lvm_jax.train.checkpoint import RECORD, RECORD_FILE, state_digest
from tests.helpers import tiny_objective

TRAIN, TEST = toy2d.sample("1", 640, 0), toy2d.sample("1", 100, 1)
CONFIG = TrainConfig(epochs=2, batch_size=64, steps_per_call=4, eval_batch_size=64, progress=False)


def params_of(result):
    return jax.tree.leaves(jax.device_get(result.state.params))


def test_fit_writes_metrics_summary_and_checkpoints(tmp_path):
    result = fit(tiny_objective(), TRAIN, TEST, CONFIG, str(tmp_path), {"model": "tiny"})
    rows = files.read_csv(str(tmp_path / "metrics.csv"))
    train_rows = [r for r in rows if r["split"] == "train"]
    test_rows = [r for r in rows if r["split"] == "test"]
    assert [int(r["step"]) for r in train_rows] == list(range(1, 21))  # 10 steps per epoch
    assert [(int(r["epoch"]), int(r["step"])) for r in test_rows] == [(0, 0), (1, 10), (2, 20)]
    assert float(test_rows[-1]["neg_elbo"]) < float(test_rows[0]["neg_elbo"])  # it learns
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["config"]["model"] == "tiny"
    assert summary["test_metrics"]["neg_elbo"] == pytest.approx(float(test_rows[-1]["neg_elbo"]))
    assert summary["units"]["neg_elbo"] == "nats per example" and "cpu" in summary["device"]
    assert {"time", "grad_norm"} <= set(summary["units"])  # the columns fit adds
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]
    np.testing.assert_allclose(
        summary["test_metrics"]["neg_elbo"],
        summary["test_metrics"]["recon"] + summary["test_metrics"]["kl"], rtol=1e-5)
    assert result.test_metrics == summary["test_metrics"]


def test_evaluation_counts_every_test_example_once(tmp_path):
    """A partial last batch is weighted by its size: batch 64 and batch 100 agree."""
    one = fit(tiny_objective(), TRAIN, TEST, CONFIG, str(tmp_path / "a"))
    whole = TrainConfig(**{**CONFIG.__dict__, "eval_batch_size": 100})
    other = fit(tiny_objective(), TRAIN, TEST, whole, str(tmp_path / "b"))
    assert one.test_metrics["kl"] == pytest.approx(other.test_metrics["kl"], rel=1e-5)


def test_evaluate_test_set_repeats_fits_evaluation_and_counts_a_partial_batch(tmp_path):
    """The same batches and noise as fit's last evaluation (64, then the partial 36 cut into
    32 + 4), to the bit, and another objective (more Monte Carlo samples) evaluated the same
    way."""
    result = fit(tiny_objective(), TRAIN, TEST, CONFIG, str(tmp_path))
    assert evaluate_test_set(tiny_objective(), result.state, TEST, CONFIG) == result.test_metrics
    model = vae.mlp_vae(2, 2, (16,), likelihoods.get("gaussian"))
    many = Objective.stateless(init=None, loss_fn=functools.partial(vae.loss_fn, model),
                               eval_loss_fn=functools.partial(vae.loss_fn, model, num_samples=50))
    tight = evaluate_test_set(many, result.state, TEST, CONFIG)
    # Reference of the weighting: batch means of 64, 32 and 4 examples, keyed as fit keys them.
    key = jax.random.split(jax.random.key(CONFIG.seed), 3)[2]
    bounds = [(0, 64), (64, 96), (96, 100)]
    means = [vae.loss_fn(model, result.state.params, jnp.asarray(TEST[start:stop]),
                         jax.random.fold_in(key, j), num_samples=50)[1]["kl"]
             for j, (start, stop) in enumerate(bounds)]
    expected = sum((stop - start) * float(m) for (start, stop), m in zip(bounds, means)) / 100
    assert tight["kl"] == pytest.approx(expected, rel=1e-6)
    assert tight["neg_elbo"] != result.test_metrics["neg_elbo"]  # 50 samples, not 1


@pytest.mark.parametrize("num, batch, expected", [
    (100, 64, [(0, 64), (64, 96), (96, 100)]), (1300, 512, [(0, 512), (512, 1024), (1024, 1296),
                                                             (1296, 1300)]),
    (1000, 512, [(0, 512), (512, 1000)]), (2500, 500, [(0, 500), (500, 1000), (1000, 1500),
                                                        (1500, 2000), (2000, 2500)]),
    (5, 64, [(0, 5)]), (100, 100, [(0, 100)]), (12, 10, [(0, 10), (10, 12)])])
def test_evaluation_batches_cut_a_partial_last_batch_at_a_multiple_of_8(num, batch, expected):
    assert steps.eval_batches(num, batch) == expected


def test_a_save_commits_the_state_and_its_record_as_one_step(tmp_path):
    """save returns while orbax writes; the step appears whole, its record (step, config,
    timing, digest of the state) inside it, and restores bit-identical."""
    state = fit(tiny_objective(), TRAIN, TEST, CONFIG, str(tmp_path / "run")).state
    at_3 = state.replace(step=jnp.full_like(state.step, 3))
    with Checkpointer(str(tmp_path / "saved")) as checkpointer:
        checkpointer.save(at_3, {"model": "tiny"}, {"elapsed_seconds": 1.5})
    record = files.read_json(os.path.join(checkpointer.step_directory(3), RECORD, RECORD_FILE))
    assert record == {"step": 3, "config": {"model": "tiny"}, "timing": {"elapsed_seconds": 1.5},
                      "digest": state_digest(at_3)}
    with Checkpointer(str(tmp_path / "saved")) as reopened:
        restored, restored_record, _ = reopened.restore(state)
    assert restored_record == record and int(restored.step) == 3
    for saved, back in zip(jax.tree.leaves(jax.device_get(at_3)),
                           jax.tree.leaves(jax.device_get(restored))):
        np.testing.assert_array_equal(saved, back)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    full = fit(tiny_objective(), TRAIN, TEST, CONFIG, str(tmp_path / "full"))
    first = TrainConfig(**{**CONFIG.__dict__, "epochs": 1})
    fit(tiny_objective(), TRAIN, TEST, first, str(tmp_path / "resumed"))
    resumed = fit(tiny_objective(), TRAIN, TEST, CONFIG, str(tmp_path / "resumed"))
    assert resumed.summary["resumed_from_step"] == 10
    for a, b in zip(params_of(full), params_of(resumed)):
        np.testing.assert_array_equal(a, b)
    assert full.test_metrics == resumed.test_metrics
    rows = files.read_csv(str(tmp_path / "resumed" / "metrics.csv"))
    assert [int(r["step"]) for r in rows if r["split"] == "train"] == list(range(1, 21))


def test_checkpoints_wait_their_interval_but_the_last_epoch_always_saves(tmp_path):
    """With a long `checkpoint_interval`, orbax's policy saves the first epoch (no save yet)
    and the forced last one only; with 0, every epoch (the newest two are kept)."""
    for interval, saved in ((1e6, ["10", "30"]), (0.0, ["20", "30"])):
        config = TrainConfig(**{**CONFIG.__dict__, "epochs": 3, "checkpoint_interval": interval})
        fit(tiny_objective(), TRAIN, TEST, config, str(tmp_path / str(interval)))
        assert sorted(os.listdir(tmp_path / str(interval) / "checkpoints"), key=int) == saved


def test_resume_from_mid_epoch_checkpoint(tmp_path):
    """Deleting the epoch-2 checkpoint and losing the log tail still resumes exactly."""
    full = fit(tiny_objective(), TRAIN, TEST, CONFIG, str(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "20")
    again = fit(tiny_objective(), TRAIN, TEST, CONFIG, str(tmp_path / "b"))
    for a, b in zip(params_of(full), params_of(again)):
        np.testing.assert_array_equal(a, b)
    rows = files.read_csv(str(tmp_path / "b" / "metrics.csv"))
    assert len(rows) == 23  # 20 train rows and 3 evaluations, none duplicated


def test_non_finite_loss_stops_with_step_and_keeps_last_good_state(tmp_path):
    good = tiny_objective()

    def poisoned_loss(params, model_state, batch, rng, train):
        value, aux = good.loss(params, model_state, batch, rng, train)
        return jnp.where(jnp.any(batch > 1e6), jnp.nan, value), aux

    # 650 examples: each epoch drops 10. Poison one that epoch 1 drops and epoch 2 uses.
    train = toy2d.sample("1", 650, 0)
    dropped_in_epoch_1 = np.random.default_rng([0, 0]).permutation(650)[640:]
    epoch_2 = list(np.random.default_rng([0, 1]).permutation(650))
    poisoned = next(i for i in dropped_in_epoch_1 if epoch_2.index(i) < 640)
    train[poisoned] = 1e7
    bad_step = 10 + epoch_2.index(poisoned) // 64 + 1
    # The loss of step k is that of the state after k - 1 steps. No call is run again: the
    # state that began the bad call is kept when its own loss (the call's first) was finite.
    call_start = 10 + (bad_step - 11) // 4 * 4
    last_good = call_start if call_start > 10 and bad_step > call_start + 1 else 10
    with pytest.raises(NonFiniteLossError,
                       match=f"at step {bad_step} \\(epoch 2\\).*\\(step {last_good}\\)"):
        fit(Objective(init=good.init, loss=poisoned_loss), train, TEST, CONFIG, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == sorted({"10", str(last_good)})
    rows = files.read_csv(str(tmp_path / "metrics.csv"))
    assert [int(r["step"]) for r in rows if r["split"] == "train"] == list(range(1, bad_step))


def test_workdir_of_another_run_is_refused_before_compute(tmp_path):
    fit(tiny_objective(), TRAIN, TEST, TrainConfig(**{**CONFIG.__dict__, "epochs": 1}),
        str(tmp_path), {"dataset": "1"})
    with pytest.raises(CheckpointError, match="dataset: saved '1', now '2'.*another --workdir"):
        fit(tiny_objective(), TRAIN, TEST, CONFIG, str(tmp_path), {"dataset": "2"})


def test_checkpoint_of_another_model_is_refused(tmp_path):
    fit(tiny_objective(), TRAIN, TEST, TrainConfig(**{**CONFIG.__dict__, "epochs": 1}), str(tmp_path))
    bigger = vae.mlp_vae(2, 2, (32,), likelihoods.get("gaussian"))
    objective = Objective.stateless(lambda rng, x: bigger.init(rng, x, rng),
                                    functools.partial(vae.loss_fn, bigger))
    with pytest.raises(CheckpointError, match="does not match this model"):
        fit(objective, TRAIN, TEST, CONFIG, str(tmp_path))


def test_corrupted_checkpoint_is_reported(tmp_path):
    fit(tiny_objective(), TRAIN, TEST, TrainConfig(**{**CONFIG.__dict__, "epochs": 1}), str(tmp_path))
    for root, _, names in os.walk(tmp_path / "checkpoints" / "10"):
        for name in names:
            if not name.startswith("_") and name != "commit_success.txt":
                (tmp_path / root / name).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="10 is corrupted"):
        fit(tiny_objective(), TRAIN, TEST, CONFIG, str(tmp_path))


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="exceeds the 640 training examples"):
        fit(tiny_objective(), TRAIN, TEST, TrainConfig(batch_size=1000), str(tmp_path))
    with pytest.raises(ValueError, match="test set is empty"):
        fit(tiny_objective(), TRAIN, TEST[:0], CONFIG, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_ema_update_formula_with_warmup():
    from lvm_jax.train import TrainState
    import optax
    state = TrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(1.0),
                              ema_params={"w": jnp.zeros(2)})
    for step, expected_decay in ((0, 0.1), (90, 0.91), (10_000, 0.99)):
        updated = state.replace(step=step).update_ema(0.99)
        np.testing.assert_allclose(updated.ema_params["w"], 1 - expected_decay, rtol=1e-5)
    assert state.replace(ema_params=None).eval_params is state.params


def test_ema_is_evaluated_checkpointed_and_resumed_exactly(tmp_path):
    ema = TrainConfig(**{**CONFIG.__dict__, "ema_decay": 0.9})
    full = fit(tiny_objective(), TRAIN, TEST, ema, str(tmp_path / "full"))
    ema_leaf = jax.tree.leaves(full.state.ema_params)[0]
    assert not np.allclose(ema_leaf, jax.tree.leaves(full.state.params)[0])
    plain = fit(tiny_objective(), TRAIN, TEST, CONFIG, str(tmp_path / "plain"))
    for a, b in zip(params_of(full), params_of(plain)):  # EMA never changes the training path
        np.testing.assert_array_equal(a, b)
    assert full.test_metrics != plain.test_metrics  # ... but is what evaluation uses
    fit(tiny_objective(), TRAIN, TEST, TrainConfig(**{**ema.__dict__, "epochs": 1}),
        str(tmp_path / "resumed"))
    resumed = fit(tiny_objective(), TRAIN, TEST, ema, str(tmp_path / "resumed"))
    for a, b in zip(jax.tree.leaves(full.state.ema_params), jax.tree.leaves(resumed.state.ema_params)):
        np.testing.assert_array_equal(a, b)
    assert full.test_metrics == resumed.test_metrics


def test_gradient_clipping_bounds_the_first_update(tmp_path):
    import optax
    one_step = TrainConfig(epochs=1, batch_size=640, steps_per_call=1, progress=False)
    start = fit(tiny_objective(), TRAIN, TEST, TrainConfig(epochs=0, progress=False),
                str(tmp_path / "start"))
    clipped = fit(tiny_objective(), TRAIN, TEST,
                  TrainConfig(**{**one_step.__dict__, "grad_clip_norm": 1e-3}),
                  str(tmp_path / "clipped"), tx=optax.sgd(1.0))
    step = [a - b for a, b in zip(params_of(clipped), params_of(start))]
    assert float(optax.tree.norm(step)) == pytest.approx(1e-3, rel=1e-3)  # sgd(1) moves by the clip


def test_dispatch_bounded_waits_for_the_oldest_call_once_the_queue_is_full():
    waited, queued = [], collections.deque()

    class Call:
        def __init__(self, i):
            self.i = i

        def block_until_ready(self):
            waited.append(self.i)
            return self

    results = [steps.dispatch_bounded(queued, Call, i) for i in range(20)]
    assert [r.i for r in results] == list(range(20))
    assert waited == list(range(20 - steps.MAX_EVAL_CALLS_IN_FLIGHT))  # the oldest, in order
    assert len(queued) == steps.MAX_EVAL_CALLS_IN_FLIGHT


def test_optimizer_operations_are_named_in_the_compiled_step():
    """Adam's (and the EMA's) operations carry the "optimizer" scope in their op_name, which
    `benchmarks.profile_step` sorts a profile by; the model's forward and backward do not."""
    mesh = batching.data_mesh()
    config = TrainConfig(**{**CONFIG.__dict__, "ema_decay": 0.9})
    state = jax.device_put(initial_state(tiny_objective(), TRAIN[:1], config),
                           batching.replicated(mesh))
    chunk = steps.make_train_chunk(tiny_objective(), mesh, config.ema_decay)
    idx = batching.put_host_indices(np.zeros((1, 64), np.int32), mesh)
    hlo = chunk.lower(state, batching.put_host_shard(TRAIN, mesh), idx,
                      jax.random.key(0)).compile().as_text()
    op_names = re.findall(r'op_name="([^"]*)"', hlo)
    in_scope = [name for name in op_names if "/optimizer/" in name]
    assert any(name.endswith("/sqrt") for name in in_scope)  # Adam's sqrt(v) + eps
    assert not any("jvp(" in name for name in in_scope)  # no forward or backward operation
    assert any("jvp(" in name for name in op_names)


def test_a_checkpoint_of_another_model_is_refused_in_one_line_naming_the_leaf(tmp_path):
    """A checkpoint whose tree differs from the model's is refused in one line naming the
    first differing leaf."""
    state = initial_state(tiny_objective(), TRAIN[:1], CONFIG)
    kernel = jax.tree.leaves(state.params)[0]
    old = state.replace(params={"Conv_0": {"kernel": kernel}}, opt_state=(), ema_params=None)
    new = state.replace(params={"encoder": {"kernel": kernel}}, opt_state=(), ema_params=None)
    with Checkpointer(str(tmp_path)) as checkpointer:
        checkpointer.save(old, {}, {})
    with pytest.raises(CheckpointError) as raised:
        checkpoint.restore_committed(str(tmp_path), new)
    message = str(raised.value)
    assert "\n" not in message
    assert "(it holds params/Conv_0/kernel, which this model lacks)" in message
    assert checkpoint.mismatch({"params": {"encoder": {"kernel": kernel[:1]}}},
                               {"params": {"encoder": {"kernel": kernel}}}) == (
        f"params/encoder/kernel has shape {kernel[:1].shape} there, {kernel.shape} here")
    assert checkpoint.mismatch({"params": {"encoder": {"kernel": kernel}}},
                               {"params": {"encoder": {"kernel": kernel}, "b": kernel}}) == (
        "it lacks params/b")
