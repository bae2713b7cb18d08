"""lvm_jax: latent variable models in JAX/Flax."""

__version__ = "0.1.0"
