"""Flax Linen building blocks: no training logic."""
