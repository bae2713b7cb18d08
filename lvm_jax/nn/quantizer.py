"""Vector quantization bottleneck of the VQ-VAE (van den Oord et al. 2017).

In the paper's names: the encoder output z_e(x) in R^D is replaced by the
nearest of K codebook vectors e_1..e_K,

    k = argmin_j ||z_e(x) - e_j||^2,    z_q(x) = e_k,

and the decoder sees z_q through the straight-through estimator. The codebook
is learned in one of two ways, one class each (as Haiku's VectorQuantizer and
VectorQuantizerEMA):

  * `VectorQuantizer`, by gradient:  loss = ||sg(z_e) - e||^2 + beta ||z_e - sg(e)||^2;
  * `VectorQuantizerEMA`, by exponential moving averages (appendix A.1 of the
    paper): each code keeps the running count N_i and sum m_i of the encoder
    outputs assigned to it, e_i = m_i / N_i, and the loss keeps only
    beta ||z_e - sg(e)||^2.

Remedies for codebook collapse (few codes used), each off by default. The EMA
quantizer's alone (they overwrite the codebook, which a gradient-trained
quantizer's optimizer owns), each its own method:

  * dead-code restart (SoundStream, Zeghidour et al. 2021): a code unused for
    some steps moves onto an encoder output of the batch (`_restart_dead_codes`);
  * k-means initialisation: the first training step sets the codebook to the
    k-means centroids (k-means++ seeding, Lloyd iterations) of that batch's
    encoder outputs, so no code starts far from the data (`_kmeans_init_once`).

Both quantizers' own, each a step of `search_space` or `_quantize`:

  * factorized, l2-normalised codes (Yu et al. 2022, ViT-VQGAN): z_e is
    projected to a small lookup_dim, the search is by cosine similarity
    between unit vectors, and the chosen code is projected back;
  * the rotation trick (Fifty et al. 2024): the decoder sees z_e rotated and
    rescaled onto its code instead of the straight-through copy.

Finite scalar quantization, which has no learned codebook, is the sibling
module `lvm_jax.nn.fsq.FiniteScalarQuantizer`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvm_jax import losses

STATS = "vq_stats"


def _uniform_init(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """U(-1/K, 1/K) for a (K, D) codebook, as in the reference implementation."""
    bound = 1.0 / shape[0]
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| over the last axis; a zero vector stays zero."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x**2, axis=-1, keepdims=True), eps))


def squared_distances(z: jax.Array, e: jax.Array) -> jax.Array:
    """||z_n - e_k||^2, (N, D) and (K, D) -> (N, K).

    ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2 costs an (N, K) matmul, never an
    (N, K, D) tensor. Full precision: TPUs default to bfloat16 passes, which
    would flip near ties.
    """
    return (jnp.sum(z**2, axis=1, keepdims=True)
            - 2.0 * jnp.dot(z, e.T, precision=jax.lax.Precision.HIGHEST)
            + jnp.sum(e**2, axis=1))


def usage_statistics(k: jax.Array, num_codes: int) -> tuple[jax.Array, jax.Array]:
    """(counts (K,) int32 of the codes in k, perplexity () = exp of the entropy of their
    frequencies, between 1 and K)."""
    counts = jnp.bincount(k.ravel(), length=num_codes)
    perplexity = jnp.exp(jnp.sum(jax.scipy.special.entr(counts / k.size)))
    return counts.astype(jnp.int32), perplexity


def kmeans_plus_plus(rng: jax.Array, z: jax.Array, num_codes: int) -> jax.Array:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): indices (K,) of K rows of z (N, D).

    The first row is uniform; each next one is drawn with probability
    proportional to its squared distance to the nearest row already chosen,
    with the key fold_in(rng, i) for the i-th pick.
    """
    first = jax.random.randint(jax.random.fold_in(rng, 0), (), 0, z.shape[0])

    def pick(i, carry):
        picks, nearest = carry
        # log 0 = -inf: a row already chosen (or a duplicate of one) is never drawn again.
        j = jax.random.categorical(jax.random.fold_in(rng, i), jnp.log(nearest))
        return picks.at[i].set(j), jnp.minimum(nearest, jnp.sum((z - z[j]) ** 2, axis=1))

    picks = jnp.zeros(num_codes, jnp.int32).at[0].set(first)
    picks, _ = jax.lax.fori_loop(1, num_codes, pick,
                                 (picks, jnp.sum((z - z[first]) ** 2, axis=1)))
    return picks


def lloyd(z: jax.Array, centroids: jax.Array, iterations: int) -> jax.Array:
    """`iterations` steps of Lloyd's k-means from centroids (K, D) on z (N, D): each centroid
    moves to the mean of the rows nearest to it; one that no row chooses stays."""
    num_codes = centroids.shape[0]

    def step(_, c):
        k = jnp.argmin(squared_distances(z, c), axis=1)
        sums = jax.ops.segment_sum(z, k, num_segments=num_codes)
        sizes = jax.ops.segment_sum(jnp.ones_like(k, z.dtype), k, num_segments=num_codes)
        return jnp.where(sizes[:, None] > 0, sums / jnp.maximum(sizes, 1.0)[:, None], c)

    return jax.lax.fori_loop(0, iterations, step, centroids)


def rotation_trick(z_e: jax.Array, z_q: jax.Array) -> jax.Array:
    """Value z_q; gradient through a rotation of z_e onto z_q (Fifty et al. 2024, arXiv 2410.06424).

    z_e, z_q: (..., D). The output is lambda R z_e with lambda = ||z_q|| / ||z_e|| and R
    the rotation taking e = z_e/||z_e|| to q = z_q/||z_q||,

        R = I - 2 r r^T + 2 q e^T,   r = (e + q) / ||e + q||,

    both held constant (stop_gradient), so the gradient reaching z_e is
    lambda R^T g where straight-through would pass g unchanged: the angle between
    z_e and its code, and their norms, shape the encoder's update.
    """
    e = jax.lax.stop_gradient(l2_normalize(z_e))
    q = jax.lax.stop_gradient(l2_normalize(z_q))
    r = jax.lax.stop_gradient(l2_normalize(e + q))
    # ||z_q|| / ||z_e||, finite for z_e = 0 (whose rotation is 0 anyway).
    scale = jax.lax.stop_gradient(jnp.linalg.norm(z_q, axis=-1, keepdims=True)
                                  / jnp.maximum(jnp.linalg.norm(z_e, axis=-1, keepdims=True),
                                                1e-12))

    def dot(a, b):
        return jnp.sum(a * b, axis=-1, keepdims=True)

    # R z_e without forming R: (I - 2 r r^T + 2 q e^T) z_e.
    return scale * (z_e - 2.0 * r * dot(r, z_e) + 2.0 * q * dot(e, z_e))


def _laplace_smoothed(cluster_size: jax.Array, epsilon: float) -> jax.Array:
    """(N_i + eps) / (n + K eps) * n with n = sum_i N_i: no code has size 0, the total is kept."""
    n = cluster_size.sum()
    return (cluster_size + epsilon) / (n + cluster_size.shape[0] * epsilon) * n


class VectorQuantizer(nn.Module):
    """Maps encoder outputs z_e (batch, ..., code_dim) to their nearest codebook vectors; the
    codebook is a parameter trained by gradient (its loss term below).

    Attributes:
      num_codes: K, the number of codebook vectors.
      code_dim: D, the size of each encoder output; the last axis of z_e.
      commitment_cost: beta, the weight of the commitment term (1.0 in the
        course solution).
      cosine: l2-normalise the codes and the (projected) encoder outputs, so the
        nearest code is the one of highest cosine similarity (ViT-VQGAN).
      lookup_dim: if set, the search runs in this smaller dimension: z_e is
        projected by a learned Dense(lookup_dim) (params/project_in), the codebook
        is (K, lookup_dim), and the chosen code is projected back by
        Dense(code_dim) (params/project_out) for the decoder (ViT-VQGAN's
        factorized codes).
      rotation_trick: feed the decoder `rotation_trick(z_e, z_q)` instead of the
        straight-through z_e + sg(z_q - z_e).

    Variables: the codebook is the parameter params/embeddings (K, d), d =
    lookup_dim or code_dim.
    """

    num_codes: int = 128
    code_dim: int = 256
    commitment_cost: float = 1.0
    cosine: bool = False
    lookup_dim: int | None = None
    rotation_trick: bool = False

    def __post_init__(self):
        if self.lookup_dim is not None and not 1 <= self.lookup_dim <= self.code_dim:
            raise ValueError(f"lookup_dim={self.lookup_dim} must be between 1 and "
                             f"code_dim={self.code_dim}: the lookup projects z_e down, not up.")
        super().__post_init__()

    @property
    def search_dim(self) -> int:
        """d, the dimension of the codes and of the nearest-code search."""
        return self.lookup_dim or self.code_dim

    def setup(self):
        self._setup_projections()
        self.embeddings = self.param("embeddings", _uniform_init,
                                     (self.num_codes, self.search_dim))

    def _setup_projections(self):
        if self.lookup_dim is not None:
            self.project_in = nn.Dense(self.lookup_dim, name="project_in")
            self.project_out = nn.Dense(self.code_dim, name="project_out")

    def codebook(self) -> jax.Array:
        """The current codebook e, (K, d); unit rows with cosine=True."""
        return self._normalized(self.embeddings)

    def _normalized(self, e: jax.Array) -> jax.Array:
        return l2_normalize(e) if self.cosine else e

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Decoder inputs of integer codes: (...,) -> (..., code_dim); decodes prior samples."""
        e = jnp.take(self.codebook(), indices, axis=0)
        return self.project_out(e) if self.lookup_dim is not None else e

    def __call__(self, z_e: jax.Array, train: bool = False, rng: jax.Array | None = None) -> dict:
        """Quantizes z_e and computes the VQ loss terms.

        Args:
          z_e: (batch, ..., D) float encoder outputs, e.g. (batch, H, W, D).
          train, rng: unused (the EMA quantizer's), so that both quantizers take
            the same call.

        Returns a dict, where z is z_e as searched (projected to lookup_dim,
        normalised with cosine; z = z_e by default), (batch, ..., d):
          quantized: (batch, ..., D) the decoder input, value z_q (projected back
            to D with lookup_dim): by default z + sg(z_q - z), whose gradient
            passes unchanged to z; with rotation_trick, rotation_trick(z, z_q).
          codes: (batch, ..., d) z_q, the chosen codebook vectors.
          indices: (batch, ...) int32 k, the chosen codes.
          codebook_loss: (batch,) ||sg(z) - z_q||^2 and
          commitment_loss: (batch,) ||z - sg(z_q)||^2, per example, summed over
            the latent positions and d (squared units of z; divide by
            codes[0].size for the per-element mean the course reports).
          loss: (batch,) the VQ part of the objective: codebook_loss +
            beta * commitment_loss (the EMA quantizer: beta * commitment_loss).
          perplexity: () exp of the entropy of the average code usage in this
            batch, between 1 and K. It depends on the batch size: for codebook
            usage over an epoch, accumulate `counts`.
          counts: (K,) int32 number of vectors of this batch assigned to each code.
        """
        self._check(z_e)
        out = self._quantize(self.search_space(z_e), self.codebook())
        return {**out, "loss": out["loss"] + out["codebook_loss"]}

    def _check(self, z_e: jax.Array) -> None:
        if not jnp.issubdtype(z_e.dtype, jnp.floating):
            raise TypeError(f"z_e must be floating point, got dtype {z_e.dtype}")
        if z_e.ndim < 2 or z_e.shape[-1] != self.code_dim:
            raise ValueError(
                f"z_e must have shape (batch, ..., code_dim={self.code_dim}), got {z_e.shape}"
            )

    def search_space(self, z_e: jax.Array) -> jax.Array:
        """z (batch, ..., d): z_e projected to lookup_dim and l2-normalised, as set."""
        z = self.project_in(z_e) if self.lookup_dim is not None else z_e
        return l2_normalize(z) if self.cosine else z

    def _quantize(self, z_s: jax.Array, e: jax.Array) -> dict:
        """The outputs of __call__ for z_s (batch, ..., d) searched in codebook e (K, d), the
        loss without its codebook term."""
        k = jnp.argmin(squared_distances(z_s.reshape(-1, self.search_dim), e), axis=1)
        z_q = jnp.take(e, k, axis=0).reshape(z_s.shape)
        codebook_loss, commitment_loss = losses.vq_losses(z_s, z_q)
        counts, perplexity = usage_statistics(k, self.num_codes)
        quantized = (rotation_trick if self.rotation_trick else losses.straight_through)(z_s, z_q)
        if self.lookup_dim is not None:
            quantized = self.project_out(quantized)
        return {
            "quantized": quantized,
            "codes": z_q,
            "indices": k.reshape(z_s.shape[:-1]).astype(jnp.int32),
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment_loss,
            "loss": self.commitment_cost * commitment_loss,
            "perplexity": perplexity,
            "counts": counts,
        }


class VectorQuantizerEMA(VectorQuantizer):
    """The vector quantizer whose codebook follows exponential moving averages of the encoder
    outputs assigned to each code (appendix A.1 of van den Oord et al. 2017), with the
    optional dead-code restart and k-means initialisation.

    Attributes (beyond VectorQuantizer's, whose commitment_cost here defaults to
    0.25, as usual with EMA):
      decay: gamma of the moving averages.
      epsilon: Laplace smoothing of the cluster sizes; keeps e_i = m_i / N_i
        finite for a code that no encoder output chooses.
      restart_after: if set, a code chosen by no encoder output in this many
        consecutive training steps is restarted: its statistics are reset to one
        randomly chosen encoder output of the current batch (m_i = z, N_i = 1),
        so it re-enters where the data is. Distinct codes get distinct outputs
        whenever the batch has at least K of them. The choice is a deterministic
        function of the `rng` given to __call__.
      kmeans_iters: if > 0, the first training step replaces the codebook by
        k-means of that batch's (projected, normalised) encoder outputs:
        `kmeans_plus_plus` seeding with the key fold_in(rng, 1), then this many
        `lloyd` iterations (m_i = centroid, N_i = 1), before quantizing. The flag
        vq_stats/initialized records it, so a resumed run never redoes it.

    Variables: the codebook lives in the collection 'vq_stats': cluster_size N
    (K,), embed_sum m (K, d), with restart_after unused_steps (K,) int32, with
    kmeans_iters initialized () bool; pass mutable=['vq_stats'] to `apply` when
    train=True. The statistics are sums over the whole batch: under `jax.jit`
    with the batch axis sharded over a device mesh, they are global sums (XLA
    inserts the all-reduce), so every replica holds the same codebook; so is the
    k-means of the first batch.
    """

    commitment_cost: float = 0.25
    decay: float = 0.99
    epsilon: float = 1e-5
    restart_after: int | None = None
    kmeans_iters: int = 0

    def __post_init__(self):
        if self.kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0 Lloyd iterations, got {self.kmeans_iters}")
        super().__post_init__()

    def setup(self):
        shape = (self.num_codes, self.search_dim)
        self._setup_projections()
        # N = 1 and m = e at the start: every code looks seen once at its initial
        # value, so a code never chosen keeps it (N and m decay alike) instead of
        # collapsing to 0 or growing as m / eps.
        self.cluster_size = self.variable(STATS, "cluster_size", jnp.ones, (self.num_codes,))
        self.embed_sum = self.variable(
            STATS, "embed_sum", lambda: _uniform_init(self.make_rng("params"), shape)
        )
        if self.restart_after is not None:
            self.unused_steps = self.variable(
                STATS, "unused_steps", jnp.zeros, (self.num_codes,), jnp.int32
            )
        if self.kmeans_iters:
            self.initialized = self.variable(STATS, "initialized", jnp.zeros, (), jnp.bool_)

    def codebook(self) -> jax.Array:
        """The current codebook e = m / N (N Laplace-smoothed), (K, d); unit rows with
        cosine=True."""
        return self._normalized(self.embed_sum.value / _laplace_smoothed(
            self.cluster_size.value, self.epsilon)[:, None])

    def __call__(self, z_e: jax.Array, train: bool = False, rng: jax.Array | None = None) -> dict:
        """Quantizes z_e as VectorQuantizer does (the same outputs; the loss is
        beta * commitment_loss) and, with train=True, then updates the codebook
        statistics from this batch (after quantizing it with the codebook as it
        was), first initialising the codebook by k-means if kmeans_iters is set
        and it is not done yet.

        rng: PRNG key for restarts and k-means; needed when train=True and
        restart_after or kmeans_iters is set.
        """
        self._check(z_e)
        if train and (self.restart_after is not None or self.kmeans_iters) and rng is None:
            raise ValueError("train=True with restart_after or kmeans_iters set needs an rng")
        z_s = self.search_space(z_e)
        z = z_s.reshape(-1, self.search_dim)
        updating = train and not self.is_initializing()
        if updating and self.kmeans_iters:
            self._kmeans_init_once(jax.random.fold_in(rng, 1), z)
        out = self._quantize(z_s, self.codebook())
        if updating:
            self._ema_update(z, out["indices"].reshape(-1), out["counts"], rng)
        return out

    def _kmeans_init_once(self, rng: jax.Array, z: jax.Array):
        """On the first call only (vq_stats/initialized), m_i = k-means centroid i of z (N, d)
        and N_i = 1; later calls keep the statistics. A `lax.cond`, so it compiles once."""

        def kmeans():
            centroids = lloyd(z, z[kmeans_plus_plus(rng, z, self.num_codes)], self.kmeans_iters)
            return centroids, jnp.ones_like(self.cluster_size.value)

        def keep():
            return self.embed_sum.value, self.cluster_size.value

        self.embed_sum.value, self.cluster_size.value = jax.lax.cond(
            self.initialized.value, keep, kmeans)
        self.initialized.value = jnp.array(True)

    def _ema_update(self, z: jax.Array, k: jax.Array, counts: jax.Array, rng: jax.Array | None):
        """N_i <- gamma N_i + (1 - gamma) n_i,  m_i <- gamma m_i + (1 - gamma) sum_{j: k_j = i} z_j,
        then the dead-code restart if set.

        z: (N, d) encoder outputs of the batch, k: (N,) their codes, counts: (K,) n_i.
        """
        gamma = self.decay
        cluster_size = gamma * self.cluster_size.value + (1.0 - gamma) * counts
        embed_sum = gamma * self.embed_sum.value + (1.0 - gamma) * jax.ops.segment_sum(
            z, k, num_segments=self.num_codes
        )
        if self.restart_after is not None:
            embed_sum, cluster_size = self._restart_dead_codes(z, counts, embed_sum,
                                                               cluster_size, rng)
        self.cluster_size.value = cluster_size
        self.embed_sum.value = embed_sum

    def _restart_dead_codes(self, z: jax.Array, counts: jax.Array, embed_sum: jax.Array,
                            cluster_size: jax.Array, rng: jax.Array):
        """(m, N) with every code unused for restart_after steps reset onto a randomly chosen
        row of z (N, d) (m_i = z, N_i = 1); counts (K,) this batch's use of each code."""
        unused = jnp.where(counts > 0, 0, self.unused_steps.value + 1)
        dead = unused >= self.restart_after
        picks = jax.random.choice(
            rng, z.shape[0], (self.num_codes,), replace=z.shape[0] < self.num_codes
        )
        self.unused_steps.value = jnp.where(dead, 0, unused)
        return jnp.where(dead[:, None], z[picks], embed_sum), jnp.where(dead, 1.0, cluster_size)
