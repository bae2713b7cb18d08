"""Single training steps, as each side's training loop runs them.

* `JaxSteps`: `fit`'s compiled step with `steps_per_call=1`, its setting for
  convolutional models on CPU: one compiled call per step on a batch gathered
  on the device from the epoch's permutation, its metrics read back to the host.
* `TorchSteps`: the PyTorch loop: index a batch of the uint8 NCHW tensor,
  scale it to [-1, 1], forward, backward, Adam step, read the loss.

Both draw their batches from `lvm_jax.data.batching.epoch_order`, so with the
same seed they see the same batches in the same order.
"""

import itertools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from benchmarks import torch_models
from lvm_jax.data import batching
from lvm_jax.train import Objective
from lvm_jax.train.loop import make_train_chunk
from lvm_jax.train.state import TrainState

LEARNING_RATE = 1e-3


def epoch_batches(seed: int, num_examples: int, batch_size: int) -> Iterator[np.ndarray]:
    """Index arrays (batch_size,) of epoch 0, 1, ... as `fit` orders them, without end."""
    steps = num_examples // batch_size
    for epoch in itertools.count():
        yield from batching.epoch_order(seed, epoch, num_examples, steps, batch_size)


class JaxSteps:
    """One `fit` training step per call of `step` (returns the loss, nats per example)."""

    def __init__(self, objective: Objective, train: np.ndarray, batch_size: int, seed: int):
        self.mesh = batching.data_mesh()
        self.data = batching.put_host_shard(train, self.mesh)
        self.chunk = make_train_chunk(objective, self.mesh)
        self.key = jax.random.key(seed)
        example = objective.preprocess(jnp.asarray(train[:1]))
        # Compiled, as `fit` initialises: a data-dependent init runs hundreds of ops.
        variables = dict(jax.jit(objective.init)(self.key, example))
        params = variables.pop("params")
        state = TrainState.create(apply_fn=None, params=params, tx=optax.adam(LEARNING_RATE),
                                  model_state=variables)
        self.state = jax.device_put(state, batching.replicated(self.mesh))
        self.batch_size = batch_size
        self.batches = epoch_batches(seed, len(train), batch_size)

    def compile(self) -> jax.stages.Compiled:
        """Compiles the step ahead of time and runs it from now on; the executable's
        `memory_analysis()` gives the memory XLA assigned to it."""
        idx = batching.put_host_indices(np.zeros((1, self.batch_size), np.int32), self.mesh)
        self.chunk = self.chunk.lower(self.state, self.data, idx, self.key).compile()
        return self.chunk

    def step(self) -> float:
        idx = batching.put_host_indices(next(self.batches)[None], self.mesh)
        self.state, metrics = self.chunk(self.state, self.data, idx, self.key)
        return float(jax.device_get(metrics)["loss"][0])


def to_torch_images(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 (N, C, H, W), PyTorch's layout."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def scale_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [-1, 1], as lvm_jax's `scale_images`."""
    return x.float() / 127.5 - 1.0


class TorchSteps:
    """One PyTorch training step of an image model per call of `step` (returns the loss).

    `loss_fn(model, x) -> (loss, metrics)` on a batch scaled to [-1, 1]; default the VAEs'.
    """

    def __init__(self, model: torch.nn.Module, train: np.ndarray, batch_size: int, seed: int,
                 loss_fn=torch_models.loss_fn):
        self.model = model
        self.loss_fn = loss_fn
        self.images = to_torch_images(train)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        self.batches = epoch_batches(seed, len(train), batch_size)

    def step(self) -> float:
        x = scale_images(self.images[torch.from_numpy(next(self.batches))])
        loss, _ = self.loss_fn(self.model, x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()
