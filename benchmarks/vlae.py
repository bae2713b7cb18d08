"""VLAE (REFERENCE.md §3): MADE-prior sampling and training throughput, lvm_jax against PyTorch.

* `sampling`: draws from the MADE flow prior (16 dims, hidden 512-512), which
  inverts the flow one dimension at a time: lvm_jax's `MADEFlowPrior.sample`,
  one jitted call (the 16 MADE passes are one `nn.scan`), against PyTorch's
  Python loop over the dimensions (one MADE pass per dimension, under
  `torch.no_grad`). Both sides hold the same weights, checked to give the
  same (shift, log_scale) before timing.
* `train_step`: images/s of VLAE training steps at batch 128 (image_vae.py's
  protocol, with the MADE prior and its Monte Carlo KL).
"""

import jax
import numpy as np
import torch

from benchmarks import torch_models
from benchmarks.common import Row, Settings, compare, device, timer
from benchmarks.image_vae import randomised, train_step_rows
from lvm_jax.models.priors import MADEFlowPrior

LATENT_DIM = 16
SAMPLE_SIZES = (10_000, 100)


def _made_priors(seed: int):
    """lvm_jax and PyTorch MADE priors with the same random weights, checked equal."""
    prior = MADEFlowPrior(LATENT_DIM)
    z = jax.random.normal(jax.random.key(seed), (64, LATENT_DIM))
    params = randomised(prior.init(jax.random.key(seed), z)["params"], seed)
    torch_prior = torch_models.MADEFlowPrior(LATENT_DIM)
    torch_models.copy_flax_made_params(torch_prior.made, params["made"])
    shift, log_scale = prior.apply({"params": params}, z, method=lambda m, z: m.made(z))
    with torch.no_grad():
        torch_shift, torch_log_scale = torch_prior.made(torch.from_numpy(np.array(z)))
    for a, b in ((shift, torch_shift), (log_scale, torch_log_scale)):
        error = float(np.max(np.abs(np.asarray(a) - b.numpy())))
        assert error < 1e-4, f"PyTorch and lvm_jax MADE outputs differ by {error}"
    return prior, params, torch_prior


def sampling(settings: Settings) -> list[Row]:
    """Milliseconds to draw n samples from the MADE prior, n = 10,000 (goal >= 10x) and 100:
    an algorithm comparison (both sides make the same LATENT_DIM sequential MADE passes, but
    lvm_jax fuses them into one jitted lax loop while the reference implementation's method
    is a Python loop over dims issuing eager PyTorch calls), not a framework ratio alone."""
    prior, params, torch_prior = _made_priors(settings.seed)
    rows = []
    for num in SAMPLE_SIZES:
        sample = jax.jit(lambda p, key: prior.apply({"params": p}, key, num,
                                                    method=MADEFlowPrior.sample))
        keys = iter(jax.random.split(jax.random.key(settings.seed), 1000))
        number = 1 if num > 1000 else 20
        result = compare(timer(lambda: jax.block_until_ready(sample(params, next(keys))), number),
                         timer(lambda: torch_prior.sample(num), number), settings)
        rows.append(Row(
            benchmark="vlae_sampling", model=f"MADE prior ({LATENT_DIM}-d, hidden 512-512)",
            step=f"draw {num:,} samples ({LATENT_DIM} sequential MADE passes): one jitted call "
                 f"vs the reference implementation's method (PyTorch loop over dims)",
            batch=num,
            lvm_jax=1e3 * result.jax_seconds, pytorch=1e3 * result.torch_seconds, unit="ms",
            higher_is_better=False, device=device(result.torch_threads, jax_devices=1),
            goal=10.0 if num == 10_000 else None,
            note=f"an algorithm comparison: lvm_jax: the {LATENT_DIM} passes in one jitted "
                 f"call; the reference implementation's method (PyTorch): a Python loop over "
                 f"dims, one eager pass per dim; {result.torch_note()}"))
    return rows


def train_step(settings: Settings) -> list[Row]:
    return train_step_rows("vlae_step", "VLAE (MADE prior)", "made", settings, goal=1.0)

