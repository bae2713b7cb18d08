"""What several test files build alike."""

import functools

from lvm_jax.models import likelihoods, vae
from lvm_jax.train import Objective


def tiny_objective() -> Objective:
    """A 2-d Gaussian MLP VAE with one hidden layer of 16: `fit` in a fraction of a second."""
    model = vae.mlp_vae(2, 2, (16,), likelihoods.get("gaussian"))
    return Objective.stateless(init=lambda rng, x: model.init(rng, x, rng),
                               loss_fn=functools.partial(vae.loss_fn, model),
                               units={"neg_elbo": "nats per example"})
