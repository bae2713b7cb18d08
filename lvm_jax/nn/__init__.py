"""Flax Linen building blocks: no training logic."""

from lvm_jax.nn.made import MADE, MaskedDense
from lvm_jax.nn.sampling import sample_codes

__all__ = ["MADE", "MaskedDense", "sample_codes"]
