"""2D VAE (REFERENCE.md §1): wall time of a whole training run, lvm_jax against PyTorch.

10 epochs over the 10,000 points of toy2d dataset 1 at batch 128 (78 steps
per epoch, the remainder dropped), Adam 1e-3, on both sides; both shuffle with
the same per-epoch permutations and read every step's metrics to the host.

* lvm_jax: the compiled chunk of `fit` (`make_train_chunk`), called as `fit`
  calls it: a whole epoch (78 steps) as one `lax.scan` over batches gathered on
  the device.
* PyTorch: the per-batch loop a PyTorch user writes, with the data held as one
  tensor and indexed per batch (no DataLoader, which would only slow it down).

Rows:
* "cold": includes JAX's tracing and XLA compilation (after `jax.clear_caches`);
  PyTorch compiles nothing, so its cold run is a run without warm-up.
* "warm": the same compiled function rerun from a fresh initial state.
  Initialisation is outside the timed region of both rows.
* "end to end": `fit` itself and the final evaluation, as `python -m
  experiments.vae_2d` runs them (init, compilation, test-set evaluation with
  `vae_2d.EPOCH_EVAL_SAMPLES` z samples per point before training and after
  every epoch, metrics.csv, a checkpoint per epoch, then one evaluation with
  `vae_2d.EVAL_SAMPLES` per point), against the PyTorch loop doing the same:
  the same evaluations of the 2,500 test points, a CSV line per step and per
  evaluation, `torch.save` of model and optimizer per epoch.
* "end to end, warm compilation cache": the same `fit` and final evaluation as a
  second run of the experiment finds them, timed in a process of its own after
  one run that filled a fresh persistent compilation cache (the experiments
  enable it, `lvm_jax.compilation_cache`); each repetition still traces its
  functions. PyTorch's end-to-end run is timed in that process too, in the same
  alternating rounds, after a warm-up run of its own.
"""

import contextlib
import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
import torch

from benchmarks import torch_models
from benchmarks.common import Comparison, Row, Settings, compare, device, merge_processes
from experiments import vae_2d
from lvm_jax import compilation_cache, data
from lvm_jax.data import batching
from lvm_jax.train import TrainConfig, evaluate_test_set, fit
from lvm_jax.train.steps import make_train_chunk
from lvm_jax.train.state import TrainState

NAME = "vae2d"
EPOCHS, BATCH, LEARNING_RATE = 10, 128, 1e-3
EVAL_BATCH = TrainConfig.eval_batch_size  # as `fit` evaluates


def one_device_mesh():
    """The mesh of `experiments.vae_2d`: one device, since `lvm_jax.cpu_devices` splits the CPU
    for convolutional models only."""
    return batching.data_mesh(jax.devices()[:1])


class JaxRun:
    """Trains the lvm_jax 2D VAE as `fit` does, without evaluation or checkpoints."""

    def __init__(self, train, seed: int):
        self.mesh = one_device_mesh()
        self.objective = vae_2d.make_objective(vae_2d.build_model())
        self.train = batching.put_host_shard(train, self.mesh)
        self.num, self.seed = len(train), seed
        self.key = jax.random.key(seed)
        self.chunk = make_train_chunk(self.objective, self.mesh)
        # One optimizer object for every run: it is static data of the state's
        # pytree, so a new one per run would make every run recompile.
        self.tx = optax.adam(LEARNING_RATE)
        self.last_loss = float("nan")

    def initial_state(self) -> TrainState:
        params = self.objective.init(self.key, jnp.asarray(self.train[:1]))["params"]
        state = TrainState.create(apply_fn=None, params=params, tx=self.tx)
        return jax.block_until_ready(jax.device_put(state, batching.replicated(self.mesh)))

    def fit(self, state: TrainState, epochs: int):
        """Trains for `epochs`; keeps the last step's loss (nats per example)."""
        steps = self.num // BATCH
        per_call = min(TrainConfig().steps_per_call, steps)
        for epoch in range(epochs):
            order = batching.epoch_order(self.seed, epoch, self.num, steps, BATCH)
            for offset in range(0, steps, per_call):
                idx = batching.put_host_indices(order[offset:offset + per_call], self.mesh)
                state, metrics = self.chunk(state, self.train, idx, self.key)
                self.last_loss = float(jax.device_get(metrics)["loss"][-1])


class TorchRun:
    """Trains the PyTorch 2D VAE with a per-batch loop."""

    def __init__(self, train, seed: int):
        self.train = torch.from_numpy(train)
        self.num, self.seed = len(train), seed
        self.last_loss = float("nan")

    def initial_state(self):
        torch.manual_seed(self.seed)
        model = torch_models.mlp_vae()
        return model, torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    def train_epoch(self, state, epoch: int) -> list[dict[str, float]]:
        """One epoch; every step's metrics (nats per example), read to the host."""
        model, optimizer = state
        steps = self.num // BATCH
        order = torch.from_numpy(batching.epoch_order(self.seed, epoch, self.num, steps, BATCH))
        logged = []
        for idx in order:
            loss, metrics = torch_models.loss_fn(model, self.train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            logged.append({k: v.item() for k, v in metrics.items()})
        self.last_loss = logged[-1]["neg_elbo"]
        return logged

    def fit(self, state, epochs: int):
        for epoch in range(epochs):
            self.train_epoch(state, epoch)

    @torch.no_grad()
    def evaluate(self, state, test: torch.Tensor, samples: int) -> dict[str, float]:
        """Test-set means of the metrics, in batches of 500, averaged over `samples` z
        samples per point."""
        sums = {}
        for start in range(0, len(test), EVAL_BATCH):
            x = test[start:start + EVAL_BATCH]
            repeated = x.repeat(samples, 1)
            for k, v in torch_models.loss_fn(state[0], repeated)[1].items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(x)
        return {k: v / len(test) for k, v in sums.items()}

    def experiment(self, test, epochs: int, workdir: str):
        """What `fit` does around the training steps, the PyTorch way."""
        state = self.initial_state()
        test = torch.from_numpy(test)
        with open(os.path.join(workdir, "metrics.csv"), "w", newline="") as f:
            log = csv.writer(f)
            initial = self.evaluate(state, test, vae_2d.EPOCH_EVAL_SAMPLES)
            log.writerows([["split", "epoch", *initial], ["test", 0, *initial.values()]])
            for epoch in range(epochs):
                for metrics in self.train_epoch(state, epoch):
                    log.writerow(["train", epoch + 1, *metrics.values()])
                log.writerow(["test", epoch + 1,
                              *self.evaluate(state, test, vae_2d.EPOCH_EVAL_SAMPLES).values()])
                torch.save({"model": state[0].state_dict(), "optimizer": state[1].state_dict()},
                           os.path.join(workdir, f"checkpoint_{epoch + 1}.pt"))
        return self.evaluate(state, test, vae_2d.EVAL_SAMPLES)


def _sampler(run, epochs: int):
    """A sampler: one training run from a fresh initial state (initialisation untimed)."""

    def sample() -> float:
        state = run.initial_state()
        tic = time.perf_counter()
        run.fit(state, epochs)
        return time.perf_counter() - tic

    return sample


def _end_to_end_samplers(dataset: data.Dataset, epochs: int, seed: int):
    """Samplers timing `fit` and the final evaluation, and their PyTorch counterpart, each in
    a fresh temporary workdir."""
    model = vae_2d.build_model()
    objective = vae_2d.make_objective(model)
    final_objective = vae_2d.make_objective(model, vae_2d.EVAL_SAMPLES)
    config = TrainConfig(epochs=epochs, batch_size=BATCH, learning_rate=LEARNING_RATE, seed=seed,
                         progress=False)
    torch_run = TorchRun(dataset.train, seed)

    def timed(run_in) -> float:
        with tempfile.TemporaryDirectory() as workdir:
            tic = time.perf_counter()
            run_in(workdir)
            return time.perf_counter() - tic

    def jax_experiment(workdir):
        mesh = one_device_mesh()
        state = fit(objective, dataset.train, dataset.test, config, workdir, mesh=mesh).state
        return evaluate_test_set(final_objective, state, dataset.test, config, mesh)

    def jax_sample() -> float:
        with contextlib.redirect_stdout(io.StringIO()):  # fit's per-epoch lines
            return timed(jax_experiment)

    return jax_sample, lambda: timed(lambda w: torch_run.experiment(dataset.test, epochs, w))


def _warm_cache_comparison(epochs: int, settings: Settings) -> Comparison:
    """lvm_jax's end-to-end run with a persistent compilation cache filled by its warm-up run,
    against PyTorch's end-to-end run, in the same rounds; in a process of its own, for the
    cache is process-wide configuration."""
    with tempfile.TemporaryDirectory() as cache:
        compilation_cache.enable(cache)
        return compare(*_end_to_end_samplers(data.load("toy2d_1"), epochs, settings.seed),
                       settings, warmup=1)


def _warm_cache_in_process(epochs: int, settings: Settings) -> Comparison:
    done = subprocess.run([sys.executable, "-m", "benchmarks.vae2d", str(epochs),
                           json.dumps(dataclasses.asdict(settings))], capture_output=True,
                          text=True, env={**os.environ, compilation_cache.DISABLE_VARIABLE: "1"})
    if done.returncode:
        raise RuntimeError(f"the warm-cache process failed:\n{done.stderr[-2000:]}")
    return merge_processes([json.loads(done.stdout.splitlines()[-1])])


def run(settings: Settings) -> list[Row]:
    """Training wall time, seconds for the whole run: cold, warm and end to end."""
    epochs = 2 if settings.quick else EPOCHS
    dataset = data.load("toy2d_1")
    jax_run, torch_run = JaxRun(dataset.train, settings.seed), TorchRun(dataset.train, settings.seed)
    warm_jax = _sampler(jax_run, epochs)

    def cold_jax() -> float:
        jax.clear_caches()
        jax_run.chunk = make_train_chunk(jax_run.objective, jax_run.mesh)
        return warm_jax()

    few = dataclasses.replace(settings, repeats=min(settings.repeats, 3))
    cold = compare(cold_jax, _sampler(TorchRun(dataset.train, settings.seed), epochs), few,
                   warmup=0)
    warm = compare(warm_jax, _sampler(torch_run, epochs), settings)
    end_to_end = compare(*_end_to_end_samplers(dataset, epochs, settings.seed), few, warmup=0)
    warm_cache = _warm_cache_in_process(epochs, few)

    step = f"train {epochs} epochs x {len(dataset.train) // BATCH} steps"
    common = dict(benchmark=NAME, model="2D VAE (MLP 128-128, 2-d latent)", batch=BATCH,
                  unit="s", higher_is_better=False, goal=20.0)
    return [
        Row(step=f"{step}, cold", lvm_jax=cold.jax_seconds, pytorch=cold.torch_seconds,
            device=device(cold.torch_threads, jax_devices=1),
            note=f"includes JAX tracing and XLA compilation; {cold.torch_note()}", **common),
        Row(step=f"{step}, warm", lvm_jax=warm.jax_seconds, pytorch=warm.torch_seconds,
            device=device(warm.torch_threads, jax_devices=1),
            note=(f"compiled function rerun from a fresh state; {warm.torch_note()}; final batch "
                  f"loss {jax_run.last_loss:.3f} (lvm_jax), {torch_run.last_loss:.3f} (PyTorch) "
                  "nats"), **common),
        Row(step=f"{step}, end to end", lvm_jax=end_to_end.jax_seconds,
            pytorch=end_to_end.torch_seconds,
            device=device(end_to_end.torch_threads, jax_devices=1),
            note=(f"lvm_jax `fit` (compile, eval each epoch with {vae_2d.EPOCH_EVAL_SAMPLES} z "
                  "samples per point, metrics.csv, asynchronous orbax checkpoints) and a final "
                  f"eval with {vae_2d.EVAL_SAMPLES} vs the PyTorch loop with the same evals, CSV "
                  f"and torch.save; "
                  f"{end_to_end.torch_note()}"), **common),
        Row(step=f"{step}, end to end, warm compilation cache",
            lvm_jax=warm_cache.jax_seconds, pytorch=warm_cache.torch_seconds,
            device=device(warm_cache.torch_threads, jax_devices=1),
            note=("the row above as a second run finds it: the persistent compilation cache "
                  "filled by a warm-up run, functions still traced; PyTorch timed in the same "
                  f"process and rounds, after a warm-up run of its own; median of {few.repeats}; "
                  f"{warm_cache.torch_note()}"), **common),
    ]


if __name__ == "__main__":
    settings = json.loads(sys.argv[2])
    settings = Settings(**{**settings, "torch_threads": tuple(settings["torch_threads"])})
    print(json.dumps(dataclasses.asdict(_warm_cache_comparison(int(sys.argv[1]), settings))))
