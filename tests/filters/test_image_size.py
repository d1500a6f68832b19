import numpy as np
import pandas as pd
import pyarrow as pa

from filters.image_size import ImageSize, aspect_ratio, image_size_mask, min_side


def test_matches_pandas_rule_with_edges():
    w = [200, 199, 600, 601, 0, None, 1000, 200, 300]
    h = [600, 600, 200, 200, 0, 300, None, 200, 100]
    got = image_size_mask(min_side(pa.array(w, pa.int64()), pa.array(h, pa.int64())),
                          aspect_ratio(pa.array(w, pa.int64()), pa.array(h, pa.int64())), ImageSize())
    df = pd.DataFrame({"w": pd.array(w, dtype="float64"), "h": pd.array(h, dtype="float64")})
    lo, hi = np.minimum(df.w, df.h), np.maximum(df.w, df.h)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = ((lo >= 200) & (hi / lo <= 3.0)).to_numpy()
    assert got.tolist() == want.tolist() == [True, False, True, False, False, False, False, True, False]
