"""What several test files build alike."""

import contextlib
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax import cpu_devices, viz
from lvm_jax.models import likelihoods, vae
from lvm_jax.train import Objective


def tiny_objective() -> Objective:
    """A 2-d Gaussian MLP VAE with one hidden layer of 16: `fit` in a fraction of a second."""
    model = vae.mlp_vae(2, 2, (16,), likelihoods.get("gaussian"))
    return Objective.stateless(init=lambda rng, x: model.init(rng, x, rng),
                               loss_fn=functools.partial(vae.loss_fn, model),
                               units={"neg_elbo": "nats per example"})


def random_variables(model, *inputs, bias_scale: float = 0.0, seed: int = 0):
    """Variables of flax `model` in the shapes its init gives for `inputs`, drawn by numpy at
    the scales of flax's default initialisers (kernels LeCun normal, embeddings normal of
    variance 1 / features), biases N(0, bias_scale^2). Nothing is compiled: flax's own init
    compiles a program per parameter shape op by op (threefry and erf_inv), seconds per
    model, where a test needs only random weights."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        fan_in = leaf.shape[-1] if "embedding" in name else int(np.prod(leaf.shape[:-1]))
        scale = bias_scale if leaf.ndim == 1 else 1 / np.sqrt(fan_in)
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(
        draw, jax.eval_shape(model.init, jax.random.key(0), *inputs))


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


@contextlib.contextmanager
def drawn_figures():
    """{figure file name: what it was drawn from} for the figures saved inside the block: the
    image array of each `viz.save_image_grid`, the panels of each `viz.save_scatter`."""
    drawn = {}
    save_grid, save_scatter = viz.save_image_grid, viz.save_scatter

    def grid(images, path, *args, **kwargs):
        drawn[os.path.basename(path)] = np.asarray(images)
        return save_grid(images, path, *args, **kwargs)

    def scatter(path, data, panels, *args, **kwargs):
        drawn[os.path.basename(path)] = {name: np.asarray(p) for name, p in panels.items()}
        return save_scatter(path, data, panels, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(viz, "save_image_grid", grid)
        patch.setattr(viz, "save_scatter", scatter)
        yield drawn
