"""Vector quantization bottleneck of the VQ-VAE (van den Oord et al. 2017).

In the paper's names: the encoder output z_e(x) in R^D is replaced by the
nearest of K codebook vectors e_1..e_K,

    k = argmin_j ||z_e(x) - e_j||^2,    z_q(x) = e_k,

and the decoder sees z_q through the straight-through estimator. The codebook
is learned in one of two ways:

  * by gradient (ema=False):  loss = ||sg(z_e) - e||^2 + beta ||z_e - sg(e)||^2;
  * by exponential moving averages (ema=True, appendix A.1 of the paper): each
    code keeps the running count N_i and sum m_i of the encoder outputs
    assigned to it, e_i = m_i / N_i, and the loss keeps only beta ||z_e - sg(e)||^2.
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


def _laplace_smoothed(cluster_size: jax.Array, epsilon: float) -> jax.Array:
    """(N_i + eps) / (n + K eps) * n with n = sum_i N_i: no code has size 0, the total is kept."""
    n = cluster_size.sum()
    return (cluster_size + epsilon) / (n + cluster_size.shape[0] * epsilon) * n


class VectorQuantizer(nn.Module):
    """Maps encoder outputs z_e (batch, ..., code_dim) to their nearest codebook vectors.

    Attributes:
      num_codes: K, the number of codebook vectors.
      code_dim: D, the size of each vector; the last axis of z_e.
      commitment_cost: beta, the weight of the commitment term (1.0 in the
        course solution; 0.25 is usual with ema=True).
      ema: learn the codebook by exponential moving averages, not gradients.
      decay: gamma of the moving averages (ema only).
      epsilon: Laplace smoothing of the cluster sizes (ema only); keeps
        e_i = m_i / N_i finite for a code that no encoder output chooses.
      restart_after: if set (ema only), a code chosen by no encoder output in
        this many consecutive training steps is restarted: its statistics are
        reset to one randomly chosen encoder output of the current batch
        (m_i = z, N_i = 1), so it re-enters where the data is. Distinct codes
        get distinct outputs whenever the batch has at least K of them. The
        choice is a deterministic function of the `rng` given to __call__.

    Variables: with ema=False the codebook is the parameter
    params/embeddings (K, D). With ema=True it lives in the collection
    'vq_stats': cluster_size N (K,), embed_sum m (K, D) and, with
    restart_after, unused_steps (K,) int32; pass mutable=['vq_stats'] to
    `apply` when train=True. The statistics are sums over the whole batch:
    under `jax.jit` with the batch axis sharded over a device mesh, they are
    global sums (XLA inserts the all-reduce), so every replica holds the same
    codebook.
    """

    num_codes: int = 128
    code_dim: int = 256
    commitment_cost: float = 1.0
    ema: bool = False
    decay: float = 0.99
    epsilon: float = 1e-5
    restart_after: int | None = None

    def __post_init__(self):
        if self.restart_after is not None and not self.ema:
            raise ValueError(
                "restart_after needs ema=True: the gradient-trained codebook is a "
                "parameter owned by the optimizer, which the quantizer cannot overwrite."
            )
        super().__post_init__()

    def setup(self):
        shape = (self.num_codes, self.code_dim)
        if not self.ema:
            self.embeddings = self.param("embeddings", _uniform_init, shape)
            return
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

    def codebook(self) -> jax.Array:
        """The current codebook e, (K, D)."""
        if not self.ema:
            return self.embeddings
        cluster_size = _laplace_smoothed(self.cluster_size.value, self.epsilon)
        return self.embed_sum.value / cluster_size[:, None]

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codebook vectors of integer codes: (...,) -> (..., D); decodes prior samples."""
        return jnp.take(self.codebook(), indices, axis=0)

    def __call__(self, z_e: jax.Array, train: bool = False, rng: jax.Array | None = None) -> dict:
        """Quantizes z_e and computes the VQ loss terms.

        Args:
          z_e: (batch, ..., D) float encoder outputs, e.g. (batch, H, W, D).
          train: with ema=True, update the codebook statistics from this batch
            (after quantizing it with the codebook as it was).
          rng: PRNG key choosing the restarted codes; needed when train=True and
            restart_after is set.

        Returns a dict:
          quantized: (batch, ..., D) z_e + sg(z_q - z_e), the decoder input: value
            z_q, gradient passed unchanged to z_e.
          codes: (batch, ..., D) z_q, the chosen codebook vectors.
          indices: (batch, ...) int32 k, the chosen codes.
          codebook_loss: (batch,) ||sg(z_e) - z_q||^2 and
          commitment_loss: (batch,) ||z_e - sg(z_q)||^2, per example, summed over
            the latent positions and D (squared units of z_e; divide by
            z_e[0].size for the per-element mean the course reports).
          loss: (batch,) the VQ part of the objective: codebook_loss +
            beta * commitment_loss, or beta * commitment_loss with ema=True.
          perplexity: () exp of the entropy of the average code usage in this
            batch, between 1 and K. It depends on the batch size: for codebook
            usage over an epoch, accumulate `counts`.
          counts: (K,) int32 number of vectors of this batch assigned to each code.
        """
        if not jnp.issubdtype(z_e.dtype, jnp.floating):
            raise TypeError(f"z_e must be floating point, got dtype {z_e.dtype}")
        if z_e.ndim < 2 or z_e.shape[-1] != self.code_dim:
            raise ValueError(
                f"z_e must have shape (batch, ..., code_dim={self.code_dim}), got {z_e.shape}"
            )
        if train and self.restart_after is not None and rng is None:
            raise ValueError("train=True with restart_after set needs an rng to choose restarts")

        e = self.codebook()
        z = z_e.reshape(-1, self.code_dim)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2 costs an (N, K) matmul, never an
        # (N, K, D) tensor. Full precision: TPUs default to bfloat16 passes, which
        # would flip near ties.
        distances = (
            jnp.sum(z**2, axis=1, keepdims=True)
            - 2.0 * jnp.dot(z, e.T, precision=jax.lax.Precision.HIGHEST)
            + jnp.sum(e**2, axis=1)
        )
        k = jnp.argmin(distances, axis=1)
        z_q = jnp.take(e, k, axis=0).reshape(z_e.shape)

        codebook_loss, commitment_loss = losses.vq_losses(z_e, z_q)
        loss = self.commitment_cost * commitment_loss
        if not self.ema:
            loss = loss + codebook_loss

        counts = jnp.bincount(k, length=self.num_codes)
        usage = counts / k.size
        perplexity = jnp.exp(jnp.sum(jax.scipy.special.entr(usage)))

        if train and self.ema and not self.is_initializing():
            self._ema_update(z, k, counts, rng)

        return {
            "quantized": losses.straight_through(z_e, z_q),
            "codes": z_q,
            "indices": k.reshape(z_e.shape[:-1]).astype(jnp.int32),
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment_loss,
            "loss": loss,
            "perplexity": perplexity,
            "counts": counts.astype(jnp.int32),
        }

    def _ema_update(self, z: jax.Array, k: jax.Array, counts: jax.Array, rng: jax.Array | None):
        """N_i <- gamma N_i + (1 - gamma) n_i,  m_i <- gamma m_i + (1 - gamma) sum_{j: k_j = i} z_j.

        z: (N, D) encoder outputs of the batch, k: (N,) their codes, counts: (K,) n_i.
        """
        gamma = self.decay
        cluster_size = gamma * self.cluster_size.value + (1.0 - gamma) * counts
        embed_sum = gamma * self.embed_sum.value + (1.0 - gamma) * jax.ops.segment_sum(
            z, k, num_segments=self.num_codes
        )
        if self.restart_after is not None:
            unused = jnp.where(counts > 0, 0, self.unused_steps.value + 1)
            dead = unused >= self.restart_after
            picks = jax.random.choice(
                rng, z.shape[0], (self.num_codes,), replace=z.shape[0] < self.num_codes
            )
            embed_sum = jnp.where(dead[:, None], z[picks], embed_sum)
            cluster_size = jnp.where(dead, 1.0, cluster_size)
            self.unused_steps.value = jnp.where(dead, 0, unused)
        self.cluster_size.value = cluster_size
        self.embed_sum.value = embed_sum
