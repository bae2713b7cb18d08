"""JAX's persistent compilation cache, on by default for the experiments, `evaluate` and
the notebook.

XLA compilation is most of a short run's time on CPU (seconds per jitted step,
evaluation and sampling function). With the cache on, compiled programs are
written to disk, keyed by the program, the jaxlib version, the devices and the
compiler flags, and a second run of the same experiment loads them instead of
compiling again.

Where: `JAX_COMPILATION_CACHE_DIR` when set, else `$XDG_CACHE_HOME/lvm_jax/jax`
(default `~/.cache/lvm_jax/jax`). Off: `LVM_JAX_COMPILATION_CACHE=0`. The
folder may be deleted at any time; it only costs the next run a compilation.
"""

import os

import jax

DISABLE_VARIABLE = "LVM_JAX_COMPILATION_CACHE"
_OFF_VALUES = ("0", "false", "off", "no")


def default_dir() -> str:
    """The cache folder `enable` uses: JAX_COMPILATION_CACHE_DIR, else the per-user cache."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(user_cache, "lvm_jax", "jax")


def enable(cache_dir: str | None = None) -> str | None:
    """Turns on the persistent compilation cache in `cache_dir` (default `default_dir()`).

    Call it before the first compilation. Every program is cached, however small
    and quick to compile: JAX's defaults skip programs compiled in under a
    second, which on CPU is most of what an experiment compiles. Returns the
    folder, or None when `LVM_JAX_COMPILATION_CACHE=0` turns the cache off (then
    also for a JAX_COMPILATION_CACHE_DIR that JAX would use by itself).
    """
    if os.environ.get(DISABLE_VARIABLE, "1").strip().lower() in _OFF_VALUES:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    cache_dir = cache_dir or default_dir()
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return cache_dir
