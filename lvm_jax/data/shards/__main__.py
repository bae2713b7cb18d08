"""`python -m lvm_jax.data.shards`: the command line of `lvm_jax.data.shards.cli`."""

import sys

from lvm_jax.data.shards.cli import main

main(sys.argv[1:])
