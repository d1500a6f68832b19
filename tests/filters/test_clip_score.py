"""The fraction -> threshold step: exact (DataComp's full sort) with constant memory."""

import numpy as np
import pandas as pd
import pytest

import pyarrow as pa

from filters.clip_score import (DescendingRankSelector, ascending_keys, fraction_threshold_in_memory,
                                key_to_value, threshold_rank)
from pipeline.strategies import spec_from_dict, spec_outcomes

TOP = spec_from_dict({"name": "top", "description": "top half by CLIP L/14",
                      "select": {"score": "clip_l14_similarity_score", "fraction": 0.5}}, "test")


def _kept(scores, threshold):
    """The selection step as pipeline.filter evaluates it: ``score >= threshold``, NaN never passes."""
    table = pa.table({"clip_l14_similarity_score": np.asarray(scores)})
    return spec_outcomes(TOP, table, {"top": threshold}, {})[-1][0]


def _select(values, fraction, chunks=7):
    sel = DescendingRankSelector(values.dtype, fraction)
    parts = np.array_split(values, chunks)
    while not sel.done:
        for part in parts[::-1]:  # any order, any chunking
            sel.add(part)
        sel.end_pass()
    return sel


def _same(a, b):
    return (np.isnan(a) and np.isnan(b)) or a == b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.1, 0.3, 0.5, 0.9, 0.999])
def test_selector_equals_full_sort(dtype, fraction):
    rng = np.random.default_rng(int(fraction * 1000))
    v = rng.uniform(-0.1, 0.45, 20_000).astype(dtype)
    v[rng.choice(len(v), 500)] = np.nan
    v[rng.choice(len(v), 300)] = v[10]  # ties
    v[:3] = [np.inf, -np.inf, -0.0]
    v[3:5] = 0.0
    sel = _select(v, fraction)
    want = fraction_threshold_in_memory(v, fraction)
    assert _same(sel.threshold, want)
    assert sel.threshold.dtype == dtype
    assert sel.passes == (2 if dtype == np.float32 else 4)
    # DataComp's exact expression on a pandas column
    df = pd.DataFrame({"s": v})
    assert _same(-np.sort(-df["s"].values)[int(len(df) * fraction)], sel.threshold)


def test_threshold_among_nans_keeps_nothing():
    v = np.array([0.5, 0.4, np.nan, np.nan, np.nan], np.float32)
    sel = _select(v, 0.6, chunks=2)  # rank 3 falls in the NaNs
    assert np.isnan(sel.threshold)
    assert not _kept(v, sel.threshold).any()


def test_ties_at_threshold_are_kept():
    v = np.array([0.9, 0.3, 0.3, 0.3, 0.1], np.float32)
    sel = _select(v, 0.2, chunks=3)  # rank 1 -> 0.3
    assert sel.threshold == np.float32(0.3)
    assert _kept(v, sel.threshold).sum() == 4


def test_keys_order_and_round_trip():
    v = np.array([-np.inf, -1.5, -0.0, 0.0, 1e-30, 0.25, np.inf], np.float32)
    keys = ascending_keys(v)
    assert (np.diff(keys.astype(np.int64)) > 0).all()
    assert ascending_keys(np.array([np.nan], np.float32))[0] == 0
    for x, k in zip(v, keys):
        back = key_to_value(int(k), np.float32)
        assert back == x and np.signbit(back) == np.signbit(x)


def test_comparison_happens_in_float32():
    # NumPy and pandas compare a float32 column with a Python float in float32.
    t = 0.28
    s = np.array([np.float32(t), np.nextafter(np.float32(t), np.float32(0))], np.float32)
    assert _kept(s, t).tolist() == (pd.Series(s) >= t).tolist() == [True, False]


def test_parameters():
    assert threshold_rank(10, 0.3) == 3
    sel = DescendingRankSelector(np.float32, 0.5)
    with pytest.raises(ValueError, match="no rows"):
        sel.end_pass()
