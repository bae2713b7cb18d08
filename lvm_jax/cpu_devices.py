"""Several JAX devices on one CPU, so that convolutional training keeps every core busy.

With one CPU device, XLA:CPU keeps a machine's cores only partly busy: on 2
cores the image VAE's training step (batch 128, 32x32x3) took 234 ms of wall
time for 343 ms of CPU time. Given several CPU devices, `fit` splits every
batch over them (its one data-parallel path, DESIGN.md §4) and XLA runs the
devices' parts side by side: on 8 devices the same step takes 136 ms for
255 ms of CPU time, against PyTorch's 131 ms on both cores (`python -m
benchmarks.run --only xla_flags` compares 1 and 8 devices on four models).
The mathematics is that of one device: the gradient is the mean over the
whole batch and BatchNorm's statistics are the whole batch's; only the order
of float32 sums changes.

Small MLPs stay on one device: there the per-step all-reduces cost more than
the step itself (the 2D VAE's 780 steps take 0.18 s on one device, 1.9 s on
eight). So the experiments that train convolutional models call `split`,
before JAX starts its backend, with their batch sizes; a script or notebook
of one's own may do the same.

How many: the largest number up to 8 (or up to `LVM_JAX_CPU_DEVICES`) that
divides every batch size given, so that every batch splits evenly, and leaves
each device at least 16 examples of the smallest (`min_per_device`): below that
the devices' fixed costs outweigh the gain in training. (Importance-weighted
evaluation splits the samples of its calls, each a batch of decoder passes, with
`min_per_device=1`.) Measured on 2 cores (ms per step; fastest in
bold): the image VAE 32x32x1 at batch 128 took 210 / 123 / **118** / 147 on
1 / 4 / 8 / 16 devices; the VLAE 32x32x1 at batch 64 97 / 72 / **68** / 84 on
1 / 2 / 4 / 8, and at batch 32 38 / **37** / 40 / 59.
`LVM_JAX_CPU_DEVICES=1` turns it off. A count the user set, in XLA_FLAGS
(`--xla_force_host_platform_device_count`) or `jax_num_cpu_devices`, is kept.
Accelerators are untouched: the split applies to JAX's CPU backend only.

Memory: the CPU devices share one copy of the training and test sets
(`lvm_jax.data.batching.aligned_copy`): CIFAR-10's training and test images,
146 + 29 MB, add 176 MB of host memory on 8 CPU devices, where a copy per
device took 1.2 GB for the training images alone (measured).
"""

import math
import os

import jax

from lvm_jax.errors import ConfigError

LIMIT_VARIABLE = "LVM_JAX_CPU_DEVICES"
DEFAULT_LIMIT = 8
MIN_EXAMPLES_PER_DEVICE = 16
_XLA_FLAG = "--xla_force_host_platform_device_count"


def count_for(batch_sizes, limit: int = DEFAULT_LIMIT,
              min_per_device: int = MIN_EXAMPLES_PER_DEVICE) -> int:
    """The largest device count up to `limit` that divides every one of `batch_sizes` and
    leaves each device at least `min_per_device` examples of the smallest (1 if none does)."""
    common = math.gcd(*batch_sizes)
    most = min(limit, min(batch_sizes) // min_per_device)
    return max(d for d in range(1, max(most, 1) + 1) if common % d == 0)


def limit() -> int:
    """The most CPU devices `split` makes: LVM_JAX_CPU_DEVICES, default 8.

    Raises:
      ConfigError: LVM_JAX_CPU_DEVICES is not a positive integer.
    """
    value = os.environ.get(LIMIT_VARIABLE, "").strip()
    if not value:
        return DEFAULT_LIMIT
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{LIMIT_VARIABLE}={value!r}: expected a positive integer (1 turns the "
                          "split of the CPU into several devices off)")
    return int(value)


def split(*batch_sizes: int, min_per_device: int = MIN_EXAMPLES_PER_DEVICE) -> int | None:
    """Gives JAX's CPU backend `count_for(batch_sizes, limit(), min_per_device)` devices and
    returns that count.

    Call it before the first JAX computation; it starts nothing itself (so
    `jax.distributed.initialize()` may still follow). Returns None, changing
    nothing, when the user has set the count (XLA_FLAGS or jax_num_cpu_devices)
    or JAX's backend has already started, which fixes its devices.
    """
    if _XLA_FLAG in os.environ.get("XLA_FLAGS", "") or jax.config.jax_num_cpu_devices >= 0:
        return None
    count = count_for(batch_sizes, limit(), min_per_device)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backend has started
        return None
    return count
