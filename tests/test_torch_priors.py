"""The sampling benchmark's PyTorch twins compute lvm_jax's priors' logits from the same weights
(skipped without the `bench` extra's PyTorch)."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_priors  # noqa: E402  (needs torch)
from benchmarks.image_vae import randomised  # noqa: E402
from lvm_jax.nn import ConditionalGatedPixelCNN, PixelSNAIL  # noqa: E402

K, TOP_K = 7, 5


@pytest.mark.parametrize("kind", ["pixelsnail", "conditional"])
def test_twin_logits_equal_lvm_jax(kind):
    codes = jax.random.randint(jax.random.key(0), (2, 4, 6), 0, K)
    if kind == "pixelsnail":
        sizes = dict(dim=8, num_blocks=2, layers_per_block=1, kernel_size=5, num_heads=2,
                     key_dim=4, value_dim=6, hidden=16)
        model, twin = PixelSNAIL(K, **sizes), torch_priors.PixelSNAIL(K, **sizes)
        inputs, copy = (codes,), torch_priors.copy_flax_pixelsnail_params
    else:
        sizes = dict(dim=8, num_layers=3, hidden=16, condition_dim=6, num_condition_blocks=2)
        model = ConditionalGatedPixelCNN(K, TOP_K, **sizes)
        twin = torch_priors.ConditionalGatedPixelCNN(K, TOP_K, **sizes)
        top = jax.random.randint(jax.random.key(1), (2, 2, 3), 0, TOP_K)
        inputs, copy = (codes, top), torch_priors.copy_flax_conditional_params
    params = randomised(model.init(jax.random.key(2), *inputs)["params"], seed=0, scale=0.3)
    expected = np.asarray(model.apply({"params": params}, *inputs))
    with torch.no_grad():
        logits = copy(twin, params)(*(torch.from_numpy(np.array(x)).long() for x in inputs))
    assert np.ptp(expected) > 0.5
    np.testing.assert_allclose(torch_priors.as_numpy_logits(logits), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())
