"""Checks that a PyTorch twin computes lvm_jax's function: values, loss and every gradient.

A twin's `copy_flax_*_params(twin, tree)` maps an lvm_jax parameter tree onto
the twin's parameters. The same map carries lvm_jax's *gradient* tree into
PyTorch's layout: copied onto a second twin, it gives, parameter by parameter
and by name, what the first twin's `.grad` must be after its backward pass.
"""

import copy

import numpy as np

TOL = 1e-4  # max |difference| / (1 + max |lvm_jax value|)
# A gradient leaf is a sum over the batch and positions of terms of both signs: float32
# summation in another order moves it by up to ~1e-3 of its largest entry in the deep priors
# (their L2 norms agree to ~1e-4), where a wrong wiring moves it by O(1).
GRAD_TOL = 1e-2


def assert_close(what: str, a, b, tol: float = TOL) -> float:
    """The relative error of b against a; raises AssertionError above `tol`."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} and {b.shape}"
    error = float(np.max(np.abs(a - b))) / (1.0 + float(np.max(np.abs(a))))
    assert error < tol, f"PyTorch and lvm_jax {what} differ by {error:.3g} (relative)"
    return error


# A leaf whose largest gradient entry is below this fraction of the model's largest is zero
# up to rounding (e.g. a bias followed by training-mode BatchNorm, which removes it): its
# entries are noise on both sides and are compared at that floor, not at their own scale.
NEGLIGIBLE = 1e-5


def assert_same_gradients(twin, copy_params, grads,
                          tol: float = GRAD_TOL) -> tuple[float, list[str]]:
    """Raises AssertionError unless every parameter's `.grad` of `twin` (after a backward
    pass) equals lvm_jax's gradient tree `grads`, mapped into PyTorch's layout by
    `copy_params(module, tree)` (the twin's weight copy). Each leaf is compared relative to
    its own scale (gradients are small), or to NEGLIGIBLE times the model's largest entry if
    that is larger. Returns the largest error and the names of the negligible leaves."""
    expected = dict(copy_params(copy.deepcopy(twin), grads).named_parameters())
    expected = {name: p.detach().numpy() for name, p in expected.items()}
    floor = NEGLIGIBLE * max(float(np.max(np.abs(a))) for a in expected.values())
    errors, negligible = [0.0], []
    for name, parameter in twin.named_parameters():
        assert parameter.grad is not None, f"PyTorch's {name} has no gradient"
        a = expected[name]
        scale = float(np.max(np.abs(a)))
        if scale < floor:
            negligible.append(name)
        scale = max(scale, floor)
        errors.append(assert_close(f"gradient of {name}", a / scale,
                                   parameter.grad.numpy() / scale, tol))
    return max(errors), negligible


def negligible_note(names: list[str]) -> str:
    """The row note's sentence on gradient leaves compared only at the model's scale."""
    if not names:
        return ""
    return (f"the gradients of {', '.join(names)} are zero up to rounding on both sides and "
            f"are compared at {NEGLIGIBLE:g} of the model's largest gradient")
