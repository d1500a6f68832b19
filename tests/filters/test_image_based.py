"""Nearest centroid by inner product: the exact argmax, whatever the near-ties."""

import numpy as np
import pytest

from filters.image_based import image_based_mask, nearest_centroid, target_centroid_ids


def _exact(x, c):
    """Row by row: the argmax of correctly rounded exact dot products (math.fsum)."""
    import math

    c64 = c.astype(np.float64)
    return np.array([int(np.argmax([math.fsum(r.astype(np.float32).astype(np.float64) * cj) for cj in c64]))
                     for r in x])


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def test_matches_rowwise_float64_argmax_on_random_data():
    rng = np.random.default_rng(0)
    c = _unit(rng.standard_normal((50, 768)))
    x = _unit(rng.standard_normal((1200, 768))).astype(np.float16)
    assert (nearest_centroid(x, c) == _exact(x, c)).all()
    assert (nearest_centroid(x, c, batch_size=7) == _exact(x, c)).all()


def test_near_and_exact_ties_resolve_like_exact_argmax():
    rng = np.random.default_rng(1)
    base = _unit(rng.standard_normal((8, 64)))
    c = np.concatenate([base, base[2:3], base[5:6] * np.float32(1 + 2e-7)])  # exact and near duplicates
    x = np.concatenate([base + rng.standard_normal(base.shape).astype(np.float32) * 1e-3,
                        rng.standard_normal((200, 64)).astype(np.float32)])
    got = nearest_centroid(x, c)
    assert (got == _exact(x, c)).all()
    assert got[2] == 2  # exact tie with index 8 goes to the lower index, as argmax does


def test_targets_and_mask():
    rng = np.random.default_rng(2)
    c = _unit(rng.standard_normal((10, 32)))
    targets = np.concatenate([c[[1, 4]] * 3, c[[4]] * 0.5])
    assert target_centroid_ids(targets, c).tolist() == [1, 4]
    assert image_based_mask(np.array([1, 2, 4, -1]), np.array([1, 4])).tolist() == [True, False, True, False]


def test_shape_errors():
    with pytest.raises(ValueError, match="same width"):
        nearest_centroid(np.zeros((3, 4), np.float32), np.zeros((2, 5), np.float32))
    assert nearest_centroid(np.zeros((0, 4), np.float32), np.zeros((2, 4), np.float32)).shape == (0,)
