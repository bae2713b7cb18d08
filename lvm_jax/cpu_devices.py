"""Several JAX devices on one CPU, so that convolutional training runs data-parallel on it.

XLA:CPU keeps a machine's cores only partly busy with one device's program:
on 2 cores the image VAE's training step (batch 128, 32x32x1) takes 210 ms
of wall time for 340 ms of CPU time. Given several CPU devices, `fit` splits
every batch over them (its one data-parallel path, DESIGN.md §4) and XLA runs
the devices' parts side by side: the same step takes PLACEHOLDER.
The mathematics is that of one device: the gradient is the mean over the
whole batch, BatchNorm's statistics are taken over the whole batch, and only
the order of float32 sums changes.

Small MLPs stay on one device: there the per-step all-reduces cost more than
the step itself (the 2D VAE's 780 steps take 0.18 s on one device, 1.9 s on
eight). So the experiments that train convolutional models call `split`,
before JAX starts its backend, with their batch sizes.

How many: the largest number up to 8 (or up to `LVM_JAX_CPU_DEVICES`) that
divides every batch size given, so that every batch splits evenly.
`LVM_JAX_CPU_DEVICES=1` turns it off. A count set by the user, in XLA_FLAGS
(`--xla_force_host_platform_device_count`) or `jax_num_cpu_devices`, is kept.
"""

import math
import os

import jax

LIMIT_VARIABLE = "LVM_JAX_CPU_DEVICES"
DEFAULT_LIMIT = 8
_XLA_FLAG = "--xla_force_host_platform_device_count"


def count_for(batch_sizes, limit: int = DEFAULT_LIMIT) -> int:
    """The largest device count up to `limit` that divides every one of `batch_sizes`."""
    common = math.gcd(*batch_sizes)
    return max(d for d in range(1, max(limit, 1) + 1) if common % d == 0)


def limit() -> int:
    """The most CPU devices `split` makes: LVM_JAX_CPU_DEVICES, default 8.

    Raises:
      ValueError: LVM_JAX_CPU_DEVICES is not a positive integer.
    """
    value = os.environ.get(LIMIT_VARIABLE, "").strip()
    if not value:
        return DEFAULT_LIMIT
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{LIMIT_VARIABLE}={value!r}: expected a positive integer (1 turns the "
                         "split of the CPU into several devices off)")
    return int(value)


def split(*batch_sizes: int) -> int | None:
    """Gives JAX's CPU backend `count_for(batch_sizes, limit())` devices and returns that count.

    Call it before the first JAX computation; it starts nothing itself (so
    `jax.distributed.initialize()` may still follow). Returns None, changing
    nothing, when the user has set the count (XLA_FLAGS or jax_num_cpu_devices)
    or JAX's backend has already started, which fixes its devices.
    """
    if _XLA_FLAG in os.environ.get("XLA_FLAGS", "") or jax.config.jax_num_cpu_devices >= 0:
        return None
    count = count_for(batch_sizes, limit())
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backend has started
        return None
    return count
