"""PyTorch twins of VQ-VAE-2's priors, for the sampling benchmark (benchmarks/vqvae2_sampling.py).

`PixelSNAIL` and `ConditionalGatedPixelCNN` compute what lvm_jax.nn's modules
of the same names compute (in inference mode), from the same parameters
(`copy_flax_pixelsnail_params`, `copy_flax_conditional_params`). Their
`sample` is `torch_models.AutoregressivePrior`'s: one full forward pass per
position, the method of rosinality/vq-vae-2-pytorch's `sample_model`.
"""

import math

import numpy as np
import torch
from torch import nn

from benchmarks.torch_models import (
    AutoregressivePrior,
    GatedLayer,
    OutputHead,
    copy_conv,
    copy_embedding,
    copy_linear,
    copy_gated_layer,
    copy_output_head,
)


def _gate_last(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) * sigmoid(b) for the two halves a, b of the last axis."""
    a, b = x.chunk(2, dim=-1)
    return torch.tanh(a) * torch.sigmoid(b)


def coordinates(height: int, width: int) -> torch.Tensor:
    """(H*W, 2): row and column of each position in raster order scaled to (-1, 1)."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    coords = torch.stack([(2 * rows + 1) / height - 1, (2 * cols + 1) / width - 1], dim=-1)
    return coords.reshape(height * width, 2).float()


class CausalAttentionBlock(nn.Module):
    """features + mix_out(gate(mix_features(features) + mix_attention(attention))), the
    attention at t over the positions s < t; like pixelsnail.CausalAttentionBlock."""

    def __init__(self, dim: int, num_heads: int, key_dim: int, value_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim + 2, key_dim)
        self.key = nn.Linear(2 * dim + 2, key_dim)
        self.value = nn.Linear(2 * dim + 2, value_dim)
        self.mix_features = nn.Linear(dim, 2 * dim)
        self.mix_attention = nn.Linear(value_dim, 2 * dim)
        self.mix_out = nn.Linear(dim, dim)

    def forward(self, features, inputs):
        """features, inputs (batch, dim, H, W) -> (batch, dim, H, W)."""
        batch, dim, height, width = features.shape
        flat = lambda x: x.permute(0, 2, 3, 1).reshape(batch, height * width, dim)
        f, x = flat(features), flat(inputs)
        coords = coordinates(height, width).expand(batch, -1, -1)
        key_in = torch.cat([x, f, coords], dim=-1)

        def heads(y):  # (batch, T, C) -> (batch, heads, T, C / heads)
            return y.reshape(batch, height * width, self.num_heads, -1).transpose(1, 2)

        q = heads(self.query(torch.cat([f, coords], dim=-1)))
        k, v = heads(self.key(key_in)), heads(self.value(key_in))
        visible = torch.tril(torch.ones(height * width, height * width, dtype=torch.bool), -1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(
            ~visible, torch.finfo(torch.float32).min)
        weights = torch.softmax(scores, dim=-1) * visible  # row 0 sees nothing: 0
        attended = (weights @ v).transpose(1, 2).reshape(batch, height * width, -1)
        out = f + self.mix_out(_gate_last(self.mix_features(f) + self.mix_attention(attended)))
        return out.reshape(batch, height, width, dim).permute(0, 3, 1, 2)


class PixelSNAIL(AutoregressivePrior):
    """Gated layers with a causal attention block after every `layers_per_block`; like
    lvm_jax.nn.PixelSNAIL (inference mode)."""

    def __init__(self, num_classes: int, dim: int = 64, num_blocks: int = 2,
                 layers_per_block: int = 2, kernel_size: int = 3, num_heads: int = 4,
                 key_dim: int = 32, value_dim: int = 64, hidden: int = 256):
        super().__init__()
        self.num_classes, self.layers_per_block = num_classes, layers_per_block
        self.embed = nn.Embedding(num_classes, dim)
        self.layers = nn.ModuleList(GatedLayer(dim, kernel_size, first=(i == 0))
                                    for i in range(num_blocks * layers_per_block))
        self.attentions = nn.ModuleList(CausalAttentionBlock(dim, num_heads, key_dim, value_dim)
                                        for _ in range(num_blocks))
        self.head = OutputHead(dim, hidden, num_classes)

    def forward(self, codes):
        x = self.embed(codes).permute(0, 3, 1, 2)
        v = h = x
        for index, layer in enumerate(self.layers):
            v, h = layer(v, h)
            if (index + 1) % self.layers_per_block == 0:
                h = self.attentions[index // self.layers_per_block](h, x)
        return self.head(h)


class ConditionalGatedPixelCNN(AutoregressivePrior):
    """Gated PixelCNN whose layers add 1x1 convs of the conditioning stack's features,
    upsampled by repetition; like lvm_jax.nn.ConditionalGatedPixelCNN."""

    def __init__(self, num_classes: int, num_condition_classes: int, dim: int = 128,
                 num_layers: int = 15, kernel_size: int = 3, hidden: int = 512,
                 condition_dim: int = 64, num_condition_blocks: int = 2):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, dim)
        self.condition_embed = nn.Embedding(num_condition_classes, condition_dim)
        self.condition_blocks = nn.ModuleList(
            nn.ModuleList([nn.Conv2d(condition_dim, condition_dim, 3, padding=1),
                           nn.Conv2d(condition_dim, condition_dim, 1)])
            for _ in range(num_condition_blocks))
        self.layers = nn.ModuleList(GatedLayer(dim, kernel_size, first=(i == 0),
                                               condition_dim=condition_dim)
                                    for i in range(num_layers))
        self.head = OutputHead(dim, hidden, num_classes)

    def forward(self, codes, condition_codes):
        condition = self.condition_embed(condition_codes).permute(0, 3, 1, 2)
        for conv3, conv1 in self.condition_blocks:
            condition = condition + conv1(torch.relu(conv3(torch.relu(condition))))
        fy, fx = codes.shape[1] // condition.shape[2], codes.shape[2] // condition.shape[3]
        condition = condition.repeat_interleave(fy, dim=2).repeat_interleave(fx, dim=3)
        v = h = self.embed(codes).permute(0, 3, 1, 2)
        for layer in self.layers:
            v, h = layer(v, h, condition)
        return self.head(h)


@torch.no_grad()
def copy_flax_pixelsnail_params(prior: PixelSNAIL, params: dict) -> PixelSNAIL:
    """Loads lvm_jax's PixelSNAIL parameters (embed, layers_i, attentions_b, head)."""
    copy_embedding(prior.embed, params["embed"])
    for i, layer in enumerate(prior.layers):
        copy_gated_layer(layer, params[f"layers_{i}"])
    for b, attention in enumerate(prior.attentions):
        for name in ("query", "key", "value", "mix_features", "mix_attention", "mix_out"):
            copy_linear(getattr(attention, name), params[f"attentions_{b}"][name])
    copy_output_head(prior.head, params["head"])
    return prior


@torch.no_grad()
def copy_flax_conditional_params(prior: ConditionalGatedPixelCNN,
                                 params: dict) -> ConditionalGatedPixelCNN:
    """Loads lvm_jax's ConditionalGatedPixelCNN parameters (embed, condition_stack, layers_i
    with their condition convs, head)."""
    copy_embedding(prior.embed, params["embed"])
    stack = params["condition_stack"]
    copy_embedding(prior.condition_embed, stack["embed"])
    for b, (conv3, conv1) in enumerate(prior.condition_blocks):
        copy_conv(conv3, stack[f"convs_3x3_{b}"], transposed=False)
        copy_conv(conv1, stack[f"convs_1x1_{b}"], transposed=False)
    for i, layer in enumerate(prior.layers):
        p = params[f"layers_{i}"]
        copy_gated_layer(layer, p)
        copy_conv(layer.condition_vertical, p["condition_vertical"], transposed=False)
        copy_conv(layer.condition_horizontal, p["condition_horizontal"], transposed=False)
    copy_output_head(prior.head, params["head"])
    return prior


def as_numpy_logits(logits: torch.Tensor) -> np.ndarray:
    """(batch, K, H, W) -> (batch, H, W, K), lvm_jax's layout."""
    return logits.permute(0, 2, 3, 1).numpy()
