"""Shared test settings: float32 CPU JAX, as the library uses, and a compilation cache of
the suite's own (never the user's ~/.cache)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Set before JAX is imported, so that JAX itself and the subprocesses the tests start see it;
# `lvm_jax.compilation_cache.enable` (called by the experiments) uses it too. CI deletes it
# at the start of a fresh run to measure a cold install.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax")
# Every program cached, as `compilation_cache.enable` does for the experiments: JAX's default
# keeps only those compiled in over a second, while most of what the tests compile takes
# less, again in every worker and subprocess (the test files' workers, the runs the tests
# start) that compiles the same program.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
