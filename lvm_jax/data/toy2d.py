"""The 2D "full covariance Gaussian" datasets (REFERENCE.md §1), with their exact NLL.

x = mean + (eps * scales) @ R with eps ~ N(0, I), so x ~ N(mean, R^T diag(scales^2) R).
The true density is known, so the exact test NLL is the floor any model can reach.
"""

import math

import numpy as np

_ROTATION = np.array([[1.0, 1.0], [-1.0, 1.0]]) / math.sqrt(2.0)

# name -> (mean, per-axis standard deviations, rotated?)
SPECS = {
    "1": ((1.0, 2.0), (5.0, 1.0), True),
    "2": ((-1.0, 2.0), (1.0, 5.0), True),
    "1b": ((1.0, 2.0), (5.0, 1.0), False),
    "2b": ((-1.0, 2.0), (1.0, 5.0), False),
}
NUM_TRAIN, NUM_TEST = 10_000, 2_500
# The original course code reseeded with 0 for both splits, making its test set
# equal to train[:2500]; distinct seeds give a genuinely held-out test set.
TRAIN_SEED, TEST_SEED = 0, 1


def _spec(which: str):
    if which not in SPECS:
        raise ValueError(f"unknown 2D dataset {which!r}; choose one of {sorted(SPECS)}.")
    mean, scales, rotated = SPECS[which]
    rotation = _ROTATION if rotated else np.eye(2)
    return np.array(mean), np.array(scales), rotation


def mean_and_covariance(which: str) -> tuple[np.ndarray, np.ndarray]:
    """The true mean (2,) and covariance (2, 2) of dataset `which`."""
    mean, scales, rotation = _spec(which)
    return mean, rotation.T @ np.diag(scales**2) @ rotation


def sample(which: str, num: int, seed: int) -> np.ndarray:
    """Draws `num` points (num, 2) float32 from dataset `which`."""
    mean, scales, rotation = _spec(which)
    eps = np.random.default_rng(seed).standard_normal((num, 2))
    return (mean + (eps * scales) @ rotation).astype(np.float32)


def splits(which: str) -> tuple[np.ndarray, np.ndarray]:
    """(train (10000, 2), test (2500, 2)) drawn with different seeds."""
    return sample(which, NUM_TRAIN, TRAIN_SEED), sample(which, NUM_TEST, TEST_SEED)


def exact_nll(x: np.ndarray, which: str) -> np.ndarray:
    """-log p(x) under the true distribution, in nats per point, shape (N,)."""
    mean, cov = mean_and_covariance(which)
    diff = np.asarray(x, np.float64) - mean
    maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
    return 0.5 * (maha + np.log(np.linalg.det(cov)) + 2 * math.log(2 * math.pi))


def entropy(which: str) -> float:
    """Differential entropy of the true distribution, 0.5 log((2 pi e)^2 |Sigma|), in nats."""
    _, cov = mean_and_covariance(which)
    return 0.5 * math.log((2 * math.pi * math.e) ** 2 * np.linalg.det(cov))
