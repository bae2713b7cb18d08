"""Evaluation of trained VAE-style models: importance-weighted likelihoods and latent diagnostics.

* `iwae_nll`: the test NLL from the importance-weighted bound of Burda et al.
  (2016), log p(x) >= log (1/k) sum_j p(x, z_j) / q(z_j | x), z_j ~ q(z | x),
  with k samples (1000 by default) evaluated in memory-bounded chunks, split over
  the devices.
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

import collections
import functools
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lvm_jax import interrupt, losses
from lvm_jax.data import batching
from lvm_jax.models import vae
from lvm_jax.models.likelihoods import Likelihood
from lvm_jax.models.priors import StandardNormalPrior
from lvm_jax.progress import Progress
from lvm_jax.train.steps import dispatch_bounded


def _identity(batch):
    return batch


# Samples per compiled call unless told: the largest divisor of k up to this. 40 divides the
# usual k (1000, 5000; 100 gives 25) and splits over up to 8 devices. With 10 examples per
# call, the image VAE's bound ran at 6,055 examples x samples per second on the 2-core CPU
# split into 8 devices, against 1,660 for calls of 100 x 50 on one device (`python -m
# benchmarks.run --only iwae`) and 4,512 for 40 x 50 on 8 (a scratch sweep): larger calls
# no longer keep the decoder's activations in the CPU's caches.
DEFAULT_CHUNK = 40


def default_chunk(num_samples: int) -> int:
    """The largest divisor of `num_samples` that is at most DEFAULT_CHUNK."""
    return max(c for c in range(1, min(DEFAULT_CHUNK, num_samples) + 1) if num_samples % c == 0)


def resolve_chunk(num_samples: int, chunk: int | None = None) -> int:
    """The samples of each compiled call of `iwae_nll` for k = `num_samples`: `chunk` capped at
    k, or `default_chunk(k)`. Raises ValueError unless both are positive and it divides k."""
    if num_samples < 1 or (chunk is not None and chunk < 1):
        raise ValueError(f"num_samples ({num_samples}) and chunk ({chunk}) must be positive.")
    chunk = default_chunk(num_samples) if chunk is None else min(chunk, num_samples)
    if num_samples % chunk:
        raise ValueError(f"chunk ({chunk}) must divide num_samples ({num_samples}).")
    return chunk


def sample_mesh(chunk: int, devices=None) -> Mesh:
    """The mesh a call's `chunk` samples split over: the most of `devices` (default this
    process's) whose number divides `chunk`."""
    devices = list(devices if devices is not None else jax.local_devices())
    count = max(d for d in range(1, len(devices) + 1) if chunk % d == 0)
    return batching.data_mesh(devices[:count])


def iwae_log_weights(model, params, x: jax.Array, rng: jax.Array, num_samples: int,
                     mesh: Mesh | None = None) -> jax.Array:
    """log w_j = log p(x | z_j) + log p(z_j) - log q(z_j | x), z_j ~ q(z | x), in nats.

    Every term is the Monte Carlo value at z_j, never an analytic KL: only then
    is each w_j an unbiased estimate of p(x) and log mean_j w_j a bound on
    log p(x) (REFERENCE.md §8).

    Args:
      model: a VAE-style module; params: its parameters.
      x: (batch, *event_shape) one batch in the model's range.
      rng: PRNG key; num_samples: k.
      mesh: split the k samples over its "data" axis (its size must divide k), inside
        `jax.jit`; the draws are those of one device.
    Returns:
      (k, batch) log-weights, split over `mesh` along k.
    """
    keys = jax.random.split(rng, num_samples)
    if mesh is not None:
        # vmap merges the samples' axis in front of the batch's, so each device decodes one
        # contiguous block of the k * batch decoder passes and needs nothing from the others.
        keys = jax.lax.with_sharding_constraint(keys, NamedSharding(mesh, P("data")))
    # vmap over the keys only: the encoder does not depend on them, so it runs once.
    terms = jax.vmap(lambda key: model.apply({"params": params}, x, key))(keys)
    return terms["log_px_z"] + terms["log_pz"] - terms["log_qz_x"]


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "preprocess", "mesh"))
def _chunk_log_weights(model, params, batch, rng, num_samples, preprocess, mesh):
    return iwae_log_weights(model, params, preprocess(batch), rng, num_samples, mesh)


def _batches(data: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(batch, number of real examples in it): the last batch is padded with copies of its
    last example, so every call has one shape and compiles once."""
    for start in range(0, len(data), batch_size):
        batch = data[start:start + batch_size]
        size = len(batch)
        yield np.concatenate([batch, np.repeat(batch[-1:], batch_size - size, axis=0)]), size


def iwae_nll(model, params, data: np.ndarray, rng: jax.Array, num_samples: int = 1000,
             chunk: int | None = None, batch_size: int = 10, preprocess: Callable = _identity,
             progress: bool = False, mesh: Mesh | None = None) -> np.ndarray:
    """Negative importance-weighted bound -log (1/k) sum_j w_j for every example, in nats.

    Each compiled call draws `chunk` of the k samples for `batch_size` examples,
    split over the devices of `mesh`: memory is bounded by one call's
    `chunk * batch_size` decoder passes, and the calls hold no collective
    operation. The chunks run as a Python loop of asynchronous calls rather than
    a `lax.map`: XLA:CPU runs convolutions inside loops many times slower
    (jax-ml/jax#12868). Their log-weights are combined on the host in float64,
    log (1/k) sum_j w_j = logsumexp_j(log w_j) - log k.

    Args:
      model, params: the VAE-style module and its parameters.
      data: (N, *event_shape) examples as stored.
      rng: PRNG key; batch j draws from fold_in(rng, j), so a result is
        reproducible for the same (rng, batch_size, chunk), on any devices.
      num_samples: k importance samples per example.
      chunk: samples per compiled call; must divide k (it is capped at k). Default
        `default_chunk(k)` (`resolve_chunk`).
      batch_size: examples per compiled call.
      preprocess: applied to each batch inside the compiled call.
      progress: show a progress bar over the batches.
      mesh: the devices of this process that each call's samples split over, a 1-D mesh
        with the axis "data" whose size divides `chunk`; default `sample_mesh(chunk)`.
    Returns:
      (N,) float64 upper bounds on -log p(x) in nats, tighter as k grows; their
      mean is the test NLL in nats per example.
    """
    if len(data) == 0:
        raise ValueError("iwae_nll needs at least one example; got an empty array.")
    chunk = resolve_chunk(num_samples, chunk)
    mesh = sample_mesh(chunk) if mesh is None else mesh
    if mesh.axis_names != ("data",) or chunk % mesh.devices.size:
        raise ValueError(f"the mesh must be 1-D with the axis 'data' and a size that divides "
                         f"chunk ({chunk}); got axes {mesh.axis_names} of sizes "
                         f"{tuple(mesh.shape.values())}.")
    if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
        raise ValueError("the mesh must hold this process's devices only: each process reads "
                         "its bounds from its own devices.")
    params = batching.put_replicated(params, mesh)
    rng = jax.device_put(rng, batching.replicated(mesh))  # where the calls' keys are made
    nlls = []
    batches = list(_batches(data, batch_size))
    bar = Progress(len(batches), 0, f"IWAE k={num_samples}", bar=progress, unit="batch")

    def bound(log_weights, size):
        """-log (1/k) sum_j w_j of a batch's first `size` examples, from its (k, batch)
        log-weights: a logsumexp over the samples in float64, without overflow (an example
        whose weights are all 0 gets +inf)."""
        log_weights = np.concatenate(jax.device_get(log_weights))[:, :size].astype(np.float64)
        top = log_weights.max(axis=0)
        top = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore"):  # log 0 = -inf: weights that are all 0
            return np.log(num_samples) - top - np.log(np.exp(log_weights - top).sum(axis=0))

    # Calls queued as in `fit`'s evaluation: these hold no collective, which is what
    # deadlocked there, but a queue of thousands gains nothing.
    queued = collections.deque()
    previous = None
    for j, (batch, size) in enumerate(batches):
        # A signal (`interrupt.handled`, as the experiments run) stops the pass between
        # batches: nothing is written before it ends.
        interrupt.check(f"the importance-weighted bound stopped at batch {j} of {len(batches)}, "
                        "before its results were written; rerun the same command to compute it")
        keys = jax.random.split(jax.random.fold_in(rng, j), num_samples // chunk)
        batch = batching.put_replicated(batch, mesh)
        calls = [dispatch_bounded(queued, _chunk_log_weights, model, params, batch, key, chunk,
                                  preprocess, mesh) for key in keys]
        if previous is not None:  # read once the next batch is queued, so no device idles
            nlls.append(bound(*previous))
            bar.update(1)
        previous = calls, size
    nlls.append(bound(*previous))
    bar.update(1)
    bar.close()
    return np.concatenate(nlls)


def image_bits_per_dim(nll_nats, num_dims: int, likelihood: Likelihood):
    """Bits per dimension of an NLL in nats per example of images, on the scale of the pixels
    `likelihood` models (`bits_per_dim_unit`): binary pixels for a Bernoulli, else 8-bit.

    A discrete likelihood (bernoulli, dmol) already gives the code length;
    a density over [-1, 1] needs D log 127.5 nats more (`vae.image_bits_per_dim`).
    """
    if likelihood.discrete:
        return losses.bits_per_dim(nll_nats, num_dims)
    return vae.image_bits_per_dim(nll_nats, num_dims)


def bits_per_dim_unit(likelihood: Likelihood) -> str:
    """The unit of `image_bits_per_dim` under `likelihood`: bits per dimension on the scale of
    the pixels it models, 8-bit or binary."""
    return f"bits per dimension ({likelihood.pixel_scale} scale)"


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

