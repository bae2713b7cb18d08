"""Flax Linen building blocks: no training logic.

The public names of DESIGN.md §5, importable from `lvm_jax.nn` itself.
"""

from lvm_jax.nn.made import MADE, MaskedDense
from lvm_jax.nn.masked_conv import ConditionalGatedPixelCNN, GatedPixelCNN, MaskedConv, PixelCNN
from lvm_jax.nn.pixelsnail import PixelSNAIL
from lvm_jax.nn.quantizer import VectorQuantizer, VectorQuantizerEMA
from lvm_jax.nn.sampling import sample_codes

__all__ = ["MADE", "ConditionalGatedPixelCNN", "GatedPixelCNN", "MaskedConv", "MaskedDense",
           "PixelCNN", "PixelSNAIL", "VectorQuantizer", "VectorQuantizerEMA", "sample_codes"]
