"""Face signals from CommonPool's ``face_bboxes`` (face boxes its pipeline detected and blurred).

``face_bboxes`` holds, per row, a list of boxes ``[x0, y0, x1, y1]`` as fractions of the image's
width and height. `face_signals` counts them and measures the fraction of the image they cover:
the area of their union (overlapping boxes count once), each box clipped to the image. A null
``face_bboxes`` (no detection ran) gives null for both.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.arrays import to_numpy


def union_area(boxes: np.ndarray) -> float:
    """Area of the union of axis-aligned boxes (n, 4) [x0, y0, x1, y1], on the grid of their edges."""
    xs, ys = np.unique(boxes[:, [0, 2]]), np.unique(boxes[:, [1, 3]])
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2
    inside = ((boxes[:, 0, None, None] <= cx[None, :, None]) & (cx[None, :, None] <= boxes[:, 2, None, None])
              & (boxes[:, 1, None, None] <= cy[None, None, :]) & (cy[None, None, :] <= boxes[:, 3, None, None]))
    covered = inside.any(axis=0)
    return float((np.diff(xs)[:, None] * np.diff(ys)[None, :])[covered].sum())


def face_signals(face_bboxes) -> dict:
    """face_count (int32) and face_area_fraction (float32) of every row; null where face_bboxes is."""
    col = face_bboxes.combine_chunks() if isinstance(face_bboxes, pa.ChunkedArray) else face_bboxes
    n = len(col)
    null = to_numpy(col.is_null())
    counts = np.where(null, 0, to_numpy(pc.list_value_length(col).fill_null(0))).astype(np.int32)
    inner = col.flatten()  # the boxes of every row, in order
    lengths = to_numpy(pc.list_value_length(inner).fill_null(0))
    bad = np.flatnonzero(lengths != 4)
    if len(bad):
        row = int(np.searchsorted(np.cumsum(counts), bad[0], side="right"))
        raise ValueError(f"column 'face_bboxes': row {row} has a box of {int(lengths[bad[0]])} numbers, not "
                         "[x0, y0, x1, y1]")
    boxes = np.clip(to_numpy(inner.flatten()).astype(np.float64).reshape(-1, 4), 0.0, 1.0)
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    starts = np.concatenate([[0], np.cumsum(counts)])
    area = np.zeros(n, dtype=np.float64)
    single = np.flatnonzero(counts == 1)
    area[single] = areas[starts[single]]
    for r in np.flatnonzero(counts > 1):  # (rare: most images show at most one face)
        area[r] = union_area(boxes[starts[r]:starts[r + 1]])
    return {"face_count": pa.array(counts, mask=null), "face_area_fraction": pa.array(area.astype(np.float32), mask=null)}
