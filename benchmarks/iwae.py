"""Importance-weighted evaluation (REFERENCE.md §8): throughput of `evaluate.iwae_nll` against
PyTorch.

The image VAE of image_vae.py (32x32x1, N(mu, I) decoder), with the same random parameters
on both sides (checked to compute the same function), bounds log p(x) of the first 50 test
digits with k = 200 importance samples each (10,000 decoder passes):

* lvm_jax: `iwae_nll` with its defaults: calls of 40 samples x 10 examples, each call's
  samples split over all JAX devices (here the CPU split of `lvm_jax.cpu_devices`).
* lvm_jax with the former settings (the defaults before 2026-12-01): calls of 100 samples x
  50 examples on one device, run by today's `iwae_nll`.
* PyTorch: the loop a PyTorch user writes, under `torch.no_grad`, the log-weights combined
  by a float64 logsumexp, at its own best call shape: each of TORCH_CALL_SHAPES (samples x
  examples per call) is timed first (median of `measure`'s protocol), and the fastest is
  compared with lvm_jax in alternating rounds; the rows name it.

Units: examples x samples per second (decoder passes per second), higher is better.
"""

import math

import jax
import torch

from benchmarks import torch_models
from benchmarks.common import Row, Settings, compare, device, format_seconds, measure, timer
from benchmarks.image_vae import assert_same_function, jax_model, randomised
from benchmarks.trainers import scale_images, to_torch_images
from experiments import vae as vae_experiment
from lvm_jax import data, evaluate
from lvm_jax.data import batching

NAME = "iwae"
NUM_SAMPLES, CHUNK, BATCH = 200, 40, 10
NUM_EXAMPLES = 50  # one call of the former defaults: no padded examples on either side
BEFORE_CHUNK, BEFORE_BATCH = 100, 50
# PyTorch's candidate call shapes, samples x examples per call (each divides 200 x 50).
TORCH_CALL_SHAPES = ((CHUNK, BATCH), (BEFORE_CHUNK, BEFORE_BATCH), (NUM_SAMPLES, BATCH))


@torch.no_grad()
def torch_iwae_nll(model: torch_models.VAE, x: torch.Tensor, num_samples: int,
                   chunk: int = CHUNK, batch_size: int = BATCH) -> torch.Tensor:
    """-log (1/k) sum_j w_j per example (nats) of the N(mu, I)-decoder VAE, N(0, I) prior,
    in calls of `chunk` samples x `batch_size` examples (each must divide its total)."""
    nlls = []
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        mean, log_var = model.encode(batch)
        log_weights = []
        for _ in range(num_samples // chunk):
            eps = torch.randn(chunk, *mean.shape)
            z = mean + torch.exp(0.5 * log_var) * eps  # (chunk, batch, latent)
            x_mean = model.decoder(z.flatten(0, 1)).view(chunk, *batch.shape)
            log_px_z = -0.5 * (torch_models.LOG_2PI + (batch - x_mean) ** 2).flatten(2).sum(2)
            log_pz = -0.5 * (torch_models.LOG_2PI + z**2).sum(-1)
            log_qz_x = -0.5 * (torch_models.LOG_2PI + log_var + eps**2).sum(-1)
            log_weights.append(log_px_z + log_pz - log_qz_x)
        nlls.append(math.log(num_samples) - torch.logsumexp(torch.cat(log_weights).double(), 0))
    return torch.cat(nlls)


def run(settings: Settings) -> list[Row]:
    dataset = data.load("mnist_embedded")
    model = jax_model(dataset, "standard")
    objective = vae_experiment.make_objective(model)
    example = objective.preprocess(dataset.test[:1])
    params = randomised(objective.init(jax.random.key(settings.seed), example)["params"],
                        settings.seed)
    torch_model = torch_models.conv_vae(1, "standard")
    assert_same_function(model, params, torch_model, dataset.test[:8])
    examples = dataset.test[:NUM_EXAMPLES]
    torch_examples = scale_images(to_torch_images(examples))
    key = jax.random.key(settings.seed)

    def lvm_jax(**options):
        return lambda: evaluate.iwae_nll(model, params, examples, key, NUM_SAMPLES,
                                         preprocess=objective.preprocess, **options)

    split, before = lvm_jax(), lvm_jax(chunk=BEFORE_CHUNK, batch_size=BEFORE_BATCH,
                                       mesh=batching.data_mesh(jax.devices()[:1]))
    nlls = {"lvm_jax": split().mean(), "before": before().mean(),
            "PyTorch": torch_iwae_nll(torch_model, torch_examples, NUM_SAMPLES).mean().item()}
    def torch_sampler(chunk: int, batch_size: int):
        return timer(lambda: torch_iwae_nll(torch_model, torch_examples, NUM_SAMPLES, chunk,
                                            batch_size))

    shape_seconds = {shape: measure(torch_sampler(*shape), settings, warmup=1)
                     for shape in TORCH_CALL_SHAPES}
    torch_chunk, torch_batch = min(shape_seconds, key=shape_seconds.get)
    result = compare(timer(split), torch_sampler(torch_chunk, torch_batch), settings,
                     also={"before": timer(before)})
    passes = NUM_EXAMPLES * NUM_SAMPLES
    devices = evaluate.sample_mesh(CHUNK).devices.size
    common = dict(benchmark=NAME, model="image VAE, 32x32x1 (mnist_embedded), random weights",
                  unit="examples x samples/s", higher_is_better=True)
    note = (f"{NUM_EXAMPLES} test digits x k = {NUM_SAMPLES}; mean bound "
            + ", ".join(f"{v:.2f} ({k})" for k, v in nlls.items()) + " nats; "
            + result.torch_note() + f"; PyTorch at its best call shape, {torch_chunk} samples x "
            f"{torch_batch} examples, of " + ", ".join(
                f"{c} x {b}: {format_seconds(t)}" for (c, b), t in shape_seconds.items()))
    return [
        Row(step=f"IWAE bound, k = {NUM_SAMPLES}: calls of {CHUNK} samples x {BATCH} examples "
                 f"split over {devices} devices; PyTorch at its best, {torch_chunk} x "
                 f"{torch_batch}",
            batch=BATCH, lvm_jax=passes / result.jax_seconds, pytorch=passes / result.torch_seconds,
            device=device(result.torch_threads, jax_devices=devices), note=note, **common),
        Row(step=f"IWAE bound, k = {NUM_SAMPLES}: one device, calls of {BEFORE_CHUNK} x "
                 f"{BEFORE_BATCH} (the former defaults' settings); PyTorch at its best, "
                 f"{torch_chunk} x {torch_batch}",
            batch=BEFORE_BATCH, lvm_jax=passes / result.also_seconds["before"],
            pytorch=passes / result.torch_seconds,
            device=device(result.torch_threads, jax_devices=1), note=note, **common),
    ]
