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
                               device, measure, timer)
from benchmarks.image_vae import dtype_label, randomised, steps_per_sample
from benchmarks.trainers import (
    LEARNING_RATE,
    JaxSteps,
    TorchSteps,
    epoch_batches,
    scale_images,
    to_torch_images,
)
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
TOL = 1e-4  # max |difference| / (1 + max |lvm_jax value|)


def _assert_close(what: str, a, b, tol: float = TOL) -> float:
    """The relative error of b against a; raises AssertionError above `tol`."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} and {b.shape}"
    error = float(np.max(np.abs(a - b))) / (1.0 + float(np.max(np.abs(a))))
    assert error < tol, f"PyTorch and lvm_jax {what} differ by {error:.3g} (relative)"
    return error


def _priors(name: str, seed: int):
    """lvm_jax and PyTorch priors with the same random weights, checked to give the same logits."""
    prior = vqvae.PRIORS[name](vqvae.NUM_CODES)
    codes = jax.random.randint(jax.random.key(seed), (16, *GRID), 0, vqvae.NUM_CODES)
    params = randomised(prior.init(jax.random.key(seed), codes)["params"], seed, scale=0.1)
    torch_prior = PRIORS[name][2](PRIORS[name][1](vqvae.NUM_CODES), params)
    with torch.no_grad():
        torch_logits = torch_prior(torch.from_numpy(np.array(codes)).long())
    error = _assert_close(f"{name} logits", prior.apply({"params": params}, codes),
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
    keys = iter(jax.random.split(jax.random.key(settings.seed), 1000))
    drawn = {}  # each method's latest codes, drawn with the same key

    def sampler(method):
        def sample():
            if method == "cached":
                drawn["key"] = next(keys)
            drawn[method] = np.asarray(jax.block_until_ready(samplers[method](drawn["key"])))
        return timer(sample)

    torch.manual_seed(settings.seed)
    result = compare(sampler("cached"), timer(lambda: torch_prior.sample(num, *grid)), settings,
                     warmup=warmup, also={"raster": sampler("raster")})
    raster_seconds = result.also_seconds["raster"]
    same = np.all(drawn["cached"] == drawn["raster"], axis=(1, 2)).sum()
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


def assert_same_vqvae(model: vqvae.VQVAE, variables, images: np.ndarray, seed: int) -> float:
    """Raises AssertionError unless PyTorch's VQ-VAE, loaded with randomised `variables`,
    gives lvm_jax's codes, reconstructions (training and inference mode), loss and
    gradients on `images` (uint8 NHWC). Returns the largest relative error."""
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
    errors = [_assert_close(
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
    errors.append(_assert_close("training-mode reconstructions", out["reconstruction"],
                                recon.permute(0, 2, 3, 1)))
    errors.append(_assert_close("loss", value, torch_loss.detach()))
    # Gradients: the first encoder conv (through the straight-through estimator), the
    # codebook and the last decoder layer.
    pairs = {"encoder conv grad": (grads["encoder"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1),
                                   torch_model.encoder[0].weight.grad),
             "codebook grad": (grads["quantizer"]["embeddings"],
                               torch_model.quantizer.embedding.weight.grad),
             "decoder output grad": (
                 grads["decoder"]["SubPixelConvTranspose_1"]["kernel"].transpose(2, 3, 0, 1),
                 torch_model.decoder[7].weight.grad)}
    for what, (a, b) in pairs.items():
        # Gradients are small: relative to their own scale.
        scale = float(np.max(np.abs(np.asarray(a))))
        errors.append(_assert_close(what, np.asarray(a) / scale, b.numpy() / scale))
    return max(errors)


class TorchPriorSteps:
    """One PyTorch training step of a prior on code grids per call of `step` (returns the loss)."""

    def __init__(self, prior: torch.nn.Module, codes: np.ndarray, batch_size: int, seed: int):
        self.prior = prior
        self.codes = torch.from_numpy(codes).long()
        self.optimizer = torch.optim.Adam(prior.parameters(), lr=LEARNING_RATE)
        self.batches = epoch_batches(seed, len(codes), batch_size)

    def step(self) -> float:
        loss, _ = torch_models.prior_loss_fn(self.prior, self.codes[torch.from_numpy(
            next(self.batches))])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def _compare_steps(jax_step, torch_step, settings: Settings) -> Comparison:
    number = steps_per_sample(settings)
    return compare(timer(jax_step, number), timer(torch_step, number), settings)


def _step_row(step_name: str, model: str, unit: str, result: Comparison, settings: Settings,
              note: str, goal: float | None = None) -> Row:
    return Row(benchmark="vqvae_step", model=model, step=step_name, batch=BATCH,
               lvm_jax=BATCH / result.jax_seconds, pytorch=BATCH / result.torch_seconds,
               unit=unit, higher_is_better=True, device=device(result.torch_threads), goal=goal,
               note=f"{note}; steps per sample: {steps_per_sample(settings)}; "
                    f"{result.torch_note()} per step{result.processes_note()}")


def _vqvae_steps(settings: Settings):
    """(float32 model, dataset, JaxSteps, TorchSteps) of the VQ-VAE's training step, lvm_jax's
    in `settings.dtype`, both sides initialised from `settings.seed`."""
    dataset = data.load(DATASET)
    model = vqvae.conv_vqvae(dataset.event_shape, vqvae.NUM_CODES, vqvae.CODE_DIM)
    timed = vqvae.conv_vqvae(dataset.event_shape, vqvae.NUM_CODES, vqvae.CODE_DIM,
                             dtype=settings.dtype)
    jax_steps = JaxSteps(vqvae_experiment.vqvae_objective(timed), dataset.train, BATCH,
                         settings.seed)
    torch.manual_seed(settings.seed)
    torch_model = torch_models.VQVAE(dataset.event_shape[-1], vqvae.NUM_CODES, vqvae.CODE_DIM)
    torch_steps = TorchSteps(torch_model, dataset.train, BATCH, settings.seed,
                             loss_fn=torch_models.vqvae_loss_fn)
    return model, dataset, jax_steps, torch_steps


def vqvae_step_comparison(settings: Settings) -> Comparison:
    """lvm_jax's and PyTorch's VQ-VAE training steps, compared (`train_step` checks first that
    the two compute the same function)."""
    _, _, jax_steps, torch_steps = _vqvae_steps(settings)
    return _compare_steps(jax_steps.step, torch_steps.step, settings)


def train_step(settings: Settings) -> list[Row]:
    """Images/s of a VQ-VAE training step (in `settings.processes` fresh processes), code
    grids/s of a prior training step, batch 128."""
    model, dataset, jax_steps, _ = _vqvae_steps(settings)
    error = assert_same_vqvae(model, {"params": jax_steps.state.params,
                                      **jax_steps.state.model_state},
                              dataset.test[:16], settings.seed)
    result = compare_in_processes("benchmarks.vqvae", "vqvae_step_comparison", [], settings)
    h, w, c = dataset.event_shape
    rows = [_step_row(
        "train step (fwd + bwd + Adam, BatchNorm in training mode)",
        f"VQ-VAE (K={vqvae.NUM_CODES}, D={vqvae.CODE_DIM}), {h}x{w}x{c} ({DATASET})"
        f"{dtype_label(settings)}",
        "images/s", result, settings,
        f"same codes, reconstructions, loss and gradients to {error:.1g}", goal=1.0)]

    codes = np.random.default_rng(settings.seed).integers(
        0, vqvae.NUM_CODES, (NUM_PRIOR_TRAIN_GRIDS, *GRID)).astype(np.int32)
    for name, (label, _, _) in PRIORS.items():
        prior, _, _, error = _priors(name, settings.seed)
        jax_steps = JaxSteps(vqvae_experiment.prior_objective(prior), codes, BATCH, settings.seed)
        torch.manual_seed(settings.seed)
        torch_steps = TorchPriorSteps(PRIORS[name][1](vqvae.NUM_CODES), codes, BATCH,
                                      settings.seed)
        rows.append(_step_row(
            f"prior train step on {GRID[0]}x{GRID[1]} code grids (fwd + bwd + Adam)",
            f"{label}, K={vqvae.NUM_CODES}", "grids/s",
            _compare_steps(jax_steps.step, torch_steps.step, settings), settings,
            f"random codes; logits equal to {error:.1g}"))
    return rows
