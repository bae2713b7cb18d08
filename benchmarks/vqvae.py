"""VQ-VAE (REFERENCE.md §4): prior sampling and training throughput, lvm_jax against PyTorch.

Both priors at the experiment's default sizes over K = 128 codes: PixelCNN
(embedding 64, 7x7 type-A conv, 12 residual blocks, head 512) and Gated
PixelCNN (dim 128, 15 layers, head 512).

* `sampling`: milliseconds per code grid drawn from each prior in raster
  order, three ways timed in the same alternating rounds: lvm_jax's cached
  sampler (`sample_codes`, one position of every layer per step, one jitted
  call), PyTorch's natural raster loop (a full forward pass per position under
  `torch.no_grad`, `torch.multinomial` at each position), and lvm_jax's raster
  loop (`method="raster"`, a `lax.fori_loop` of full passes, the reference).
  First 100 grids of 8x8 (`--quick`: 10) with the settings' repeats. Then the
  cost per grid against the number of positions, linear for the cached
  sampler and quadratic for the raster loops: the three on one 8x8, 16x16 and
  32x32 grid per call (`--quick`: up to 16x16), timed once after compiling,
  and the cached sampler alone on 100 grids of 16x16 and 32x32.
* `train_step`: images/s of one VQ-VAE training step (K = 128 codes of
  D = 256, forward, backward, Adam, BatchNorm in training mode) at batch 128
  on 32x32x3 (patches_embedded), with image_vae.py's protocol (`fit`'s
  compiled step against the PyTorch loop); and code grids/s of one training
  step of each prior at batch 128 of 8x8 grids (random codes).

Before timing, the PyTorch models are loaded with lvm_jax's parameters,
randomised (`image_vae.randomised`), and must compute the same prior logits
on random codes, and the same VQ-VAE codes, reconstructions (training and
inference mode), loss and gradients on test images.
"""

import dataclasses

import jax
import numpy as np
import torch

from benchmarks import torch_models
from benchmarks.common import (Comparison, Row, Settings, compare, compare_in_processes,
                               SameKeyDraws, device, measure, timer)
from benchmarks.image_vae import dtype_label, randomised, step_note, steps_per_sample
from benchmarks.trainers import JaxSteps, compare_steps, scale_images, to_torch_images
from benchmarks.twins import assert_close, assert_same_gradients, negligible_note
from experiments import vqvae as vqvae_experiment
from lvm_jax import data
from lvm_jax.models import vqvae
from lvm_jax.nn.sampling import METHODS, sample_codes

BATCH = 128
GRID = (8, 8)
DATASET = "patches_embedded"
NUM_SAMPLES, QUICK_NUM_SAMPLES = 100, 10
# Cost per grid against positions: every sampler on one grid per call (a raster call on a
# 32x32 grid takes about 40 s per side on a 2-core CPU), each warmed up once, then timed
# with repeats x positions held to SCALING_POSITION_BUDGET (5 repeats at 8x8, 2 at 16x16, 1
# at 32x32: vqvae_sampling within about 12 min on an idle 2-core machine); and the cached
# sampler alone on larger grids at NUM_SAMPLES per call.
SCALING_SIDES, QUICK_SCALING_SIDES = (8, 16, 32), (8, 16)
CACHED_SIDES, QUICK_CACHED_SIDES = (16, 32), (16,)
SCALING_POSITION_BUDGET = 2 * 16 * 16
NUM_PRIOR_TRAIN_GRIDS = 20 * BATCH
PRIORS = {  # name: (row label, PyTorch twin, weight copy)
    "pixelcnn": ("PixelCNN (embed 64, 12 res. blocks, head 512)", torch_models.PixelCNN,
                 torch_models.copy_flax_pixelcnn_params),
    "gated": ("Gated PixelCNN (dim 128, 15 layers, head 512)", torch_models.GatedPixelCNN,
              torch_models.copy_flax_gated_pixelcnn_params),
}
def _priors(name: str, seed: int):
    """lvm_jax and PyTorch priors with the same random weights, checked to give the same logits."""
    prior = vqvae.PRIORS[name](vqvae.NUM_CODES)
    codes = jax.random.randint(jax.random.key(seed), (16, *GRID), 0, vqvae.NUM_CODES)
    params = randomised(prior.init(jax.random.key(seed), codes)["params"], seed, scale=0.1)
    torch_prior = PRIORS[name][2](PRIORS[name][1](vqvae.NUM_CODES), params)
    with torch.no_grad():
        torch_logits = torch_prior(torch.from_numpy(np.array(codes)).long())
    error = assert_close(f"{name} logits", prior.apply({"params": params}, codes),
                          torch_logits.permute(0, 2, 3, 1))
    return prior, params, torch_prior, error


def _compiled_sampler(prior, params, num: int, grid: tuple[int, int], method: str):
    """`sample_codes` compiled ahead of time: key -> codes (num, *grid)."""
    sample = jax.jit(lambda p, key: sample_codes(prior, {"params": p}, key, num, *grid, method))
    compiled = sample.lower(params, jax.random.key(0)).compile()
    return lambda key: compiled(params, key)


def _what(num: int, grid: tuple[int, int]) -> str:
    height, width = grid
    return (f"draw {num} code grid{'s' if num > 1 else ''} of {height}x{width} "
            f"({height * width} positions)")


def _row(name: str, num: int, **fields) -> Row:
    return Row(benchmark="vqvae_sampling", model=f"{PRIORS[name][0]}, K={vqvae.NUM_CODES}",
               batch=num, unit="ms per grid", higher_is_better=False, **fields)


def _sampling_rows(name: str, num: int, grid: tuple[int, int], settings: Settings, warmup: int,
                   goal: float | None = None) -> list[Row]:
    """Two rows, all three samplers timed in the same rounds: lvm_jax's cached sampler against
    the reference implementation's method (PyTorch's raster loop; no cached PyTorch sampler
    exists), with its speed-up over lvm_jax's own raster loop (an algorithm comparison: same
    framework, same codes); and lvm_jax's raster loop against PyTorch's (a framework
    comparison: same algorithm). `goal`: the least ratio of the cached sampler to the
    reference method asked for (an algorithm goal)."""
    prior, params, torch_prior, error = _priors(name, settings.seed)
    samplers = {method: _compiled_sampler(prior, params, num, grid, method) for method in METHODS}
    draws = SameKeyDraws(settings.seed)
    sampler = {method: draws.timer(method, samplers[method]) for method in METHODS}

    torch.manual_seed(settings.seed)
    result = compare(sampler["cached"], timer(lambda: torch_prior.sample(num, *grid)), settings,
                     warmup=warmup, also={"raster": sampler["raster"]})
    raster_seconds = result.also_seconds["raster"]
    same = np.all(draws.latest["cached"] == draws.latest["raster"], axis=(1, 2)).sum()
    quick = " [quick]" if settings.quick else ""
    timing = (f"median of {settings.repeats}" if settings.repeats > 1 else "timed once") + (
        " after a warm-up round" if warmup else " after compiling")
    shared = dict(pytorch=1e3 * result.torch_seconds / num,
                  device=device(result.torch_threads, jax_devices=1))
    return [
        _row(name, num, step=f"{_what(num, grid)}: cached sampler vs the reference "
                                f"implementation's method (PyTorch raster loop){quick}",
             lvm_jax=1e3 * result.jax_seconds / num, goal=goal,
             note=f"an algorithm comparison, not a framework ratio: lvm_jax: "
                  f"sample_codes(method='cached'), one jitted call, "
                  f"{raster_seconds / result.jax_seconds:.1f}x faster than lvm_jax's own raster "
                  f"loop on the same codes (the speed-up of caching alone; algorithm goal >= "
                  f"20x), the same codes in {same} of {num} grids; the reference "
                  f"implementation's method (PyTorch): a full forward pass per position in a "
                  f"Python loop; logits equal to {error:.1g}; {timing}; {result.torch_note()}",
             **shared),
        _row(name, num, step=f"{_what(num, grid)}: lvm_jax raster loop vs PyTorch raster "
                                f"loop (same algorithm){quick}",
             lvm_jax=1e3 * raster_seconds / num,
             note=f"a framework comparison: lvm_jax: sample_codes(method='raster'), a "
                  f"lax.fori_loop of {grid[0] * grid[1]} full passes in one jitted call; "
                  f"PyTorch: the same passes in a Python loop; {timing}; {result.torch_note()}",
             **shared),
    ]


def _cached_row(name: str, num: int, grid: tuple[int, int], settings: Settings) -> Row:
    """The cached sampler alone (a raster loop would take hours at this batch)."""
    prior, params, _, _ = _priors(name, settings.seed)
    sample = _compiled_sampler(prior, params, num, grid, "cached")
    keys = iter(jax.random.split(jax.random.key(settings.seed), 1000))
    seconds = measure(timer(lambda: jax.block_until_ready(sample(next(keys)))), settings,
                      warmup=0)
    return _row(name, num,
                step=f"{_what(num, grid)}: cached sampler" + (" [quick]" if settings.quick else ""),
                lvm_jax=1e3 * seconds / num, device=device(jax_devices=1),
                note=f"lvm_jax: sample_codes(method='cached') alone, median of "
                     f"{settings.repeats} after compiling")


def _scaling_settings(side: int, settings: Settings) -> Settings:
    """`settings` with fewer repeats on larger grids: a raster loop's call grows with the
    number of positions, so repeats x positions is held to SCALING_POSITION_BUDGET, with at
    least one timed call after the warm-up."""
    repeats = max(1, min(settings.repeats, SCALING_POSITION_BUDGET // (side * side)))
    return dataclasses.replace(settings, repeats=repeats)


def sampling(settings: Settings) -> list[Row]:
    """Milliseconds per code grid from each prior: cached (algorithm goals on 100 8x8 grids:
    >= 10x the reference implementation's method, PyTorch's raster loop, and >= 20x lvm_jax's
    own raster loop) and raster; the cost per grid against the number of positions, every
    side warmed up once before timing."""
    num = QUICK_NUM_SAMPLES if settings.quick else NUM_SAMPLES
    rows = []
    for name in PRIORS:
        rows += _sampling_rows(name, num, GRID, settings, warmup=1, goal=10.0)
        for side in QUICK_SCALING_SIDES if settings.quick else SCALING_SIDES:
            rows += _sampling_rows(name, 1, (side, side), _scaling_settings(side, settings),
                                   warmup=1)
        for side in QUICK_CACHED_SIDES if settings.quick else CACHED_SIDES:
            rows.append(_cached_row(name, num, (side, side), settings))
    return rows


def _randomised_batch_stats(batch_stats, seed: int):
    """Running means N(0, 0.1^2) and variances in (0.5, 1.5): BatchNorm in inference mode."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (0.5 + rng.random(s.shape) if path[-1].key == "var"
                         else 0.1 * rng.standard_normal(s.shape)).astype(np.float32),
        jax.device_get(batch_stats))


def assert_same_vqvae(model: vqvae.VQVAE, variables, images: np.ndarray,
                      seed: int) -> tuple[float, str]:
    """Raises AssertionError unless PyTorch's VQ-VAE, loaded with randomised `variables`,
    gives lvm_jax's codes, reconstructions (training and inference mode), loss and every
    gradient on `images` (uint8 NHWC). Returns the largest relative error and
    `twins.negligible_note` (the convolution biases before training-mode BatchNorm, which
    removes them: their gradient is zero up to rounding)."""
    params = randomised(variables["params"], seed)
    stats = _randomised_batch_stats(variables["batch_stats"], seed)
    torch_model = torch_models.copy_flax_vqvae_params(
        torch_models.VQVAE(images.shape[-1], vqvae.NUM_CODES, vqvae.CODE_DIM), params, stats)
    x = data.scale_images(images)
    torch_x = scale_images(to_torch_images(images))
    # Inference mode first: training-mode passes update PyTorch's running statistics.
    torch_model.eval()
    with torch.no_grad():
        recon = torch_model(torch_x)[0]
    errors = [assert_close(
        "inference-mode reconstructions",
        model.apply({"params": params, "batch_stats": stats}, x)["reconstruction"],
        recon.permute(0, 2, 3, 1))]

    def loss(p):
        value, (_, new_state) = vqvae.loss_fn(model, p, {"batch_stats": stats}, x, None, True)
        return value, new_state

    (value, _), grads = jax.value_and_grad(loss, has_aux=True)(params)
    out = model.apply({"params": params, "batch_stats": stats}, x, True, mutable=["batch_stats"])[0]
    torch_model.train()
    torch_loss, _ = torch_models.vqvae_loss_fn(torch_model, torch_x)
    torch_loss.backward()
    with torch.no_grad():
        recon, _, _, indices = torch_model(torch_x)
    assert np.array_equal(np.asarray(out["indices"]), indices.numpy()), "codes differ"
    errors.append(assert_close("training-mode reconstructions", out["reconstruction"],
                                recon.permute(0, 2, 3, 1)))
    errors.append(assert_close("loss", value, torch_loss.detach()))
    error, negligible = assert_same_gradients(torch_model, torch_models.copy_flax_vqvae_params,
                                              grads)
    return max(*errors, error), negligible_note(negligible)


def _step_row(step_name: str, model: str, unit: str, result: Comparison, settings: Settings,
              checked: tuple[str, ...], goal: float | None = None) -> Row:
    return Row(benchmark="vqvae_step", model=model, step=step_name, batch=BATCH, unit=unit,
               higher_is_better=True, goal=goal, note=step_note(result, settings, *checked),
               **result.throughput_fields(BATCH, settings.torch_device))


def _vqvae_model(dataset: data.Dataset, dtype: str = "float32") -> vqvae.VQVAE:
    return vqvae.conv_vqvae(dataset.event_shape, vqvae.NUM_CODES, vqvae.CODE_DIM, dtype=dtype)


def vqvae_step_comparison(settings: Settings) -> Comparison:
    """lvm_jax's and PyTorch's VQ-VAE training steps (lvm_jax's in `settings.dtype`) from the
    same initial parameters and BatchNorm statistics, compared (`train_step` checks first that
    the two compute the same function)."""
    dataset = data.load(DATASET)
    jax_steps = JaxSteps(vqvae_experiment.vqvae_objective(_vqvae_model(dataset, settings.dtype)),
                         dataset.train, BATCH, settings.seed)
    params, state = jax.device_get((jax_steps.state.params, jax_steps.state.model_state))

    def twin():
        return torch_models.copy_flax_vqvae_params(
            torch_models.VQVAE(dataset.event_shape[-1], vqvae.NUM_CODES, vqvae.CODE_DIM),
            params, state["batch_stats"])

    return compare_steps(jax_steps, twin, to_torch_images(dataset.train), BATCH,
                         steps_per_sample(settings), settings, loss_fn=torch_models.vqvae_loss_fn)


def prior_codes(seed: int) -> np.ndarray:
    """The priors' training set: NUM_PRIOR_TRAIN_GRIDS random code grids (N, *GRID) int32."""
    return np.random.default_rng(seed).integers(
        0, vqvae.NUM_CODES, (NUM_PRIOR_TRAIN_GRIDS, *GRID)).astype(np.int32)


def assert_same_prior_training(name: str, seed: int) -> tuple[float, str]:
    """Raises AssertionError unless the PyTorch prior, loaded with randomised lvm_jax
    parameters, gives lvm_jax's logits, loss (nats per code) and every gradient on a batch of
    random codes. Returns the largest relative error and `twins.negligible_note`."""
    prior, params, torch_prior, error = _priors(name, seed)
    codes = prior_codes(seed)[:16]
    value, grads = jax.value_and_grad(
        lambda p: vqvae.prior_loss_fn(prior, p, codes, None)[0])(params)
    loss, _ = torch_models.prior_loss_fn(torch_prior, torch.from_numpy(codes).long())
    loss.backward()
    grad_error, negligible = assert_same_gradients(torch_prior, PRIORS[name][2], grads)
    return (max(error, assert_close(f"{name} loss", value, loss.detach()), grad_error),
            negligible_note(negligible))


def prior_step_comparison(name: str, settings: Settings) -> Comparison:
    """lvm_jax's and PyTorch's training steps of prior `name` on random code grids, from the
    same initial parameters."""
    prior = vqvae.PRIORS[name](vqvae.NUM_CODES)
    codes = prior_codes(settings.seed)
    jax_steps = JaxSteps(vqvae_experiment.prior_objective(prior), codes, BATCH, settings.seed)
    params = jax.device_get(jax_steps.state.params)
    return compare_steps(
        jax_steps, lambda: PRIORS[name][2](PRIORS[name][1](vqvae.NUM_CODES), params),
        torch.from_numpy(codes).long(), BATCH, steps_per_sample(settings), settings,
        loss_fn=torch_models.prior_loss_fn, prepare=lambda codes: codes)


def train_step(settings: Settings) -> list[Row]:
    """Images/s of a VQ-VAE training step, code grids/s of a prior training step, batch 128,
    each in `settings.processes` fresh processes after checking loss and gradients."""
    dataset = data.load(DATASET)
    model = _vqvae_model(dataset)
    variables = jax.jit(model.init)(jax.random.key(settings.seed),
                                    data.scale_images(dataset.test[:1]))
    error, negligible = assert_same_vqvae(model, variables, dataset.test[:16], settings.seed)
    result = compare_in_processes("benchmarks.vqvae", "vqvae_step_comparison", [], settings)
    h, w, c = dataset.event_shape
    rows = [_step_row(
        "train step (fwd + bwd + Adam, BatchNorm in training mode)",
        f"VQ-VAE (K={vqvae.NUM_CODES}, D={vqvae.CODE_DIM}), {h}x{w}x{c} ({DATASET})"
        f"{dtype_label(settings)}",
        "images/s", result, settings,
        (f"same codes, reconstructions, loss and every gradient to {error:.1g}", negligible),
        goal=1.0)]
    for name, (label, _, _) in PRIORS.items():
        error, negligible = assert_same_prior_training(name, settings.seed)
        rows.append(_step_row(
            f"prior train step on {GRID[0]}x{GRID[1]} code grids (fwd + bwd + Adam)",
            f"{label}, K={vqvae.NUM_CODES}", "grids/s",
            compare_in_processes("benchmarks.vqvae", "prior_step_comparison", [name], settings),
            settings, (f"random codes; same logits, loss and every gradient to {error:.1g}",
                       negligible)))
    return rows
