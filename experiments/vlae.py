"""VLAE (REFERENCE.md §3): the image VAE with a MADE autoregressive-flow prior.

    python -m experiments.vlae

Same encoder, decoder, data, flags and figures as experiments.vae; p(z) is a
MADE flow (two hidden layers of 512) and the KL term the single-sample Monte
Carlo log q(z|x) - log p(z). Samples invert the flow one dimension at a time
inside one compiled loop.
"""

import sys

from experiments import common, vae


def parser():
    return vae.parser("vlae", __doc__, "made")


def main(argv=None):
    return common.run(parser(), vae.train_and_evaluate, argv, "vlae")


if __name__ == "__main__":
    main(sys.argv[1:])
