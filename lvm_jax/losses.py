"""Pure loss and density functions on arrays.

Conventions, shared by every function here:
  * the leading axis is the batch; every other axis is an event axis;
  * results are per example, summed over the event axes, shape (batch,); a
    batch of 0 gives an empty (0,) result;
  * units are nats unless the name says otherwise;
  * arguments are checked when the function is traced (shapes and dtypes are
    static under `jit`, so the checks cost nothing at run time): a mismatch
    raises ValueError naming the function, the argument and both shapes. A
    parameter per element has the shape of the data, except where a docstring
    allows an event broadcast: a scalar, or the data's rank and batch size with
    size 1 on the event axes it broadcasts over (one variance for every pixel
    of an example, say).
    Nothing broadcasts silently, and densities need floating-point inputs
    (uint8 images must be scaled first).

Nothing here holds parameters or state, so each function can be dropped into
any JAX code, jitted, vmapped and differentiated.
"""

import math
import numbers

import jax
import jax.numpy as jnp

LOG_2PI = math.log(2.0 * math.pi)


def _check(fn: str, data: tuple[str, jax.Array], same_shape: dict | None = None,
           event_broadcast: dict | None = None) -> None:
    """Trace-time argument checks shared by every function of this module.

    Args:
      fn: the public function's name, for the message.
      data: (name, array) of the argument that sets the shape (batch, ...): at
        least one axis, the batch.
      same_shape: {name: array} of arguments that must have exactly data's shape.
      event_broadcast: {name: array} of arguments that may also be a scalar, or
        have data's rank and batch size with size 1 on some event axes.
    Raises:
      ValueError: an argument is not floating point, or its shape breaks the rule.
    """
    data_name, data_value = data
    data_shape = jnp.shape(data_value)
    same_shape, event_broadcast = same_shape or {}, event_broadcast or {}
    _check_floating(fn, {data_name: data_value, **same_shape, **event_broadcast})
    if len(data_shape) < 1:
        raise ValueError(f"{fn}: {data_name} has shape {data_shape}; it needs a leading batch axis.")
    for name, value in same_shape.items():
        if jnp.shape(value) != data_shape:
            raise _shape_error(fn, name, value, data_name, data_shape, f"{data_name}'s shape")
    for name, value in event_broadcast.items():
        shape = jnp.shape(value)
        if not (shape == () or (len(shape) == len(data_shape) and shape[0] == data_shape[0]
                                and all(s in (1, d) for s, d in zip(shape[1:], data_shape[1:])))):
            raise _shape_error(fn, name, value, data_name, data_shape,
                               f"{data_name}'s shape, a scalar, or {data_name}'s rank and batch "
                               "size with size 1 on the event axes it broadcasts over")


def _check_floating(fn: str, arrays: dict) -> None:
    """Densities of integer inputs would be wrong (uint8 arithmetic wraps), so refuse them."""
    for name, value in arrays.items():
        dtype = jnp.result_type(value)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{fn}: {name} has dtype {dtype}; it must be floating point "
                             "(scale integer images to floats first).")


def _shape_error(fn: str, name: str, value, data_name: str, data_shape: tuple,
                 rule: str) -> ValueError:
    return ValueError(f"{fn}: {name} has shape {jnp.shape(value)} but {data_name} has shape "
                      f"{data_shape}; {name} must have {rule}.")


def _sum_events(values: jax.Array) -> jax.Array:
    """Sums over every axis but the leading (batch) axis: (batch, ...) -> (batch,).

    An explicit event size, not -1: reshape cannot infer it from an empty batch.
    """
    return values.reshape(values.shape[0], math.prod(values.shape[1:])).sum(axis=-1)


def gaussian_log_prob(x: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """log N(x; mean, diag(exp(log_var))) in nats, shape (batch,).

    Args:
      x: (batch, ...) observations.
      mean, log_var: x's shape, or an event broadcast of it (a scalar, or x's
        rank and batch size with size 1 on event axes); log_var is the natural
        log of the variance. Bound it before calling (the models do) so exp
        cannot overflow.
    """
    _check("gaussian_log_prob", ("x", x), event_broadcast={"mean": mean, "log_var": log_var})
    sq = jnp.square(x - mean) * jnp.exp(-log_var)
    return -0.5 * _sum_events(LOG_2PI + log_var + sq)  # x's shape: the checks allow no larger


def bernoulli_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
    """log Bernoulli(x; sigmoid(logits)) in nats, shape (batch,).

    x: (batch, ...) floats in {0, 1} (or [0, 1] for the continuous relaxation
    used with grey values); logits: x's shape. Written as x * l - softplus(l),
    which is stable for any logit.
    """
    _check("bernoulli_log_prob", ("x", x), same_shape={"logits": logits})
    return _sum_events(x * logits - jax.nn.softplus(logits))


def kl_std_normal_per_dim(mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """Analytic KL(N(mu_i, sigma_i^2) || N(0, 1)) of each dimension in nats, shape of `mean`:
    1/2 (sigma_i^2 + mu_i^2 - 1 - log sigma_i^2).

    mean: (batch, ...); log_var: mean's shape, or an event broadcast of it (a
    scalar, or mean's rank and batch size with size 1 on event axes).
    """
    _check("kl_std_normal_per_dim", ("mean", mean), event_broadcast={"log_var": log_var})
    return _kl_std_normal_per_dim(mean, log_var)


def kl_std_normal(mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """Analytic KL(N(mean, diag(exp(log_var))) || N(0, I)) in nats, shape (batch,).

    Summed (never averaged) over the latent dimensions, so that recon + KL is the ELBO.
    Shapes as in `kl_std_normal_per_dim`.
    """
    _check("kl_std_normal", ("mean", mean), event_broadcast={"log_var": log_var})
    return _sum_events(_kl_std_normal_per_dim(mean, log_var))


def _kl_std_normal_per_dim(mean: jax.Array, log_var: jax.Array) -> jax.Array:
    return 0.5 * (jnp.exp(log_var) + jnp.square(mean) - 1.0 - log_var)


def straight_through(z_e: jax.Array, z_q: jax.Array) -> jax.Array:
    """Value z_q, gradient of the identity to z_e (van den Oord et al. 2017).

    z_e + sg(z_q - z_e): the decoder sees the quantized vectors while its
    gradient flows unchanged into the encoder output. z_e and z_q: the same
    shape (batch, ...).
    """
    _check("straight_through", ("z_e", z_e), same_shape={"z_q": z_q})
    return z_e + jax.lax.stop_gradient(z_q - z_e)


def vq_losses(z_e: jax.Array, z_q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """VQ-VAE codebook and commitment terms, each (batch,), summed over elements.

    codebook   = ||sg(z_e) - z_q||^2  (moves the codes towards the encoder outputs)
    commitment = ||z_e - sg(z_q)||^2  (keeps the encoder close to its codes)

    z_q must be the codebook vectors themselves, not the straight-through
    output, or the codebook receives no gradient. z_e and z_q: the same shape
    (batch, ...).
    """
    _check("vq_losses", ("z_e", z_e), same_shape={"z_q": z_q})
    codebook = _sum_events(jnp.square(jax.lax.stop_gradient(z_e) - z_q))
    commitment = _sum_events(jnp.square(z_e - jax.lax.stop_gradient(z_q)))
    return codebook, commitment


def iwae_bound(log_weights: jax.Array) -> jax.Array:
    """Importance-weighted bound log (1/k) sum_j w_j (Burda et al. 2016).

    Args:
      log_weights: (k, batch) values log p(x, z_j) - log q(z_j | x), z_j ~ q:
        the samples on axis 0, k >= 1. A (batch, k) array has the same rank and
        cannot be told apart: transpose it first.
    Returns:
      (batch,) lower bound on log p(x) in nats; k = 1 gives the ELBO.
    """
    shape = jnp.shape(log_weights)
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"iwae_bound: log_weights has shape {shape}; it must be (k, batch) "
                         "with k >= 1 samples on axis 0.")
    _check_floating("iwae_bound", {"log_weights": log_weights})
    return jax.nn.logsumexp(log_weights, axis=0) - math.log(shape[0])


def bits_per_dim(nll_nats: jax.Array, num_dims: int) -> jax.Array:
    """Converts a negative log-likelihood in nats (per example, any shape) to bits per
    dimension; num_dims >= 1, a Python integer (static under `jax.jit`), is the number of
    dimensions of one example."""
    _check_floating("bits_per_dim", {"nll_nats": nll_nats})
    if isinstance(num_dims, bool) or not isinstance(num_dims, numbers.Integral):
        raise ValueError(f"bits_per_dim: num_dims is {num_dims!r}; it must be a Python integer "
                         "(under jax.jit, a static argument).")
    if num_dims < 1:
        raise ValueError(f"bits_per_dim: num_dims is {num_dims}; it must be at least 1.")
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
      ValueError: params is not floating point, or its last axis does not hold a
        whole number of components.
    """
    _check("logistic_mixture_params", ("params", params))
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
    fn = "logistic_mixture_locations"
    _check(fn, ("means", means))
    _check_floating(fn, {"coeffs": coeffs, "x": x})
    *batch, num_channels, m = means.shape
    pairs = [(c, before) for c in range(num_channels) for before in range(c)]
    if coeffs.shape != (*batch, len(pairs), m):
        raise _shape_error(fn, "coeffs", coeffs, "means", means.shape,
                           f"shape (..., C(C-1)/2 = {len(pairs)}, M) with the means' other axes")
    if x.shape not in (means.shape, (*batch, num_channels, 1)):
        raise _shape_error(fn, "x", x, "means", means.shape, "the means' shape or size 1 on the last axis")
    # The pairs are few and static: an unrolled sum runs several times faster
    # on CPU than a scatter-add into the means.
    shifts = [jnp.zeros_like(means[..., 0, :]) for _ in range(num_channels)]
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
    fn = "discretized_logistic_mixture_log_prob"
    _check(fn, ("x", x))
    _check_floating(fn, {"params": params})
    if x.ndim < 2:
        raise ValueError(f"{fn}: x has shape {x.shape}; it must be (batch, ..., C), channels last.")
    if jnp.shape(params)[:-1] != x.shape[:-1]:
        raise _shape_error(fn, "params", params, "x", x.shape,
                           "x's shape on every axis but the last (x's channels, the mixture's "
                           "parameters of params)")
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
