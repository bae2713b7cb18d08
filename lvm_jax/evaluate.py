"""Evaluation of trained VAE-style models: importance-weighted likelihoods and latent diagnostics.

* `iwae_nll`: the test NLL from the importance-weighted bound of Burda et al.
  (2016), log p(x) >= log (1/k) sum_j p(x, z_j) / q(z_j | x), z_j ~ q(z | x),
  with k samples (1000 by default) evaluated in memory-bounded chunks.
* `active_units` (Burda et al. 2016, §5.2) and `per_dim_kl`: how many latent
  dimensions the model uses, the posterior-collapse diagnostics.

The model is any Flax module with the interface of `models.vae.VAE`:
`apply(variables, x, rng)` returns per-example Monte Carlo terms `log_px_z`,
`log_pz` and `log_qz_x` at one z ~ q(z | x), and `encode(x)` returns the
(mean, log_var) of the diagonal Gaussian q(z | x).

Data: the dataset functions take the stored arrays (e.g. uint8 images) and a
`preprocess` applied to each batch inside the compiled call, the trainer's
`Objective.preprocess` (`data.scale_images` for images); `iwae_log_weights`
takes one batch already in the model's range.
"""

import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lvm_jax import losses
from lvm_jax.models import vae
from lvm_jax.models.likelihoods import Likelihood
from lvm_jax.models.priors import StandardNormalPrior
from lvm_jax.train.progress import Progress


def _identity(batch):
    return batch


def iwae_log_weights(model, params, x: jax.Array, rng: jax.Array, num_samples: int) -> jax.Array:
    """log w_j = log p(x | z_j) + log p(z_j) - log q(z_j | x), z_j ~ q(z | x), in nats.

    Every term is the Monte Carlo value at z_j, never an analytic KL: only then
    is each w_j an unbiased estimate of p(x) and log mean_j w_j a bound on
    log p(x) (REFERENCE.md §8).

    Args:
      model: a VAE-style module; params: its parameters.
      x: (batch, *event_shape) one batch in the model's range.
      rng: PRNG key; num_samples: k.
    Returns:
      (k, batch) log-weights.
    """
    # vmap over the keys only: the encoder does not depend on them, so it runs once.
    terms = jax.vmap(lambda key: model.apply({"params": params}, x, key))(
        jax.random.split(rng, num_samples))
    return terms["log_px_z"] + terms["log_pz"] - terms["log_qz_x"]


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "preprocess"))
def _chunk_bound(model, params, batch, rng, num_samples, preprocess):
    """The importance-weighted bound of one chunk of samples, (batch,) nats."""
    return losses.iwae_bound(iwae_log_weights(model, params, preprocess(batch), rng, num_samples))


@jax.jit
def _combine_chunks(chunk_bounds: list[jax.Array]) -> jax.Array:
    """The bound over all samples from the bounds of equal chunks, (batch,) nats."""
    return losses.iwae_bound(jnp.stack(chunk_bounds))


def _batches(data: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(batch, number of real examples in it): the last batch is padded with copies of its
    last example, so every call has one shape and compiles once."""
    for start in range(0, len(data), batch_size):
        batch = data[start:start + batch_size]
        size = len(batch)
        yield np.concatenate([batch, np.repeat(batch[-1:], batch_size - size, axis=0)]), size


def iwae_nll(model, params, data: np.ndarray, rng: jax.Array, num_samples: int = 1000,
             chunk: int = 100, batch_size: int = 50, preprocess: Callable = _identity,
             progress: bool = False) -> np.ndarray:
    """Negative importance-weighted bound -log (1/k) sum_j w_j for every example, in nats.

    Memory is bounded by one compiled call of `chunk * batch_size` decoder
    passes. Chunks of equal size c combine exactly: the k-sample bound is the
    bound of the chunk bounds, log (1/k) sum_j w_j = log (1/n) sum_i exp(B_i)
    with B_i = log (1/c) sum_{j in chunk i} w_j and n = k / c chunks. The chunks
    run as a Python loop of asynchronous calls rather than a `lax.map`: XLA:CPU
    runs convolutions inside loops many times slower (jax-ml/jax#12868), and on
    an accelerator each chunk is large enough to hide the dispatch.

    Args:
      model, params: the VAE-style module and its parameters.
      data: (N, *event_shape) examples as stored.
      rng: PRNG key; batch j draws from fold_in(rng, j), so a result is
        reproducible for the same (rng, batch_size, chunk).
      num_samples: k importance samples per example.
      chunk: samples per compiled call; must divide k (it is capped at k).
      batch_size: examples per compiled call.
      preprocess: applied to each batch inside the compiled call.
      progress: show a progress bar over the batches.
    Returns:
      (N,) float64 upper bounds on -log p(x) in nats, tighter as k grows; their
      mean is the test NLL in nats per example.
    """
    chunk = min(chunk, num_samples)
    if num_samples % chunk:
        raise ValueError(f"chunk ({chunk}) must divide num_samples ({num_samples}).")
    bounds = []
    batches = list(_batches(data, batch_size))
    bar = Progress(len(batches), 0, f"IWAE k={num_samples}", bar=progress, unit="batch")
    for j, (batch, size) in enumerate(batches):
        keys = jax.random.split(jax.random.fold_in(rng, j), num_samples // chunk)
        chunk_bounds = [_chunk_bound(model, params, batch, key, chunk, preprocess) for key in keys]
        bounds.append(np.asarray(_combine_chunks(chunk_bounds))[:size])
        bar.update(1)
    bar.close()
    return -np.concatenate(bounds).astype(np.float64)


def image_bits_per_dim(nll_nats, num_dims: int, likelihood: Likelihood):
    """Bits per dimension on the 8-bit scale of an NLL in nats per example of images.

    A discrete likelihood (bernoulli, dmol) already gives the code length;
    a density over [-1, 1] needs D log 127.5 nats more (`vae.image_bits_per_dim`).
    """
    if likelihood.discrete:
        return losses.bits_per_dim(nll_nats, num_dims)
    return vae.image_bits_per_dim(nll_nats, num_dims)


@functools.partial(jax.jit, static_argnames=("model", "preprocess"))
def _encode(model, params, batch, preprocess):
    return model.apply({"params": params}, preprocess(batch), method="encode")


def _posteriors(model, params, data, batch_size, preprocess) -> tuple[np.ndarray, np.ndarray]:
    """(mean, log_var) of q(z | x) for every example, each (N, latent_dim)."""
    means, log_vars = [], []
    for batch, size in _batches(data, batch_size):
        mean, log_var = jax.device_get(_encode(model, params, batch, preprocess))
        means.append(mean[:size])
        log_vars.append(log_var[:size])
    return np.concatenate(means), np.concatenate(log_vars)


def active_units(model, params, data: np.ndarray, threshold: float = 0.01, batch_size: int = 500,
                 preprocess: Callable = _identity) -> tuple[int, np.ndarray]:
    """Active units of Burda et al. (2016): dimension u is active when
    A_u = Cov_x(E_{q(z|x)}[z_u]) > threshold.

    A collapsed dimension has the same posterior for every x, so its
    posterior mean does not vary with x.

    Args:
      model, params, data, batch_size, preprocess: as for `iwae_nll`.
      threshold: activity threshold (0.01 in the paper).
    Returns:
      (number of active units, activity A (latent_dim,), the variance over the
      data of each posterior mean).
    """
    means, _ = _posteriors(model, params, data, batch_size, preprocess)
    activity = means.astype(np.float64).var(axis=0)
    return int((activity > threshold).sum()), activity


def per_dim_kl(model, params, data: np.ndarray, batch_size: int = 500,
               preprocess: Callable = _identity) -> np.ndarray:
    """KL(q(z_u | x) || N(0, 1)) for each latent dimension u, averaged over the data.

    Analytic, per dimension, so only defined for the standard normal prior
    (a flow prior couples the dimensions). The values sum to the KL term of
    the ELBO; a dimension near 0 nats carries no information about x.

    Returns:
      (latent_dim,) nats per example.
    """
    if not isinstance(model.prior, StandardNormalPrior):
        raise ValueError(f"the per-dimension KL is analytic only for the standard normal prior; "
                         f"this model's prior is {type(model.prior).__name__}.")
    means, log_vars = _posteriors(model, params, data, batch_size, preprocess)
    return np.asarray(losses.kl_std_normal_per_dim(means, log_vars), np.float64).mean(axis=0)

