"""Training on a mesh of 8 simulated CPU devices gives what one device gives.

XLA_FLAGS must be set before JAX starts, so the comparison runs in a subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import functools, json, sys, tempfile
    import jax, numpy as np
    from lvm_jax.data import batching, toy2d
    from lvm_jax.models import likelihoods, vae
    from lvm_jax.train import Objective, TrainConfig, fit

    assert jax.device_count() == 8, jax.devices()
    model = vae.mlp_vae(2, 2, (16,), likelihoods.get("gaussian"))
    objective = Objective.stateless(lambda rng, x: model.init(rng, x, rng),
                                    functools.partial(vae.loss_fn, model))
    train, test = toy2d.sample("2", 512, 0), toy2d.sample("2", 100, 1)
    config = TrainConfig(epochs=2, batch_size=64, steps_per_call=4, eval_batch_size=48,
                         progress=False)
    out = {}
    for n in (1, 8):
        result = fit(objective, train, test, config, tempfile.mkdtemp(),
                     mesh=batching.data_mesh(jax.devices()[:n]))
        leaf = jax.tree.leaves(result.state.params)[0]
        out[n] = {"metrics": result.test_metrics,
                  "params": [np.asarray(p).tolist() for p in jax.tree.leaves(result.state.params)],
                  "shards": len(leaf.sharding.device_set)}
    try:
        fit(objective, train, test, TrainConfig(batch_size=60), tempfile.mkdtemp())
    except ValueError as err:
        out["error"] = str(err)
    json.dump(out, sys.stdout)
""")


def test_eight_devices_match_one():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, eight = out["1"], out["8"]
    assert one["shards"] == 1 and eight["shards"] == 8  # parameters replicated on every device
    for name, value in one["metrics"].items():
        assert abs(value - eight["metrics"][name]) <= 1e-4 * max(1.0, abs(value)), name
    import numpy as np
    for a, b in zip(one["params"], eight["params"]):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    assert "divisible by the 8 devices" in out["error"]
