"""The benchmarks' PyTorch twins of the image VAE, VLAE and VQ-VAE compute lvm_jax's function,
loss and every gradient from the same weights, mapped layer by layer in call order (skipped
without the `bench` extra's PyTorch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_models  # noqa: E402  (needs torch)
from benchmarks.image_vae import (assert_same_function, assert_same_training,  # noqa: E402
                                  randomised)
from benchmarks.vqvae import assert_same_vqvae  # noqa: E402
from experiments import vae as vae_experiment  # noqa: E402
from lvm_jax import data  # noqa: E402
from lvm_jax.models import vqvae  # noqa: E402
from lvm_jax.nn.conv import VQEncoder  # noqa: E402


def _images(channels: int) -> np.ndarray:
    return np.random.default_rng(channels).integers(0, 256, (4, 32, 32, channels), np.uint8)


@pytest.mark.parametrize("prior, channels", [("standard", 1), ("made", 3)])
def test_image_vae_twin_computes_lvm_jax_function_loss_and_gradients(prior, channels):
    images = _images(channels)
    model = vae_experiment.build_model(images.shape[1:], prior, "unit_gaussian")
    objective = vae_experiment.make_objective(model)
    params = randomised(objective.init(jax.random.key(0), objective.preprocess(images[:1]))
                        ["params"], seed=0)
    assert_same_function(model, params, torch_models.conv_vae(channels, prior), images)
    error, _ = assert_same_training(model, params, channels, prior, images, seed=0)
    assert error < 1e-2


def test_vqvae_twin_computes_lvm_jax_reconstructions_loss_and_gradients():
    images = _images(3)
    model = vqvae.conv_vqvae(images.shape[1:], vqvae.NUM_CODES, vqvae.CODE_DIM)
    variables = model.init(jax.random.key(0), data.scale_images(images[:1]))
    error, _ = assert_same_vqvae(model, variables, images, seed=0)
    assert error < 1e-2


def _encoder_layers():
    module, x = VQEncoder(8), jnp.zeros((1, 4, 4, 3))
    variables = module.init(jax.random.key(0), x, False)
    return torch_models.flax_layers(module, (x, False), variables["params"],
                                    variables["batch_stats"])


def test_flax_layers_are_found_in_call_order_with_their_variables():
    """The encoder creates its second conv before the BatchNorm whose output it takes, and
    calls it after: call order, not creation order."""
    layers = _encoder_layers()
    block = ["BatchNorm", "Conv", "BatchNorm", "Conv"]
    assert [layer.kind.__name__ for layer in layers] == ["Conv", "BatchNorm", "Conv", *block,
                                                          *block]
    assert [layer.params["kernel"].shape for layer in layers[:3:2]] == [(4, 4, 3, 8),
                                                                        (4, 4, 8, 8)]
    assert layers[0].stats is None and layers[1].stats["var"].shape == (8,)


def test_a_twin_whose_layers_differ_is_refused():
    nn = torch.nn
    layers = _encoder_layers()
    twin = torch_models.VQEncoder(3, 8)
    with pytest.raises(AssertionError, match=r"lvm_jax's layers \['Conv', 'BatchNorm', .*\] do "
                                             r"not match the twin's \['BatchNorm2d', 'Conv2d'"):
        torch_models.copy_layers(torch_models.twin_layers(twin)[1:], layers)
    wider = nn.Sequential(nn.Conv2d(3, 9, 4, 2, 1), *list(twin)[1:])
    with pytest.raises(AssertionError, match=r"lvm_jax's weight \(8, 3, 4, 4\) does not fit "
                                             r"the twin's Conv2d\(3, 9"):
        torch_models.copy_layers(torch_models.twin_layers(wider), layers)
