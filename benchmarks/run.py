"""Runs the speed and quality benchmarks of lvm_jax against PyTorch.

    python -m benchmarks.run [--only NAME ...] [--quick] [--quality_epochs N] [--repeats N]

Prints the table and writes benchmarks/results/latest.json and latest.md
(`--quick` smoke runs write quick.json and quick.md instead, so they never
replace real figures). Needs the `bench` extra (pip install -e ".[bench]"); a CPU build of PyTorch
is enough.

To add a benchmark: a module with a function `(Settings) -> list[Row]`,
registered in BENCHMARKS below.
"""

import argparse
import dataclasses
import os
import sys
import time

from benchmarks import conv_transpose, image_vae, image_vae_quality, report, vae2d, vlae, vqvae
from benchmarks import iwae, lvae, scaling, startup, vqvae2_sampling, xla_flags
from benchmarks.common import NUM_CORES, Settings, default_torch_threads, machine
from experiments import common
from experiments import vae as vae_experiment

BENCHMARKS = {
    "vae2d": vae2d.run,
    "image_vae": image_vae.run,
    "image_vae_quality": image_vae_quality.run,
    "vlae_sampling": vlae.sampling,
    "vlae_step": vlae.train_step,
    "vqvae_sampling": vqvae.sampling,
    "vqvae_step": vqvae.train_step,
    "vqvae2_sampling": vqvae2_sampling.run,
    "conv_transpose": conv_transpose.run,
    "lvae_step": lvae.run,
    "iwae": iwae.run,
    "scaling": scaling.run,
    "xla_flags": xla_flags.run,
    "startup": startup.run,
}

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def _registry_position(name: str) -> int:
    """Table order: the registry's, then benchmarks no longer registered."""
    return list(BENCHMARKS).index(name) if name in BENCHMARKS else len(BENCHMARKS)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), metavar="NAME",
                   help=f"run only these, of: {', '.join(BENCHMARKS)}")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: small workloads, 1 repeat; writes results/quick.*")
    p.add_argument("--quality_epochs", type=int, default=Settings.quality_epochs,
                   help="training epochs of the image_vae_quality comparison")
    p.add_argument("--repeats", type=int, default=Settings.repeats,
                   help="timed repetitions per side (medians are reported)")
    p.add_argument("--torch_threads", type=int, nargs="+", default=default_torch_threads(),
                   help="PyTorch thread counts to time; the fastest is reported")
    p.add_argument("--processes", type=int, default=5,
                   help="fresh processes per training-step comparison of the image VAE, VLAE, "
                        "VQ-VAE and priors (PyTorch's speed moves more between processes than "
                        "within one); the ratio is the median of the paired per-process ratios, "
                        "with their range; 1 with --quick")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=Settings.dtype,
                   help="compute dtype of lvm_jax's models in the training-step comparisons "
                        "(bfloat16 for accelerators; PyTorch stays float32); other than float32, "
                        "results go to latest_<dtype>.*")
    p.add_argument("--torch_device", default=Settings.torch_device,
                   help="where PyTorch runs the training-step comparisons: cpu, or cuda on a GPU "
                        "machine (benchmarks/device_check.sh); with --dtype bfloat16 PyTorch "
                        "runs under bfloat16 autocast (AMP), the fair pair")
    p.add_argument("--results", default=None, metavar="NAME",
                   help="write results/NAME.json and NAME.md instead of latest[_<dtype>].* "
                        "(e.g. a file per device)")
    p.add_argument("--seed", type=int, default=Settings.seed)
    p.add_argument("--note", default=None,
                   help="a sentence about the conditions, written into the results file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Before JAX starts: the CPU as `python -m experiments.vae` splits it (the 2D VAE benchmark
    # keeps to one device, as its experiment does).
    common.split_cpu(vae_experiment.Config(batch_size=image_vae.BATCH))
    settings = Settings(quick=args.quick, quality_epochs=args.quality_epochs,
                        repeats=1 if args.quick else args.repeats, seed=args.seed,
                        torch_threads=tuple(args.torch_threads),
                        processes=1 if args.quick else args.processes, dtype=args.dtype,
                        torch_device=args.torch_device)
    name = args.results or ("quick" if args.quick else "latest") + (
        "" if args.dtype == "float32" else f"_{args.dtype}")
    json_path = os.path.join(RESULTS_DIR, f"{name}.json")
    results = report.load(json_path)
    if args.note:
        results["note"] = args.note
    for benchmark in args.only or BENCHMARKS:
        print(f"--- {benchmark}", flush=True)
        load_before, tic = os.getloadavg()[0], time.perf_counter()
        rows = BENCHMARKS[benchmark](settings)
        results["benchmarks"][benchmark] = {
            "machine": machine(), "settings": dataclasses.asdict(settings),
            "seconds": time.perf_counter() - tic, "load_before": load_before,
            "load_after": os.getloadavg()[0], "rows": [r.as_dict() for r in rows]}
        results["benchmarks"] = dict(sorted(results["benchmarks"].items(),
                                            key=lambda item: _registry_position(item[0])))
        print(report.text_table(rows), flush=True)
        report.save(results, json_path, os.path.join(RESULTS_DIR, f"{name}.md"))
    print(f"\n{report.markdown(results)}")
    print(f"written to {os.path.relpath(json_path)} and {name}.md ({NUM_CORES} cores)")


if __name__ == "__main__":
    main(sys.argv[1:])
