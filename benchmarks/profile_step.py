"""Where a training step's time goes, per kind of operation: lvm_jax's against PyTorch's.

    python -m benchmarks.profile_step [--model NAME ...] [--steps 5] [--top 20]

For each model of MODELS (default: all six), in one process: lvm_jax's compiled training step
(batch 128, `fit`'s step) is timed unprofiled, then run `--steps` times under `jax.profiler`,
whose per-operation events are summed by kind (convolutions forward and backward, layout
transposes, the optimizer, everything else); then the PyTorch twin's same step (eager, as
benchmarks.trainers runs it) likewise, under `torch.profiler` (self time per operator). A
profile's durations do not add up to the step (operations overlap on the cores, and
profiling slows them), so each side's kinds are scaled to its own unprofiled step: the
comparison table says, in milliseconds of the real step, where lvm_jax spends more or less
than PyTorch. The `--top` slowest operations of each side follow, with XLA's output shape
and op from the compiled HLO.

It profiles one JAX device, not the CPU split of the experiments (`lvm_jax.cpu_devices`):
with 8 device threads on 2 cores, an operation's traced duration also counts the time its
thread waits for a core, and the all-reduces' the time each device waits for the others.
PyTorch runs eager, not compiled: the inductor's fused kernels do not map onto operations.
Writes one file per model to benchmarks/results/profile_step/.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax
import numpy as np
import torch

from benchmarks import torch_models, vqvae as vqvae_benchmark, xla_flags
from benchmarks.common import Settings, cpu_model, measure, timer
from benchmarks.trainers import JaxSteps, TorchSteps, to_torch_images
from experiments import vqvae as vqvae_experiment
from lvm_jax import data
from lvm_jax.data import batching
from lvm_jax.models import vqvae

PRIOR_MODELS = {"PixelCNN prior 8x8": "pixelcnn", "Gated PixelCNN prior 8x8": "gated"}
MODELS = (*xla_flags.MODELS, *PRIOR_MODELS)

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results", "profile_step")
# The kinds of operation both profiles are summed into.
CONV_FORWARD, CONV_BACKWARD = "convolutions, forward", "convolutions, backward"
LAYOUT, OPTIMIZER = "layout changes (transposes, copies)", "optimizer (Adam)"
OTHER = "everything else"
KINDS = (CONV_FORWARD, CONV_BACKWARD, LAYOUT, OPTIMIZER, OTHER)


def results_file(model: str) -> str:
    """benchmarks/results/profile_step/<model, as a file name>.md"""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    return os.path.join(RESULTS_DIR, re.sub(r"[^\w]+", "_", model).strip("_") + ".md")


def kind(name: str, hlo: str) -> str:
    """The kind of XLA operation `name` (its compiled HLO line `hlo`), in torch_kind's terms.

    A convolution is a backward one when JAX's autodiff made it: its op_name metadata runs
    through `transpose(jvp(...))`. The optimizer's operations are those `fit`'s step traces
    in its "optimizer" named scope."""
    op_name = re.search(r'op_name="([^"]*)"', hlo)
    op_name = op_name.group(1) if op_name else ""
    if name.startswith("ynn_fusion") or " convolution(" in hlo:
        return CONV_BACKWARD if "transpose(" in op_name else CONV_FORWARD
    if "transpose" in name:
        return LAYOUT
    if "/optimizer/" in op_name:
        return OPTIMIZER
    return OTHER


def jax_steps(model: str) -> JaxSteps:
    """lvm_jax's training steps of `model` (a name of MODELS) at batch 128."""
    if model in PRIOR_MODELS:
        prior = vqvae.PRIORS[PRIOR_MODELS[model]](vqvae.NUM_CODES)
        return JaxSteps(vqvae_experiment.prior_objective(prior), vqvae_benchmark.prior_codes(0),
                        vqvae_benchmark.BATCH, seed=0)
    return xla_flags.model_steps(model)


def torch_step(model: str):
    """PyTorch's training step of `model`'s twin at batch 128: a callable."""
    if model in PRIOR_MODELS:
        twin = vqvae_benchmark.PRIORS[PRIOR_MODELS[model]][1](vqvae.NUM_CODES)
        codes = torch.from_numpy(vqvae_benchmark.prior_codes(0)).long()
        return TorchSteps(twin, codes, vqvae_benchmark.BATCH, 0,
                          loss_fn=torch_models.prior_loss_fn, prepare=lambda batch: batch).step
    channels = int(model[-1])
    images = to_torch_images(data.load(xla_flags.DATASETS[channels]).train)
    if model.startswith("VQ-VAE"):
        return TorchSteps(torch_models.VQVAE(channels, vqvae.NUM_CODES, vqvae.CODE_DIM), images,
                          xla_flags.BATCH, 0, loss_fn=torch_models.vqvae_loss_fn).step
    prior = "made" if model.startswith("VLAE") else "standard"
    return TorchSteps(torch_models.conv_vae(channels, prior), images, xla_flags.BATCH, 0).step


def torch_kind(event) -> str:
    """The kind of a PyTorch profiler event: the optimizer's are those under Adam's step."""
    name, caller = event.name, event
    while caller is not None:
        if caller.name.startswith("Optimizer.step"):
            return OPTIMIZER
        caller = caller.cpu_parent
    if "convolution_backward" in name:
        return CONV_BACKWARD
    if "convolution" in name:
        return CONV_FORWARD
    if name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"):
        return LAYOUT
    return OTHER


def torch_operation_milliseconds(step, number: int) -> dict[tuple[str, str], float]:
    """{(PyTorch operator, kind): self milliseconds per step} from a profile of `number` steps."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(number):
            step()
    total = collections.Counter()
    for event in profile.events():
        if event.self_cpu_time_total > 0:
            total[event.name, torch_kind(event)] += event.self_cpu_time_total / 1e3 / number
    return total


def compiled_instructions(steps) -> dict[str, str]:
    """{instruction name: its HLO line} of the compiled step."""
    idx = batching.put_host_indices(np.zeros((1, steps.batch_size), np.int32), steps.mesh)
    text = steps.chunk.lower(steps.state, steps.data, idx, steps.key).compile().as_text()
    found = {}
    for line in text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*)", line)
        if match:
            found.setdefault(match.group(1), match.group(2))
    return found


def operation_milliseconds(steps, number: int) -> dict[str, float]:
    """{operation name: milliseconds per step} from a profile of `number` steps."""
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(number):
                steps.step()
        (trace,) = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(trace) as f:
            events = json.load(f)["traceEvents"]
    total = collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            total[event["name"]] += event["dur"] / 1e3 / number
    return total


def wall_milliseconds(step) -> float:
    """Median wall milliseconds per call of `step`, unprofiled: the harness's `measure` of 5
    samples of 3 calls, after one warm-up sample."""
    return 1e3 * measure(timer(step, 3), Settings(), warmup=1)


def per_step(by_kind: collections.Counter, wall_ms: float) -> dict[str, float]:
    """Each kind's share of the profiled time, in milliseconds of the unprofiled step.

    A profile's durations sum to more than the step's wall time (operations overlap on the
    cores, and profiling slows them), so each side's kinds are scaled to its own measured
    step: that is what compares across the two frameworks."""
    total = sum(by_kind.values())
    return {k: wall_ms * by_kind[k] / total for k in KINDS}


def profile(model: str, number: int, top: int) -> str:
    """The markdown report of `model`'s step profiled over `number` steps on both sides."""
    steps = jax_steps(model)
    jax_wall = wall_milliseconds(steps.step)
    hlo = compiled_instructions(steps)
    times = {name: ms for name, ms in operation_milliseconds(steps, number).items()
             if name in hlo}
    by_kind = collections.Counter()
    for name, ms in times.items():
        by_kind[kind(name, hlo[name])] += ms
    eigen = sum(ms for name, ms in times.items()
                if " convolution(" in hlo[name] and not name.startswith("ynn_fusion"))

    torch_step_fn = torch_step(model)
    torch_wall = wall_milliseconds(torch_step_fn)
    torch_times = torch_operation_milliseconds(torch_step_fn, number)
    torch_by_kind = collections.Counter()
    for (_, kind_of), ms in torch_times.items():
        torch_by_kind[kind_of] += ms

    jax_ms, torch_ms = per_step(by_kind, jax_wall), per_step(torch_by_kind, torch_wall)
    lines = [f"# Where the {model} training step's time goes (batch 128)", "",
             f"`python -m benchmarks.profile_step --model \"{model}\"`: {number} profiled steps "
             f"each side, {cpu_model()}, load average {os.getloadavg()[0]:.2f}. lvm_jax on one "
             f"JAX device; PyTorch eager at {torch.get_num_threads()} threads. Each side's "
             "profiled time per kind is scaled to its own unprofiled step (median wall time, in the "
             "same process), so the columns add up to the steps' wall times.", "",
             "| kind | lvm_jax ms per step | PyTorch ms per step | lvm_jax - PyTorch (ms) |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {jax_ms[k]:.1f} ({by_kind[k] / sum(by_kind.values()):.0%}) | "
              f"{torch_ms[k]:.1f} ({torch_by_kind[k] / sum(torch_by_kind.values()):.0%}) | "
              f"{jax_ms[k] - torch_ms[k]:+.1f} |" for k in KINDS]
    lines += [f"| the step (wall) | {jax_wall:.1f} | {torch_wall:.1f} | "
              f"{jax_wall - torch_wall:+.1f} |", "",
              f"Profiled sums: lvm_jax {sum(by_kind.values()):.1f} ms per step (of which "
              f"{eigen:.1f} convolutions on XLA's slower Eigen path, the rest YNNPACK's), "
              f"PyTorch {sum(torch_by_kind.values()):.1f} ms (self time).", "",
              f"## lvm_jax: the {top} slowest operations (profiled ms per step)", "",
              "| ms | operation | kind | output and op (compiled HLO) |", "|---|---|---|---|"]
    for name, ms in sorted(times.items(), key=lambda item: -item[1])[:top]:
        op = re.sub(r", metadata=.*", "", hlo[name])[:110].replace("|", "\\|")
        lines.append(f"| {ms:.1f} | {name} | {kind(name, hlo[name])} | `{op}` |")
    lines += ["", f"## PyTorch: the {top} slowest operators (profiled self ms per step)", "",
              "| ms | operator | kind |", "|---|---|---|"]
    lines += [f"| {ms:.1f} | {name} | {kind_of} |" for (name, kind_of), ms in
              sorted(torch_times.items(), key=lambda item: -item[1])[:top]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=list(MODELS), choices=MODELS,
                   help="the models to profile (default: all)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    for model in args.model:
        text = profile(model, args.steps, args.top)
        with open(results_file(model), "w") as f:
            f.write(text)
        print(text, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
