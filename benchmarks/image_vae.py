"""Image VAE (REFERENCE.md §2): training throughput at batch 128, lvm_jax against PyTorch.

On 32x32x1 (embedded MNIST) and 32x32x3 (embedded photo patches): images per
second of full training steps (forward, backward, Adam update, loss read back),
lvm_jax as `fit` runs it on CPU (one compiled call per step) against the
PyTorch loop, eager and compiled (trainers.twin_samplers), both from lvm_jax's
initial parameters. Before timing, PyTorch's twin, loaded with randomised
lvm_jax parameters, must compute the same loss and every gradient.
"""

import dataclasses

import jax
import numpy as np
import torch

from benchmarks import torch_models
from benchmarks.common import Comparison, Row, Settings, compare_in_processes
from benchmarks.trainers import JaxSteps, compare_steps, scale_images, to_torch_images
from benchmarks.twins import assert_close, assert_same_gradients, negligible_note
from experiments import vae as vae_experiment
from lvm_jax import data
from lvm_jax.models import vae

NAME = "image_vae"
BATCH = 128
DATASETS = {1: "mnist_embedded", 3: "patches_embedded"}


def jax_model(dataset: data.Dataset, prior: str, dtype: str = "float32") -> vae.VAE:
    """lvm_jax's image VAE ("standard" prior) or VLAE ("made"), as the experiments build it."""
    return vae_experiment.build_model(dataset.event_shape, prior, "unit_gaussian", dtype)


def dtype_label(settings: Settings) -> str:
    """", bfloat16" for a model computing in another dtype than float32, else ""."""
    return "" if settings.dtype == "float32" else f", {settings.dtype}"


@torch.no_grad()
def assert_same_function(model: vae.VAE, params, torch_model: torch_models.VAE,
                         images: np.ndarray, tol: float = 1e-4):
    """Raises AssertionError unless `torch_model`, loaded with `params`, gives lvm_jax's
    encoder (mean, log_var), decoder means and log p(z) on `images` (uint8 NHWC)."""
    torch_models.copy_flax_params(torch_model, params)
    variables = {"params": params}
    x = scale_images(to_torch_images(images))
    mean, log_var = model.apply(variables, data.scale_images(images), method=vae.VAE.encode)
    torch_mean, torch_log_var = torch_model.encode(x)
    decoded = model.apply(variables, mean, method=lambda m, z: m.likelihood.mean(m.decode(z)))
    torch_decoded = torch_model.decoder(torch_mean).permute(0, 2, 3, 1)
    pairs = {"encoder mean": (mean, torch_mean), "encoder log_var": (log_var, torch_log_var),
             "decoder mean": (decoded, torch_decoded)}
    if hasattr(torch_model.prior, "log_prob"):
        log_pz = model.apply(variables, mean, method=lambda m, z: m.prior.log_prob(z))
        pairs["prior log p(z)"] = (log_pz, torch_model.prior.log_prob(torch_mean))
    for what, (a, b) in pairs.items():
        error = float(np.max(np.abs(np.asarray(a) - b.numpy())))
        assert error < tol * (1 + float(np.max(np.abs(np.asarray(a))))), (
            f"PyTorch and lvm_jax {what} differ by {error}: the models are not the same")


def assert_same_training(model: vae.VAE, params, channels: int, prior: str,
                         images: np.ndarray, seed: int) -> tuple[float, str]:
    """Raises AssertionError unless PyTorch's twin, loaded with `params`, gives lvm_jax's
    training loss (the negative ELBO of `vae.loss_fn`, one sample, the same noise) and every
    parameter's gradient on `images` (uint8 NHWC). Returns the largest relative error and
    `twins.negligible_note`."""
    key = jax.random.key(seed)
    # vae.loss_fn's noise: one sample, drawn from the first of split(key, 1).
    eps = jax.random.normal(jax.random.split(key, 1)[0], (len(images), model.latent_dim))
    value, grads = jax.value_and_grad(lambda p: vae.loss_fn(model, p, data.scale_images(images),
                                                            key)[0])(params)
    twin = torch_models.copy_flax_params(torch_models.conv_vae(channels, prior), params)
    loss, _ = torch_models.loss_fn(twin, scale_images(to_torch_images(images)),
                                   torch.from_numpy(np.array(eps)))
    loss.backward()
    error, negligible = assert_same_gradients(twin, torch_models.copy_flax_params, grads)
    return max(assert_close("loss", value, loss.detach()), error), negligible_note(negligible)


def steps_per_sample(settings: Settings) -> int:
    return 1 if settings.quick else 3


def step_comparison(prior: str, channels: int, settings: Settings) -> Comparison:
    """lvm_jax's and PyTorch's training steps of the image VAE ("standard" prior) or VLAE
    ("made") on `channels`-channel images, from the same initial parameters (PyTorch eager
    and compiled), after checking that both compute the same loss and gradients."""
    dataset = data.load(DATASETS[channels])
    model = jax_model(dataset, prior, settings.dtype)
    jax_steps = JaxSteps(vae_experiment.make_objective(model), dataset.train, BATCH,
                         settings.seed)
    initial = jax.device_get(jax_steps.state.params)
    # The same function in float32 (the parameters are float32 in every dtype).
    error, negligible = assert_same_training(jax_model(dataset, prior),
                                             randomised(initial, settings.seed), channels, prior,
                                             dataset.test[:8], settings.seed)
    result = compare_steps(
        jax_steps, lambda: torch_models.copy_flax_params(torch_models.conv_vae(channels, prior),
                                                         initial),
        to_torch_images(dataset.train), BATCH, steps_per_sample(settings), settings)
    checked = f"same loss and every gradient to {error:.1g}"
    return dataclasses.replace(result, remarks=(checked, negligible, *result.remarks))


def train_step_rows(name: str, model_name: str, prior: str, settings: Settings,
                    goal: float | None) -> list[Row]:
    """Images/s of one training step at batch 128, on 1- and 3-channel images, each
    compared in `settings.processes` fresh processes."""
    rows = []
    for channels, dataset_name in DATASETS.items():
        result = compare_in_processes("benchmarks.image_vae", "step_comparison",
                                      [prior, channels], settings)
        rows.append(Row(
            benchmark=name,
            model=f"{model_name}, 32x32x{channels} ({dataset_name}){dtype_label(settings)}",
            step="train step (fwd + bwd + Adam)", batch=BATCH, unit="images/s",
            higher_is_better=True, goal=goal, note=step_note(result, settings),
            **result.throughput_fields(BATCH, settings.torch_device)))
    return rows


def step_note(result: Comparison, settings: Settings, *checked: str) -> str:
    """A training-step row's note: what was checked (on randomised parameters), steps per
    sample, each PyTorch configuration's figures, the per-process ratios and the remarks."""
    return "; ".join(part for part in [
        *checked, "both sides trained from lvm_jax's initial parameters",
        f"steps per sample: {steps_per_sample(settings)}",
        f"{result.torch_note()} per step{result.processes_note()}", *result.remarks] if part)


def randomised(params, seed: int, scale: float = 0.05):
    """`params` with every entry redrawn from N(0, scale^2): the zero-initialised layers
    of lvm_jax would otherwise hide a wrong wiring from the equivalence check."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: (scale * rng.standard_normal(p.shape)).astype(np.float32),
                        jax.device_get(params))


def run(settings: Settings) -> list[Row]:
    return train_step_rows(NAME, "image VAE", "standard", settings, goal=1.0)
