"""VectorQuantizer against NumPy references: nearest codes, gradients, EMA updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.nn.quantizer import VectorQuantizer

K, D = 16, 8


def _batch(seed, shape=(4, 3, 3, D)):
    return jax.random.normal(jax.random.key(seed), shape)


def _np_nearest(z, e):
    """Brute-force argmin_k ||z - e_k||^2 over an explicit (N, K, D) difference."""
    z = np.asarray(z, np.float64).reshape(-1, e.shape[1])
    return np.argmin(((z[:, None, :] - np.asarray(e, np.float64)[None]) ** 2).sum(-1), axis=1)


def test_codebook_initialised_uniform():
    params = VectorQuantizer(K, D).init(jax.random.key(0), _batch(1))
    e = params["params"]["embeddings"]
    assert e.shape == (K, D)
    assert np.all(np.abs(e) <= 1.0 / K) and np.std(e) > 0.25 / K


def test_nearest_codes_match_numpy():
    vq = VectorQuantizer(K, D, commitment_cost=0.25)
    z_e = _batch(1)
    e = jax.random.normal(jax.random.key(2), (K, D))  # spread out, unlike the tiny init
    out = vq.apply({"params": {"embeddings": e}}, z_e)

    k = _np_nearest(z_e, e)
    np.testing.assert_array_equal(out["indices"], k.reshape(4, 3, 3))
    assert out["indices"].dtype == jnp.int32
    np.testing.assert_array_equal(out["codes"], np.asarray(e)[k].reshape(z_e.shape))
    np.testing.assert_allclose(out["quantized"], out["codes"], atol=1e-6)
    lookup = vq.apply({"params": {"embeddings": e}}, out["indices"], method=VectorQuantizer.lookup)
    np.testing.assert_array_equal(lookup, out["codes"])

    counts = np.bincount(k, minlength=K)
    np.testing.assert_array_equal(out["counts"], counts)
    p = counts[counts > 0] / k.size
    np.testing.assert_allclose(out["perplexity"], np.exp(-np.sum(p * np.log(p))), rtol=1e-5)

    sq = ((np.asarray(z_e) - np.asarray(out["codes"])) ** 2).reshape(4, -1).sum(1)
    for name in ("codebook_loss", "commitment_loss"):
        np.testing.assert_allclose(out[name], sq, rtol=1e-5)
    np.testing.assert_allclose(out["loss"], 1.25 * sq, rtol=1e-5)


def test_gradients_follow_the_paper():
    """Decoder gradient copied to z_e; codebook moved only by its own term."""
    vq = VectorQuantizer(K, D, commitment_cost=0.25)
    z_e = _batch(3, (2, 5, D))
    params = vq.init(jax.random.key(0), z_e)
    w = jax.random.normal(jax.random.key(4), z_e.shape)

    def decoder_loss(x):
        return jnp.sum(jnp.sin(x) * w)

    def terms(params, z_e):
        out = vq.apply(params, z_e)
        return {
            "recon": decoder_loss(out["quantized"]),
            "codebook": out["codebook_loss"].sum(),
            "commitment": out["commitment_loss"].sum(),
        }, out

    (_, out) = terms(params, z_e)
    grads = {
        name: jax.grad(lambda p, z, n=name: terms(p, z)[0][n], argnums=(0, 1))(params, z_e)
        for name in ("recon", "codebook", "commitment")
    }
    zero = np.zeros((K, D))

    g_params, g_z = grads["recon"]
    np.testing.assert_allclose(g_z, jax.grad(decoder_loss)(out["quantized"]), rtol=1e-6)
    np.testing.assert_array_equal(g_params["params"]["embeddings"], zero)

    g_params, g_z = grads["commitment"]
    np.testing.assert_allclose(g_z, 2 * (z_e - out["codes"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g_params["params"]["embeddings"], zero)

    g_params, g_z = grads["codebook"]
    np.testing.assert_array_equal(g_z, np.zeros(z_e.shape))
    k = np.asarray(out["indices"]).ravel()
    diff = 2 * (np.asarray(out["codes"]) - np.asarray(z_e)).reshape(-1, D)
    expected = np.zeros((K, D))
    np.add.at(expected, k, diff)
    np.testing.assert_allclose(g_params["params"]["embeddings"], expected, rtol=1e-5, atol=1e-6)


def test_ema_updates_match_numpy():
    gamma, eps, beta = 0.9, 1e-5, 0.25
    vq = VectorQuantizer(K, D, commitment_cost=beta, ema=True, decay=gamma, epsilon=eps)
    batches = [_batch(5, (6, 4, D)), _batch(6, (6, 4, D))]
    variables = vq.init(jax.random.key(0), batches[0])
    assert "params" not in variables

    n_ref = np.ones(K)
    m_ref = np.asarray(variables["vq_stats"]["embed_sum"], np.float64)
    for z_e in batches:
        total = n_ref.sum()
        e_ref = m_ref / ((n_ref + eps) / (total + K * eps) * total)[:, None]
        out, updates = vq.apply(variables, z_e, train=True, mutable=["vq_stats"])
        variables = {**variables, **updates}

        z = np.asarray(z_e, np.float64).reshape(-1, D)
        k = _np_nearest(z, e_ref)
        np.testing.assert_array_equal(np.asarray(out["indices"]).ravel(), k)
        np.testing.assert_allclose(out["loss"], beta * out["commitment_loss"])
        onehot = np.eye(K)[k]
        n_ref = gamma * n_ref + (1 - gamma) * onehot.sum(0)
        m_ref = gamma * m_ref + (1 - gamma) * onehot.T @ z
        np.testing.assert_allclose(variables["vq_stats"]["cluster_size"], n_ref, rtol=1e-5)
        np.testing.assert_allclose(variables["vq_stats"]["embed_sum"], m_ref, rtol=1e-5, atol=1e-6)

    total = n_ref.sum()
    e_ref = m_ref / ((n_ref + eps) / (total + K * eps) * total)[:, None]
    e = vq.apply(variables, method=VectorQuantizer.codebook)
    np.testing.assert_allclose(e, e_ref, rtol=1e-5, atol=1e-6)

    _, unchanged = vq.apply(variables, batches[0], train=False, mutable=["vq_stats"])
    jax.tree.map(np.testing.assert_array_equal, unchanged["vq_stats"], variables["vq_stats"])


def test_dead_codes_restart_onto_batch_outputs():
    gamma = 0.99
    vq = VectorQuantizer(K, D, ema=True, decay=gamma, restart_after=2)
    z_e = _batch(7, (3, D))  # 3 outputs choose at most 3 of the 16 codes
    variables = vq.init(jax.random.key(0), z_e)

    unused = np.zeros(K, int)
    for seed in (1, 2):
        previous = variables["vq_stats"]
        out, updates = vq.apply(
            variables, z_e, train=True, rng=jax.random.key(seed), mutable=["vq_stats"]
        )
        variables = {**variables, **updates}
        stats = variables["vq_stats"]

        counts = np.asarray(out["counts"])
        unused = np.where(counts > 0, 0, unused + 1)
        dead = unused >= 2
        unused[dead] = 0
        np.testing.assert_array_equal(stats["unused_steps"], unused)

        live_sizes = gamma * np.asarray(previous["cluster_size"]) + (1 - gamma) * counts
        np.testing.assert_allclose(stats["cluster_size"][~dead], live_sizes[~dead], rtol=1e-6)
        np.testing.assert_array_equal(stats["cluster_size"][dead], np.ones(dead.sum()))
        for m in np.asarray(stats["embed_sum"])[dead]:
            assert np.any(np.all(np.asarray(z_e) == m, axis=1)), "restarts sit on encoder outputs"
    assert dead.sum() >= K - 6  # unused in both steps, so restarted in the second


def test_bad_input_is_rejected():
    vq = VectorQuantizer(K, D)
    params = vq.init(jax.random.key(0), _batch(1))
    with pytest.raises(ValueError, match="code_dim=8"):
        vq.apply(params, jnp.zeros((4, 3, D + 1)))
    with pytest.raises(ValueError, match="code_dim=8"):
        vq.apply(params, jnp.zeros((D,)))
    with pytest.raises(TypeError, match="floating"):
        vq.apply(params, jnp.zeros((4, D), jnp.int32))
    with pytest.raises(ValueError, match="ema=True"):
        VectorQuantizer(K, D, restart_after=10)
    ema = VectorQuantizer(K, D, ema=True, restart_after=10)
    variables = ema.init(jax.random.key(0), _batch(1))
    with pytest.raises(ValueError, match="rng"):
        ema.apply(variables, _batch(1), train=True, mutable=["vq_stats"])
