"""The basic filter's image-size rule, on the original (pre-download) width and height.

DataComp: ``min(w, h) >= 200`` and ``max(w, h) / min(w, h) <= 3.0``, computed with pandas on
``original_width`` / ``original_height``. A missing size (null) or a zero side gives NaN or
infinity and fails the rule.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from filters.arrays import to_numpy


def _as_float(values) -> np.ndarray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return to_numpy(values.cast(pa.float64()))  # nulls become NaN, as in pandas
    return np.asarray(values, dtype=np.float64)


def min_side(width, height) -> np.ndarray:
    """Shorter side in pixels (float64; NaN when a side is missing)."""
    return np.minimum(_as_float(width), _as_float(height))


def aspect_ratio(width, height) -> np.ndarray:
    """Longer side / shorter side (float64), as DataComp divides: x/0 is inf, 0/0 is NaN."""
    w, h = _as_float(width), _as_float(height)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.maximum(w, h) / np.minimum(w, h)


def size_signals(original_width, original_height) -> dict[str, np.ndarray]:
    """The size signal group: shorter side and aspect ratio of the original image."""
    return {"min_side": min_side(original_width, original_height),
            "aspect_ratio": aspect_ratio(original_width, original_height)}
