"""Checks that a PyTorch twin computes lvm_jax's function: values, loss and every gradient.

A twin's `copy_flax_*_params(twin, tree)` maps an lvm_jax parameter tree onto
the twin's parameters. The same map carries lvm_jax's *gradient* tree into
PyTorch's layout: copied onto a second twin, it gives, parameter by parameter
and by name, what the first twin's `.grad` must be after its backward pass.
"""

import copy

import numpy as np

TOL = 1e-4  # max |difference| / (1 + max |lvm_jax value|)


def assert_close(what: str, a, b, tol: float = TOL) -> float:
    """The relative error of b against a; raises AssertionError above `tol`."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} and {b.shape}"
    error = float(np.max(np.abs(a - b))) / (1.0 + float(np.max(np.abs(a))))
    assert error < tol, f"PyTorch and lvm_jax {what} differ by {error:.3g} (relative)"
    return error


def assert_same_gradients(twin, copy_params, grads, tol: float = TOL) -> float:
    """Raises AssertionError unless every parameter's `.grad` of `twin` (after a backward
    pass) equals lvm_jax's gradient tree `grads`, mapped into PyTorch's layout by
    `copy_params(module, tree)` (the twin's weight copy). Each leaf is compared relative to
    its own scale (gradients are small). Returns the largest error."""
    expected = copy_params(copy.deepcopy(twin), grads)
    expected = dict(expected.named_parameters())
    errors = [0.0]
    for name, parameter in twin.named_parameters():
        assert parameter.grad is not None, f"PyTorch's {name} has no gradient"
        a = expected[name].detach().numpy()
        scale = float(np.max(np.abs(a))) or 1.0
        errors.append(assert_close(f"gradient of {name}", a / scale,
                                   parameter.grad.numpy() / scale, tol))
    return max(errors)
