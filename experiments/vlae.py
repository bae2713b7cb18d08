"""VLAE (REFERENCE.md §3): the image VAE with a MADE autoregressive-flow prior.

    python -m experiments.vlae

Same encoder, decoder, data, flags and figures as experiments.vae; p(z) is a
MADE flow (two hidden layers of 512) and the KL term the single-sample Monte
Carlo log q(z|x) - log p(z). Samples invert the flow one dimension at a time
inside one compiled loop.
"""

import dataclasses
import sys

from experiments import common, configs, vae


@dataclasses.dataclass(frozen=True)
class Config(vae.Config):
    """The image VAE's settings with the MADE-flow prior."""

    prior: vae.Prior = configs.redefault(vae.Config, "prior", "made")


# The VAE's, with the MADE-flow prior that the Config names.
build = vae.build


def train_and_evaluate(config: Config, workdir: str | None = None) -> dict:
    """`vae.train_and_evaluate` as the VLAE: its workdir defaults to runs/vlae/<dataset>."""
    return vae.train_and_evaluate(config, workdir, "vlae")


def parser():
    return common.parser(Config, "vlae", __doc__)


def main(argv=None):
    return common.run(parser(), Config, train_and_evaluate, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
