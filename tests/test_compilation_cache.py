"""The persistent compilation cache: a second process loads what the first compiled, in
the folder the environment names, and the off switch keeps everything off."""

import os
import subprocess
import sys

from lvm_jax import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Enables the cache as the experiments do, compiles small functions (JAX's own
# thresholds would not cache them) and prints the folder, the number of compilations
# loaded from the cache and the number that looked in it.
PROGRAM = """
import collections
import jax, jax.numpy as jnp
from lvm_jax import compilation_cache
events = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **kwargs: events.update([event]))
print(compilation_cache.enable())
jax.jit(lambda x: jnp.sin(x) * 2.0)(jnp.arange(3.0)).block_until_ready()
print(events["/jax/compilation_cache/cache_hits"],
      events["/jax/compilation_cache/compile_requests_use_cache"])
"""


def run_program(**env) -> tuple[str, int, int]:
    """(cache folder or "None", cache hits, cache lookups) of PROGRAM in a fresh process."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("JAX_COMPILATION_CACHE_DIR", compilation_cache.DISABLE_VARIABLE)}
    environ.update(env, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=environ, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[-3], int(out[-2]), int(out[-1])


def cached_files(folder) -> list[str]:
    return [f for _, _, files in os.walk(folder) for f in files]


def test_second_process_loads_the_first_ones_compilation_from_the_user_cache(tmp_path):
    cache = tmp_path / "lvm_jax" / "jax"
    folder, hits, lookups = run_program(XDG_CACHE_HOME=str(tmp_path))
    assert (folder, hits) == (str(cache), 0) and lookups > 0
    assert len(cached_files(cache)) >= lookups
    assert run_program(XDG_CACHE_HOME=str(tmp_path)) == (str(cache), lookups, lookups)


def test_off_switch_disables_the_cache_even_where_jax_would_use_it(tmp_path):
    cache = tmp_path / "jax_cache"
    env = {"JAX_COMPILATION_CACHE_DIR": str(cache), compilation_cache.DISABLE_VARIABLE: "0"}
    assert run_program(**env) == ("None", 0, 0)
    assert run_program(**env) == ("None", 0, 0)
    assert not cached_files(cache)


def test_folder_is_jax_compilation_cache_dir_else_xdg_cache_home_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/jax")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert compilation_cache.default_dir() == "/somewhere/jax"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert compilation_cache.default_dir() == os.path.join("/xdg", "lvm_jax", "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compilation_cache.default_dir() == os.path.join(str(tmp_path), ".cache", "lvm_jax", "jax")
