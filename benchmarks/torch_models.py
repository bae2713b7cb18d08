"""PyTorch versions of lvm_jax's models, written the way a PyTorch user would.

Same layers, widths, bounds and losses as lvm_jax (REFERENCE.md §1-4), in
PyTorch's conventions: NCHW images, `nn.Module`s, PyTorch's default
initialisation, a Python loop over the latent dimensions to sample the MADE
prior and over the grid positions to sample the PixelCNNs. `copy_flax_params`
(and the `copy_flax_*_params` of the other models) loads an lvm_jax parameter
tree into these modules, so the benchmarks can check that both sides compute
the same function before timing them.

The VAEs' layers keep Flax's automatic names (`Conv_0`: renaming them would
change their initial values, which Flax derives from each module's path), so
their copies never write those names out: `flax_layers` lists lvm_jax's layers
in the order the lvm_jax module calls them, and `copy_layers` copies them into
the twin's layers in its forward order, checking kinds and shapes. The priors
name every submodule, and their copies address them by name.

All log-densities are per example, summed over the event dimensions, in nats.
"""

import math
from typing import NamedTuple

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from lvm_jax.nn.conv import ConvDecoder as FlaxConvDecoder
from lvm_jax.nn.conv import ConvEncoder as FlaxConvEncoder
from lvm_jax.nn.conv import SubPixelConvTranspose
from lvm_jax.nn.conv import VQDecoder as FlaxVQDecoder
from lvm_jax.nn.conv import VQEncoder as FlaxVQEncoder
from lvm_jax.nn.dense import GaussianHead

LOG_2PI = math.log(2.0 * math.pi)
LOG_VAR_BOUND = 10.0  # lvm_jax bounds every Gaussian log-variance to (-10, 10)
LOG_SCALE_BOUND = 1.0  # and the MADE log-scale to (-1, 1): tanh, as the official solution


def soft_clamp(x: torch.Tensor, bound: float) -> torch.Tensor:
    """bound * tanh(x / bound), in (-bound, bound)."""
    return bound * torch.tanh(x / bound)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_var) -> torch.Tensor:
    """log N(x; mean, diag(exp(log_var))), (batch,) in nats."""
    sq = (x - mean) ** 2 * torch.exp(-torch.as_tensor(log_var))
    return -0.5 * (LOG_2PI + log_var + sq).flatten(1).sum(1)


def kl_std_normal(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)), (batch,) in nats."""
    return 0.5 * (torch.exp(log_var) + mean**2 - 1.0 - log_var).sum(1)


class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I); the KL term is analytic."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def kl(self, z, mean, log_var):
        return kl_std_normal(mean, log_var)

    def sample(self, num: int) -> torch.Tensor:
        return torch.randn(num, self.latent_dim)


def made_masks(dim: int, hidden: tuple[int, ...]) -> list[torch.Tensor]:
    """Germain et al. (2015) masks, (out_features, in_features) like `nn.Linear.weight`.

    Natural order: input and output i have degree i + 1; hidden degrees cycle
    through 1..D-1; a hidden unit sees degrees <= its own, an output degrees
    strictly below its own. The output mask is repeated for (shift, log_scale).
    """
    in_degrees = torch.arange(1, dim + 1)
    degrees, masks = in_degrees, []
    for width in hidden:
        hidden_degrees = 1 + torch.arange(width) % max(dim - 1, 1)
        masks.append((hidden_degrees[:, None] >= degrees[None, :]).float())
        degrees = hidden_degrees
    out_mask = (in_degrees[:, None] > degrees[None, :]).float()
    masks.append(torch.cat([out_mask, out_mask], 0))
    return masks


class MaskedLinear(nn.Linear):
    """nn.Linear whose weight is multiplied by a fixed 0/1 mask (out_features, in_features)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask)

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """z (batch, D) -> (shift, log_scale), each (batch, D); output i sees z_{<i} only.

    Two ReLU hidden layers of 512 by default; log_scale = tanh(raw).
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (512, 512)):
        super().__init__()
        layers = [MaskedLinear(m) for m in made_masks(dim, hidden)]
        self.hidden = nn.ModuleList(layers[:-1])
        self.out = layers[-1]

    def forward(self, z):
        h = z
        for layer in self.hidden:
            h = torch.relu(layer(h))
        shift, raw_log_scale = self.out(h).chunk(2, dim=-1)
        return shift, soft_clamp(raw_log_scale, LOG_SCALE_BOUND)


class MADEFlowPrior(nn.Module):
    """VLAE prior: eps = z * exp(log_scale(z)) + shift(z) ~ N(0, I) (REFERENCE.md §3)."""

    def __init__(self, latent_dim: int, hidden: tuple[int, ...] = (512, 512)):
        super().__init__()
        self.latent_dim = latent_dim
        self.made = MADE(latent_dim, hidden)

    def log_prob(self, z):
        """log p(z) = log N(eps; 0, I) + sum_i log_scale_i(z), (batch,) in nats."""
        shift, log_scale = self.made(z)
        return gaussian_log_prob(z * torch.exp(log_scale) + shift, 0.0, 0.0) + log_scale.sum(1)

    def kl(self, z, mean, log_var):
        """Single-sample Monte Carlo KL: log q(z|x) - log p(z)."""
        return gaussian_log_prob(z, mean, log_var) - self.log_prob(z)

    @torch.no_grad()
    def sample(self, num: int) -> torch.Tensor:
        """(num, D) samples, inverting the flow with one MADE pass per dimension."""
        eps = torch.randn(num, self.latent_dim)
        z = torch.zeros_like(eps)
        for i in range(self.latent_dim):
            shift, log_scale = self.made(z)
            z[:, i] = (eps[:, i] - shift[:, i]) * torch.exp(-log_scale[:, i])
        return z


class VAE(nn.Module):
    """x -> q(z|x) = N(mean, exp(log_var)) -> z -> p(x|z), like lvm_jax.models.vae.VAE.

    `trunk` maps x to features, a linear head to (mean, log_var) with the
    log-variance bounded to (-10, 10). With `learned_variance` the decoder
    outputs (mean, log_var) interleaved per data dimension, the log-variance
    bounded the same way; otherwise p(x|z) = N(mean, I).
    """

    def __init__(self, trunk: nn.Module, features: int, decoder: nn.Module, prior: nn.Module,
                 latent_dim: int, learned_variance: bool):
        super().__init__()
        self.trunk, self.decoder, self.prior = trunk, decoder, prior
        self.head = nn.Linear(features, 2 * latent_dim)
        self.learned_variance = learned_variance
        self.latent_dim = latent_dim

    def encode(self, x):
        mean, raw_log_var = self.head(self.trunk(x)).chunk(2, dim=-1)
        return mean, soft_clamp(raw_log_var, LOG_VAR_BOUND)

    def forward(self, x, eps=None):
        """(recon, kl), each (batch,) in nats, for one sample z = mean + std * eps ~ q(z|x);
        `eps` (batch, latent_dim) N(0, I) noise, drawn here by default."""
        mean, log_var = self.encode(x)
        eps = torch.randn_like(mean) if eps is None else eps
        z = mean + torch.exp(0.5 * log_var) * eps
        out = self.decoder(z)
        if self.learned_variance:
            out = out.view(*x.shape, 2)
            x_mean, x_log_var = out[..., 0], soft_clamp(out[..., 1], LOG_VAR_BOUND)
        else:
            x_mean, x_log_var = out, 0.0
        return -gaussian_log_prob(x, x_mean, x_log_var), self.prior.kl(z, mean, log_var)


def loss_fn(model: VAE, x: torch.Tensor, eps: torch.Tensor | None = None):
    """Negative ELBO averaged over the batch (nats per example), and its terms; `eps` as
    `VAE.forward`'s, drawn here by default (outside the model, so that a compiled model sees
    one input signature and the noise does not depend on the compiler's random numbers)."""
    if eps is None:
        eps = torch.randn(x.shape[0], model.latent_dim, device=x.device)
    recon, kl = model(x, eps)
    recon, kl = recon.mean(), kl.mean()
    return recon + kl, {"neg_elbo": recon + kl, "recon": recon, "kl": kl}


def mlp_vae(hidden: tuple[int, ...] = (128, 128)) -> VAE:
    """The 2D VAE (REFERENCE.md §1): MLP 2 -> 128 -> 128 encoder and decoder, 2-dim latent,
    Gaussian decoder with a learned, bounded log-variance."""

    def mlp(widths, last_relu):
        layers = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        return nn.Sequential(*(layers if last_relu else layers[:-1]))

    return VAE(trunk=mlp((2, *hidden), last_relu=True), features=hidden[-1],
               decoder=mlp((2, *hidden, 2 * 2), last_relu=False),
               prior=StandardNormalPrior(2), latent_dim=2, learned_variance=True)


class ConvEncoder(nn.Sequential):
    """(batch, C, 32, 32) -> (batch, 4*4*256) features, REFERENCE.md §2."""

    def __init__(self, channels: int):
        super().__init__(
            nn.Conv2d(channels, 32, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(128, 256, 3, 2, 1), nn.ReLU(),
            nn.Flatten())


class ConvDecoder(nn.Sequential):
    """(batch, 16) latents -> (batch, C, 32, 32) means, REFERENCE.md §2."""

    def __init__(self, channels: int, latent_dim: int = 16):
        super().__init__(
            nn.Linear(latent_dim, 4 * 4 * 128), nn.ReLU(), nn.Unflatten(1, (128, 4, 4)),
            nn.ConvTranspose2d(128, 128, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, channels, 3, 1, 1))


def conv_vae(channels: int, prior: str = "standard", latent_dim: int = 16) -> VAE:
    """The image VAE (prior "standard") or VLAE (prior "made") on 32x32 images in [-1, 1]."""
    priors = {"standard": StandardNormalPrior, "made": MADEFlowPrior}
    return VAE(trunk=ConvEncoder(channels), features=4 * 4 * 256,
               decoder=ConvDecoder(channels, latent_dim), prior=priors[prior](latent_dim),
               latent_dim=latent_dim, learned_variance=False)


def _check_shape(layer: nn.Module, weight: np.ndarray):
    assert weight.shape == tuple(layer.weight.shape), (
        f"lvm_jax's weight {weight.shape} does not fit the twin's {layer} "
        f"{tuple(layer.weight.shape)}")


def copy_linear(layer: nn.Linear, dense: dict, in_perm=None, out_perm=None):
    """flax Dense {kernel (in, out), bias} -> nn.Linear, optionally permuting the
    input or output units (to map NHWC-flattened features to NCHW-flattened)."""
    kernel, bias = np.asarray(dense["kernel"]), np.asarray(dense["bias"])
    if in_perm is not None:
        kernel = kernel[in_perm]
    if out_perm is not None:
        kernel, bias = kernel[:, out_perm], bias[out_perm]
    _check_shape(layer, kernel.T)
    layer.weight.copy_(torch.from_numpy(kernel.T.copy()))
    layer.bias.copy_(torch.from_numpy(bias.copy()))


def copy_conv(layer: nn.Module, conv: dict, transposed: bool):
    """flax (kh, kw, Cin, Cout) kernel -> Conv2d (Cout, Cin, kh, kw) or ConvTranspose2d
    (Cin, Cout, kh, kw); lvm_jax's SubPixelConvTranspose stores PyTorch's kernel layout."""
    kernel = np.asarray(conv["kernel"]).transpose((2, 3, 0, 1) if transposed else (3, 2, 0, 1))
    _check_shape(layer, kernel)
    layer.weight.copy_(torch.from_numpy(kernel.copy()))
    layer.bias.copy_(torch.from_numpy(np.asarray(conv["bias"]).copy()))


def _batch_norm(layer: nn.BatchNorm2d, params: dict, stats: dict | None):
    """flax BatchNorm {scale, bias} and, if given, {mean, var} -> nn.BatchNorm2d."""
    layer.weight.copy_(torch.from_numpy(np.asarray(params["scale"]).copy()))
    layer.bias.copy_(torch.from_numpy(np.asarray(params["bias"]).copy()))
    if stats is not None:
        layer.running_mean.copy_(torch.from_numpy(np.asarray(stats["mean"]).copy()))
        layer.running_var.copy_(torch.from_numpy(np.asarray(stats["var"]).copy()))


class FlaxLayer(NamedTuple):
    """One layer of an lvm_jax module: its class, its parameters (or their gradients) and its
    BatchNorm statistics (None where it has none or none were given)."""

    kind: type
    params: dict
    stats: dict | None


# Each lvm_jax layer kind a twin mirrors, and the PyTorch layer that mirrors it.
TWIN_LAYERS = {flax.linen.Conv: nn.Conv2d, SubPixelConvTranspose: nn.ConvTranspose2d,
               flax.linen.Dense: nn.Linear, flax.linen.BatchNorm: nn.BatchNorm2d}


def flax_layers(module: flax.linen.Module, inputs: tuple, params: dict,
                batch_stats: dict | None = None) -> list[FlaxLayer]:
    """Every layer (a `TWIN_LAYERS` kind) that `module` calls on `inputs`, in call order,
    with its subtrees of `params` and `batch_stats` (trees of `module`'s variables).

    The calls are recorded by `flax.linen.intercept_methods` while `module.init` is traced
    (`jax.eval_shape`: nothing is computed); each layer's subtrees are found by the path
    Flax gives it, so its automatic name is never written out.
    """
    paths = []

    def record(call, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module,
                                                            tuple(TWIN_LAYERS)):
            paths.append((type(context.module), context.module.path))
        return call(*args, **kwargs)

    with flax.linen.intercept_methods(record):
        jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))

    def at(tree, path):
        for name in path:
            tree = None if tree is None else tree.get(name)
        return tree

    return [FlaxLayer(kind, at(params, path), at(batch_stats, path)) for kind, path in paths]


def twin_layers(twin: nn.Module) -> list[nn.Module]:
    """The twin's layers of the `TWIN_LAYERS` kinds in the order `twin.modules()` lists them:
    the order the twins build them in, their forward order."""
    return [m for m in twin.modules() if isinstance(m, tuple(TWIN_LAYERS.values()))]


def copy_layers(targets: list[nn.Module], layers: list[FlaxLayer]):
    """Copies lvm_jax's `layers` (`flax_layers`) one for one into the twin's `targets`
    (`twin_layers`); raises AssertionError unless both are the same kinds of layers, in the
    same order, of the same shapes."""
    kinds = [type(m).__name__ for m in targets]
    assert [TWIN_LAYERS[layer.kind].__name__ for layer in layers] == kinds, (
        f"lvm_jax's layers {[layer.kind.__name__ for layer in layers]} do not match the "
        f"twin's {kinds}")
    for target, layer in zip(targets, layers):
        if isinstance(target, nn.BatchNorm2d):
            _batch_norm(target, layer.params, layer.stats)
        elif isinstance(target, nn.Linear):
            copy_linear(target, layer.params)
        else:
            copy_conv(target, layer.params, transposed=isinstance(target, nn.ConvTranspose2d))


def _nchw_order(height: int, width: int, channels: int) -> np.ndarray:
    """nchw_order[k] = NHWC-flat index of the unit at NCHW-flat index k."""
    return np.arange(height * width * channels).reshape(height, width, channels).transpose(
        2, 0, 1).ravel()


@torch.no_grad()
def copy_flax_params(model: VAE, params: dict) -> VAE:
    """Loads lvm_jax's image VAE/VLAE parameters (`conv_vae`) into `model`, in place.

    The two dense layers between NHWC feature maps and flat vectors get their units
    permuted to PyTorch's NCHW flattening.
    """
    channels, latent_dim = model.trunk[0].in_channels, model.latent_dim
    copy_layers(twin_layers(model.trunk), flax_layers(
        FlaxConvEncoder(), (jnp.zeros((1, 32, 32, channels)),), params["trunk"]))
    (head,) = flax_layers(GaussianHead(latent_dim), (jnp.zeros((1, model.head.in_features)),),
                          params["head"])
    copy_linear(model.head, head.params, in_perm=_nchw_order(4, 4, 256))
    dense, *upsampling = flax_layers(FlaxConvDecoder(channels),
                                     (jnp.zeros((1, latent_dim)),), params["decoder"])
    linear, *twin_upsampling = twin_layers(model.decoder)
    copy_linear(linear, dense.params, out_perm=_nchw_order(4, 4, 128))
    copy_layers(twin_upsampling, upsampling)
    if isinstance(model.prior, MADEFlowPrior):
        copy_flax_made_params(model.prior.made, params["prior"]["made"])
    return model


@torch.no_grad()
def copy_flax_made_params(made: MADE, params: dict) -> MADE:
    """Loads lvm_jax's MADE parameters (hidden_0, hidden_1, ..., out) into `made`, in place."""
    for i, layer in enumerate(made.hidden):
        copy_linear(layer, params[f"hidden_{i}"])
    copy_linear(made.out, params["out"])
    return made


# --- VQ-VAE and its autoregressive priors (REFERENCE.md §4) ---


def pixelcnn_mask(kernel_size: int, mask_type: str) -> torch.Tensor:
    """Spatial (k, k) raster-order mask: rows above the centre, and left of the centre on
    the centre row; type "B" keeps the centre too."""
    c = kernel_size // 2
    mask = torch.zeros(kernel_size, kernel_size)
    mask[:c] = 1.0
    mask[c, : c + (mask_type == "B")] = 1.0
    return mask


class MaskedConv2d(nn.Conv2d):
    """nn.Conv2d whose weight is multiplied by a fixed 0/1 spatial mask (kh, kw)."""

    def __init__(self, in_channels: int, out_channels: int, mask: torch.Tensor, padding=0):
        super().__init__(in_channels, out_channels, tuple(mask.shape), padding=padding)
        self.register_buffer("mask", mask[None, None])

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class OutputHead(nn.Sequential):
    """ReLU, 1x1 conv to `hidden`, ReLU, 1x1 conv to the logits of `num_classes`."""

    def __init__(self, channels: int, hidden: int, num_classes: int):
        super().__init__(nn.ReLU(), nn.Conv2d(channels, hidden, 1), nn.ReLU(),
                         nn.Conv2d(hidden, num_classes, 1))


class PixelCNNBlock(nn.Module):
    """x + 1x1(ReLU(B(ReLU(1x1(ReLU(x)))))), B a type-B masked convolution."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, channels, 1)
        self.masked = MaskedConv2d(channels, channels, pixelcnn_mask(kernel_size, "B"),
                                   padding=kernel_size // 2)
        self.conv_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        h = self.masked(torch.relu(self.conv_in(torch.relu(x))))
        return x + self.conv_out(torch.relu(h))


class AutoregressivePrior(nn.Module):
    """Shared by the priors: codes (batch, H, W) long -> logits (batch, K, H, W), and
    sampling in raster order with one full forward pass per position."""

    num_classes: int

    @torch.no_grad()
    def sample(self, num: int, height: int, width: int, *inputs) -> torch.Tensor:
        """(num, height, width) codes; code (i, j) drawn from the softmax at (i, j).
        `inputs`: the forward pass's further arguments (a conditioned prior's condition)."""
        codes = torch.zeros(num, height, width, dtype=torch.long)
        for i in range(height):
            for j in range(width):
                probs = torch.softmax(self(codes, *inputs)[:, :, i, j], dim=1)
                codes[:, i, j] = torch.multinomial(probs, 1).squeeze(1)
        return codes


class PixelCNN(AutoregressivePrior):
    """Embedding to embed_dim channels, 7x7 type-A masked conv, residual blocks around
    type-B masked convs, 1x1 head; like lvm_jax.nn.masked_conv.PixelCNN."""

    def __init__(self, num_classes: int, embed_dim: int = 64, num_residual_blocks: int = 12,
                 hidden: int = 512, kernel_size: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.input_conv = MaskedConv2d(embed_dim, embed_dim, pixelcnn_mask(7, "A"), padding=3)
        self.blocks = nn.Sequential(*(PixelCNNBlock(embed_dim, kernel_size)
                                      for _ in range(num_residual_blocks)))
        self.head = OutputHead(embed_dim, hidden, num_classes)

    def forward(self, codes):
        x = self.embed(codes).permute(0, 3, 1, 2)
        return self.head(self.blocks(self.input_conv(x)))


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) * sigmoid(b) for the two channel halves a, b."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer on the (vertical, horizontal) stacks, van den Oord et al. (2016b).

    Vertical: (k//2 + 1) x k conv over the rows up to the current one; horizontal:
    1 x (k//2 + 1) conv up to the current column (excluded in the first layer), plus a
    1x1 link from the vertical stack shifted down a row; gates; 1x1 conv and (after the
    first layer) a residual on the horizontal stack. With condition_dim, both stacks'
    pre-gate activations also get their own 1x1 conv of a condition (batch, condition_dim,
    H, W).
    """

    def __init__(self, dim: int, kernel_size: int, first: bool, condition_dim: int | None = None):
        super().__init__()
        c = self.c = kernel_size // 2
        self.first = first
        self.vertical = nn.Conv2d(dim, 2 * dim, (c + 1, kernel_size))
        mask = torch.ones(1, c + 1)
        if first:
            mask[0, c] = 0.0
        self.horizontal = MaskedConv2d(dim, 2 * dim, mask)
        self.link = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.out = nn.Conv2d(dim, dim, 1)
        if condition_dim is not None:
            self.condition_vertical = nn.Conv2d(condition_dim, 2 * dim, 1)
            self.condition_horizontal = nn.Conv2d(condition_dim, 2 * dim, 1)

    def forward(self, v, h, condition=None):
        c = self.c
        v_pre = self.vertical(nn.functional.pad(v, (c, c, c, 0)))
        h_pre = self.horizontal(nn.functional.pad(h, (c, 0, 0, 0)))
        if condition is not None:
            v_pre = v_pre + self.condition_vertical(condition)
            h_pre = h_pre + self.condition_horizontal(condition)
        h_pre = h_pre + self.link(nn.functional.pad(v_pre, (0, 0, 1, 0))[:, :, :-1])
        h_out = self.out(gate(h_pre))
        return gate(v_pre), h_out if self.first else h + h_out


class GatedPixelCNN(AutoregressivePrior):
    """Embedding to `dim` channels feeding both stacks, num_layers gated layers, 1x1 head on
    the horizontal stack; like lvm_jax.nn.masked_conv.GatedPixelCNN."""

    def __init__(self, num_classes: int, dim: int = 128, num_layers: int = 15,
                 kernel_size: int = 3, hidden: int = 512):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, dim)
        self.layers = nn.ModuleList(GatedLayer(dim, kernel_size, first=(i == 0))
                                    for i in range(num_layers))
        self.head = OutputHead(dim, hidden, num_classes)

    def forward(self, codes):
        v = h = self.embed(codes).permute(0, 3, 1, 2)
        for layer in self.layers:
            v, h = layer(v, h)
        return self.head(h)


def prior_loss_fn(prior: AutoregressivePrior, codes: torch.Tensor):
    """Cross-entropy of the codes (batch, H, W) under the prior, nats per code."""
    nll = nn.functional.cross_entropy(prior(codes), codes)
    return nll, {"prior_nll": nll}


class VQResidualBlock(nn.Module):
    """x + Conv1x1(ReLU(BN(Conv3x3(ReLU(BN(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, 1, 1),
            nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        return x + self.net(x)


class VQEncoder(nn.Sequential):
    """(batch, C, H, W) -> z_e (batch, D, H/4, W/4), REFERENCE.md §4."""

    def __init__(self, channels: int, dim: int = 256):
        super().__init__(
            nn.Conv2d(channels, dim, 4, 2, 1), nn.BatchNorm2d(dim), nn.ReLU(),
            nn.Conv2d(dim, dim, 4, 2, 1), VQResidualBlock(dim), VQResidualBlock(dim))


class VQDecoder(nn.Sequential):
    """z_q (batch, D, h, w) -> images (batch, C, 4h, 4w) in (-1, 1), REFERENCE.md §4."""

    def __init__(self, channels: int, dim: int = 256):
        super().__init__(
            VQResidualBlock(dim), VQResidualBlock(dim), nn.BatchNorm2d(dim), nn.ReLU(),
            nn.ConvTranspose2d(dim, dim, 4, 2, 1), nn.BatchNorm2d(dim), nn.ReLU(),
            nn.ConvTranspose2d(dim, channels, 4, 2, 1), nn.Tanh())


class VectorQuantizer(nn.Module):
    """Nearest of K learned codes (codebook U(-1/K, 1/K)), straight-through gradient."""

    def __init__(self, num_codes: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)

    def forward(self, z_e):
        """z_e (batch, D, h, w) -> (straight-through z_q, z_q, indices (batch, h, w))."""
        z = z_e.permute(0, 2, 3, 1)
        flat = z.reshape(-1, z.shape[-1])
        e = self.embedding.weight
        distances = (flat**2).sum(1, keepdim=True) - 2.0 * flat @ e.T + (e**2).sum(1)
        indices = distances.argmin(1).view(z.shape[:-1])
        z_q = self.embedding(indices).permute(0, 3, 1, 2)
        return z_e + (z_q - z_e).detach(), z_q, indices


class VQVAE(nn.Module):
    """x -> z_e -> nearest code z_q -> x_hat, like lvm_jax.models.vqvae.VQVAE."""

    def __init__(self, channels: int = 3, num_codes: int = 128, dim: int = 256,
                 beta: float = 1.0):
        super().__init__()
        self.encoder = VQEncoder(channels, dim)
        self.quantizer = VectorQuantizer(num_codes, dim)
        self.decoder = VQDecoder(channels, dim)
        self.beta = beta

    def forward(self, x):
        """Reconstruction, z_e, z_q and the code indices."""
        z_e = self.encoder(x)
        quantized, z_q, indices = self.quantizer(z_e)
        return self.decoder(quantized), z_e, z_q, indices


def vqvae_loss_fn(model: VQVAE, x: torch.Tensor):
    """recon MSE + ||sg(z_e) - z_q||^2 + beta ||z_e - sg(z_q)||^2, each a mean over elements."""
    x_hat, z_e, z_q, _ = model(x)
    recon = ((x_hat - x) ** 2).mean()
    codebook = ((z_e.detach() - z_q) ** 2).mean()
    commitment = ((z_e - z_q.detach()) ** 2).mean()
    loss = recon + codebook + model.beta * commitment
    return loss, {"loss": loss, "recon_mse": recon, "codebook_loss": codebook,
                  "commitment_loss": commitment}


def _sub(tree: dict | None, key: str) -> dict | None:
    return None if tree is None else tree[key]


@torch.no_grad()
def copy_flax_vqvae_params(model: VQVAE, params: dict, batch_stats: dict | None = None) -> VQVAE:
    """Loads lvm_jax's VQ-VAE (`conv_vqvae`, gradient-trained codebook) parameters and, if
    given, its BatchNorm running statistics into `model`, in place."""
    channels, dim = model.encoder[0].in_channels, model.quantizer.embedding.embedding_dim
    for name, flax_module, x in (
            ("encoder", FlaxVQEncoder(dim), jnp.zeros((1, 4, 4, channels))),
            ("decoder", FlaxVQDecoder(dim, channels), jnp.zeros((1, 1, 1, dim)))):
        copy_layers(twin_layers(getattr(model, name)), flax_layers(
            flax_module, (x, False), params[name], _sub(batch_stats, name)))
    model.quantizer.embedding.weight.copy_(
        torch.from_numpy(np.asarray(params["quantizer"]["embeddings"]).copy()))
    return model


def copy_embedding(layer: nn.Embedding, params: dict):
    layer.weight.copy_(torch.from_numpy(np.asarray(params["embedding"]).copy()))


def copy_output_head(head: OutputHead, params: dict):
    copy_conv(head[1], params["to_hidden"], transposed=False)
    copy_conv(head[3], params["to_logits"], transposed=False)


@torch.no_grad()
def copy_flax_pixelcnn_params(prior: PixelCNN, params: dict) -> PixelCNN:
    """Loads lvm_jax's PixelCNN parameters (embed, input_conv, blocks_i, head) into `prior`."""
    copy_embedding(prior.embed, params["embed"])
    copy_conv(prior.input_conv, params["input_conv"]["conv"], transposed=False)
    for i, block in enumerate(prior.blocks):
        p = params[f"blocks_{i}"]
        copy_conv(block.conv_in, p["conv_in"], transposed=False)
        copy_conv(block.masked, p["masked"]["conv"], transposed=False)
        copy_conv(block.conv_out, p["conv_out"], transposed=False)
    copy_output_head(prior.head, params["head"])
    return prior


def copy_gated_layer(layer: GatedLayer, params: dict):
    """lvm_jax's GatedLayer convs, named as the twin's: vertical, horizontal, link, out."""
    for name in ("vertical", "horizontal", "link", "out"):
        copy_conv(getattr(layer, name), params[name], transposed=False)


@torch.no_grad()
def copy_flax_gated_pixelcnn_params(prior: GatedPixelCNN, params: dict) -> GatedPixelCNN:
    """Loads lvm_jax's GatedPixelCNN parameters (embed, layers_i, head) into `prior`."""
    copy_embedding(prior.embed, params["embed"])
    for i, layer in enumerate(prior.layers):
        copy_gated_layer(layer, params[f"layers_{i}"])
    copy_output_head(prior.head, params["head"])
    return prior
