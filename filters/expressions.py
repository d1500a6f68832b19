"""Rules as Polars SQL expressions over signal columns: ``min_side >= 256 AND aspect_ratio <= 3``.

A strategy's rules are strings in Polars' SQL expression language (`polars.sql_expr`), so a
researcher writes ``fasttext_lang = 'en'`` or ``clip_l14_similarity_score >= 0.3`` without a
parser of ours. Two conventions make them mean what DataComp's pandas code means:

- every NaN reaches the expressions as a null: Polars orders NaN above every number
  (``NaN >= 0.25`` is true there), while in DataComp a NaN score, a NaN aspect ratio or a
  missing size never passes a comparison;
- a rule's outcome is three-valued: true (passes), false (fails), null (a missing value, or a
  model label not computed for the row); only true passes.

Comparisons run in the column's own dtype (a float32 score is compared with ``0.3`` rounded to
float32, as NumPy 2 compares a float32 column with a Python float), which is DataComp's rule.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import polars as pl
import pyarrow as pa


class RuleError(ValueError):
    """A rule that does not parse, names an unknown column or is not a true/false test."""


def compile_rule(expr: str) -> pl.Expr:
    """The Polars expression of one rule (raises `RuleError` if it does not parse)."""
    try:
        return pl.sql_expr(expr)
    except Exception as exc:  # polars raises several SQL error types
        raise RuleError(f"does not parse as a SQL expression ({_first_line(exc)})") from None


def rule_columns(expr: str) -> list[str]:
    """The column names a rule reads."""
    return list(dict.fromkeys(compile_rule(expr).meta.root_names()))


def check_rule(expr: str, schema: Mapping[str, pl.DataType]) -> None:
    """Raise `RuleError` unless `expr` is a true/false test over columns of `schema`."""
    unknown = [c for c in rule_columns(expr) if c not in schema]
    if unknown:
        raise RuleError(f"unknown column {', '.join(map(repr, unknown))}; known columns: "
                        f"{', '.join(sorted(schema))}")
    empty = pl.DataFrame(schema=dict(schema))
    try:
        out = empty.select(compile_rule(expr).alias("rule")).schema["rule"]
    except Exception as exc:
        raise RuleError(f"cannot be evaluated on the signal columns' types ({_first_line(exc)})") from None
    if out != pl.Boolean:
        raise RuleError(f"gives {out}, not true/false: a rule must be a comparison or a test")


def signal_frame(table: pa.Table | Mapping[str, pa.Array | pa.ChunkedArray | np.ndarray],
                 columns: Iterable[str] | None = None) -> pl.DataFrame:
    """A Polars frame of `columns` (default: all) with every float NaN turned into a null."""
    if not isinstance(table, pa.Table):
        table = pa.table(dict(table))
    if columns is not None:
        table = table.select(list(dict.fromkeys(columns)))
    frame = pl.from_arrow(table, rechunk=False)
    floats = [n for n, t in frame.schema.items() if t in (pl.Float32, pl.Float64)]
    if floats:
        frame = frame.with_columns(pl.col(floats).fill_nan(None))
    return frame


def rule_outcomes(frame: pl.DataFrame, exprs: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(passes, fails) masks of each rule on `frame`; a null outcome is in neither."""
    if not exprs:
        return []
    names = [f"r{i}" for i in range(len(exprs))]
    out = frame.select([compile_rule(e).alias(n) for e, n in zip(exprs, names)])
    results = []
    for n in names:
        s = out.get_column(n)
        if len(s) != len(frame):  # a rule that reads no column (``TRUE``) is one value
            s = pl.repeat(s[0], len(frame), eager=True, dtype=pl.Boolean)
        passes = s.fill_null(False).to_numpy()
        fails = (~s).fill_null(False).to_numpy()
        results.append((np.asarray(passes, dtype=bool), np.asarray(fails, dtype=bool)))
    return results


def all_pass(frame: pl.DataFrame, exprs: Sequence[str]) -> np.ndarray:
    """Rows that pass every rule in `exprs` (every row when there is none)."""
    keep = np.ones(len(frame), dtype=bool)
    for passes, _ in rule_outcomes(frame, exprs):
        keep &= passes
    return keep


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
