"""Ladder VAE (REFERENCE.md §5, issue #6): training step time and memory per number of layers.

The model of `python -m experiments.lvae --latent_layers L` with its defaults
(32 latent channels, hidden 64, 2 gated residual blocks per layer and path,
learned merge, skip connections, learned top prior, data-dependent
initialisation; free bits 0.5 nats per layer), on embedded MNIST binarized in
the step (Bernoulli likelihood), for L = 1, 3 and 6 stochastic layers, at
batch 64 (the Ladder VAE results of docs/results.md) and 128. lvm_jax alone: no PyTorch
counterpart, so the rows have no ratio.

* "train step": milliseconds per full training step (forward, backward, Adam
  update, loss read back) as `fit` runs it on CPU: one compiled call per step
  on a batch gathered on the device (`trainers.JaxSteps`), the median of the
  repeats after warm-up (`common.measure`); the note gives images/s.
* "memory of the compiled step": what XLA's buffer assignment gives the
  executable (`jit(step).lower(...).compile().memory_analysis()`): arguments
  (parameters, Adam moments, the training set held on the device, the batch
  indices) + outputs (the new state, the metrics) + temporaries (activations
  kept for the backward pass, gradients, scratch) - outputs aliased to
  arguments (none: the step donates nothing). This is the memory the step
  needs while it runs, without the process's other allocations (docs/results.md's
  "peak memory" column is not this figure). Where the backend reports it
  (GPU, TPU), the note adds the device's `peak_bytes_in_use`: the peak of
  the whole process so far, so it never decreases from one row to the next.
"""

import jax

from benchmarks.common import Row, Settings, device, measure, timer
from benchmarks.trainers import JaxSteps
from experiments import lvae as lvae_experiment
from lvm_jax import data

NAME = "lvae_step"
DATASET = "mnist_embedded"
LAYERS = (1, 3, 6)
BATCHES = (64, 128)
MB = 1e6


def build(dataset: data.Dataset, layers: int):
    """The experiment's model and objective at its command-line defaults."""
    config = lvae_experiment.Config(latent_layers=layers)
    model = lvae_experiment.build_model(config, dataset.event_shape,
                                        lvae_experiment.default_likelihood(dataset))
    init_data = dataset.train[:lvae_experiment.INIT_EXAMPLES] if config.data_init else None
    return model, lvae_experiment.make_objective(
        model, lvae_experiment.default_free_bits(layers), init_data)


def compiled_bytes(compiled: jax.stages.Compiled) -> tuple[int, str]:
    """The compiled step's memory (arguments + outputs + temporaries - aliased), with its
    breakdown in words."""
    m = compiled.memory_analysis()
    if m is None:  # best-effort API: a backend may not implement it
        raise RuntimeError("this backend gives no memory analysis of compiled executables")
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    parts = (f"arguments {m.argument_size_in_bytes / MB:.1f} MB + outputs "
             f"{m.output_size_in_bytes / MB:.1f} MB + temporaries {m.temp_size_in_bytes / MB:.1f} "
             f"MB - aliased {m.alias_size_in_bytes / MB:.1f} MB")
    return total, parts


def device_peak_bytes() -> int | None:
    """The device's peak bytes in use over the process so far, where the backend reports it."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def run(settings: Settings) -> list[Row]:
    dataset = data.load(DATASET)
    number = 1 if settings.quick else 3
    rows = []
    for layers in LAYERS:
        _, objective = build(dataset, layers)
        for batch in BATCHES:
            steps = JaxSteps(objective, dataset.train, batch, settings.seed)
            num_params = sum(p.size for p in jax.tree.leaves(steps.state.params))
            total, parts = compiled_bytes(steps.compile())
            seconds = measure(timer(steps.step, number), settings)
            peak = device_peak_bytes()
            name = (f"Ladder VAE, {layers} stochastic layer{'s' if layers > 1 else ''} "
                    f"({num_params / 1e6:.2f} M parameters), 32x32x1 ({DATASET}, binarized)")
            rows.append(Row(
                benchmark=NAME, model=name, step="train step (fwd + bwd + Adam)", batch=batch,
                lvm_jax=1e3 * seconds, unit="ms per step", higher_is_better=False,
                device=device(),
                note=f"{batch / seconds:.1f} images/s, {1 / seconds:.2f} steps/s; one compiled "
                     f"call per step, as fit on CPU; steps per sample: {number}"))
            rows.append(Row(
                benchmark=NAME, model=name, step="memory of the compiled step", batch=batch,
                lvm_jax=total / MB, unit="MB per device (XLA buffers: args + outputs + temps)",
                higher_is_better=False, device=device(),
                note=f"compiled train step's memory_analysis(), for each of the "
                     f"{steps.mesh.devices.size} devices' part of the batch: {parts}"
                     + ("" if peak is None else
                        f"; device peak_bytes_in_use, process so far: {peak / MB:.1f} MB")))
            del steps
    return rows
