"""Image VAE quality: test -ELBO on embedded MNIST after equal epochs, lvm_jax against PyTorch.

* lvm_jax: `fit` itself with `experiments.vae`'s model and objective (batch
  128, Adam 1e-3, one compiled call per step), in a temporary workdir; its
  test metrics after the last epoch.
* PyTorch: the same model trained on the same batches in the same order
  (`epoch_order` of the same seed), evaluated on the same 1,000 test images
  with one z ~ q(z|x) per image, as lvm_jax evaluates. Twice: with PyTorch's
  default initialisation (the PyTorch implementation a user writes), and
  starting from lvm_jax's initialisers (a Flax initialisation copied in),
  which separates the frameworks from their initialisation schemes.

Units: nats per example, and the course's: summed squared error of images in
[-1, 1] plus the KL (REFERENCE.md §2). PyTorch trains with one thread here: the
thread count does not change the result, and one thread is the fastest on a
shared machine.
"""

import tempfile

import jax
import numpy as np
import torch

from benchmarks import torch_models
from benchmarks.common import NUM_CORES, Row, Settings, device
from benchmarks.image_vae import BATCH, jax_model
from benchmarks.trainers import TorchSteps, scale_images, to_torch_images
from experiments import vae as vae_experiment
from experiments.common import CONVOLUTIONAL_EVAL_BATCH
from lvm_jax import data
from lvm_jax.models import likelihoods
from lvm_jax.train import TrainConfig, fit

NAME = "image_vae_quality"
DATASET = "mnist_embedded"
EVAL_BATCH = CONVOLUTIONAL_EVAL_BATCH  # as lvm_jax evaluates


def train_lvm_jax(dataset: data.Dataset, epochs: int, seed: int) -> dict[str, float]:
    """Test metrics (nats per example) after `epochs` of `fit`."""
    objective = vae_experiment.make_objective(jax_model(dataset, "standard"))
    config = TrainConfig(epochs=epochs, batch_size=BATCH, seed=seed, steps_per_call=1,
                         eval_batch_size=EVAL_BATCH, progress=False)
    with tempfile.TemporaryDirectory() as workdir:
        return fit(objective, dataset.train, dataset.test, config, workdir).test_metrics


@torch.no_grad()
def evaluate(model: torch_models.VAE, test: np.ndarray, seed: int) -> dict[str, float]:
    """Test-set means of -ELBO, recon and KL (nats per example), one z sample per image."""
    torch.manual_seed(seed)
    images = to_torch_images(test)
    totals = np.zeros(2)
    for start in range(0, len(images), EVAL_BATCH):
        recon, kl = model(scale_images(images[start:start + EVAL_BATCH]))
        totals += [recon.sum().item(), kl.sum().item()]
    recon, kl = totals / len(images)
    return {"neg_elbo": recon + kl, "recon": recon, "kl": kl}


def train_torch(dataset: data.Dataset, epochs: int, seed: int, flax_init: bool) -> dict[str, float]:
    """Test metrics after `epochs` of the PyTorch loop, from PyTorch's or lvm_jax's init."""
    torch.manual_seed(seed)
    model = torch_models.conv_vae(dataset.event_shape[-1])
    if flax_init:
        model_jax = jax_model(dataset, "standard")
        x = data.scale_images(dataset.train[:1])
        key = jax.random.key(seed)
        torch_models.copy_flax_params(model, model_jax.init(key, x, key)["params"])
    steps = TorchSteps(model, to_torch_images(dataset.train), BATCH, seed)
    for _ in range(epochs * (len(dataset.train) // BATCH)):
        steps.step()
    return evaluate(model, dataset.test, seed)


def run(settings: Settings) -> list[Row]:
    """Test -ELBO after `settings.quality_epochs` epochs, in nats and in the course's units."""
    epochs = 1 if settings.quick else settings.quality_epochs
    dataset = data.load(DATASET)
    ours = train_lvm_jax(dataset, epochs, settings.seed)
    torch.set_num_threads(1)
    theirs = {flax_init: train_torch(dataset, epochs, settings.seed, flax_init)
              for flax_init in (False, True)}
    torch.set_num_threads(NUM_CORES)

    def course_units(metrics):
        return likelihoods.reference_units(metrics, dataset.num_dims)["neg_elbo_sse"]

    def terms(metrics):
        return f"recon {metrics['recon']:.2f} + KL {metrics['kl']:.2f}"

    model = f"image VAE, 32x32x1 ({DATASET}, {len(dataset.train)} train / {len(dataset.test)} test)"
    step = f"test -ELBO after {epochs} epochs"
    common = dict(benchmark=NAME, model=model, batch=BATCH, higher_is_better=False,
                  device=device(1))
    rows = []
    for flax_init, label in ((False, "PyTorch default init"), (True, "PyTorch from lvm_jax's init")):
        metrics = theirs[flax_init]
        goal = None if flax_init else 1.0
        rows += [
            Row(step=f"{step} [{label}]", lvm_jax=ours["neg_elbo"], pytorch=metrics["neg_elbo"],
                unit="nats per example", goal=goal,
                note=f"lvm_jax {terms(ours)}; PyTorch {terms(metrics)} nats", **common),
            Row(step=f"{step} [{label}]", lvm_jax=course_units(ours),
                pytorch=course_units(metrics), unit="SSE + KL (course units)", goal=goal,
                note="recon as summed squared error of images in [-1, 1]", **common),
        ]
    return rows
