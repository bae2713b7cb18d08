"""Mixed precision: low-precision activations between float32 parameters and float32 losses.

Every building block of `lvm_jax.nn` and every model takes `dtype`, the dtype
of its computation (activations, and the copies of the weights that the
matrix multiplies and convolutions read), and keeps its parameters in float32
(flax's `param_dtype` default), so the optimizer updates float32 weights and
checkpoints hold float32. With `dtype=jnp.bfloat16` the convolutions and
matrix multiplies run at bfloat16 speed on GPUs and TPUs; float32 (the
default) computes exactly as without this option.

What forms a loss or a log-density is float32 whatever `dtype` is: the
outputs that parameterise a distribution (decoder outputs, the encoder's mean
and log-variance, logits, a flow's shift and log-scale, the VQ-VAE's encoder
outputs before the quantizer) pass through `to_float32` before any
likelihood, KL, softmax cross-entropy or codebook distance. bfloat16 keeps 8
bits of mantissa (a relative error of 0.4%): a log-density summed over 3,072
pixels in bfloat16 would be off by several nats, and the small differences of
large numbers in ||z - e||^2 would pick the wrong code.
"""

import jax
import jax.numpy as jnp


def to_float32(tree):
    """Casts every array of a pytree (an array, a (mean, log_var) pair, ...) to float32.

    A no-op on float32 arrays, so float32 models compute exactly as before.
    Gradients flow back through the cast in the array's own dtype.
    """
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
