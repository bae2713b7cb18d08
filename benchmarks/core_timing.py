"""This tree against another (default /work/main), side by side: the warm end-to-end
`python -m experiments.vae_2d --dataset 1`, `python -c "import experiments.vae_2d"` and, with
`--readme_repeats N`, the README's main command (`python -m experiments.vlae --epochs 5
--batch_size 32`, about a minute a run).

    python -m benchmarks.core_timing [--other /work/main] [--repeats 5] [--readme_repeats 3]

Each run is a fresh process with PYTHONPATH and the working directory set to its tree, each
training run in a fresh workdir under /tmp. One warm-up run per tree and command fills the
persistent compilation cache first (not counted); then the trees alternate, and which goes first
alternates too, so that a change of the machine's load falls on both. Prints and writes
the medians and ranges (seconds) and the load average before and after to
benchmarks/results/core_timing.{json,md}. The machine may be shared: read the load average.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import startup

THIS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(THIS, "benchmarks", "results", "core_timing")
# {results key: (the command as a user types it, the arguments run)}: the whole runs are
# startup's, without the progress bar.
COMMANDS = {
    "vae_2d_dataset_1": ("python -m " + " ".join(startup.VAE_2D_RUN[0]),
                         ["-m", *startup.VAE_2D_RUN[0], "--no_progress"]),
    "import_experiments_vae_2d": ('python -c "import experiments.vae_2d"',
                                  ["-c", "import experiments.vae_2d"]),
    "readme_main_command": ("python -m " + " ".join(startup.MAIN_RUN[0]),
                            ["-m", *startup.MAIN_RUN[0], "--no_progress"])}


def seconds(tree: str, argv: list[str]) -> float:
    """Wall time of `python argv` run in `tree`, importing that tree's code; a training run
    (`-m experiments...`) gets a fresh workdir under /tmp, removed afterwards."""
    workdir = tempfile.mkdtemp(prefix="core_timing_") if argv[0] == "-m" else None
    command = [sys.executable, *argv, *(["--workdir", workdir] if workdir else [])]
    tic = time.perf_counter()
    subprocess.run(command, cwd=tree, env={**os.environ, "PYTHONPATH": tree}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - tic
    if workdir:
        shutil.rmtree(workdir)
    return elapsed


def interleaved(trees: dict[str, str], measure, repeats: int) -> dict[str, list]:
    """{name: [measure(tree)] * repeats}, the trees alternating, each pair's order alternating."""
    times = {name: [] for name in trees}
    for i in range(repeats):
        for name in (list(trees) if i % 2 == 0 else list(trees)[::-1]):
            times[name].append(measure(trees[name]))
    return times


def summary(times: dict[str, list]) -> dict:
    """Median and range of each tree's times, and the other's median over this one's."""
    out = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                  "runs_s": t} for name, t in times.items()}
    out["speedup_this_over_other"] = out["other"]["median_s"] / out["this"]["median_s"]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", default="/work/main", help="the tree to compare with")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each tree per command")
    parser.add_argument("--readme_repeats", type=int, default=0,
                        help="runs of each tree of the README's main command (0: not run)")
    args = parser.parse_args(argv)
    trees = {"this": THIS, "other": os.path.abspath(args.other)}
    repeats = {key: args.readme_repeats if key == "readme_main_command" else args.repeats
               for key in COMMANDS}
    commands = {key: command for key, (_, command) in COMMANDS.items() if repeats[key] > 0}
    load_before = os.getloadavg()
    for command in commands.values():  # warm the compilation cache, not counted
        for tree in trees.values():
            seconds(tree, command)
    results = {"trees": trees, "load_average_before": load_before}
    for key, command in commands.items():
        results[key] = summary(interleaved(trees, lambda tree: seconds(tree, command),
                                           repeats[key]))
    results["load_average_after"] = os.getloadavg()
    lines = [f"# This tree ({THIS}) against {trees['other']}, interleaved runs",
             "", f"load average before {load_before}, after {results['load_average_after']}", "",
             "| command | runs | this: median (range) s | other: median (range) s | other / this |",
             "|---|---|---|---|---|"]
    for key in commands:
        row = results[key]
        cells = [f"{row[n]['median_s']:.2f} ({row[n]['min_s']:.2f}-{row[n]['max_s']:.2f})"
                 for n in ("this", "other")]
        lines.append(f"| `{COMMANDS[key][0]}` | {repeats[key]} | {cells[0]} | {cells[1]} | "
                     f"{row['speedup_this_over_other']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS + ".json", "w") as f:
        json.dump(results, f, indent=2)
    with open(RESULTS + ".md", "w") as f:
        f.write(text)
    return results


if __name__ == "__main__":
    main()
