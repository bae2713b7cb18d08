"""One comparison of `common.compare_in_processes`, in a fresh process.

    python -m benchmarks.worker '[MODULE, FUNCTION, ARGS, SETTINGS]'

Splits the CPU as `benchmarks.run` does, before JAX starts, calls
`MODULE.FUNCTION(*ARGS, Settings(**SETTINGS))` (which returns a `common.Comparison`)
and prints it as JSON on its last line.
"""

import dataclasses
import importlib
import json
import sys

from benchmarks import image_vae
from benchmarks.common import Settings
from experiments import common
from experiments import vae as vae_experiment


def main(spec: str) -> None:
    module, function, args, settings = json.loads(spec)
    common.split_cpu(vae_experiment.Config(batch_size=image_vae.BATCH))
    settings = Settings(**{**settings, "torch_threads": tuple(settings["torch_threads"]),
                           "processes": 1})
    result = getattr(importlib.import_module(module), function)(*args, settings)
    print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main(sys.argv[1])
