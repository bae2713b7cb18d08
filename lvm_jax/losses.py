"""Pure loss and density functions on arrays.

Conventions, shared by every function here:
  * the leading axis is the batch; every other axis is an event axis;
  * results are per example, summed over the event axes, shape (batch,);
  * units are nats unless the name says otherwise.

Nothing here holds parameters or state, so each function can be dropped into
any JAX code, jitted, vmapped and differentiated.
"""

import math

import jax
import jax.numpy as jnp

LOG_2PI = math.log(2.0 * math.pi)


def _sum_events(values: jax.Array) -> jax.Array:
    """Sums over every axis but the leading (batch) axis: (batch, ...) -> (batch,)."""
    return values.reshape(values.shape[0], -1).sum(axis=-1)


def gaussian_log_prob(x: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """log N(x; mean, diag(exp(log_var))) in nats, shape (batch,).

    Args:
      x: (batch, ...) observations.
      mean, log_var: broadcastable to x; log_var is the natural log of the
        variance. Bound it before calling (the models do) so exp cannot overflow.
    """
    sq = jnp.square(x - mean) * jnp.exp(-log_var)
    return -0.5 * _sum_events(jnp.broadcast_to(LOG_2PI + log_var + sq, jnp.shape(x)))


def bernoulli_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
    """log Bernoulli(x; sigmoid(logits)) in nats, shape (batch,).

    x is in {0, 1} (or [0, 1] for the continuous relaxation used with grey
    values); written as x * l - softplus(l), which is stable for any logit.
    """
    return _sum_events(x * logits - jax.nn.softplus(logits))


def kl_std_normal_per_dim(mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """Analytic KL(N(mu_i, sigma_i^2) || N(0, 1)) of each dimension in nats, shape of `mean`:
    1/2 (sigma_i^2 + mu_i^2 - 1 - log sigma_i^2)."""
    return 0.5 * (jnp.exp(log_var) + jnp.square(mean) - 1.0 - log_var)


def kl_std_normal(mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """Analytic KL(N(mean, diag(exp(log_var))) || N(0, I)) in nats, shape (batch,).

    Summed (never averaged) over the latent dimensions, so that recon + KL is the ELBO.
    """
    return _sum_events(kl_std_normal_per_dim(mean, log_var))


def straight_through(z_e: jax.Array, z_q: jax.Array) -> jax.Array:
    """Value z_q, gradient of the identity to z_e (van den Oord et al. 2017).

    z_e + sg(z_q - z_e): the decoder sees the quantized vectors while its
    gradient flows unchanged into the encoder output.
    """
    return z_e + jax.lax.stop_gradient(z_q - z_e)


def vq_losses(z_e: jax.Array, z_q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """VQ-VAE codebook and commitment terms, each (batch,), summed over elements.

    codebook   = ||sg(z_e) - z_q||^2  (moves the codes towards the encoder outputs)
    commitment = ||z_e - sg(z_q)||^2  (keeps the encoder close to its codes)

    z_q must be the codebook vectors themselves, not the straight-through
    output, or the codebook receives no gradient.
    """
    codebook = _sum_events(jnp.square(jax.lax.stop_gradient(z_e) - z_q))
    commitment = _sum_events(jnp.square(z_e - jax.lax.stop_gradient(z_q)))
    return codebook, commitment


def iwae_bound(log_weights: jax.Array) -> jax.Array:
    """Importance-weighted bound log (1/k) sum_j w_j (Burda et al. 2016).

    Args:
      log_weights: (k, batch) values log p(x, z_j) - log q(z_j | x), z_j ~ q.
    Returns:
      (batch,) lower bound on log p(x) in nats; k = 1 gives the ELBO.
    """
    k = log_weights.shape[0]
    return jax.nn.logsumexp(log_weights, axis=0) - math.log(k)


def bits_per_dim(nll_nats: jax.Array, num_dims: int) -> jax.Array:
    """Converts a negative log-likelihood in nats per example to bits per dimension."""
    return nll_nats / (num_dims * math.log(2.0))


def logistic_mixture_params(params: jax.Array, num_channels: int):
    """Splits the discretized-logistic-mixture parameters of each pixel into their parts.

    Layout of the last axis, for C = `num_channels` channels, M components and
    the T = C(C - 1)/2 channel pairs (c, c') with c' < c in row-major order
    ((1, 0), (2, 0), (2, 1) for RGB: PixelCNN++'s coefficients of g on r, b on
    r and b on g):

      [ logits (M) | means (C*M) | log_scales (C*M) | coeffs (T*M) ]

    so the last axis has M (1 + 2C + T) entries: 3M for grey, 10M for RGB (the
    size of PixelCNN++'s, grouped by kind instead of interleaved by channel).
    means, log_scales and coeffs are channel-major: entry c*M + m belongs to
    channel (or pair) c and component m.

    Args:
      params: (..., M (1 + 2C + T)) raw decoder outputs.
      num_channels: C.
    Returns:
      (log_pi (..., M), means (..., C, M), log_scales (..., C, M), coeffs (..., T, M)):
      the log mixture weights (log-softmax of the logits), the logistic
      locations before the channel coupling, the log-scales clipped to [-7, 7]
      (below at -7 as in PixelCNN++; above so that the bin width in scale
      units, 2 exp(-log_scale) / 255, stays representable in float32) and the
      coupling coefficients tanh(raw) in (-1, 1).
    Raises:
      ValueError: the last axis does not hold a whole number of components.
    """
    c, t = num_channels, num_channels * (num_channels - 1) // 2
    per_component = 1 + 2 * c + t
    if params.shape[-1] % per_component:
        raise ValueError(
            f"a discretized logistic mixture over {c} channel(s) needs a multiple of "
            f"{per_component} parameters per pixel (M components x (1 + 2C + C(C-1)/2)); "
            f"got {params.shape[-1]}.")
    m = params.shape[-1] // per_component
    logits, means, log_scales, coeffs = jnp.split(params, [m, m + c * m, m + 2 * c * m], axis=-1)
    batch = params.shape[:-1]
    return (jax.nn.log_softmax(logits, axis=-1),
            means.reshape(*batch, c, m),
            jnp.clip(log_scales.reshape(*batch, c, m), -7.0, 7.0),
            jnp.tanh(coeffs.reshape(*batch, t, m)))


def logistic_mixture_locations(means: jax.Array, coeffs: jax.Array, x: jax.Array) -> jax.Array:
    """The channel-coupled locations mu~_cm = mu_cm + sum_{c' < c} coeff_{cc'm} x_c'm.

    Location c reads only the values of channels before c, so a sampler can
    fill x one channel at a time.

    Args:
      means: (..., C, M) and coeffs (..., T, M), from `logistic_mixture_params`.
      x: (..., C, 1) values shared by the components, or (..., C, M) one per component.
    Returns:
      (..., C, M) locations.
    """
    num_channels = means.shape[-2]
    # The pairs are few and static: an unrolled sum runs several times faster
    # on CPU than a scatter-add into the means.
    shifts = [jnp.zeros_like(means[..., 0, :]) for _ in range(num_channels)]
    pairs = [(c, before) for c in range(num_channels) for before in range(c)]
    for t, (c, before) in enumerate(pairs):
        shifts[c] = shifts[c] + coeffs[..., t, :] * x[..., before, :]
    return means + jnp.stack(shifts, axis=-2)


def discretized_logistic_mixture_log_prob(x: jax.Array, params: jax.Array) -> jax.Array:
    """log p(x) of the discretized mixture of logistics of PixelCNN++ (Salimans et al.
    2017) for 8-bit images scaled to [-1, 1], in nats, shape (batch,).

    Each pixel is a mixture of M components; within component m the channels
    are autoregressive, channel c a logistic with location
      mu~_cm = mu_cm + sum_{c' < c} coeff_{cc'm} x_c'
    (RGB: g depends on r, b on r and g) and scale s_cm. The 256 values
    x = k / 127.5 - 1 own the bins [x - 1/255, x + 1/255], except that the
    edges take the tails: value -1 gets the mass below -1 + 1/255 (its CDF
    starts at -inf) and value 1 the mass above 1 - 1/255 (up to +inf). So
      log p(x) = sum_pixels logsumexp_m [log pi_m + sum_c log P_cm(x_c | x_<c)],
    with every term in log space. For an interior bin, with a = (x + 1/255 - mu~)/s
    and b = (x - 1/255 - mu~)/s, the exact identity
      sigma(a) - sigma(b) = sigma(a) sigma(-b) (1 - e^(b - a))
    gives log P(bin) = log sigma(a) + log sigma(-b) + log(1 - e^(-2 / (255 s))),
    which never subtracts two nearly equal CDFs (PixelCNN++ does, and falls back
    to the density at the bin centre when the difference underflows).

    Args:
      x: (batch, ..., C) images in [-1, 1] on the 8-bit grid, channels last.
      params: (batch, ..., M (1 + 2C + C(C-1)/2)), laid out as in
        `logistic_mixture_params`.
    Returns:
      (batch,) log-probability mass in nats, summed over pixels and channels.
    """
    if params.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"params {params.shape} and x {x.shape} must agree on every axis "
                         "but the last (channels of x, mixture parameters of params).")
    log_pi, means, log_scales, coeffs = logistic_mixture_params(params, x.shape[-1])
    x = x[..., None]  # (..., C, 1) against the components (..., C, M)
    means = logistic_mixture_locations(means, coeffs, x)
    inv_scale = jnp.exp(-log_scales)
    upper = inv_scale * (x - means + 1.0 / 255.0)
    lower = inv_scale * (x - means - 1.0 / 255.0)
    log_cdf_upper = -jax.nn.softplus(-upper)  # log sigma(upper): the whole mass of value -1
    log_sf_lower = -jax.nn.softplus(lower)  # log (1 - sigma(lower)): the whole mass of value 1
    log_bin = log_cdf_upper + log_sf_lower + jnp.log(-jnp.expm1(-2.0 / 255.0 * inv_scale))
    log_p = jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, log_bin))
    return _sum_events(jax.nn.logsumexp(log_pi + log_p.sum(axis=-2), axis=-1))
