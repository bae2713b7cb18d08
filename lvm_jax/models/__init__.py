"""Flax models, one file per family, each with its loss function."""
