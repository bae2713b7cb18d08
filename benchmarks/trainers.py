"""Single training steps, as each side's training loop runs them.

* `JaxSteps`: `fit`'s compiled step with `steps_per_call=1`, its setting for
  convolutional models on CPU: one compiled call per step on a batch gathered
  on the device from the epoch's permutation, its metrics read back to the host.
* `TorchSteps`: the PyTorch loop: index a batch of the uint8 NCHW tensor,
  scale it to [-1, 1], forward, backward, Adam step, read the loss; eager with
  `torch.optim.Adam`'s defaults, or `compiled` (`torch.compile`, channels_last,
  fused Adam): the two configurations `torch_configs` offers `compare`.

Both draw their batches from `lvm_jax.data.batching.epoch_order`, so with the
same seed they see the same batches in the same order.
"""

import dataclasses
import itertools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from benchmarks import torch_models
from benchmarks.common import EAGER, Comparison, Sampler, Settings, compare, timer
from benchmarks.twins import TOL, assert_close
from lvm_jax.data import batching
from lvm_jax.train import Objective
from lvm_jax.train.steps import make_train_chunk
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
        # Waits for every output, the new state as well as the metrics, before reading the loss.
        self.state, metrics = jax.block_until_ready(
            self.chunk(self.state, self.data, idx, self.key))
        return float(jax.device_get(metrics)["loss"][0])


def to_torch_images(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 (N, C, H, W), PyTorch's layout."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def scale_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [-1, 1], as lvm_jax's `scale_images`."""
    return x.float() / 127.5 - 1.0


def adam(parameters, compiled: bool) -> tuple[torch.optim.Adam, str]:
    """(Adam, its label): fused for the compiled configuration, or foreach where this PyTorch
    build has no fused CPU kernel; PyTorch's default otherwise."""
    parameters = list(parameters)
    if not compiled:
        return torch.optim.Adam(parameters, lr=LEARNING_RATE), "Adam"
    try:  # raises where the device has no fused kernel
        return torch.optim.Adam(parameters, lr=LEARNING_RATE, fused=True), "fused Adam"
    except RuntimeError:
        return torch.optim.Adam(parameters, lr=LEARNING_RATE, foreach=True), "foreach Adam"


class TorchSteps:
    """One PyTorch training step per call of `step` (returns the loss).

    Args:
      model: the PyTorch twin (its parameters are trained in place).
      inputs: the training set as a tensor: uint8 NCHW images, or integer code grids.
      batch_size, seed: the batches, in `fit`'s order.
      loss_fn: `(model, batch) -> (loss, metrics)`; default the VAEs'.
      prepare: batch of `inputs` -> the model's input; default `scale_images` to [-1, 1].
      compiled: `torch.compile(model)` (default mode), with the model's parameters and the
        image batches in `channels_last` and fused Adam, instead of eager NCHW with
        `torch.optim.Adam`'s defaults. `config` names what was used.
      device: where the model, its optimizer and the batches live ("cpu", "cuda").
      amp: the forward pass and loss under `torch.autocast` in bfloat16 (automatic mixed
        precision; parameters, gradients and Adam stay float32): the counterpart of
        lvm_jax's bfloat16 compute dtype.
    """

    def __init__(self, model: torch.nn.Module, inputs: torch.Tensor, batch_size: int,
                 seed: int, loss_fn=torch_models.loss_fn, prepare=None, compiled: bool = False,
                 device: str = "cpu", amp: bool = False):
        self.loss_fn = loss_fn
        self.device, self.amp = torch.device(device), amp
        model, self.inputs = model.to(self.device), inputs.to(self.device)
        self.prepare = scale_images if prepare is None else prepare
        self.memory_format = torch.channels_last if compiled else torch.contiguous_format
        self.optimizer, optimizer = adam(model.parameters(), compiled)
        self.model = torch.compile(model.to(memory_format=torch.channels_last)) if compiled \
            else model
        self.config = (f"torch.compile, channels_last, {optimizer}" if compiled else EAGER) + (
            ", AMP bfloat16" if amp else "")
        self.batches = epoch_batches(seed, len(inputs), batch_size)

    def batch(self, idx: np.ndarray) -> torch.Tensor:
        """The model's input for examples `idx`, in this configuration's memory format."""
        x = self.prepare(self.inputs[torch.from_numpy(idx).to(self.device)])
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def step(self) -> float:
        """One step; reading the loss waits for it (and, on a GPU, for the queued update)."""
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            loss, _ = self.loss_fn(self.model, self.batch(next(self.batches)))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def twin_samplers(make_twin, inputs: torch.Tensor, batch_size: int, seed: int, number: int,
                  **steps) -> tuple[dict[str, Sampler], str]:
    """({configuration: sampler of `number` TorchSteps steps}, remark) for `compare`: eager
    PyTorch and, where torch.compile runs, the compiled configuration, each on a fresh
    `make_twin()` (lvm_jax's initial parameters loaded). The compiled twin's first step,
    which compiles forward and backward, must give the eager twin's first loss (same
    parameters, batch and noise). The remark says why only eager was timed, else "".
    `steps`: TorchSteps' loss_fn, prepare, device and amp."""
    eager = TorchSteps(make_twin(), inputs, batch_size, seed, **steps)
    samplers = {EAGER: timer(eager.step, number)}
    torch.manual_seed(seed)
    eager_loss = eager.step()
    try:
        compiled = TorchSteps(make_twin(), inputs, batch_size, seed, compiled=True, **steps)
        torch.manual_seed(seed)
        compiled_loss = compiled.step()
    except Exception as error:  # noqa: BLE001 - any compiler failure (no C++ toolchain, ...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return samplers, f"torch.compile could not run here ({type(error).__name__}: " \
                         f"{reason[:200]}): eager PyTorch only"
    # bfloat16 autocast rounds differently once inductor fuses the operations.
    assert_close("compiled and eager PyTorch first-step losses", eager_loss, compiled_loss,
                 tol=1e-2 if steps.get("amp") else TOL)
    samplers[compiled.config] = timer(compiled.step, number)
    return samplers, ""


def compare_steps(jax_steps: JaxSteps, make_twin, inputs: torch.Tensor, batch_size: int,
                  number: int, settings: Settings, **steps) -> Comparison:
    """lvm_jax's training steps against its PyTorch twin's (`twin_samplers`: eager and
    compiled, on `settings.torch_device`, under bfloat16 autocast when lvm_jax computes in
    bfloat16), `number` steps per sample; the remark, if any, in `remarks`."""
    samplers, remark = twin_samplers(make_twin, inputs, batch_size, settings.seed, number,
                                     device=settings.torch_device,
                                     amp=settings.dtype == "bfloat16", **steps)
    result = compare(timer(jax_steps.step, number), samplers, settings)
    return dataclasses.replace(result, remarks=(remark,) if remark else ())
