"""ConvTranspose(4x4, stride 2, padding 1) on CPU: flax's `nn.ConvTranspose`, lvm_jax's
`SubPixelConvTranspose` (a 3x3 convolution to 4x the channels, then depth-to-space)
and PyTorch's `nn.ConvTranspose2d`.

1. One layer, batch 128, 128 -> 64 channels, 8x8 -> 16x16: forward and backward
   (gradients of the input, kernel and bias), milliseconds per call.
2. The image-VAE training step (image_vae.py's protocol, 32x32x3 patches) with
   the decoder's three transposed convolutions written either way.

`nn.ConvTranspose` with explicit padding k - 1 - p = 2 on each side computes
the same function as `SubPixelConvTranspose` with the kernel flipped
spatially (PyTorch's padding=1); this is checked before timing.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import torch_models
from benchmarks.common import Row, Settings, compare, device, timer
from benchmarks.image_vae import BATCH
from benchmarks.trainers import JaxSteps, TorchSteps
from experiments import vae as vae_experiment
from lvm_jax import data
from lvm_jax.models import likelihoods, vae
from lvm_jax.models.priors import StandardNormalPrior
from lvm_jax.nn.conv import ConvDecoder, ConvEncoder, SubPixelConvTranspose

NAME = "conv_transpose"
IN_CHANNELS, OUT_CHANNELS, SIZE = 128, 64, 8
LATENT_DIM = 16
TORCH_PADDING = ((2, 2), (2, 2))  # k - 1 - p for kernel 4, padding 1


def flax_conv_transpose(features: int, dtype=jnp.float32) -> nn.ConvTranspose:
    """flax's transposed convolution with PyTorch's ConvTranspose2d(k=4, s=2, p=1) geometry,
    computing in `dtype` (ConvDecoder passes its own)."""
    return nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding=TORCH_PADDING, dtype=dtype)


def _assert_same_layer(x: jax.Array):
    """nn.ConvTranspose with the flipped kernel equals SubPixelConvTranspose."""
    subpixel = SubPixelConvTranspose(OUT_CHANNELS)
    params = subpixel.init(jax.random.key(0), x)["params"]
    params["bias"] = jax.random.normal(jax.random.key(1), params["bias"].shape)
    flipped = {"kernel": params["kernel"][::-1, ::-1], "bias": params["bias"]}
    expected = subpixel.apply({"params": params}, x)
    actual = flax_conv_transpose(OUT_CHANNELS).apply({"params": flipped}, x)
    error = float(jnp.max(jnp.abs(actual - expected)))
    assert error < 1e-4, f"nn.ConvTranspose and SubPixelConvTranspose differ by {error}"


def _jax_layer_gradient(layer: nn.Module, x: jax.Array, cotangent: jax.Array):
    """A blocking call computing the gradients of <layer(x), cotangent> in (params, x)."""
    params = layer.init(jax.random.key(0), x)

    @jax.jit
    def gradients(params, x):
        return jax.grad(lambda p, x: jnp.vdot(layer.apply(p, x), cotangent), argnums=(0, 1))(
            params, x)

    return lambda: jax.block_until_ready(gradients(params, x))


def _torch_layer_gradient(x: np.ndarray, cotangent: np.ndarray):
    layer = torch.nn.ConvTranspose2d(IN_CHANNELS, OUT_CHANNELS, 4, 2, 1)
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    cotangent = torch.from_numpy(cotangent.transpose(0, 3, 1, 2).copy())

    def call():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(cotangent)

    return call


def layer_rows(settings: Settings) -> list[Row]:
    rng = np.random.default_rng(settings.seed)
    x = rng.standard_normal((BATCH, SIZE, SIZE, IN_CHANNELS)).astype(np.float32)
    cotangent = rng.standard_normal((BATCH, 2 * SIZE, 2 * SIZE, OUT_CHANNELS)).astype(np.float32)
    _assert_same_layer(jnp.asarray(x[:4]))
    torch_call = _torch_layer_gradient(x, cotangent)
    number = 2 if settings.quick else 10
    rows = []
    for name, layer in (("flax nn.ConvTranspose", flax_conv_transpose(OUT_CHANNELS)),
                        ("lvm_jax SubPixelConvTranspose", SubPixelConvTranspose(OUT_CHANNELS))):
        result = compare(timer(_jax_layer_gradient(layer, jnp.asarray(x), jnp.asarray(cotangent)),
                               number), timer(torch_call, number), settings)
        rows.append(Row(
            benchmark=NAME, model=f"{name} vs torch ConvTranspose2d",
            step=f"fwd + bwd, {IN_CHANNELS}->{OUT_CHANNELS} ch, {SIZE}x{SIZE}->{2 * SIZE}x{2 * SIZE}",
            batch=BATCH, lvm_jax=1e3 * result.jax_seconds, pytorch=1e3 * result.torch_seconds,
            unit="ms", higher_is_better=False, device=device(result.torch_threads),
            note=f"gradients of input, kernel and bias; {result.torch_note()}"))
    return rows


def _image_vae(decoder: nn.Module) -> vae.VAE:
    """lvm_jax's image VAE on 32x32x3 images (as `conv_vae` builds it) with `decoder`."""
    return vae.VAE(trunk=ConvEncoder(), decoder=decoder, prior=StandardNormalPrior(LATENT_DIM),
                   likelihood=likelihoods.get("unit_gaussian"), event_shape=(32, 32, 3),
                   latent_dim=LATENT_DIM)


def step_rows(settings: Settings) -> list[Row]:
    train = data.load("patches_embedded").train
    models = {"flax nn.ConvTranspose": _image_vae(ConvDecoder(3, upsample=flax_conv_transpose)),
              "lvm_jax SubPixelConvTranspose": _image_vae(ConvDecoder(3))}
    number = 1 if settings.quick else 3
    rows = []
    for name, model in models.items():
        jax_steps = JaxSteps(vae_experiment.make_objective(model), train, BATCH, settings.seed)
        torch.manual_seed(settings.seed)
        torch_steps = TorchSteps(torch_models.conv_vae(3), train, BATCH, settings.seed)
        result = compare(timer(jax_steps.step, number), timer(torch_steps.step, number), settings)
        rows.append(Row(
            benchmark=NAME, model=f"image VAE 32x32x3, decoder with {name}",
            step="train step (fwd + bwd + Adam)", batch=BATCH, lvm_jax=BATCH / result.jax_seconds,
            pytorch=BATCH / result.torch_seconds, unit="images/s", higher_is_better=True,
            device=device(result.torch_threads),
            note=f"steps per sample: {number}; {result.torch_note()} per step"))
    return rows


def run(settings: Settings) -> list[Row]:
    return layer_rows(settings) + step_rows(settings)
