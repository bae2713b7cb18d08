"""What `sample_codes` refuses, each in one line naming the argument, before anything is
compiled: a model without the step API, sizes that are not positive ints or whose arrays
would not fit in memory, a missing, unexpected or malformed condition, and variables that are
not the tree `model.init` makes. It knows no model: a prior checks its own context
(`check_context`, lvm_jax.nn.sampling's step API)."""

import functools
import inspect
import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

STEP_API = ("init_cache", "step", "end_position", "end_row")
MAX_POSITIONS = 2**31 - 1  # positions are int32 on the device


def check_arguments(model, variables, shape: tuple, condition, method: str) -> tuple:
    """Checks sample_codes' arguments for a grid `shape` (num, height, width); returns the
    model's inputs after the codes: () or (condition,)."""
    _check_model(model, method)
    _check_sizes(shape)
    context = _check_condition(model, condition, shape)
    structs = (jax.ShapeDtypeStruct(shape, jnp.int32),
               *(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in context))
    _check_memory(_bytes_needed(model, structs, method))
    _check_variables(model, variables, structs)
    return context


def _check_model(model, method: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax Module mapping codes to logits, got "
                        f"{type(model).__name__}")
    if method == "cached" and not all(hasattr(model, name) for name in STEP_API):
        raise TypeError(f"a {type(model).__name__} has no step API ({', '.join(STEP_API)}) "
                        f"for method='cached': draw with method='raster'")


def _check_sizes(shape: tuple) -> None:
    for name, size in zip(("num", "height", "width"), shape):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    if shape[1] * shape[2] > MAX_POSITIONS:
        raise ValueError(f"height * width must be at most 2**31 - 1 positions (int32 on the "
                         f"device), got {shape[1]} * {shape[2]}")


def _check_condition(model, condition, shape: tuple) -> tuple:
    """() or (condition,) as the model's __call__ takes a required input after the codes."""
    name = type(model).__name__
    after_codes = list(inspect.signature(model.__call__).parameters.values())[1:]
    required = [p.name for p in after_codes if p.default is p.empty]
    if condition is None:
        if required:
            raise ValueError(f"a {name} needs condition= its {required[0]} (its input after "
                             f"the codes), e.g. the top codes")
        return ()
    if not required:
        raise ValueError(f"condition is for a prior that takes an input after the codes; a "
                         f"{name} takes none")
    if not hasattr(condition, "dtype") or not hasattr(condition, "shape"):
        raise TypeError(f"condition must be an array, got {type(condition).__name__}")
    if hasattr(model, "check_context"):
        model.check_context(shape, condition, name="condition")
    return (condition,)


def _check_memory(needed: int) -> None:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        available = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:  # a CPU: its physical memory
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > available:
        raise MemoryError(f"num, height and width ask for at least {needed:,} bytes of arrays, "
                          f"more than the {available:,} bytes that {jax.devices()[0]} can "
                          f"allocate: draw fewer or smaller grids per call")


@functools.cache
def _bytes_needed(model, structs: tuple, method: str) -> int:
    """A lower bound of the bytes a draw holds at once: the codes, and the cache or the full
    pass's logits."""
    params = _init_shapes(model, structs)
    if method == "cached":
        held = jax.eval_shape(functools.partial(model.apply, method="init_cache",
                                                mutable=["cache"]), params, *structs)[1]
    else:
        held = jax.eval_shape(model.apply, params, *structs)
    return structs[0].size * 4 + sum(leaf.size * leaf.dtype.itemsize
                                     for leaf in jax.tree.leaves(held))


@functools.cache
def _init_shapes(model, structs: tuple) -> dict:
    """{"params": shapes} of the tree model.init makes for inputs shaped like `structs`."""
    return {"params": jax.eval_shape(model.init, jax.random.key(0), *structs)["params"]}


def _check_variables(model, variables, structs: tuple) -> None:
    """variables must be {"params": the tree model.init makes}: a one-line ValueError names
    what differs (a bare parameter dict, another model's or size's parameters)."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        found = (f"a mapping with keys {sorted(variables)[:4]}" if isinstance(variables, Mapping)
                 else type(variables).__name__)
        raise ValueError(f"variables must be {{'params': params}}, as model.apply takes them, "
                         f"got {found}")
    expected = _shapes(_init_shapes(model, structs)["params"])
    found = _shapes(variables["params"])
    problems = ([f"{'/'.join(path)} has shape {found[path]}, expected {shape}"
                 for path, shape in expected.items() if found.get(path, shape) != shape]
                + [f"missing {name}" for name in _first_absent(expected, found)]
                + [f"unexpected {name}" for name in _first_absent(found, expected)])
    if problems:
        raise ValueError(f"variables['params'] do not fit this {type(model).__name__}: "
                         f"{'; '.join(problems[:3])}" + ("; ..." if len(problems) > 3 else ""))


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of a tree's leaves, e.g. {("embed", "embedding"): (128, 64)}."""
    return {tuple(str(getattr(key, "key", key)) for key in path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _first_absent(tree: dict, other: dict) -> list[str]:
    """The shortest paths of `tree` (leaf paths' prefixes) that `other` lacks, e.g.
    "layers_0/condition_vertical" for a whole missing conv, in order, once each."""
    present = {path[:k] for path in other for k in range(1, len(path) + 1)}
    absent = (next(path[:k] for k in range(1, len(path) + 1) if path[:k] not in present)
              for path in tree if path not in present)
    return ["/".join(path) for path in dict.fromkeys(absent)]
