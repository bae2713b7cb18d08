"""The discretized logistic mixture against a NumPy reference and its normalisation;
the likelihood families' shapes, means and samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from lvm_jax import losses
from lvm_jax.models import likelihoods

RNG = np.random.default_rng(0)
LEVELS = np.arange(256) / 127.5 - 1.0  # the 8-bit values scaled to [-1, 1]
# Compiled once per shape: op-by-op dispatch would dominate these tests' time.
dmol_log_prob = jax.jit(losses.discretized_logistic_mixture_log_prob)


def reference_dmol_log_prob(x, params):
    """PixelCNN++'s likelihood written directly in float64: probabilities as CDF differences,
    one pixel, component and channel at a time. x (N, C), params (N, M (1 + 2C + C(C-1)/2))."""
    n, c = x.shape
    t = c * (c - 1) // 2
    m = params.shape[1] // (1 + 2 * c + t)
    logits = params[:, :m]
    means = params[:, m:m + c * m].reshape(n, c, m)
    scales = np.exp(np.clip(params[:, m + c * m:m + 2 * c * m].reshape(n, c, m), -7.0, 7.0))
    coeffs = np.tanh(params[:, m + 2 * c * m:].reshape(n, t, m))
    pairs = [(ch, before) for ch in range(c) for before in range(ch)]
    out = np.empty(n)
    for i in range(n):
        total = 0.0
        weights = special.softmax(logits[i])
        for k in range(m):
            prob = weights[k]
            for ch in range(c):
                loc = means[i, ch, k] + sum(coeffs[i, p, k] * x[i, b]
                                            for p, (a, b) in enumerate(pairs) if a == ch)
                cdf = lambda v: special.expit((v - loc) / scales[i, ch, k])  # noqa: E731
                upper = 1.0 if x[i, ch] > 0.999 else cdf(x[i, ch] + 1 / 255)
                lower = 0.0 if x[i, ch] < -0.999 else cdf(x[i, ch] - 1 / 255)
                prob *= upper - lower
            total += prob
        out[i] = np.log(total)
    return out


def random_params(shape, num_channels, num_components, scale=2.0):
    size = num_components * (1 + 2 * num_channels + num_channels * (num_channels - 1) // 2)
    return RNG.normal(size=(*shape, size)) * scale


@pytest.mark.parametrize("num_channels", [1, 3])
def test_dmol_matches_numpy_reference(num_channels):
    n, m = 400, 5
    x = LEVELS[RNG.integers(0, 256, size=(n, num_channels))]
    x[:40] = -1.0  # the edges, whose bins extend to -inf and +inf
    x[40:80] = 1.0
    params = random_params((n,), num_channels, m)
    expected = reference_dmol_log_prob(x, params)
    got = dmol_log_prob(jnp.asarray(x, jnp.float32), jnp.asarray(params, jnp.float32))
    assert got.shape == (n,)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_dmol_sums_over_pixels_and_channels_per_example():
    x = LEVELS[RNG.integers(0, 256, size=(2, 4, 4, 3))]
    params = random_params((2, 4, 4), 3, 2)
    per_pixel = reference_dmol_log_prob(x.reshape(-1, 3), params.reshape(32, -1)).reshape(2, 16)
    got = dmol_log_prob(jnp.asarray(x, jnp.float32), jnp.asarray(params, jnp.float32))
    np.testing.assert_allclose(got, per_pixel.sum(-1), rtol=1e-4)


def test_grey_dmol_sums_to_one_over_the_256_values():
    # Sharp and broad components, locations inside and far outside [-1, 1].
    pixels = 64
    params = random_params((pixels,), 1, 10, scale=3.0)
    params[:8, 10:30] = np.repeat([20.0, -1.0], 10)  # every component far above 1: all mass on 1
    params[8:16, 20:30] = -20.0  # log-scales clipped at -7: components narrower than a bin
    x = np.tile(LEVELS, pixels)[:, None]  # each pixel's 256 values, one pixel per example
    log_p = dmol_log_prob(jnp.asarray(x, jnp.float32),
                          jnp.asarray(params.repeat(256, axis=0), jnp.float32))
    log_p = log_p.reshape(pixels, 256)
    np.testing.assert_allclose(jax.nn.logsumexp(log_p, axis=1), 0.0, atol=2e-5)
    np.testing.assert_allclose(log_p[:8, -1], 0.0, atol=1e-4)


def keep_first_channels(params, num_channels, keep, m):
    """The parameters of the same mixture over channels 0..keep-1: with the layout's
    channel-major blocks and row-major pairs, a prefix of every block."""
    t, t_keep = num_channels * (num_channels - 1) // 2, keep * (keep - 1) // 2
    means = params[..., m:m + num_channels * m]
    log_scales = params[..., m + num_channels * m:m + 2 * num_channels * m]
    coeffs = params[..., m + 2 * num_channels * m:m + (2 * num_channels + t) * m]
    return np.concatenate([params[..., :m], means[..., :keep * m], log_scales[..., :keep * m],
                           coeffs[..., :t_keep * m]], axis=-1)


def test_rgb_dmol_channel_conditionals_sum_to_one():
    """Summing the last channel out of the RGB mixture leaves the same mixture over (r, g),
    and summing g out of that leaves the grey mixture over r, which sums to 1.

    Within each component the channels are autoregressive, p_m(r, g, b) =
    p_m(r) p_m(g | r) p_m(b | r, g), so sum_b p(r, g, b) = sum_m pi_m p_m(r)
    p_m(g | r) exactly when every conditional p_m(b | r, g) sums to 1; likewise
    for g. Checking these identities at random contexts covers the 256^3 sum
    at a cost of 256 evaluations per context.
    """
    m, contexts = 10, 64
    params = random_params((), 3, m)
    rg = LEVELS[RNG.integers(0, 256, size=(contexts, 2))]
    rg[:8, 0], rg[8:16, 1] = -1.0, 1.0

    def log_prob(x, p):
        x = jnp.asarray(x, jnp.float32)
        p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (*x.shape[:-1], p.shape[-1]))
        return dmol_log_prob(x[:, None], p[:, None])

    # sum_b p(r, g, b) = p(r, g) for each context (r, g).
    rgb = np.concatenate([rg.repeat(256, 0), np.tile(LEVELS, contexts)[:, None]], axis=1)
    marginal_b = jax.nn.logsumexp(log_prob(rgb, params).reshape(contexts, 256), axis=1)
    np.testing.assert_allclose(marginal_b, log_prob(rg, keep_first_channels(params, 3, 2, m)),
                               atol=2e-5)
    # sum_g p(r, g) = p(r) for each r.
    r_g = np.stack([rg[:, 0].repeat(256), np.tile(LEVELS, contexts)], axis=1)
    marginal_g = jax.nn.logsumexp(
        log_prob(r_g, keep_first_channels(params, 3, 2, m)).reshape(contexts, 256), axis=1)
    red = keep_first_channels(params, 3, 1, m)
    np.testing.assert_allclose(marginal_g, log_prob(rg[:, :1], red), atol=2e-5)
    # sum_r p(r) = 1.
    total = jax.nn.logsumexp(log_prob(LEVELS[:, None], red))
    np.testing.assert_allclose(total, 0.0, atol=2e-5)


def test_dmol_is_finite_with_finite_gradients_at_extremes():
    x = jnp.asarray([[-1.0], [1.0], [0.0], [1.0 / 127.5 - 1.0]], jnp.float32)
    params = jnp.asarray([[20.0, -30.0, 30.0], [5.0, -30.0, -30.0], [0.0, 40.0, 30.0],
                          [0.0, 0.0, -40.0]], jnp.float32)  # logit, mean, log_scale for M = 1
    value, grad = jax.jit(jax.value_and_grad(lambda p: dmol_log_prob(x, p).sum()))(params)
    assert np.isfinite(value) and np.isfinite(grad).all()


def test_dmol_rejects_mismatched_shapes():
    x = jnp.zeros((1, 2, 2, 3))
    with pytest.raises(ValueError, match="multiple of 10"):
        losses.discretized_logistic_mixture_log_prob(x, jnp.zeros((1, 2, 2, 25)))
    with pytest.raises(ValueError, match="every axis but the last"):
        losses.discretized_logistic_mixture_log_prob(x, jnp.zeros((1, 2, 3, 30)))


@pytest.mark.parametrize("name, event_shape, out_shape, channels", [
    ("bernoulli", (32, 32, 1), (32, 32, 1, 1), 1),
    ("gaussian", (32, 32, 3), (32, 32, 3, 2), 6),
    ("unit_gaussian", (32, 32, 3), (32, 32, 3, 1), 3),
    ("dmol", (32, 32, 1), (32, 32, 30), 30),
    ("dmol", (32, 32, 3), (32, 32, 100), 100),
])
def test_decoder_output_shapes_follow_the_likelihood(name, event_shape, out_shape, channels):
    likelihood = likelihoods.get(name)
    assert likelihood.out_shape(event_shape) == out_shape
    assert likelihood.channels_per_pixel(event_shape) == channels
    out = jnp.asarray(RNG.normal(size=(2, *out_shape)), jnp.float32)
    x = jnp.asarray(LEVELS[RNG.integers(0, 256, size=(2, *event_shape))], jnp.float32)
    log_prob, mean, sample = jax.eval_shape(
        lambda x, out: (likelihood.log_prob(x, out), likelihood.mean(out),
                        likelihood.sample(jax.random.key(0), out)), x, out)
    assert log_prob.shape == (2,) and mean.shape == sample.shape == (2, *event_shape)
    assert set(likelihoods.LIKELIHOODS) == {"bernoulli", "gaussian", "unit_gaussian", "dmol"}


def test_dmol_needs_a_channel_axis():
    with pytest.raises(ValueError, match="channel axis"):
        likelihoods.get("dmol").out_shape((784,))
    assert likelihoods.get("dmol").out_shape((784, 1)) == (784, 30)


def test_bernoulli_reads_images_in_minus_one_to_one():
    logits = jnp.asarray([[[0.3], [-1.2], [2.0]]])
    x = jnp.asarray([[1.0, -1.0, -1.0]])  # white, black, black
    expected = np.log(special.expit(0.3)) + np.log(special.expit(1.2)) + np.log(special.expit(-2.0))
    bernoulli = likelihoods.get("bernoulli")
    np.testing.assert_allclose(bernoulli.log_prob(x, logits), [expected], rtol=1e-6)
    np.testing.assert_allclose(bernoulli.mean(logits), 2 * special.expit(logits[..., 0]) - 1,
                               rtol=1e-6)
    draws = bernoulli.sample(jax.random.key(0), jnp.broadcast_to(logits, (20000, 3, 1)))
    assert set(np.unique(draws)) == {-1.0, 1.0}
    np.testing.assert_allclose(draws.mean(0), bernoulli.mean(logits)[0], atol=0.03)


def test_grey_dmol_samples_follow_its_probabilities():
    dmol = likelihoods.DiscretizedLogisticMixture(num_components=3)
    out = jnp.asarray(np.concatenate([RNG.normal(size=3), RNG.normal(size=3), [-2.0, -3.0, -1.0]]),
                      jnp.float32)
    draws = np.asarray(jax.jit(dmol.sample)(jax.random.key(1),
                                            jnp.broadcast_to(out, (50000, 1, 9))))[:, 0, 0]
    values = np.round((draws + 1) * 127.5)
    np.testing.assert_allclose(values, np.round(values, 4), atol=1e-4)  # on the 8-bit grid
    probs = np.exp(jax.jit(dmol.log_prob)(jnp.asarray(LEVELS[:, None, None], jnp.float32),
                                 jnp.broadcast_to(out, (256, 1, 9))))
    frequencies = np.bincount(values.astype(int), minlength=256) / len(draws)
    assert np.abs(np.cumsum(frequencies) - np.cumsum(probs)).max() < 0.01  # Kolmogorov distance


def test_rgb_dmol_samples_couple_the_channels():
    """One component: g = mu_g + alpha r + noise and b = mu_b + beta r + gamma g + noise."""
    means, coeffs = np.array([0.1, -0.2, 0.3]), np.array([0.5, -0.4, 0.3])
    out = np.concatenate([[0.0], means, [-4.0] * 3, np.arctanh(coeffs)])
    dmol = likelihoods.DiscretizedLogisticMixture(num_components=1)
    out_batch = jnp.broadcast_to(jnp.asarray(out, jnp.float32), (20000, 1, 10))
    draws = np.asarray(jax.jit(dmol.sample)(jax.random.key(2), out_batch))[:, 0]
    design = np.stack([np.ones(len(draws)), draws[:, 0], draws[:, 1]], axis=1)
    g_fit = np.linalg.lstsq(design[:, :2], draws[:, 1], rcond=None)[0]
    b_fit = np.linalg.lstsq(design, draws[:, 2], rcond=None)[0]
    np.testing.assert_allclose(g_fit, [means[1], coeffs[0]], atol=0.02)
    np.testing.assert_allclose(b_fit, [means[2], coeffs[1], coeffs[2]], atol=0.02)
    np.testing.assert_allclose(draws.mean(0), dmol.mean(jnp.asarray(out[None], jnp.float32))[0],
                               atol=0.005)


def test_dmol_components_start_apart_from_a_zero_decoder():
    """Zero decoder outputs give distinct components (spread over [-1, 1]), so they can
    differentiate under training; the mixture is then still a proper distribution."""
    dmol = likelihoods.get("dmol")
    grads = jax.jit(jax.grad(lambda out: dmol.log_prob(jnp.full((1, 1, 1), 0.5), out).sum()))(
        jnp.zeros((1, 1, 30)))
    mean_grads = np.asarray(grads[0, 0, 10:20])
    assert len(np.unique(np.round(mean_grads, 6))) == 10
    x = jnp.asarray(LEVELS[:, None, None], jnp.float32)
    total = jax.nn.logsumexp(jax.jit(dmol.log_prob)(x, jnp.zeros((256, 1, 30))))
    np.testing.assert_allclose(total, 0.0, atol=2e-5)
