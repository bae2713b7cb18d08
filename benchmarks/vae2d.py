"""2D VAE (REFERENCE.md §1): wall time of a whole training run, lvm_jax against PyTorch.

10 epochs over the 10,000 points of toy2d dataset 1 at batch 128 (78 steps
per epoch, the remainder dropped), Adam 1e-3, on both sides.

* lvm_jax: the compiled chunk of `fit` (`make_train_chunk`), called as `fit`
  calls it: a whole epoch (78 steps) as one `lax.scan` over batches gathered on
  the device, its metrics read back to the host after each call.
* PyTorch: the per-batch loop a PyTorch user writes, with the data held as one
  tensor and indexed per batch (no DataLoader, which would only slow it down).

Both sides shuffle with the same per-epoch permutations. Initialisation is
outside the timed region; evaluation, checkpoints and logs are not run.
"Cold" includes JAX's tracing and XLA compilation (after `jax.clear_caches`);
PyTorch compiles nothing, so its cold run is a run without warm-up. "Warm"
reruns the same compiled function from a fresh initial state.
"""

import time

import jax
import jax.numpy as jnp
import optax
import torch

from benchmarks import torch_models
from benchmarks.common import Row, Settings, compare, device
from experiments import vae_2d
from lvm_jax import data
from lvm_jax.data import batching
from lvm_jax.train import TrainConfig
from lvm_jax.train.loop import make_train_chunk
from lvm_jax.train.state import TrainState

NAME = "vae2d"
EPOCHS, BATCH, LEARNING_RATE = 10, 128, 1e-3


class JaxRun:
    """Trains the lvm_jax 2D VAE as `fit` does, without evaluation or checkpoints."""

    def __init__(self, train, seed: int):
        self.mesh = batching.data_mesh()
        self.objective = vae_2d.make_objective(vae_2d.build_model())
        self.train = batching.put_replicated(train, self.mesh)
        self.num, self.seed = len(train), seed
        self.key = jax.random.key(seed)
        self.chunk = make_train_chunk(self.objective, self.mesh)

    def initial_state(self) -> TrainState:
        params = self.objective.init(self.key, jnp.asarray(self.train[:1]))["params"]
        state = TrainState.create(apply_fn=None, params=params, tx=optax.adam(LEARNING_RATE))
        return jax.block_until_ready(jax.device_put(state, batching.replicated(self.mesh)))

    def fit(self, state: TrainState, epochs: int) -> float:
        """Trains for `epochs`; returns the last step's loss (nats per example)."""
        steps = self.num // BATCH
        per_call = min(TrainConfig().steps_per_call, steps)
        for epoch in range(epochs):
            order = batching.epoch_order(self.seed, epoch, self.num, steps, BATCH)
            for offset in range(0, steps, per_call):
                idx = batching.put_indices(order[offset:offset + per_call], self.mesh)
                state, metrics = self.chunk(state, self.train, idx, self.key)
                loss = jax.device_get(metrics)["loss"][-1]
        return float(loss)


class TorchRun:
    """Trains the PyTorch 2D VAE with a per-batch loop."""

    def __init__(self, train, seed: int):
        self.train = torch.from_numpy(train)
        self.num, self.seed = len(train), seed

    def initial_state(self):
        torch.manual_seed(self.seed)
        model = torch_models.mlp_vae()
        return model, torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def fit(self, state, epochs: int) -> float:
        model, optimizer = state
        steps = self.num // BATCH
        for epoch in range(epochs):
            order = torch.from_numpy(batching.epoch_order(self.seed, epoch, self.num, steps, BATCH))
            for idx in order:
                loss, _ = torch_models.loss_fn(model, self.train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                last = loss.item()  # the loop logs every step's loss, as fit does
        return last


def _sampler(run, epochs: int):
    """A sampler: one training run from a fresh initial state (initialisation untimed)."""

    def sample() -> float:
        state = run.initial_state()
        tic = time.perf_counter()
        run.last_loss = run.fit(state, epochs)
        return time.perf_counter() - tic

    return sample


def run(settings: Settings) -> list[Row]:
    """Cold and warm training wall time, seconds for the whole run."""
    epochs = 2 if settings.quick else EPOCHS
    train = data.load("toy2d_1").train
    jax_run, torch_run = JaxRun(train, settings.seed), TorchRun(train, settings.seed)
    warm_jax = _sampler(jax_run, epochs)

    def cold_jax() -> float:
        jax.clear_caches()
        jax_run.chunk = make_train_chunk(jax_run.objective, jax_run.mesh)
        return warm_jax()

    cold = compare(cold_jax, _sampler(TorchRun(train, settings.seed), epochs), settings, warmup=0)
    warm = compare(warm_jax, _sampler(torch_run, epochs), settings)

    step = f"train {epochs} epochs x {len(train) // BATCH} steps"
    common = dict(benchmark=NAME, model="2D VAE (MLP 128-128, 2-d latent)", batch=BATCH,
                  unit="s", higher_is_better=False, goal=20.0)
    return [
        Row(step=f"{step}, cold", lvm_jax=cold.jax_seconds, pytorch=cold.torch_seconds,
            device=device(cold.torch_threads),
            note=f"includes JAX tracing and XLA compilation; {cold.torch_note()}", **common),
        Row(step=f"{step}, warm", lvm_jax=warm.jax_seconds, pytorch=warm.torch_seconds,
            device=device(warm.torch_threads),
            note=(f"compiled function rerun from a fresh state; {warm.torch_note()}; final batch "
                  f"loss {jax_run.last_loss:.3f} (lvm_jax), {torch_run.last_loss:.3f} (PyTorch) "
                  "nats"), **common),
    ]
