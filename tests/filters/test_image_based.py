"""Nearest centroid by inner product: the exact argmax, whatever the near-ties."""

import numpy as np
import pytest

from filters.image_based import (NO_CENTROID, image_based_mask, missing_embedding_mask, nearest_centroid,
                                 target_centroid_ids)


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


def test_all_zero_rows_are_nearest_to_no_centroid():
    # pipeline.score writes zeros for a sample without an image: such a row is not an embedding
    rng = np.random.default_rng(3)
    c = _unit(rng.standard_normal((300, 64)))
    x = _unit(rng.standard_normal((40, 64))).astype(np.float16)
    zero = np.zeros(40, bool)
    zero[[0, 7, 8, 39]] = True
    x[zero] = 0
    x[8] = -0.0  # negative zeros are zeros too
    assert missing_embedding_mask(x).tolist() == zero.tolist()
    for dtype in (np.float16, np.float32, np.float64):  # a NaN or an infinity is no embedding either
        y = x.astype(dtype)
        y[3, 5], y[4, 0], y[5, 63] = np.nan, np.inf, -np.inf
        y[6, 1] = np.finfo(dtype).smallest_subnormal  # tiny but not zero: an embedding
        y[6, 0] = 0
        want = zero.copy()
        want[[3, 4, 5]] = True
        assert missing_embedding_mask(y).tolist() == want.tolist(), dtype
    for batch_size in (None, 3):
        got = nearest_centroid(x, c, batch_size=batch_size)
        assert (got[zero] == NO_CENTROID).all()
        assert (got[~zero] == _exact(x[~zero], c)).all()  # the others exactly as before
    # a zero target has no centroid either, and a -1 row is never kept
    targets = np.concatenate([c[[5]] * 2, np.zeros((1, 64), np.float32)])
    assert target_centroid_ids(targets, c).tolist() == [5]
    assert not image_based_mask(np.array([NO_CENTROID]), np.array([NO_CENTROID, 5])).any()
