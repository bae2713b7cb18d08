"""The public API of DESIGN.md §5: every name it lists imports from where it says."""

import flax.linen as nn
import pytest

import lvm_jax.losses
import lvm_jax.nn

LOSSES = ["gaussian_log_prob", "bernoulli_log_prob", "discretized_logistic_mixture_log_prob",
          "kl_std_normal", "straight_through", "vq_losses", "iwae_bound", "bits_per_dim"]


@pytest.mark.parametrize("name", LOSSES)
def test_losses_functions(name):
    assert callable(getattr(lvm_jax.losses, name))


def test_nn_exports_the_building_blocks_from_the_package_itself():
    from lvm_jax.nn import (MADE, ConditionalGatedPixelCNN, GatedPixelCNN, MaskedConv, MaskedDense,
                            PixelCNN, PixelSNAIL, VectorQuantizer)
    for module in (ConditionalGatedPixelCNN, GatedPixelCNN, MADE, MaskedConv, MaskedDense,
                   PixelCNN, PixelSNAIL, VectorQuantizer):
        assert issubclass(module, nn.Module) and module.__name__ in lvm_jax.nn.__all__
