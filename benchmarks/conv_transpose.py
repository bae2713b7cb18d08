"""ConvTranspose(4x4, stride 2, padding 1) on CPU, before and after exact-FLOP upsampling:
flax's `nn.ConvTranspose`, the 3x3 sub-pixel form lvm_jax used before (one 3x3
convolution to 4x the channels, then depth-to-space: 36 multiply-adds per input
pixel and channel pair where the transposed convolution needs 16), lvm_jax's
`SubPixelConvTranspose` now (four 2x2 phase convolutions forward, stride-2
convolutions backward: the transposed convolution's own FLOPs) and PyTorch's
`nn.ConvTranspose2d`.

1. One layer, batch 128, 128 -> 64 channels, 8x8 -> 16x16: forward and backward
   (gradients of the input, kernel and bias), milliseconds per call.
2. The image-VAE (32x32x3) and VQ-VAE training steps (image_vae.py's and
   vqvae.py's protocol) with the decoder's transposed convolutions written
   each way.

Every note gives XLA's FLOP count of the compiled computation
(`cost_analysis()`, 2 per multiply-add). All forms compute the same function,
checked before timing.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax.linen.dtypes import promote_dtype

from benchmarks import torch_models
from benchmarks.common import Row, Settings, compare, device, timer
from benchmarks.image_vae import BATCH
from benchmarks.trainers import JaxSteps, TorchSteps, to_torch_images
from experiments import vae as vae_experiment
from experiments import vqvae as vqvae_experiment
from lvm_jax import data
from lvm_jax.models import likelihoods, vae, vqvae
from lvm_jax.models.priors import StandardNormalPrior
from lvm_jax.nn.conv import (PAD1, ConvDecoder, ConvEncoder, SubPixelConvTranspose, VQDecoder,
                             VQEncoder, depth_to_space)

NAME = "conv_transpose"
IN_CHANNELS, OUT_CHANNELS, SIZE = 128, 64, 8
LATENT_DIM = 16
TORCH_PADDING = ((2, 2), (2, 2))  # k - 1 - p for kernel 4, padding 1
# Kernel index used at each tap of the 3-tap window x[m - 1], x[m], x[m + 1] by
# output phase r (-1: none): see lvm_jax.nn.conv.
_TAPS = ((3, 1, -1), (-1, 2, 0))


def flax_conv_transpose(features: int, dtype=jnp.float32) -> nn.ConvTranspose:
    """flax's transposed convolution with PyTorch's ConvTranspose2d(k=4, s=2, p=1) geometry
    (on the spatially flipped kernel), computing in `dtype`."""
    return nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding=TORCH_PADDING, dtype=dtype)


def _subpixel_3x3_kernel(kernel: jax.Array) -> jax.Array:
    """(4, 4, Cin, Cout) -> (3, 3, Cin, 4 * Cout), outputs ordered (row phase, column phase,
    Cout), zeros where a phase has no tap."""
    zero = jnp.zeros(kernel.shape[2:], kernel.dtype)
    return jnp.stack([jnp.stack([jnp.concatenate(
        [kernel[_TAPS[ry][ty], _TAPS[rx][tx]] if _TAPS[ry][ty] >= 0 and _TAPS[rx][tx] >= 0
         else zero for ry in range(2) for rx in range(2)], axis=-1)
        for tx in range(3)]) for ty in range(3)])


class SubPixel3x3ConvTranspose(nn.Module):
    """The form lvm_jax used before exact-FLOP upsampling: same parameters and function as
    `SubPixelConvTranspose`, as one 3x3 convolution to 4 * Cout channels + depth-to-space."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (4, 4, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = promote_dtype(x, _subpixel_3x3_kernel(kernel), bias, dtype=self.dtype)
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), PAD1,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return depth_to_space(y, 2) + bias


# Row label: (upsampling layer, whether its kernel is spatially flipped against PyTorch's).
FORMS = {"flax nn.ConvTranspose": (flax_conv_transpose, True),
         "3x3 sub-pixel conv (before)": (SubPixel3x3ConvTranspose, False),
         "lvm_jax SubPixelConvTranspose (phase convs)": (SubPixelConvTranspose, False)}


def xla_gflops(compiled: jax.stages.Compiled) -> float:
    """XLA's FLOP count of a compiled computation, in GFLOP."""
    cost = compiled.cost_analysis()
    return (cost if isinstance(cost, dict) else cost[0])["flops"] / 1e9


def _assert_same_layer(x: jax.Array):
    """Every form, given the same PyTorch-ordered kernel, equals SubPixelConvTranspose."""
    reference = SubPixelConvTranspose(OUT_CHANNELS)
    params = reference.init(jax.random.key(0), x)["params"]
    params["bias"] = jax.random.normal(jax.random.key(1), params["bias"].shape)
    expected = reference.apply({"params": params}, x)
    for name, (layer, flipped) in FORMS.items():
        kernel = params["kernel"][::-1, ::-1] if flipped else params["kernel"]
        actual = layer(OUT_CHANNELS).apply({"params": {**params, "kernel": kernel}}, x)
        error = float(jnp.max(jnp.abs(actual - expected)))
        assert error < 1e-4, f"{name} and SubPixelConvTranspose differ by {error}"


def _jax_layer_gradient(layer: nn.Module, x: jax.Array, cotangent: jax.Array):
    """(a blocking call computing the gradients of <layer(x), cotangent> in (params, x),
    its XLA GFLOP)."""
    params = layer.init(jax.random.key(0), x)

    def gradients(params, x):
        return jax.grad(lambda p, x: jnp.vdot(layer.apply(p, x), cotangent), argnums=(0, 1))(
            params, x)

    compiled = jax.jit(gradients).lower(params, x).compile()
    return lambda: jax.block_until_ready(compiled(params, x)), xla_gflops(compiled)


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
    for name, (layer, _) in FORMS.items():
        call, gflops = _jax_layer_gradient(layer(OUT_CHANNELS), jnp.asarray(x),
                                           jnp.asarray(cotangent))
        result = compare(timer(call, number), timer(torch_call, number), settings)
        rows.append(Row(
            benchmark=NAME, model=f"{name} vs torch ConvTranspose2d",
            step=f"fwd + bwd, {IN_CHANNELS}->{OUT_CHANNELS} ch, {SIZE}x{SIZE}->{2 * SIZE}x{2 * SIZE}",
            batch=BATCH, lvm_jax=1e3 * result.jax_seconds, pytorch=1e3 * result.torch_seconds,
            unit="ms", higher_is_better=False, device=device(result.torch_threads, jax_devices=1),
            note=f"gradients of input, kernel and bias; XLA {gflops:.2f} GFLOP; "
                 f"{result.torch_note()}"))
    return rows


def _image_vae(upsample) -> vae.VAE:
    """lvm_jax's image VAE on 32x32x3 images (as `conv_vae` builds it) upsampling with `upsample`."""
    return vae.VAE(trunk=ConvEncoder(), decoder=ConvDecoder(3, upsample=upsample),
                   prior=StandardNormalPrior(LATENT_DIM),
                   likelihood=likelihoods.get("unit_gaussian"), event_shape=(32, 32, 3),
                   latent_dim=LATENT_DIM)


def _vqvae(upsample) -> vqvae.VQVAE:
    """lvm_jax's VQ-VAE on 32x32x3 images (as `conv_vqvae` builds it) upsampling with `upsample`."""
    reference = vqvae.conv_vqvae((32, 32, 3))
    return vqvae.VQVAE(VQEncoder(vqvae.CODE_DIM), reference.quantizer,
                       VQDecoder(vqvae.CODE_DIM, 3, upsample=upsample))


def _step_row(model: str, jax_steps: JaxSteps, torch_steps: TorchSteps,
              settings: Settings) -> Row:
    gflops = xla_gflops(jax_steps.compile())
    number = 1 if settings.quick else 3
    result = compare(timer(jax_steps.step, number), timer(torch_steps.step, number), settings)
    return Row(
        benchmark=NAME, model=model, step="train step (fwd + bwd + Adam)", batch=BATCH,
        lvm_jax=BATCH / result.jax_seconds, pytorch=BATCH / result.torch_seconds,
        unit="images/s", higher_is_better=True, device=device(result.torch_threads),
        note=f"XLA {gflops:.1f} GFLOP per step; steps per sample: {number}; "
             f"{result.torch_note()} per step")


def step_rows(settings: Settings) -> list[Row]:
    train = data.load("patches_embedded").train
    torch_train = to_torch_images(train)
    rows = []
    for name, (upsample, _) in FORMS.items():
        jax_steps = JaxSteps(vae_experiment.make_objective(_image_vae(upsample)), train, BATCH,
                             settings.seed)
        torch.manual_seed(settings.seed)
        torch_steps = TorchSteps(torch_models.conv_vae(3), torch_train, BATCH, settings.seed)
        rows.append(_step_row(f"image VAE 32x32x3, decoder with {name}", jax_steps, torch_steps,
                              settings))
    for name, (upsample, _) in list(FORMS.items())[1:]:  # flax's form: minutes per sample
        jax_steps = JaxSteps(vqvae_experiment.vqvae_objective(_vqvae(upsample)), train, BATCH,
                             settings.seed)
        torch.manual_seed(settings.seed)
        torch_steps = TorchSteps(torch_models.VQVAE(3, vqvae.NUM_CODES, vqvae.CODE_DIM),
                                 torch_train, BATCH, settings.seed,
                                 loss_fn=torch_models.vqvae_loss_fn)
        rows.append(_step_row(f"VQ-VAE 32x32x3, decoder with {name}", jax_steps, torch_steps,
                              settings))
    return rows


def run(settings: Settings) -> list[Row]:
    return layer_rows(settings) + step_rows(settings)
