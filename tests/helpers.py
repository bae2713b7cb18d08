"""What several test files build alike."""

import functools
import json
import os
import subprocess
import sys
import textwrap

from lvm_jax import cpu_devices
from lvm_jax.models import likelihoods, vae
from lvm_jax.train import Objective


def tiny_objective() -> Objective:
    """A 2-d Gaussian MLP VAE with one hidden layer of 16: `fit` in a fraction of a second."""
    model = vae.mlp_vae(2, 2, (16,), likelihoods.get("gaussian"))
    return Objective.stateless(init=lambda rng, x: model.init(rng, x, rng),
                               loss_fn=functools.partial(vae.loss_fn, model),
                               units={"neg_elbo": "nats per example"})


def run_python(script: str, **env) -> dict:
    """Runs `script` in a fresh Python, whose JAX starts afresh, with `env` added (and the
    variables that set the CPU device count removed unless given); returns the JSON object it
    prints last."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", cpu_devices.LIMIT_VARIABLE)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                          env={**base, "JAX_PLATFORMS": "cpu", **env}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
