"""face_count and face_area_fraction from face_bboxes (union of the boxes, clipped to the image)."""

import numpy as np
import pyarrow as pa
import pytest

from filters.faces import face_signals, union_area


def test_counts_and_union_area():
    boxes = pa.array([[], [[0.0, 0.0, 0.5, 0.5]], [[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]],
                      None, [[0.5, 0.5, 1.5, 1.2]], [[0.1, 0.1, 0.2, 0.2], [0.1, 0.1, 0.2, 0.2]]],
                     pa.list_(pa.list_(pa.float64())))
    out = face_signals(boxes)
    assert out["face_count"].to_pylist() == [0, 1, 2, None, 1, 2]
    area = out["face_area_fraction"].to_pylist()
    assert area[3] is None
    np.testing.assert_allclose([area[i] for i in (0, 1, 2, 4, 5)],
                               [0, 0.25, 0.25 + 0.25 - 0.0625, 0.25, 0.01], rtol=1e-6)


def test_union_area_against_a_pixel_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lo = rng.integers(0, 90, size=(4, 2))
        hi = lo + rng.integers(1, 10, size=(4, 2))
        boxes = np.concatenate([lo, hi], axis=1) / 100
        grid = np.zeros((100, 100), bool)
        for x0, y0, x1, y1 in (np.concatenate([lo, hi], axis=1)):
            grid[x0:x1, y0:y1] = True
        assert union_area(boxes) == pytest.approx(grid.sum() / 1e4)


def test_a_box_of_three_numbers_names_its_row():
    boxes = pa.array([[], [[0.1, 0.2, 0.3]]], pa.list_(pa.list_(pa.float64())))
    with pytest.raises(ValueError, match="row 1 has a box of 3 numbers"):
        face_signals(boxes)
