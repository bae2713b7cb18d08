"""Flax Linen building blocks: no training logic."""

from lvm_jax.nn.made import MADE, MaskedDense

__all__ = ["MADE", "MaskedDense"]
