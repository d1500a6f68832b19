"""Rules as Polars expressions; the presence test that skips Polars means what Polars means."""

import numpy as np
import pyarrow as pa

from filters.expressions import presence_column, presence_outcome, rule_columns, rule_outcomes, signal_frame


def test_presence_rule_equals_polars_on_nulls_and_nans():
    table = pa.table({"score": pa.array([0.3, None, float("nan"), -1.0], pa.float32()),
                      "label": pa.array(["en", None, "de", None])})
    for column in ("score", "label"):
        rule = f"{column} IS NOT NULL"
        assert presence_column(rule) == column and rule_columns(rule) == [column]
        (want_pass, want_fail), = rule_outcomes(signal_frame(table), [rule])
        got_pass, got_fail = presence_outcome(table.column(column))
        np.testing.assert_array_equal(got_pass, want_pass)
        np.testing.assert_array_equal(got_fail, want_fail)
    np.testing.assert_array_equal(presence_outcome(table.column("score"))[0], [True, False, False, True])
    for other in ("score IS NULL", "score IS NOT NULL AND label = 'en'", "score > 0"):
        assert presence_column(other) is None
