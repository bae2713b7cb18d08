"""PyTorch versions of lvm_jax's models, written the way a PyTorch user would.

Same layers, widths, bounds and losses as lvm_jax (REFERENCE.md §1-3), in
PyTorch's conventions: NCHW images, `nn.Module`s, PyTorch's default
initialisation, a Python loop over the latent dimensions to sample the MADE
prior. `copy_flax_params` loads an lvm_jax parameter tree into these modules,
so the benchmarks can check that both sides compute the same function before
timing them.

All log-densities are per example, summed over the event dimensions, in nats.
"""

import math

import numpy as np
import torch
from torch import nn

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

    def encode(self, x):
        mean, raw_log_var = self.head(self.trunk(x)).chunk(2, dim=-1)
        return mean, soft_clamp(raw_log_var, LOG_VAR_BOUND)

    def forward(self, x):
        """(recon, kl), each (batch,) in nats, for one sample z ~ q(z|x)."""
        mean, log_var = self.encode(x)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        out = self.decoder(z)
        if self.learned_variance:
            out = out.view(*x.shape, 2)
            x_mean, x_log_var = out[..., 0], soft_clamp(out[..., 1], LOG_VAR_BOUND)
        else:
            x_mean, x_log_var = out, 0.0
        return -gaussian_log_prob(x, x_mean, x_log_var), self.prior.kl(z, mean, log_var)


def loss_fn(model: VAE, x: torch.Tensor):
    """Negative ELBO averaged over the batch (nats per example), and its terms."""
    recon, kl = model(x)
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


def _linear(layer: nn.Linear, dense: dict, in_perm=None, out_perm=None):
    """flax Dense {kernel (in, out), bias} -> nn.Linear, optionally permuting the
    input or output units (to map NHWC-flattened features to NCHW-flattened)."""
    kernel, bias = np.asarray(dense["kernel"]), np.asarray(dense["bias"])
    if in_perm is not None:
        kernel = kernel[in_perm]
    if out_perm is not None:
        kernel, bias = kernel[:, out_perm], bias[out_perm]
    layer.weight.copy_(torch.from_numpy(kernel.T.copy()))
    layer.bias.copy_(torch.from_numpy(bias.copy()))


def _conv(layer: nn.Module, conv: dict, transposed: bool):
    """flax (kh, kw, Cin, Cout) kernel -> Conv2d (Cout, Cin, kh, kw) or ConvTranspose2d
    (Cin, Cout, kh, kw); lvm_jax's SubPixelConvTranspose stores PyTorch's kernel layout."""
    kernel = np.asarray(conv["kernel"]).transpose((2, 3, 0, 1) if transposed else (3, 2, 0, 1))
    layer.weight.copy_(torch.from_numpy(kernel.copy()))
    layer.bias.copy_(torch.from_numpy(np.asarray(conv["bias"]).copy()))


def _nchw_order(height: int, width: int, channels: int) -> np.ndarray:
    """nchw_order[k] = NHWC-flat index of the unit at NCHW-flat index k."""
    return np.arange(height * width * channels).reshape(height, width, channels).transpose(
        2, 0, 1).ravel()


@torch.no_grad()
def copy_flax_params(model: VAE, params: dict) -> VAE:
    """Loads lvm_jax's image VAE/VLAE parameters (`conv_vae`) into `model`, in place."""
    convs = [m for m in model.trunk if isinstance(m, nn.Conv2d)]
    for i, layer in enumerate(convs):
        _conv(layer, params["trunk"][f"Conv_{i}"], transposed=False)
    _linear(model.head, params["head"]["Dense_0"], in_perm=_nchw_order(4, 4, 256))
    _linear(model.decoder[0], params["decoder"]["Dense_0"], out_perm=_nchw_order(4, 4, 128))
    ups = [m for m in model.decoder if isinstance(m, nn.ConvTranspose2d)]
    for i, layer in enumerate(ups):
        _conv(layer, params["decoder"][f"SubPixelConvTranspose_{i}"], transposed=True)
    _conv(model.decoder[-1], params["decoder"]["Conv_0"], transposed=False)
    if isinstance(model.prior, MADEFlowPrior):
        copy_flax_made_params(model.prior.made, params["prior"]["made"])
    return model


@torch.no_grad()
def copy_flax_made_params(made: MADE, params: dict) -> MADE:
    """Loads lvm_jax's MADE parameters (hidden_0, hidden_1, ..., out) into `made`, in place."""
    for i, layer in enumerate(made.hidden):
        _linear(layer, params[f"hidden_{i}"])
    _linear(made.out, params["out"])
    return made
