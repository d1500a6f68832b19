"""The basic spec's image-size rule on size_signals, against DataComp's pandas expression."""

import numpy as np
import pandas as pd
import pyarrow as pa

from filters.expressions import rule_outcomes, signal_frame
from filters.image_size import size_signals
from pipeline.strategies import resolve_strategies


def test_basic_size_rule_matches_pandas_with_edges():
    w = [200, 199, 600, 601, 0, None, 1000, 200, 300]
    h = [600, 600, 200, 200, 0, 300, None, 200, 100]
    signals = size_signals(pa.array(w, pa.int64()), pa.array(h, pa.int64()))
    basic = resolve_strategies(["basic"])[0]
    size_rules = [r.expr for r in basic.rules if "min_side" in r.expr or "aspect_ratio" in r.expr]
    assert size_rules, basic.rules
    got = np.logical_and.reduce([p for p, _ in rule_outcomes(signal_frame(signals), size_rules)])
    df = pd.DataFrame({"w": pd.array(w, dtype="float64"), "h": pd.array(h, dtype="float64")})
    lo, hi = np.minimum(df.w, df.h), np.maximum(df.w, df.h)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = ((lo >= 200) & (hi / lo <= 3.0)).to_numpy()
    assert got.tolist() == want.tolist() == [True, False, True, False, False, False, False, True, False]
