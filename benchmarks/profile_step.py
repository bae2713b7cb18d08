"""Where a training step's time goes: XLA:CPU's own per-operation times, lvm_jax alone.

    python -m benchmarks.profile_step [--model "image VAE 32x32x3"] [--steps 5] [--top 25]

Runs `--steps` compiled training steps of one model of benchmarks.xla_flags.MODELS (batch 128,
`fit`'s compiled step) under `jax.profiler`, reads the per-operation events of the trace, and
prints the milliseconds per step of each kind of operation (YNNPACK fusions: the
convolutions XLA hands to YNNPACK; other convolutions, which run on XLA's slower Eigen path,
such as the zero-dilated input gradients of strided convolutions; transposes, the layout
changes of kernel gradients; everything else) and of the `--top` slowest operations, each
with its output shape and op from the compiled HLO. Profiling slows the step itself (compare
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

from benchmarks.xla_flags import MODELS, _steps
from lvm_jax.data import batching

RESULTS_FILE = os.path.join(os.path.dirname(__file__), "results", "profile_step.md")


def kind(name: str, hlo: str) -> str:
    if name.startswith("ynn_fusion"):
        return "YNNPACK fusions (convolutions)"
    if " convolution(" in hlo:
        return "convolutions on XLA's Eigen path"
    if "transpose" in name:
        return "transposes (layout changes)"
    return "other operations"


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


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="image VAE 32x32x3", choices=MODELS)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    steps = _steps(args.model)
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
    text = "\n".join(lines) + "\n"
    with open(RESULTS_FILE, "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
