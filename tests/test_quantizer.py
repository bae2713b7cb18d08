"""VectorQuantizer and FiniteScalarQuantizer against NumPy references: nearest codes,
gradients, EMA updates, k-means initialisation, cosine lookup, rotation trick, FSQ."""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm_jax.models import vqvae
from lvm_jax.nn.fsq import FiniteScalarQuantizer
from lvm_jax.nn.quantizer import (VectorQuantizer, VectorQuantizerEMA, kmeans_plus_plus,
                                  rotation_trick)

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
    vq = VectorQuantizerEMA(K, D, commitment_cost=beta, decay=gamma, epsilon=eps)
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
    e = vq.apply(variables, method="codebook")
    np.testing.assert_allclose(e, e_ref, rtol=1e-5, atol=1e-6)

    _, unchanged = vq.apply(variables, batches[0], train=False, mutable=["vq_stats"])
    jax.tree.map(np.testing.assert_array_equal, unchanged["vq_stats"], variables["vq_stats"])


def test_dead_codes_restart_onto_batch_outputs():
    gamma = 0.99
    vq = VectorQuantizerEMA(K, D, decay=gamma, restart_after=2)
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
    with pytest.raises(ValueError, match="restart_after needs ema=True"):
        vqvae.quantizer(K, D, restart_after=10)
    with pytest.raises(ValueError, match="kmeans_iters needs ema=True"):
        vqvae.quantizer(K, D, kmeans_iters=3)
    with pytest.raises(ValueError, match="kmeans_iters must be >= 0"):
        VectorQuantizerEMA(K, D, kmeans_iters=-1)
    with pytest.raises(ValueError, match="lookup_dim=9 must be between 1 and code_dim=8"):
        VectorQuantizer(K, D, lookup_dim=D + 1)
    with pytest.raises(ValueError, match=r"levels \(8, 4, 3\) give 96 codes, not num_codes=128"):
        FiniteScalarQuantizer(128, D, (8, 4, 3))
    with pytest.raises(ValueError, match=">= 3"):
        FiniteScalarQuantizer(16, D, (8, 2))
    for option in (dict(ema=True), dict(kmeans_iters=2), dict(cosine=True),
                   dict(lookup_dim=4), dict(rotation_trick=True)):
        name = next(iter(option))
        with pytest.raises(ValueError, match=f"fsq_levels has no learned codebook: {name}"):
            vqvae.quantizer(128, D, fsq_levels=(8, 4, 4), **option)
    ema = VectorQuantizerEMA(K, D, restart_after=10)
    variables = ema.init(jax.random.key(0), _batch(1))
    with pytest.raises(ValueError, match="rng"):
        ema.apply(variables, _batch(1), train=True, mutable=["vq_stats"])


def _np_dense(params, x, layer):
    """A Flax Dense layer `layer` of `params` applied in float64."""
    return x @ np.asarray(params[layer]["kernel"], np.float64) + np.asarray(params[layer]["bias"])


def _np_lloyd(z, centroids, iterations):
    z, c = np.asarray(z, np.float64), np.asarray(centroids, np.float64).copy()
    for _ in range(iterations):
        k = _np_nearest(z, c)
        for i in range(len(c)):
            if np.any(k == i):
                c[i] = z[k == i].mean(0)
    return c


def test_kmeans_plus_plus_seeds_every_separated_cluster():
    """K tight clusters 100 apart: proportional-to-distance² sampling picks one row of each."""
    centres = 100.0 * np.eye(K, D) + 100.0 * np.arange(K)[:, None] / K
    labels = np.repeat(np.arange(K), 5)
    z = jnp.asarray(centres[labels] + 0.01 * np.random.default_rng(0).standard_normal((5 * K, D)),
                    jnp.float32)
    for seed in range(3):
        picks = np.asarray(kmeans_plus_plus(jax.random.key(seed), z, K))
        assert sorted(labels[picks]) == list(range(K))


def test_kmeans_initialises_the_codebook_once():
    """The first training step sets the codebook to k-means of its batch (NumPy Lloyd from the
    same k-means++ seeds), under jit; a second step with another batch keeps it (decay = 1
    freezes the moving averages, so only a re-initialisation could change the codebook)."""
    iterations = 4
    vq = VectorQuantizerEMA(K, D, decay=1.0, kmeans_iters=iterations)
    batches = [_batch(8, (6, 5, D)), 3.0 + _batch(9, (6, 5, D))]
    variables = vq.init(jax.random.key(0), batches[0])
    assert not variables["vq_stats"]["initialized"]
    step = jax.jit(lambda v, z, rng: vq.apply(v, z, True, rng, mutable=["vq_stats"]))

    rng = jax.random.key(1)
    out, updates = step(variables, batches[0], rng)
    variables = {**variables, **updates}
    z = np.asarray(batches[0]).reshape(-1, D)
    seeds = np.asarray(kmeans_plus_plus(jax.random.fold_in(rng, 1), jnp.asarray(z), K))
    expected = _np_lloyd(z, z[seeds], iterations)
    codebook = vq.apply(variables, method="codebook")
    np.testing.assert_allclose(codebook, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["indices"]).ravel(), _np_nearest(z, expected))
    assert variables["vq_stats"]["initialized"]

    _, updates = step(variables, batches[1], jax.random.key(2))
    np.testing.assert_array_equal(
        vq.apply({**variables, **updates}, method="codebook"), codebook)


def test_cosine_codes_with_a_low_dimensional_lookup_match_numpy():
    lookup_dim = 3
    vq = VectorQuantizer(K, D, commitment_cost=0.25, cosine=True, lookup_dim=lookup_dim)
    z_e = _batch(10)
    variables = vq.init(jax.random.key(0), z_e)
    params = variables["params"]
    assert params["embeddings"].shape == (K, lookup_dim)
    out = vq.apply(variables, z_e)

    def normalize(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    z = normalize(_np_dense(params, np.asarray(z_e, np.float64).reshape(-1, D), "project_in"))
    e = normalize(np.asarray(params["embeddings"], np.float64))
    k = np.argmax(z @ e.T, axis=1)  # highest cosine similarity
    np.testing.assert_array_equal(np.asarray(out["indices"]).ravel(), k)
    np.testing.assert_allclose(np.asarray(out["codes"]).reshape(-1, lookup_dim), e[k], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["quantized"]).reshape(-1, D),
                               _np_dense(params, e[k], "project_out"), rtol=1e-4, atol=1e-5)
    sq = ((z - e[k]) ** 2).reshape(4, -1).sum(1)
    np.testing.assert_allclose(out["commitment_loss"], sq, rtol=1e-4)
    np.testing.assert_allclose(out["loss"], 1.25 * sq, rtol=1e-4)
    np.testing.assert_allclose(vq.apply(variables, out["indices"], method=VectorQuantizer.lookup),
                               out["quantized"], rtol=1e-5, atol=1e-6)


def _np_rotation(z_e, z_q):
    """lambda R of Fifty et al. (2024), built as a matrix: R = I - 2 r r^T + 2 q e^T."""
    e, q = z_e / np.linalg.norm(z_e), z_q / np.linalg.norm(z_q)
    r = (e + q) / np.linalg.norm(e + q)
    rotation = np.eye(len(e)) - 2 * np.outer(r, r) + 2 * np.outer(q, e)
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(len(e)), atol=1e-12)  # a rotation
    return np.linalg.norm(z_q) / np.linalg.norm(z_e) * rotation


def test_rotation_trick_value_is_the_code_and_gradient_the_rotation():
    z_e, z_q = _batch(11, (6, D)), _batch(12, (6, D))
    w = _batch(13, (6, D))
    np.testing.assert_allclose(rotation_trick(z_e, z_q), z_q, rtol=1e-5, atol=1e-5)

    g_e, g_q = jax.grad(lambda a, b: jnp.sum(w * rotation_trick(a, b)), argnums=(0, 1))(z_e, z_q)
    np.testing.assert_array_equal(g_q, np.zeros_like(g_q))  # the code learns by its own loss
    w64 = np.asarray(w, np.float64)
    for i in range(len(z_e)):
        jacobian = _np_rotation(np.asarray(z_e[i], np.float64), np.asarray(z_q[i], np.float64))
        np.testing.assert_allclose(g_e[i], jacobian.T @ w64[i], rtol=1e-4, atol=1e-5)
        # Straight-through would pass w unchanged: the rotation turns it by z_e's angle to z_q.
        assert np.linalg.norm(g_e[i] - w64[i]) > 0.1 * np.linalg.norm(w64[i])

    # z_e already pointing at its code: no rotation, only the rescaling ||z_q|| / ||z_e||.
    g_aligned = jax.grad(lambda a: jnp.sum(w * rotation_trick(a, z_q)))(0.5 * z_q)
    np.testing.assert_allclose(g_aligned, 2.0 * w, rtol=1e-5)


def test_rotation_trick_in_the_quantizer():
    z_e = _batch(14)
    plain, rotated = VectorQuantizer(K, D), VectorQuantizer(K, D, rotation_trick=True)
    variables = {"params": {"embeddings": jax.random.normal(jax.random.key(2), (K, D))}}
    a, b = plain.apply(variables, z_e), rotated.apply(variables, z_e)
    for name in ("indices", "codes", "loss"):
        np.testing.assert_array_equal(a[name], b[name])
    np.testing.assert_allclose(b["quantized"], b["codes"], rtol=1e-5, atol=1e-5)


def _np_fsq(z, levels):
    """Bound, round, digits and mixed-radix index of Mentzer et al. (2023), in NumPy."""
    levels = np.asarray(levels)
    half = (levels - 1) * (1 - 1e-3) / 2
    offset = np.where(levels % 2 == 0, 0.5, 0.0)
    bounded = np.tanh(z + np.arctanh(offset / half)) * half - offset
    digits = np.round(bounded).astype(int) + levels // 2
    basis = np.concatenate([[1], np.cumprod(levels[:-1])])
    return bounded, digits, digits @ basis


@pytest.mark.parametrize("levels", [(8, 4, 4), (5, 4, 3)])
def test_fsq_matches_numpy_and_indices_are_a_bijection(levels):
    num_codes = int(np.prod(levels))
    fsq = FiniteScalarQuantizer(num_codes, D, levels)
    z_e = 2.0 * _batch(15, (4, 6, D))
    variables = fsq.init(jax.random.key(0), z_e)
    params = variables["params"]
    out = fsq.apply(variables, z_e)

    z = _np_dense(params, np.asarray(z_e, np.float64).reshape(-1, D), "project_in")
    bounded, digits, indices = _np_fsq(z, levels)
    assert np.all((digits >= 0) & (digits < np.asarray(levels)))
    np.testing.assert_array_equal(np.asarray(out["indices"]).ravel(), indices)
    codes = (digits - np.asarray(levels) // 2) / (np.asarray(levels) // 2)
    np.testing.assert_allclose(np.asarray(out["codes"]).reshape(-1, len(levels)), codes, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["quantized"]).reshape(-1, D),
                               _np_dense(params, codes, "project_out"), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out["loss"], np.zeros(4))
    np.testing.assert_array_equal(out["counts"], np.bincount(indices, minlength=num_codes))

    # Every index decodes to its own digits, and every digit tuple encodes to its index.
    all_indices = jnp.arange(num_codes)
    all_digits = np.asarray(fsq.apply(variables, all_indices,
                                      method=FiniteScalarQuantizer.indices_to_digits))
    assert {tuple(d) for d in all_digits} == set(itertools.product(*map(range, levels)))
    basis = np.cumprod([1, *levels[:-1]])
    np.testing.assert_array_equal(all_digits @ basis, np.arange(num_codes))
    np.testing.assert_allclose(fsq.apply(variables, out["indices"],
                                         method=FiniteScalarQuantizer.lookup),
                               out["quantized"], rtol=1e-5, atol=1e-6)


def test_fsq_bound_reaches_every_level_and_rounds_straight_through():
    levels = (8, 5, 4)
    fsq = FiniteScalarQuantizer(160, D, levels)
    sweep = jnp.linspace(-20.0, 20.0, 4001)[:, None] * jnp.ones(3)
    bounded = fsq.bound(sweep)
    np.testing.assert_allclose(fsq.bound(jnp.zeros(3)), np.zeros(3), atol=1e-6)
    for i, level in enumerate(levels):
        assert len(np.unique(np.round(bounded[:, i]))) == level

    z_e = _batch(16, (4, D))
    variables = fsq.init(jax.random.key(0), z_e)
    w = _batch(17, (4, 3))
    g_round = jax.grad(lambda z: jnp.sum(w * fsq.apply(variables, z)["codes"]))(z_e)
    projected = lambda z: fsq.apply(variables, z, method=lambda m, z: m.project_in(z))  # noqa: E731
    half_width = np.asarray(levels) // 2
    g_smooth = jax.grad(lambda z: jnp.sum(w * fsq.bound(projected(z)) / half_width))(z_e)
    np.testing.assert_allclose(g_round, g_smooth, rtol=1e-5, atol=1e-7)


MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from lvm_jax.data import batching
    from lvm_jax.nn.quantizer import VectorQuantizerEMA

    vq = VectorQuantizerEMA(16, 8, restart_after=2, kmeans_iters=3)
    z = jax.random.normal(jax.random.key(0), (16, 4, 8))
    variables = vq.init(jax.random.key(1), z)
    step = jax.jit(lambda v, z: vq.apply(v, z, True, jax.random.key(2), mutable=["vq_stats"])[1])
    mesh = batching.data_mesh(jax.devices())
    sharded = jax.device_put(z, NamedSharding(mesh, P("data")))
    one, eight = step(variables, z), step(variables, sharded)
    diffs = [np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))
             for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight))]
    json.dump({"devices": len(sharded.sharding.device_set), "max_diff": float(max(diffs))},
              sys.stdout)
""")


def test_kmeans_initialisation_on_a_mesh_matches_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["max_diff"] < 1e-5


def _preset_trajectory(preset: str) -> tuple[str, float, float, float]:
    """A (16 codes, 40 dims) quantizer of `preset` trained 3 calls (EMA statistics, restarts,
    k-means) on fixed data: its final indices as hex digits, the sums of its final loss and
    quantized output, and the sum of the last call's gradient of a loss on z_e."""
    vq = vqvae.quantizer(16, 40, **vqvae.QUANTIZER_PRESETS[preset])
    z = jax.random.normal(jax.random.key(1), (6, 3, 3, 40))
    variables = vq.init(jax.random.key(0), z)

    def objective(z_t, rng):
        out, state = vq.apply(variables, z_t, True, rng, mutable=["vq_stats"])
        return out["loss"].sum() + (out["quantized"] ** 2).sum(), state

    for step in range(3):
        grad, state = jax.grad(objective, has_aux=True)(z + 0.1 * step,
                                                        jax.random.key(10 + step))
        variables = {**variables, **state}
    out = vq.apply(variables, z)
    return ("".join(f"{k:x}" for k in np.asarray(out["indices"]).ravel()),
            float(np.asarray(out["loss"], np.float64).sum()),
            float(np.asarray(out["quantized"], np.float64).sum()),
            float(np.asarray(grad, np.float64).sum()))


# Recorded from main before the EMA quantizer became its own class (issue 33): the presets give
# the same codes and values (a bitwise comparison of every output: the closing note).
PRESET_TRAJECTORIES = {
    "plain": ("99486f72fbdf2e3aeb724d28e065b41174299328929bc952da2ff4",
             4266.851623535156, 2.8150941990315914, 793.8193823248148),
    "ema": ("99486f72fbdf2e3aeb724d28e065b41174299328929bc952da2ff4",
           499.0900115966797, 20.466851378791034, 206.98895440017805),
    "ema_restart": ("99486f72fbdf2e3aeb724d28e065b41174299328929bc952da2ff4",
                   499.0900115966797, 20.466851378791034, 206.98895440017805),
    "kmeans": ("ebb87738f3bbba1188b8c861d373d885796bf9c2895cb8ebbbc0d4",
              320.94762802124023, -3.8392889716196805, 162.42000493779778),
    "cosine": ("d5472c59c1abb4f2bbcb49bfb0134b9bcfdbf9759f421fd718f22b",
              153.30875778198242, -6.452514522708952, 1.9969220089260489),
    "rotation": ("99486f72fbdf2e3aeb724d28e065b41174299328929bc952da2ff4",
                4266.851623535156, 2.815094639570816, 776.8434108213405),
    "ema_cosine_rotation": ("04280728f37cba1acd3818c9d37358a5996b18c2a952b8e71b90d4",
                           7.8622050285339355, -11.416317785624415, 6.057861203094944),
}


@pytest.mark.parametrize("preset", sorted(PRESET_TRAJECTORIES))
def test_quantizer_presets_reproduce_their_recorded_results(preset):
    indices, loss, quantized, grad = _preset_trajectory(preset)
    expected = PRESET_TRAJECTORIES[preset]
    assert indices == expected[0]
    np.testing.assert_allclose((loss, quantized, grad), expected[1:], rtol=1e-6)
