"""Multi-host training: each host's data shard and batch order, and `fit` in two real processes.

Two processes on this machine's CPU, 2 simulated devices each, joined by
`jax.distributed.initialize` (CPU collectives through gloo), train a tiny 2D VAE
in one shared workdir: one epoch, then a second resumed from the orbax checkpoint.
They must agree with each other and with one process trained on the same global
batches, and only process 0 may write files. With `--input stream` each host must
also read only its own shard of the training set.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from lvm_jax import files
from lvm_jax.data import batching, toy2d
from lvm_jax.train import TrainConfig
from lvm_jax.train import steps as train_steps
from tests.helpers import tiny_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS = 2
TRAIN, TEST = toy2d.sample("1", 131, 0), toy2d.sample("1", 50, 1)
# 65 examples per host, 16 per host per step: 4 steps per epoch. Evaluation batches of
# 16, 16, 16 and 2 test examples: the last does not divide over the 4 devices.
CONFIG = TrainConfig(epochs=2, batch_size=32, steps_per_call=4, eval_batch_size=16,
                     progress=False)


@pytest.mark.parametrize("num_examples", [10, 11, 131, 640])
@pytest.mark.parametrize("hosts", [1, 2, 3, 4])
def test_host_shards_are_equal_disjoint_and_contiguous(num_examples, hosts):
    shards = [batching.host_shard(num_examples, p, hosts) for p in range(hosts)]
    covered = np.concatenate([np.arange(num_examples)[s] for s in shards])
    np.testing.assert_array_equal(covered, np.arange(num_examples // hosts * hosts))
    assert {s.stop - s.start for s in shards} == {num_examples // hosts}


def test_one_host_keeps_the_single_host_order():
    shard = batching.host_shard(100, 0, 1)
    assert shard == slice(0, 100)
    np.testing.assert_array_equal(batching.epoch_order(3, 1, 100, 7, 13, shard),
                                  batching.epoch_order(3, 1, 100, 7, 13))


def test_each_host_permutes_its_own_shard():
    num_examples, steps, local_batch = 131, 4, 16
    local_orders, global_orders = [], []
    for p in range(HOSTS):
        shard = batching.host_shard(num_examples, p, HOSTS)
        size = shard.stop - shard.start
        order = batching.epoch_order(0, 1, num_examples, steps, local_batch, shard)
        whole_shard = batching.epoch_order(0, 1, num_examples, 1, size, shard)[0]
        np.testing.assert_array_equal(np.sort(whole_shard), np.arange(size))
        np.testing.assert_array_equal(order.ravel(), whole_shard[:order.size])
        local_orders.append(order)
        global_orders.append(order + shard.start)
    assert not np.array_equal(*local_orders)  # each host its own random order
    assert len(np.unique(global_orders)) == HOSTS * steps * local_batch


# Both hosts, in one pair of processes (one start and one compilation for every test of this
# module): a run on each input, trained one epoch and resumed for the second, then a run that
# host 1 alone is told to stop (SIGTERM, as by a preemption notice), resumed.
CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    # Each fit compiles what the one before compiled: take it from the disk cache.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, f"jit_cache{process}"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process)
    import numpy as np
    from lvm_jax import files, interrupt, viz
    from lvm_jax.data import stream
    from lvm_jax.train import TrainConfig, fit
    from tests.helpers import tiny_objective
    from tests.test_multihost import CONFIG, TEST, TRAIN

    class Recorded(stream.ArraySource):  # the examples this host reads
        read = set()

        def read_batch(self, indices):
            self.read.update(int(i) for i in indices)
            return super().read_batch(indices)

    def params(result):
        return [np.asarray(p).tolist() for p in jax.tree.leaves(result.state.params)]

    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    outs = {}
    for input in ("memory", "stream"):
        run = os.path.join(workdir, input)
        train = Recorded(TRAIN, "toy") if input == "stream" else TRAIN
        fit(tiny_objective(), train, TEST, TrainConfig(**{**CONFIG.__dict__, "epochs": 1}), run,
            {"model": "tiny"})
        result = fit(tiny_objective(), train, TEST, CONFIG, run, {"model": "tiny"})
        own = os.path.join(run, f"process{process}")
        written = [files.write_atomic(os.path.join(own, "a.txt"), "a"),
                   viz.save_curves(os.path.join(run, "metrics.csv"), os.path.join(own, "b.png"))]
        outs[input] = {"params": params(result), "test_metrics": result.test_metrics,
                       "resumed_from_step": result.summary["resumed_from_step"],
                       "device": result.summary["device"],
                       "wrote": sorted(os.listdir(own)) if os.path.exists(own) else [],
                       "returned": [os.path.basename(p) for p in written],
                       "read": sorted(Recorded.read)}
    run = os.path.join(workdir, "stopped")
    with interrupt.handled():
        if process == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        try:
            fit(tiny_objective(), TRAIN, TEST, CONFIG, run, {"model": "tiny"})
            stopped = None
        except interrupt.Interrupted as stop:
            stopped = [str(stop), stop.exit_status]
    result = fit(tiny_objective(), TRAIN, TEST, CONFIG, run, {"model": "tiny"})  # resumes
    outs["stopped"] = {"stopped": stopped, "params": params(result)}
    json.dump(outs, sys.stdout)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def single_process_reference():
    """Trains one process, one device, on the global batches the two hosts assemble:
    host p's local batch of each step, as indices into the whole set, side by side."""
    num_examples, local_batch = len(TRAIN), CONFIG.batch_size // HOSTS
    shards = [batching.host_shard(num_examples, p, HOSTS) for p in range(HOSTS)]
    steps = (shards[0].stop - shards[0].start) // local_batch
    idx = np.concatenate([
        np.concatenate([batching.epoch_order(CONFIG.seed, epoch, num_examples, steps,
                                             local_batch, s) + s.start for s in shards], axis=1)
        for epoch in range(CONFIG.epochs)])
    mesh = batching.data_mesh(jax.devices()[:1])
    objective = tiny_objective()
    _, train_key, eval_key = train_steps.keys(CONFIG.seed)  # fit's keys
    state = batching.put_replicated(train_steps.initial_state(objective, TRAIN[:1], CONFIG), mesh)
    state, metrics = train_steps.make_train_chunk(objective, mesh)(
        state, batching.put_host_shard(TRAIN, mesh), batching.put_host_indices(idx, mesh),
        train_key)
    test_metrics = train_steps.make_evaluate(objective, mesh)(
        state, batching.put_replicated(TEST, mesh), CONFIG.eval_batch_size, eval_key)
    return np.asarray(metrics["loss"]), jax.tree.leaves(jax.device_get(state.params)), test_metrics


def run_hosts(script: str, *args, meanwhile=lambda: None):
    """Runs HOSTS processes of `script` (argv: its process index, a coordinator port, `args`;
    2 CPU devices each) and `meanwhile()` in this process while they run.

    Returns:
      (the JSON each host printed last, in process order; what `meanwhile` returned). A host
      that fails fails the test.
    """
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(p), str(port), *map(str, args)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for p in range(HOSTS)]
    try:
        result = meanwhile()
        outs = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
        return outs, result
    finally:
        for proc in procs:
            proc.kill()  # a host left waiting for a failed one; nothing once they have exited


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """(each host's JSON, the single-process reference, the workdir) of CHILD's runs."""
    workdir = tmp_path_factory.mktemp("hosts")
    outs, reference = run_hosts(CHILD, workdir, meanwhile=single_process_reference)
    return outs, reference, workdir


@pytest.mark.parametrize("input", ["memory", "stream"])
def test_two_processes_train_like_one_on_the_same_global_batches(hosts, input):
    outs, (losses, params, test_metrics), workdir = hosts
    outs, run = [out[input] for out in outs], workdir / input
    for out in outs:  # every host holds the same result, restored from the checkpoint of epoch 1
        assert out["resumed_from_step"] == 4 and out["device"] == "4 x cpu (cpu) on 2 hosts"
        for a, b in zip(params, out["params"]):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
        for name, value in test_metrics.items():
            assert out["test_metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert outs[0]["params"] == outs[1]["params"]
    assert outs[0]["test_metrics"] == outs[1]["test_metrics"]

    rows = files.read_csv(str(run / "metrics.csv"))  # written once, by process 0
    np.testing.assert_allclose([float(r["loss"]) for r in rows if r["split"] == "train"], losses,
                               rtol=1e-5)
    assert [int(r["step"]) for r in rows if r["split"] == "test"] == [0, 4, 8]
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
    assert sorted(os.listdir(run / "checkpoints")) == ["4", "8"]
    assert outs[0]["wrote"] == ["a.txt", "b.png"] and outs[1]["wrote"] == []
    assert outs[0]["returned"] == outs[1]["returned"] == ["a.txt", "b.png"]
    if input == "stream":  # each host read its own shard: all of it, nothing else (the
        # first example is read by both, to initialise the parameters)
        for p, out in enumerate(outs):
            shard = batching.host_shard(len(TRAIN), p, HOSTS)
            assert set(out["read"]) - {0} == set(range(shard.start, shard.stop)) - {0}


def test_a_signal_on_one_host_stops_every_host_at_the_same_saved_step(hosts):
    """Host 1 alone gets SIGTERM; the hosts agree on the flag (an all-gather at each step
    boundary), so both save their parts of the same checkpoint, stop, and resume alike."""
    outs, _, workdir = hosts
    outs, run = [out["stopped"] for out in outs], workdir / "stopped"
    saved = os.path.join(run, "checkpoints", "0")
    for out in outs:
        assert out["stopped"] == [f"stopped by SIGTERM: step 0 of 8 is saved in {saved}; rerun "
                                  "the same command to resume from it", 143]
    assert outs[0]["params"] == outs[1]["params"]
    assert sorted(os.listdir(run / "checkpoints")) == ["4", "8"]  # step 0 kept 2 newest
