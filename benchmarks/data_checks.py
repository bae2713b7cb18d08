"""What knowing a run's data costs (issue 35): identities and change checks on 4 GiB of shards.

    python -m benchmarks.data_checks [--folder /tmp/lvm_jax_streaming_benchmark] [--gigabytes 4]

On the shard folder of `benchmarks.streaming` (written unless it is there), each
timed three times, in seconds:

* fingerprint: the folder's identity (`shards.fingerprint`: a stat per listed file,
  the manifest's SHA-256);
* mismatch_same_stamp: `identity.mismatch` of the folder against its own identity;
* mismatch_other_stamp: the same with another recorded stamp (a folder moved, copied or
  touched), which verifies every file against the manifest (a full read; twice);
* open_source: `ShardSource(folder)`, which reads the checksum files and notes each
  shard's stat;
* first_read_of_each_shard / again: one example of every shard, when each file is first
  opened (and checked against the stat the opening noted) and once all are open.

Then a course pickle of CIFAR-10's size (50,000 + 10,000 images of 32x32x3): its
loading and its SHA-256, the pickles' digest. The files are in the page cache (just
written), so these are reads from memory. Writes benchmarks/results/data_checks.json.
"""

import argparse
import json
import os
import pickle
import tempfile
import time

import numpy as np

from benchmarks import streaming
from lvm_jax.data import identity, pickles, shards

RESULTS = os.path.join(streaming.RESULTS, "data_checks.json")


def seconds(f, repeats: int = 3) -> list[float]:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        f()
        times.append(round(time.perf_counter() - tic, 4))
    return times


def shard_checks(folder: str) -> dict:
    current = identity.of_shards("shards", folder)
    moved = {**current.to_json(), "stamp": "0" * 64}
    counts = [shard["count"] for shard in shards.read_manifest(folder)["splits"]["train"]["shards"]]
    first_examples = np.cumsum([0, *counts[:-1]])  # the first example of each shard
    source = shards.ShardSource(folder)
    tic = time.perf_counter()
    source.read_batch(first_examples)
    first_read = time.perf_counter() - tic
    return {
        "shards": len(first_examples),
        "fingerprint": seconds(lambda: shards.fingerprint(folder)),
        "mismatch_same_stamp": seconds(lambda: identity.mismatch(
            current.to_json(), identity.of_shards("shards", folder))),
        "mismatch_other_stamp": seconds(lambda: identity.mismatch(
            moved, identity.of_shards("shards", folder)), repeats=2),
        "open_source": seconds(lambda: shards.ShardSource(folder)),
        "first_read_of_each_shard": round(first_read, 4),
        "again": seconds(lambda: source.read_batch(first_examples)),
    }


def pickle_checks() -> dict:
    rng = np.random.default_rng(0)
    arrays = {"train": rng.integers(0, 256, (50_000, 32, 32, 3), np.uint8),
              "test": rng.integers(0, 256, (10_000, 32, 32, 3), np.uint8)}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, pickles.FILES["deepul_cifar10"])
        with open(path, "wb") as f:
            pickle.dump(arrays, f, protocol=4)
        return {"bytes": os.path.getsize(path),
                "load": seconds(lambda: pickles.load("deepul_cifar10", folder)),
                "sha256": seconds(lambda: identity.of_file("deepul_cifar10", path))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default="/tmp/lvm_jax_streaming_benchmark")
    p.add_argument("--gigabytes", type=float, default=4.0, help="training images, GiB")
    flags = p.parse_args(argv)
    written = streaming.ensure_folder(flags.folder, flags.gigabytes)
    load_before = os.getloadavg()
    results = {"folder": written, "shards": shard_checks(flags.folder),
               "pickle": pickle_checks(),
               "load_average_before_after": [load_before, os.getloadavg()],
               "cpus": os.cpu_count()}
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
