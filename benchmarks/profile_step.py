"""Where a training step's time goes, per kind of operation: lvm_jax's and PyTorch's.

    python -m benchmarks.profile_step [--model "image VAE 32x32x3"] [--steps 5] [--top 25]

Runs `--steps` compiled training steps of one model of MODELS (batch 128, `fit`'s compiled
step) under `jax.profiler`, reads the per-operation events of the trace, and prints the
milliseconds per step of each kind of operation (YNNPACK fusions: the convolutions XLA
hands to YNNPACK; other convolutions, which run on XLA's slower Eigen path, such as the
zero-dilated input gradients of strided convolutions; transposes, the layout changes of
kernel gradients; everything else) and of the `--top` slowest operations, each with its
output shape and op from the compiled HLO. Then the same step of the PyTorch twin (eager,
as benchmarks.trainers runs it) under `torch.profiler`, its self time per kind (convolutions
forward and backward, layout copies, the optimizer, everything else) and its `--top` slowest
operators, so that the two profiles compare kind by kind. Profiling slows the step itself (compare
kinds, not the total, with the step benchmarks). It profiles one JAX device, not the CPU split
of the experiments (`lvm_jax.cpu_devices`): with 8 device threads on 2 cores, an operation's
traced duration also counts the time its thread waits for a core, and the all-reduces' the
time each device waits for the others (measured: 292 of 941 traced ms per image-VAE step).
Writes the table to benchmarks/results/profile_step.md.
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

from benchmarks import torch_models, vqvae as vqvae_benchmark, xla_flags
from benchmarks.trainers import JaxSteps, TorchSteps, to_torch_images
from experiments import vqvae as vqvae_experiment
from lvm_jax.data import batching
from lvm_jax.models import vqvae

PRIOR_MODELS = {"PixelCNN prior 8x8": "pixelcnn", "Gated PixelCNN prior 8x8": "gated"}
MODELS = (*xla_flags.MODELS, *PRIOR_MODELS)

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results", "profile_step")


def results_file(model: str) -> str:
    """benchmarks/results/profile_step/<model, as a file name>.md"""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    return os.path.join(RESULTS_DIR, re.sub(r"[^\w]+", "_", model).strip("_") + ".md")


def kind(name: str, hlo: str) -> str:
    if name.startswith("ynn_fusion"):
        return "YNNPACK fusions (convolutions)"
    if " convolution(" in hlo:
        return "convolutions on XLA's Eigen path"
    if "transpose" in name:
        return "transposes (layout changes)"
    return "other operations"


def jax_steps(model: str) -> JaxSteps:
    """lvm_jax's training steps of `model` (a name of MODELS) at batch 128."""
    if model in PRIOR_MODELS:
        prior = vqvae.PRIORS[PRIOR_MODELS[model]](vqvae.NUM_CODES)
        return JaxSteps(vqvae_experiment.prior_objective(prior), vqvae_benchmark.prior_codes(0),
                        vqvae_benchmark.BATCH, seed=0)
    return xla_flags._steps(model)


def torch_step(model: str):
    """PyTorch's training step of `model`'s twin at batch 128: a callable."""
    if model in PRIOR_MODELS:
        import torch

        twin = vqvae_benchmark.PRIORS[PRIOR_MODELS[model]][1](vqvae.NUM_CODES)
        return TorchSteps(twin, torch.from_numpy(vqvae_benchmark.prior_codes(0)).long(), vqvae_benchmark.BATCH,
                          0, loss_fn=torch_models.prior_loss_fn, prepare=lambda codes: codes).step
    channels = int(model[-1])
    images = to_torch_images(xla_flags.data.load(xla_flags.DATASETS[channels]).train)
    if model.startswith("VQ-VAE"):
        return TorchSteps(torch_models.VQVAE(channels, vqvae.NUM_CODES, vqvae.CODE_DIM), images,
                          xla_flags.BATCH, 0, loss_fn=torch_models.vqvae_loss_fn).step
    prior = "made" if model.startswith("VLAE") else "standard"
    return TorchSteps(torch_models.conv_vae(channels, prior), images, xla_flags.BATCH, 0).step


def torch_kind(name: str) -> str:
    if "convolution_backward" in name:
        return "convolutions, backward"
    if "convolution" in name:
        return "convolutions, forward"
    if name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"):
        return "copies (layout changes)"
    if "adam" in name.lower() or "_foreach" in name:
        return "optimizer (Adam)"
    return "other operations"


def torch_operation_milliseconds(step, number: int) -> dict[str, float]:
    """{PyTorch operator: self milliseconds per step} from a profile of `number` steps."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(number):
            step()
    return {event.key: event.self_cpu_time_total / 1e3 / number
            for event in profile.key_averages() if event.self_cpu_time_total > 0}


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


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="image VAE 32x32x3", choices=MODELS)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    steps = jax_steps(args.model)
    for _ in range(3):  # compile and warm up
        steps.step()
    hlo = compiled_instructions(steps)
    times = {name: ms for name, ms in operation_milliseconds(steps, args.steps).items()
             if name in hlo}
    by_kind = collections.Counter()
    for name, ms in times.items():
        by_kind[kind(name, hlo[name])] += ms
    lines = [f"# Where the {args.model} training step's time goes (batch 128, profiled)", "",
             f"`python -m benchmarks.profile_step --model \"{args.model}\"`, "
             f"{args.steps} steps, load average {os.getloadavg()[0]:.2f}; ms per step.", "",
             "| kind | ms per step |", "|---|---|"]
    lines += [f"| {k} | {ms:.1f} |" for k, ms in by_kind.most_common()]
    lines += [f"| all operations | {sum(by_kind.values()):.1f} |", "",
              "| ms per step | operation | output and op (compiled HLO) |", "|---|---|---|"]
    for name, ms in sorted(times.items(), key=lambda item: -item[1])[:args.top]:
        op = re.sub(r", metadata=.*", "", hlo[name])[:120].replace("|", "\\|")
        lines.append(f"| {ms:.1f} | {name} | `{op}` |")
    torch_step_fn = torch_step(args.model)
    for _ in range(3):
        torch_step_fn()
    torch_times = torch_operation_milliseconds(torch_step_fn, args.steps)
    torch_by_kind = collections.Counter()
    for name, ms in torch_times.items():
        torch_by_kind[torch_kind(name)] += ms
    lines += ["", f"## PyTorch (eager, {_torch_threads()} threads), the same step", "",
              "| kind | ms per step (self time) |", "|---|---|"]
    lines += [f"| {k} | {ms:.1f} |" for k, ms in torch_by_kind.most_common()]
    lines += [f"| all operators | {sum(torch_by_kind.values()):.1f} |", "",
              "| ms per step | operator |", "|---|---|"]
    lines += [f"| {ms:.1f} | {name} |" for name, ms in
              sorted(torch_times.items(), key=lambda item: -item[1])[:args.top]]
    text = "\n".join(lines) + "\n"
    with open(results_file(args.model), "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
