"""This tree's cached samplers against another tree's (default /work/main), side by side.

    python -m benchmarks.sampler_timing --other /path/to/old/tree [--rounds 3]

The priors of `benchmarks.vqvae` and `benchmarks.vqvae2_sampling` over K = 128 codes, with
random weights: the VQ-VAE-2's bottom prior (ConditionalGatedPixelCNN, dim 64, 8 layers,
head 256, conditioning stack of 64 channels and 2 blocks, given random top codes of half
its grid) and top prior (PixelSNAIL, dim 64, 2 blocks of 2 layers, 4 heads, key 32, value
64, head 256), and the VQ-VAE's PixelCNN and GatedPixelCNN at their defaults, as
experiments.vqvae trains them.
Each case (prior, grids per call, side) runs in a fresh process per tree: its
`sample_codes(method="cached")` compiled ahead of time (the compile time is reported), one
warm-up call, then the median wall and CPU time of `CALLS` calls. The trees alternate and
which goes first alternates each round (`core_timing.interleaved`), so that a change of the machine's load falls on
both; the CPU time shows what a shared machine does to the wall time. Prints and writes
the medians over rounds, the ratio this/other and the load average to
benchmarks/results/sampler_timing.{json,md}.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

THIS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(THIS, "benchmarks", "results", "sampler_timing")
K, CALLS = 128, 5
CASES = [("bottom", 1, 32), ("bottom", 100, 16), ("top", 1, 32), ("top", 100, 8),
         ("pixelcnn", 100, 8), ("gated", 1, 8), ("gated", 100, 8)]


def child(prior: str, num: int, side: int) -> dict:
    """{"compile_s", "wall_ms", "cpu_ms"} of one case in this process (the tree on sys.path)."""
    import jax
    import numpy as np

    from lvm_jax import nn as lnn

    models = {
        "bottom": lambda: lnn.ConditionalGatedPixelCNN(K, K, dim=64, num_layers=8, hidden=256,
                                                       condition_dim=64, num_condition_blocks=2),
        "top": lambda: lnn.PixelSNAIL(K, dim=64, num_blocks=2, layers_per_block=2, num_heads=4,
                                      key_dim=32, value_dim=64, hidden=256),
        "pixelcnn": lambda: lnn.PixelCNN(K),
        "gated": lambda: lnn.GatedPixelCNN(K)}
    model = models[prior]()
    keys = jax.random.split(jax.random.key(0), 3)
    codes = jax.random.randint(keys[0], (num, side, side), 0, K)
    condition = (jax.random.randint(keys[1], (num, side // 2, side // 2), 0, K)
                 if prior == "bottom" else None)
    variables = model.init(keys[2], codes, *([] if condition is None else [condition]))
    sample = jax.jit(lambda variables, key, condition: lnn.sample_codes(
        model, variables, key, num, side, side, "cached", condition))
    tic = time.perf_counter()
    compiled = sample.lower(variables, keys[0], condition).compile()
    compile_s = time.perf_counter() - tic
    jax.block_until_ready(compiled(variables, keys[0], condition))
    walls, cpus = [], []
    for i in range(CALLS):
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(variables, jax.random.key(i), condition))
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"compile_s": compile_s, "wall_ms": 1e3 * float(np.median(walls)),
            "cpu_ms": 1e3 * float(np.median(cpus))}


def measure(tree: str, case: tuple) -> dict:
    """`child(*case)` run in a fresh process importing `tree`'s code."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *map(str, case)],
                         cwd=tree, env={**os.environ, "PYTHONPATH": tree}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--other", default="/work/main")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        prior, num, side = args.child
        print(json.dumps(child(prior, int(num), int(side))))
        return
    # Here, not at the top: a child runs this file in the other tree, which may lack core_timing.
    from benchmarks.core_timing import interleaved

    trees = {"this": THIS, "other": os.path.abspath(args.other)}
    load_before = os.getloadavg()
    rows = []
    for case in CASES:
        times = interleaved(trees, lambda tree: measure(tree, case), args.rounds)
        row = {"prior": case[0], "grids": case[1], "side": case[2]}
        for name, runs in times.items():
            for key in ("compile_s", "wall_ms", "cpu_ms"):
                row[f"{name}_{key}"] = statistics.median(r[key] for r in runs)
        row["wall_ratio_this_over_other"] = row["this_wall_ms"] / row["other_wall_ms"]
        rows.append(row)
        print(f"{case[0]} {case[1]}x{case[2]}x{case[2]}: this {row['this_wall_ms']:.1f} ms "
              f"(cpu {row['this_cpu_ms']:.1f}, compile {row['this_compile_s']:.2f} s), other "
              f"{row['other_wall_ms']:.1f} ms (cpu {row['other_cpu_ms']:.1f}, compile "
              f"{row['other_compile_s']:.2f} s): {row['wall_ratio_this_over_other']:.2f}x",
              flush=True)
    result = {"other": trees["other"], "rounds": args.rounds, "calls_per_round": CALLS,
              "load_before": load_before, "load_after": os.getloadavg(), "rows": rows}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(RESULTS + ".md", "w") as f:
        f.write(f"Cached samplers, this tree against {trees['other']} ({args.rounds} rounds, "
                f"median of {CALLS} calls each; load {load_before[0]:.2f} before, "
                f"{result['load_after'][0]:.2f} after)\n\n| prior | grids x side | this ms "
                "(cpu) | other ms (cpu) | this/other | compile this / other s |\n"
                "|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['prior']} | {r['grids']} x {r['side']}x{r['side']} | "
                    f"{r['this_wall_ms']:.1f} ({r['this_cpu_ms']:.1f}) | {r['other_wall_ms']:.1f} "
                    f"({r['other_cpu_ms']:.1f}) | {r['wall_ratio_this_over_other']:.2f} | "
                    f"{r['this_compile_s']:.2f} / {r['other_compile_s']:.2f} |\n")


if __name__ == "__main__":
    main()
