"""Streaming a dataset larger than the training process's memory cap (issue 24, item 5).

    python -m benchmarks.streaming [--gigabytes 4] [--input_cap_mb 512] [--train_cap_mb 1536]
                                   [--train_seconds 150]

1. Writes a shard folder (`lvm_jax.data.shards`) of 32x32x3 uint8 images, the
   format of ImageNet 32 and the size the image VAE trains on: the photo
   patches of `patches_embedded`, each shifted, flipped and brightened at random
   so that no two are alike, `--gigabytes` of them (kept for reruns).
2. Input alone: a fresh process under `--input_cap_mb` reads one whole epoch of
   the folder through the training pipeline (`stream.TrainBatches`, the run's
   batch size and order), timing its images/s and recording its peak RSS.
3. Training: `python -m experiments.vae --dataset shards --input stream` under
   `--train_cap_mb` for `--train_seconds`, then stopped; its steps/s come from
   metrics.csv (the compiling first step left out), its peak RSS from /proc. Its
   cap is larger: JAX, XLA's compiled programs and the CPU devices alone hold
   about 1.3 GB in this process, whatever the data.

The cap is a cgroup (v2 memory.max, else v1 memory.limit_in_bytes) that both
processes run in; `resource.setrlimit(RLIMIT_AS)` cannot cap a JAX process,
whose address-space reservations alone exceed any useful limit. A cgroup also
charges page cache that the process brings in, but reclaims it rather than fail.
Where no cgroup is writable the benchmark says so and reports peak RSS alone. The
folder's files are in the page cache after writing them, so the input figures are
those of reads from memory, not from disk. Writes
benchmarks/results/streaming.{json,md}; `--report` rewrites the .md from the .json.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from lvm_jax.data import embedded, shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
IMAGE_SHAPE = (32, 32, 3)
TEST_IMAGES = 1024
CGROUP_NAME = "lvm_jax_streaming_benchmark"


def varied_patches(count: int, seed: int, chunk: int = shards.DEFAULT_PER_SHARD):
    """`count` uint8 (32, 32, 3) images in chunks: photo patches, each rolled by up to 8
    pixels, maybe flipped, and scaled in brightness by 0.6..1.2."""
    patches = embedded.photo_patches()[0]
    rng = np.random.default_rng(seed)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        images = patches[rng.integers(0, len(patches), n)].astype(np.float32)
        images = np.roll(images, tuple(rng.integers(-8, 9, 2)), axis=(1, 2))
        flip = rng.random(n) < 0.5
        images[flip] = images[flip, :, ::-1]
        images *= rng.uniform(0.6, 1.2, (n, 1, 1, 1)).astype(np.float32)
        yield np.clip(images, 0, 255).astype(np.uint8)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))


def ensure_folder(folder: str, gigabytes: float) -> dict:
    """Writes the folder unless it already holds this many images; returns its facts."""
    count = int(gigabytes * 2**30 / np.prod(IMAGE_SHAPE))
    try:
        if shards.read_manifest(folder)["splits"]["train"]["count"] == count:
            return {"images": count, "bytes": folder_bytes(folder), "write_seconds": None}
    except shards.DataError:
        pass
    shutil.rmtree(folder, ignore_errors=True)
    tic = time.perf_counter()
    shards.write(folder, {"train": varied_patches(count, 0),
                          "test": varied_patches(TEST_IMAGES, 1)})
    return {"images": count, "bytes": folder_bytes(folder),
            "write_seconds": time.perf_counter() - tic}


class Cgroup:
    """A memory cgroup of `limit` bytes that child processes join, or None if none is
    writable here."""

    def __init__(self):
        v2, v1 = "/sys/fs/cgroup", "/sys/fs/cgroup/memory"
        if os.path.exists(os.path.join(v2, "cgroup.controllers")):
            self.path, self.limit_file, self.peak_file = (os.path.join(v2, CGROUP_NAME),
                                                          "memory.max", "memory.peak")
        else:
            self.path, self.limit_file, self.peak_file = (os.path.join(v1, CGROUP_NAME),
                                                          "memory.limit_in_bytes",
                                                          "memory.max_usage_in_bytes")
        try:
            os.makedirs(self.path, exist_ok=True)
            self.enforced = True
        except OSError as err:
            self.enforced, self.why_not = False, str(err)

    def cap(self, limit: int) -> int | None:
        """Sets the limit, in bytes, and resets the peak; returns the limit if enforced."""
        if not self.enforced:
            return None
        with open(os.path.join(self.path, self.limit_file), "w") as f:
            f.write(str(limit))
        if self.peak_file == "memory.max_usage_in_bytes":
            with open(os.path.join(self.path, self.peak_file), "w") as f:
                f.write("0")
        return limit

    def join(self) -> None:
        """Moves the calling process in (a `preexec_fn`)."""
        if self.enforced:
            with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    def peak(self) -> int | None:
        """The cgroup's peak charge in bytes since it was created (page cache included)."""
        try:
            with open(os.path.join(self.path, self.peak_file)) as f:
                return int(f.read())
        except OSError:
            return None

    def remove(self) -> None:
        if self.enforced:
            os.rmdir(self.path)


def peak_rss(pid: int) -> int:
    """VmHWM of process `pid`, in bytes: the most resident memory it has held."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


INPUT_ONLY = """
import json, os, sys, time
from lvm_jax.data import batching, shards, stream

folder, batch = sys.argv[1], int(sys.argv[2])
source = shards.ShardSource(folder)
steps = len(source) // batch
batches = stream.TrainBatches(source, 0, steps, batch, slice(0, len(source)), steps)
iterator = batches.iterator(step=0)
next(iterator)
tic = time.perf_counter()
for _ in range(steps - 1):
    next(iterator)
seconds = time.perf_counter() - tic
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps({"images": (steps - 1) * batch, "seconds": seconds, "peak_rss_bytes": hwm}))
"""


def measure_input(folder: str, batch_size: int, cgroup: Cgroup) -> dict:
    proc = subprocess.run([sys.executable, "-c", INPUT_ONLY, folder, str(batch_size)], cwd=REPO,
                          capture_output=True, text=True, preexec_fn=cgroup.join, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"the input-only process failed ({proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**out, "images_per_second": out["images"] / out["seconds"]}


def measure_training(folder: str, workdir: str, batch_size: int, seconds: float,
                     cgroup: Cgroup) -> dict:
    command = [sys.executable, "-m", "experiments.vae", "--dataset", "shards", "--data_dir",
               folder, "--input", "stream", "--epochs", "1", "--batch_size", str(batch_size),
               "--workdir", workdir, "--no_progress"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=cgroup.join)
    deadline, rss = time.monotonic() + seconds, 0
    while time.monotonic() < deadline and proc.poll() is None:
        rss = max(rss, peak_rss(proc.pid))
        time.sleep(1)
    alive = proc.poll() is None
    if alive:
        rss = max(rss, peak_rss(proc.pid))
        proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0]
    if not alive:
        raise RuntimeError(f"training ended before {seconds} s (status {proc.returncode}): "
                           f"{output[-2000:]}")
    with open(os.path.join(workdir, "metrics.csv")) as f:
        header = f.readline().strip().split(",")
        times = [float(row.split(",")[header.index("time")]) for row in f
                 if row.startswith("train,")]
    steps = len(times) - 1  # the first step's time includes its compilation
    return {"command": " ".join(["python", *command[1:]]),
            "steps": len(times), "peak_rss_bytes": rss,
            "steps_per_second": steps / (times[-1] - times[0]),
            "images_per_second": steps * batch_size / (times[-1] - times[0])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default="/tmp/lvm_jax_streaming_benchmark")
    p.add_argument("--gigabytes", type=float, default=4.0, help="training images to write, GiB")
    p.add_argument("--input_cap_mb", type=int, default=512, help="the input-only process's cap")
    p.add_argument("--train_cap_mb", type=int, default=1536, help="the training process's cap")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--train_seconds", type=float, default=150)
    p.add_argument("--report", action="store_true", help="only rewrite streaming.md from .json")
    flags = p.parse_args(argv)
    if flags.report:
        with open(os.path.join(RESULTS, "streaming.json")) as f:
            results = json.load(f)
        with open(os.path.join(RESULTS, "streaming.md"), "w") as f:
            f.write(report(results))
        return

    load_before = os.getloadavg()
    data = ensure_folder(flags.folder, flags.gigabytes)
    cgroup = Cgroup()
    try:
        input_cap = cgroup.cap(flags.input_cap_mb * 2**20)
        input_only = measure_input(flags.folder, flags.batch_size, cgroup)
        input_only.update(memory_cap_bytes=input_cap, cgroup_peak_bytes=cgroup.peak())
        train_cap = cgroup.cap(flags.train_cap_mb * 2**20)
        workdir = flags.folder + "_run"
        shutil.rmtree(workdir, ignore_errors=True)
        training = measure_training(flags.folder, workdir, flags.batch_size, flags.train_seconds,
                                    cgroup)
        training.update(memory_cap_bytes=train_cap, cgroup_peak_bytes=cgroup.peak())
    finally:
        cgroup.remove()
    results = {
        "dataset": {**data, "image_shape": IMAGE_SHAPE, "folder": flags.folder},
        "cap": ("cgroup " + cgroup.path) if cgroup.enforced else f"none ({cgroup.why_not})",
        "input_only": input_only, "training": training,
        "input_over_step": input_only["images_per_second"] / training["images_per_second"],
        "load_average_before_after": [load_before, os.getloadavg()],
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "command": "python -m benchmarks.streaming " + " ".join(argv or sys.argv[1:]),
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "streaming.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(RESULTS, "streaming.md"), "w") as f:
        f.write(report(results))
    print(report(results))


def report(r: dict) -> str:
    mb = 2**20
    d, i, t = r["dataset"], r["input_only"], r["training"]
    return "\n".join([
        "# Streaming a dataset larger than the memory cap",
        "",
        f"`{r['command']}`, {r['cpus']} CPU cores shared with other jobs; load average (1, 5, "
        f"15 min) {tuple(round(x, 1) for x in r['load_average_before_after'][0])} before, "
        f"{tuple(round(x, 1) for x in r['load_average_before_after'][1])} after.",
        "",
        "| | |", "|---|---|",
        f"| dataset | {d['images']:,} images of {'x'.join(map(str, d['image_shape']))} uint8, "
        f"{d['bytes'] / mb:,.0f} MiB in a shard folder"
        + (f", written in {d['write_seconds']:.0f} s |" if d["write_seconds"] else " |"),
        f"| memory caps | {r['cap']} |",
        f"| input alone: one epoch through the pipeline | {i['images_per_second']:,.0f} images/s, "
        f"peak RSS {i['peak_rss_bytes'] / mb:,.0f} MiB under a cap of "
        f"{fmt(i['memory_cap_bytes'])} |",
        f"| training (`{t['command']}`) | {t['steps']} steps, {t['images_per_second']:,.0f} "
        f"images/s ({t['steps_per_second']:.2f} steps/s), peak RSS "
        f"{t['peak_rss_bytes'] / mb:,.0f} MiB under a cap of {fmt(t['memory_cap_bytes'])} |",
        f"| input / training step | {r['input_over_step']:.1f}x |",
        "",
        "Peak RSS: VmHWM of the process, which counts the pages of the shards it read only "
        "while they are mapped (never: they are read with os.preadv into batch buffers). The "
        f"cgroup's own peak charge (input {fmt(i['cgroup_peak_bytes'])}, training "
        f"{fmt(t['cgroup_peak_bytes'])}) leaves out what was charged before the process joined "
        "it: the shared libraries, and the page cache of the folder, written by the "
        "benchmark's parent just before. So the reads came from memory, not disk: the input "
        "figure is the pipeline's, not the disk's.",
        "",
    ])


def fmt(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


if __name__ == "__main__":
    main(sys.argv[1:])
