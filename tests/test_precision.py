"""Mixed precision: bfloat16 activations between float32 parameters and float32 losses.

The layers of every family compute in bfloat16 while parameters, BatchNorm and codebook
statistics, and everything that forms a loss stay float32; the bfloat16 loss at init is
within 2% of the float32 one for the same parameters; training in bfloat16 keeps its
state float32 and its loss finite. Dtypes of intermediates come from `jax.eval_shape`,
which compiles nothing: bfloat16 compiles slowly on XLA:CPU, so only tiny models run.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import vae_2d
from lvm_jax import data
from lvm_jax.models import likelihoods, lvae, vae, vqvae
from lvm_jax.models.priors import MADEFlowPrior
from lvm_jax.nn.masked_conv import GatedPixelCNN, PixelCNN
from lvm_jax.train import Objective, TrainConfig, fit

BF16, F32 = np.dtype(jnp.bfloat16), np.dtype(jnp.float32)
# Initialisers drawn with the 'rbg' generator compile several times faster on CPU.
RNG = jax.random.key(0, impl="rbg")


def stateless_objective(model, loss_fn, preprocess) -> Objective:
    """The trainer's view of a VAE or LVAE: init on (x, rng), `loss_fn(model, params, x, rng)`."""
    return Objective.stateless(init=lambda rng, x: model.init(rng, x, rng),
                               loss_fn=functools.partial(loss_fn, model), preprocess=preprocess)


def conv_vlae(dtype):
    """The image VAE of REFERENCE.md §2 with a small MADE-flow prior, on 32x32 grey images."""
    model = vae.conv_vae((32, 32, 1), 4, likelihoods.get("unit_gaussian"),
                         prior=MADEFlowPrior(4, hidden=(16,), dtype=dtype), dtype=dtype)
    return model, stateless_objective(model, vae.loss_fn, data.scale_images), (32, 32, 1)


def flat_images(x):
    """uint8 (N, 4, 4, 1) -> float32 (N, 16) in [-1, 1]."""
    return data.scale_images(x).reshape(x.shape[0], 16)


def mlp_vlae(dtype):
    """A tiny MLP VAE with a MADE-flow prior on flattened 4x4 grey images."""
    model = vae.mlp_vae(16, 2, (16,), likelihoods.get("gaussian"),
                        prior=MADEFlowPrior(2, hidden=(16,), dtype=dtype), dtype=dtype)
    return model, stateless_objective(model, vae.loss_fn, flat_images), (4, 4, 1)


def tiny_vqvae(dtype):
    model = vqvae.conv_vqvae((8, 8, 3), num_codes=8, code_dim=8, dtype=dtype)
    objective = Objective(init=model.init, loss=functools.partial(vqvae.loss_fn, model),
                          preprocess=data.scale_images)
    return model, objective, (8, 8, 3)


def tiny_lvae(dtype):
    """Two layers, so that q merges the bottom-up and top-down paths (through a residual
    block), with data-dependent init."""
    model = lvae.LVAE((8, 8, 1), likelihoods.get("gaussian"), num_layers=2, latent_channels=2,
                      hidden=4, blocks_per_layer=0, data_init=True, dtype=dtype)
    return model, stateless_objective(model, lvae.loss_fn, data.scale_images), (8, 8, 1)


def images(shape, num, seed=0):
    """Stored uint8 images (num, *shape), as `fit` takes them."""
    return np.random.default_rng(seed).integers(0, 256, (num, *shape), dtype=np.uint8)


def float_dtypes(tree) -> set:
    """The floating-point dtypes among a pytree's leaves (integers: codes, counts, steps)."""
    return {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)}


def outputs(captured, *path) -> set:
    """Float dtypes of what the submodule at `path` returned, from captured intermediates."""
    for name in path:
        captured = captured[name]
    return float_dtypes(captured["__call__"])


@pytest.mark.parametrize("family", [conv_vlae, tiny_vqvae, tiny_lvae])
def test_layers_compute_in_bfloat16_and_parameters_and_loss_terms_stay_float32(family):
    model, objective, shape = family(BF16)
    x = objective.preprocess(images(shape, 4))
    variables = jax.eval_shape(objective.init, RNG, x)  # data-dependent init included
    assert float_dtypes(variables) == {F32}  # params, BatchNorm and codebook statistics

    rng = [] if family is tiny_vqvae else [RNG]
    out, state = jax.eval_shape(functools.partial(
        model.apply, capture_intermediates=True, mutable=["intermediates"]), variables, x, *rng)
    captured = state["intermediates"]
    assert float_dtypes(out) == {F32}  # every ELBO term; the VQ outputs and x_hat
    if family is conv_vlae:
        layers = [("trunk", "Conv_0"), ("trunk",), ("decoder",), ("prior", "made", "hidden_0")]
        float32_heads = [("head",), ("prior", "made")]  # q(z|x); the flow's shift and log-scale
    elif family is tiny_vqvae:
        layers = [("encoder",), ("decoder", "ResidualBlock_0", "BatchNorm_0"), ("decoder",)]
        float32_heads = [("quantizer",)]  # codebook distances and VQ losses
    else:
        layers = [("stem",), ("top_down_layers_0", "merge_block"), ("output_head",)]
        float32_heads = []  # its Gaussians are no module outputs: `out` holds their terms
    for path in layers:
        assert outputs(captured, *path) == {BF16}, path
    for path in float32_heads:
        assert outputs(captured, *path) == {F32}, path


@pytest.mark.parametrize("prior_class, settings", [
    (PixelCNN, dict(embed_dim=8, num_residual_blocks=1, hidden=16)),
    (GatedPixelCNN, dict(dim=8, num_layers=2, hidden=16))])
def test_pixelcnn_priors_give_float32_logits_from_bfloat16_layers(prior_class, settings):
    prior = prior_class(8, **settings, dtype=BF16)
    codes = jnp.zeros((2, 4, 4), jnp.int32)
    variables = jax.eval_shape(prior.init, RNG, codes)
    assert float_dtypes(variables) == {F32}
    logits, state = jax.eval_shape(functools.partial(
        prior.apply, capture_intermediates=True, mutable=["intermediates"]), variables, codes)
    assert logits.dtype == F32  # the softmax cross-entropy reads them
    captured = state["intermediates"]
    assert outputs(captured, "embed") == outputs(captured, "head") == {BF16}


@pytest.mark.parametrize("family", [mlp_vlae, tiny_vqvae, tiny_lvae])
def test_bfloat16_loss_at_init_is_within_2_percent_of_float32_for_the_same_parameters(family):
    _, objective32, shape = family(F32)
    _, objective16, _ = family(BF16)
    variables = dict(jax.jit(objective32.init)(RNG, objective32.preprocess(images(shape, 8))))
    # Zero-initialised output layers make some outputs exactly 0 at init, whatever the
    # dtype of the layers before them; small noise on every parameter puts them to work.
    noise = np.random.default_rng(2)
    params = jax.tree.map(lambda p: p + 0.05 * noise.standard_normal(p.shape, np.float32),
                          variables.pop("params"))
    x = images(shape, 8, seed=1)

    def loss(objective):
        value, (metrics, _) = jax.jit(lambda p, s, b: objective.loss(
            p, s, objective.preprocess(b), RNG, False))(params, variables, x)
        return value, metrics

    (loss32, _), (loss16, metrics16) = loss(objective32), loss(objective16)
    assert loss16.dtype == F32 and float_dtypes(metrics16) == {F32}
    np.testing.assert_allclose(loss16, loss32, rtol=0.02)
    assert float(loss16) != float(loss32)  # the bfloat16 model did compute in bfloat16


def test_bfloat16_fit_keeps_parameters_statistics_and_optimizer_float32(tmp_path):
    model, objective, shape = tiny_vqvae(BF16)
    # fit's threefry key would make compiling the initialisers most of this test's time.
    objective = dataclasses.replace(objective, init=lambda rng, x: model.init(RNG, x))
    config = TrainConfig(epochs=1, batch_size=8, steps_per_call=1, eval_batch_size=8,
                         progress=False)
    # `fit` stops with NonFiniteLossError on a non-finite training loss.
    result = fit(objective, images(shape, 16), images(shape, 8, seed=1), config, str(tmp_path))
    state = result.state
    assert int(state.step) == 2
    assert float_dtypes((state.params, state.model_state, state.opt_state)) == {F32}
    assert np.isfinite(list(result.test_metrics.values())).all()


def test_dtype_flag_trains_and_a_resume_must_use_the_same_dtype(tmp_path, capsys):
    args = ["--dataset", "1", "--quick", "--no_progress", "--workdir", str(tmp_path)]
    summary = vae_2d.main([*args, "--dtype", "bfloat16"])
    assert summary["config"]["dtype"] == "bfloat16"
    assert np.isfinite(list(summary["test_metrics"].values())).all()
    with pytest.raises(SystemExit) as done:
        vae_2d.main(args)  # float32, the default, on the bfloat16 run's checkpoints
    assert done.value.code == 1
    assert "dtype: saved 'bfloat16', now 'float32'" in capsys.readouterr().err
