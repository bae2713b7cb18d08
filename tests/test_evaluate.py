"""Importance-weighted evaluation and latent diagnostics: probabilistic PCA, where the
bounds are exact, a small trained model, where they must order, and the CLI."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats
from sklearn.datasets import load_digits

from experiments import evaluate as evaluate_cli
from experiments import vae_2d
from lvm_jax import evaluate, losses
from lvm_jax.models import likelihoods, vae
from lvm_jax.models.priors import MADEFlowPrior, StandardNormalPrior
from lvm_jax.nn.dense import GaussianHead
from tests.helpers import run_python


# Compiled: op-by-op dispatch would dominate these small tests' time.
log_weights = jax.jit(evaluate.iwae_log_weights, static_argnums=(0, 4))
iwae_bound = jax.jit(losses.iwae_bound)


class Identity(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x


def inverse_soft_clamp(y, bound):
    return bound * np.arctanh(y / bound)


def ppca_fit(x: np.ndarray, q: int):
    """Maximum-likelihood probabilistic PCA (Tipping & Bishop 1999) with R = I.

    Returns (mu, W, sigma2, per-point log-likelihood log N(x; mu, C), C = W W^T + sigma2 I).
    """
    n, d = x.shape
    mu = x.mean(0)
    s = (x - mu).T @ (x - mu) / n
    eigenvalues, eigenvectors = np.linalg.eigh(s)  # ascending
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    sigma2 = eigenvalues[q:].mean()
    w = eigenvectors[:, :q] * np.sqrt(eigenvalues[:q] - sigma2)
    c = w @ w.T + sigma2 * np.eye(d)
    # The closed form log L = -N/2 [d log 2 pi + log|C| + tr(C^-1 S)], and at the
    # maximum tr(C^-1 S) = d.
    trace = np.trace(np.linalg.solve(c, s))
    np.testing.assert_allclose(trace, d, rtol=1e-8)
    log_l = -0.5 * n * (d * np.log(2 * np.pi) + np.linalg.slogdet(c)[1] + trace)
    log_px = stats.multivariate_normal(mu, c).logpdf(x)
    np.testing.assert_allclose(log_px.sum(), log_l, rtol=1e-10)
    return mu, w, sigma2, log_px


def linear_gaussian_vae(x: np.ndarray, q: int):
    """A VAE with linear encoder and decoder set to the pPCA maximum-likelihood model and its
    exact posterior q(z|x) = N(M^-1 W^T (x - mu), sigma2 M^-1), M = W^T W + sigma2 I
    (diagonal, = the top eigenvalues, because R = I)."""
    d = x.shape[1]
    mu, w, sigma2, log_px = ppca_fit(x, q)
    m_diag = np.diag(w.T @ w) + sigma2
    model = vae.VAE(trunk=Identity(), decoder=nn.Dense(2 * d), prior=StandardNormalPrior(q),
                    likelihood=likelihoods.get("gaussian"), event_shape=(d,), latent_dim=q)
    # z -> (W z + mu, raw log sigma2) per dimension, flat: VAE.decode reshapes it to (d, 2).
    decoder_kernel = np.zeros((q, d, 2))
    decoder_kernel[..., 0] = w.T
    decoder_bias = np.stack(
        [mu, np.full(d, inverse_soft_clamp(np.log(sigma2), likelihoods.LOG_VAR_BOUND))], -1)
    # x -> (mean, raw log-variance) of the exact posterior: M^-1 W^T (x - mu), log(sigma2 / M).
    head_kernel = np.concatenate([w / m_diag, np.zeros((d, q))], axis=1)
    log_var = inverse_soft_clamp(np.log(sigma2 / m_diag), GaussianHead.log_var_bound)
    head_bias = np.concatenate([-(w / m_diag).T @ mu, log_var])
    params = {"decoder": {"kernel": decoder_kernel.reshape(q, 2 * d),
                          "bias": decoder_bias.reshape(-1)},
              "head": {"Dense_0": {"kernel": head_kernel, "bias": head_bias}}}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    key = jax.random.key(0)
    init = jax.eval_shape(model.init, key, x[:1].astype(np.float32), key)
    assert jax.tree.structure(init["params"]) == jax.tree.structure(params)
    return model, params, log_px


def ppca_data(n=2000, d=5, seed=0):
    rng = np.random.default_rng(seed)
    w_true, mu_true = rng.normal(size=(d, 2)), rng.normal(size=d)
    return rng.normal(size=(n, 2)) @ w_true.T + mu_true + 0.5 * rng.normal(size=(n, d))


def exact_elbo(model: vae.VAE, x):
    """E_q[log p(x|z)] - KL(q || p) per example, the expectation exact: log p(x|z) is quadratic
    in z, and the 2q sigma points mean +- sqrt(q) sigma_u e_u integrate quadratics exactly."""
    mean, log_var = model.encode(x)
    q = mean.shape[-1]
    offsets = jnp.sqrt(q) * jnp.concatenate([jnp.eye(q), -jnp.eye(q)])  # (2q, q)
    z = mean + offsets[:, None, :] * jnp.exp(0.5 * log_var)  # (2q, batch, q)
    x_tiled = jnp.broadcast_to(x, (2 * q, *x.shape)).reshape(-1, *x.shape[1:])
    recon = model.likelihood.log_prob(x_tiled, model.decode(z.reshape(-1, q)))
    return recon.reshape(2 * q, -1).mean(0) - model.prior.kl(z[0], mean, log_var)


def test_ppca_elbo_and_iwae_bound_equal_the_exact_log_likelihood():
    """REFERENCE.md §7: with the exact posterior every importance weight is p(x)."""
    x = ppca_data()
    model, params, log_px = linear_gaussian_vae(x, q=2)
    x, log_px = jnp.asarray(x[:200], jnp.float32), log_px[:200]
    elbo = jax.jit(functools.partial(model.apply, method=exact_elbo))({"params": params}, x)
    np.testing.assert_allclose(elbo, log_px, atol=1e-4)
    log_w = log_weights(model, params, x, jax.random.key(1), 100)
    np.testing.assert_allclose(log_w, np.broadcast_to(log_px, log_w.shape), atol=1e-4)
    for k in (1, 7, 100):
        np.testing.assert_allclose(iwae_bound(log_w[:k]), log_px, atol=1e-4)
    nll = evaluate.iwae_nll(model, params, np.asarray(x), jax.random.key(2), num_samples=60,
                            chunk=20, batch_size=64)
    np.testing.assert_allclose(nll, -log_px, atol=1e-4)


def test_chunks_combine_to_the_k_sample_bound():
    """iwae_nll, drawing in chunks and combining their log-weights on the host, equals
    iwae_bound on the concatenated log-weights of the same draws."""
    model = vae.mlp_vae(3, 2, (8,), likelihoods.get("gaussian"))
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(0), x, jax.random.key(1))["params"]
    noise = np.random.default_rng(3)
    params = jax.tree.map(lambda p: p + 0.5 * noise.normal(size=p.shape).astype(np.float32), params)
    rng = jax.random.key(4)
    nll = evaluate.iwae_nll(model, params, x, rng, num_samples=12, chunk=4, batch_size=6)
    keys = jax.random.split(jax.random.fold_in(rng, 0), 3)  # batch 0's three chunks
    log_w = jnp.concatenate([log_weights(model, params, x, key, 4) for key in keys])
    np.testing.assert_allclose(nll, -iwae_bound(log_w), rtol=1e-5)
    with pytest.raises(ValueError, match="must divide"):
        evaluate.iwae_nll(model, params, x, rng, num_samples=10, chunk=4)


@pytest.fixture(scope="module")
def trained_digits_vae():
    """An MLP VAE with a Bernoulli decoder trained for 400 steps on binarized 8x8 digits."""
    digits = (load_digits().images.reshape(-1, 64) > 7).astype(np.float32) * 2 - 1  # {-1, 1}
    train, test = jnp.asarray(digits[:1500]), digits[1500:]
    model = vae.mlp_vae(64, 4, (64,), likelihoods.get("bernoulli"))
    params = jax.jit(model.init)(jax.random.key(0), train[:1], jax.random.key(0))["params"]
    tx, loss = optax.adam(3e-3), functools.partial(vae.loss_fn, model)

    @jax.jit
    def train_steps(params, opt_state, key):
        def step(carry, key):
            params, opt_state = carry
            batch = train[jax.random.choice(key, len(train), (100,), replace=False)]
            grads = jax.grad(lambda p: loss(p, batch, jax.random.fold_in(key, 1))[0])(params)
            updates, opt_state = tx.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), None
        return jax.lax.scan(step, (params, opt_state), jax.random.split(key, 400))[0]

    params, _ = train_steps(params, tx.init(params), jax.random.key(1))
    return model, params, test


def test_iwae_bound_is_above_the_elbo_and_grows_with_k(trained_digits_vae):
    """E[L_k] is non-decreasing in k and L_1 is the ELBO (Burda et al. 2016, Theorem 1).

    Each E[L_k] is estimated from the same 1000 draws per example, split into
    1000 / k groups of k, so the differences between k are measured on shared
    noise and are significant many standard errors over.
    """
    model, params, test = trained_digits_vae
    log_w = log_weights(model, params, jnp.asarray(test), jax.random.key(5), 1000)
    # iwae_bound takes (k, batch): the groups join the batch axis, then split off again.
    bounds = {k: np.asarray(iwae_bound(log_w.reshape(k, -1))).reshape(1000 // k, -1).mean(0)
              for k in (1, 10, 100, 1000)}

    @jax.jit
    def elbo(key):  # the training objective: analytic KL, averaged over 1000 draws of z
        keys = jax.random.split(key, 1000)
        terms = jax.vmap(lambda k: model.apply({"params": params}, test, k))(keys)
        return (terms["log_px_z"] - terms["kl"]).mean(0)

    elbo_value = elbo(jax.random.key(6))

    def standard_error(values):
        return values.std() / np.sqrt(len(values))

    # k = 1 is the ELBO, here with a Monte Carlo KL instead of the analytic one.
    assert abs(bounds[1].mean() - elbo_value.mean()) < 4 * standard_error(bounds[1] - elbo_value)
    for k_small, k_large in [(1, 10), (10, 100), (100, 1000)]:
        gain = bounds[k_large] - bounds[k_small]
        assert gain.mean() > 3 * standard_error(gain), (k_small, k_large, gain.mean())
    assert bounds[1000].mean() - elbo_value.mean() > 0.5  # nats: a visible gap on this model


def test_a_dimension_forced_to_the_prior_counts_as_collapsed():
    model = vae.mlp_vae(6, 4, (16,), likelihoods.get("gaussian"))
    x = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(0), x[:1], jax.random.key(0))["params"]
    head = params["head"]["Dense_0"]
    kernel = 0.5 * np.random.default_rng(1).normal(size=head["kernel"].shape).astype(np.float32)
    # Dimension 2's mean and log-variance columns at zero: q(z_2 | x) = N(0, 1) for every x.
    kernel[:, [2, 4 + 2]] = 0.0
    params = {**params, "head": {"Dense_0": {**head, "kernel": kernel}}}

    num_active, activity = evaluate.active_units(model, params, x, batch_size=128)
    kl = evaluate.per_dim_kl(model, params, x, batch_size=128)
    assert num_active == 3 and activity[2] == 0.0 and np.all(np.delete(activity, 2) > 0.01)
    assert kl[2] == 0.0 and np.all(np.delete(kl, 2) > 0.01)
    mean, log_var = model.apply({"params": params}, jnp.asarray(x), method=vae.VAE.encode)
    np.testing.assert_allclose(kl.sum(), losses.kl_std_normal(mean, log_var).mean(), rtol=1e-5)
    made = vae.mlp_vae(6, 4, (16,), likelihoods.get("gaussian"),
                       prior=MADEFlowPrior(4, hidden=(8,)))
    with pytest.raises(ValueError, match="standard normal prior"):
        evaluate.per_dim_kl(made, params, x)


def test_image_bits_per_dim_counts_discrete_likelihoods_as_they_are():
    d, one_bit = 1024, 1024 * np.log(2.0)  # nats per example
    dmol_bits = evaluate.image_bits_per_dim(one_bit, d, likelihoods.get("dmol"))
    assert float(dmol_bits) == pytest.approx(1.0)
    # The uniform density on [-1, 1] (ln 2 nats per dim) is uniform on [0, 255]: log2(255) bits/dim.
    uniform = evaluate.image_bits_per_dim(one_bit, d, likelihoods.get("unit_gaussian"))
    assert float(uniform) == pytest.approx(np.log2(255.0))


@pytest.mark.parametrize("name, scale", [("bernoulli", "binary"), ("dmol", "8-bit"),
                                         ("gaussian", "8-bit"), ("unit_gaussian", "8-bit")])
def test_bits_per_dim_unit_names_the_scale_of_the_pixels(name, scale):
    """Binarized pixels count one bit each at most; 8-bit ones up to 8."""
    assert evaluate.bits_per_dim_unit(likelihoods.get(name)) == f"bits per dimension ({scale} scale)"


def test_evaluate_cli_writes_the_iwae_nll_into_the_run_summary(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    with pytest.raises(SystemExit) as done:
        evaluate_cli.main(["--workdir", workdir])
    assert done.value.code == 1 and "no config.json" in capsys.readouterr().err
    vae_2d.main(["--quick", "--workdir", workdir, "--no_progress"])
    evaluate_cli.main(["--workdir", workdir, "--num_samples", "50", "--no_progress"])
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    metrics = summary["test_metrics"]
    assert metrics["iwae_num_samples"] == 50 and metrics["iwae_nll"] <= metrics["neg_elbo"] + 0.05
    assert "iwae_bits_per_dim" not in metrics and "iwae_bits_per_dim" not in summary["units"]
    assert {"iwae_nll", "iwae_nll_stderr", "iwae_num_samples", "active_units"} <= set(summary["units"])
    assert len(summary["latent_diagnostics"]["kl_per_dim"]) == 2
    out = capsys.readouterr().out  # vae_2d's closing line, then evaluate's
    assert f"metrics.csv and summary.json in {workdir}" in out and "IWAE NLL (k=50)" in out

    empty = tmp_path / "untrained"
    empty.mkdir()
    (empty / "config.json").write_text((tmp_path / "run" / "config.json").read_text())
    with pytest.raises(SystemExit) as done:
        evaluate_cli.main(["--workdir", str(empty)])
    assert done.value.code == 1 and "no checkpoints/" in capsys.readouterr().err


def write_config(workdir, experiment):
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"experiment": experiment}))


def evaluate_error(workdir, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        evaluate_cli.main(["--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert done.value.code == 1 and err.count("\n") == 1, err  # one line, no traceback
    return err


def test_evaluate_cli_names_the_runs_it_cannot_bound(tmp_path, capsys):
    """A VQ-VAE workdir holds its two stages' runs, neither with an IWAE bound; a folder of
    runs names those it can evaluate."""
    vqvae_run = tmp_path / "vqvae_run"
    write_config(vqvae_run / "vqvae", "vqvae")
    write_config(vqvae_run / "prior_pixelcnn", "vqvae_prior")
    assert (f"{vqvae_run} holds runs of vqvae, vqvae_prior, which have no importance-weighted "
            "bound: this evaluates runs of vae, vlae, vae_2d, mlp_vae, lvae.") \
        in evaluate_error(vqvae_run, capsys)
    assert f"{vqvae_run / 'vqvae'} holds a run of vqvae, which has no importance-weighted bound" \
        in evaluate_error(vqvae_run / "vqvae", capsys)
    runs = tmp_path / "runs"
    write_config(runs / "a", "vae")
    write_config(runs / "b", "vqvae")
    write_config(runs / "c", "lvae")
    assert (f"{runs} holds no config.json of its own, but the runs in {runs / 'a'}, {runs / 'c'}: "
            "pass one of those as --workdir.") in evaluate_error(runs, capsys)


@pytest.mark.parametrize("k, chunk", [(1, 1), (7, 7), (40, 40), (100, 25), (1000, 40),
                                      (5000, 40), (64, 32), (97, 1)])
def test_default_chunk_is_the_largest_divisor_of_k_up_to_40(k, chunk):
    assert evaluate.default_chunk(k) == chunk
    assert evaluate.resolve_chunk(k) == chunk


def test_resolve_chunk_caps_at_k_and_refuses_a_chunk_that_does_not_divide_it():
    assert evaluate.resolve_chunk(100, 50) == 50 and evaluate.resolve_chunk(100, 500) == 100
    for k, chunk, message in [(100, 30, "chunk \\(30\\) must divide num_samples \\(100\\)"),
                              (0, None, "must be positive"), (10, 0, "must be positive")]:
        with pytest.raises(ValueError, match=message):
            evaluate.resolve_chunk(k, chunk)


def test_an_empty_test_set_is_refused():
    model = vae.mlp_vae(3, 2, (8,), likelihoods.get("gaussian"))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 3)), jax.random.key(1))["params"]
    with pytest.raises(ValueError, match="at least one example"):
        evaluate.iwae_nll(model, params, np.zeros((0, 3), np.float32), jax.random.key(2), 10)


EIGHT_DEVICES = """
    import json, re
    import jax, numpy as np
    from lvm_jax import evaluate
    from lvm_jax.data import batching
    from lvm_jax.models import likelihoods, vae
    from tests.helpers import random_variables

    model = vae.conv_vae((32, 32, 1), 4, likelihoods.get("bernoulli"))
    x = np.random.default_rng(0).uniform(-1, 1, (13, 32, 32, 1)).astype(np.float32)
    # The bounds are compared across devices: any weights do, and init would compile for seconds.
    params = random_variables(model, x[:1], jax.random.key(1), seed=1)["params"]
    rng = jax.random.key(2)
    one = evaluate.iwae_nll(model, params, x, rng, 80, batch_size=5,
                            mesh=batching.data_mesh(jax.devices()[:1]))
    eight = evaluate.iwae_nll(model, params, x, rng, 80, batch_size=5)
    mesh = evaluate.sample_mesh(40)
    hlo = evaluate._chunk_log_weights.lower(
        model, batching.put_replicated(params, mesh), batching.put_replicated(x[:5], mesh), rng,
        40, evaluate._identity, mesh).compile().as_text()
    try:
        evaluate.iwae_nll(model, params, x, rng, 80, chunk=20, mesh=mesh)
        error = None
    except ValueError as err:
        error = str(err)
    print(json.dumps({
        "one": one.tolist(), "eight": eight.tolist(), "error": error,
        "collectives": re.findall(
            r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute", hlo),
        "mesh_sizes": {c: evaluate.sample_mesh(c).devices.size for c in (40, 25, 7, 1, 12)}}))
"""


def test_iwae_splits_each_calls_samples_over_the_devices_with_one_devices_draws():
    """On 8 devices every call's 40 samples split 5 per device, each device decoding its
    own (no collective in the compiled call), and the bound is the one device's: the draws
    do not depend on the devices."""
    out = run_python(EIGHT_DEVICES, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    np.testing.assert_allclose(out["eight"], out["one"], rtol=1e-6)
    assert len(out["one"]) == 13 and np.all(np.isfinite(out["one"]))
    assert out["collectives"] == []
    assert out["mesh_sizes"] == {"40": 8, "25": 5, "7": 7, "1": 1, "12": 6}
    assert out["error"] == ("the mesh must be 1-D with the axis 'data' and a size that divides "
                            "chunk (20); got axes ('data',) of sizes (8,).")


def test_iwae_of_weights_that_are_all_zero_is_infinite_and_bad_sizes_are_refused():
    """A log-weight of -inf everywhere (p(x, z) = 0) bounds -log p(x) by +inf, not NaN."""

    class Impossible(nn.Module):
        @nn.compact
        def __call__(self, x, rng):
            zero = self.param("zero", nn.initializers.zeros, ())
            shape = x.shape[:1]
            return {"log_px_z": jnp.full(shape, -jnp.inf) + zero, "log_pz": jnp.zeros(shape),
                    "log_qz_x": jnp.zeros(shape)}

    model, x = Impossible(), np.zeros((3, 2), np.float32)
    params = model.init(jax.random.key(0), x, jax.random.key(1))["params"]
    with np.errstate(all="raise"):
        nll = evaluate.iwae_nll(model, params, x, jax.random.key(2), 8)
    assert nll.tolist() == [np.inf] * 3
    for k, chunk in ((0, None), (8, 0)):
        with pytest.raises(ValueError, match="must be positive"):
            evaluate.iwae_nll(model, params, x, jax.random.key(2), k, chunk)
