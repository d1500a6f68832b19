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

import functools
import re
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.arrays import to_numpy

# Polars is imported where a rule is first compiled or run: the strategies that only read the
# pool's scores (no_filter, clip) never need it, and its import was a fifth of their time.
if TYPE_CHECKING:
    import polars as pl


class RuleError(ValueError):
    """A rule that does not parse, names an unknown column or is not a true/false test."""


# `<column> IS NOT NULL` (the one rule of DataComp's clip strategy) is checked and evaluated on
# the Arrow column itself, with Polars' meaning (a NaN is a null here): a clip run then never
# imports Polars nor builds a frame, which was a fifth of a one-second command.
_PRESENCE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s+IS\s+NOT\s+NULL\s*$", re.IGNORECASE)


def presence_column(expr: str) -> str | None:
    """The column of a rule that is exactly ``<column> IS NOT NULL``, else None."""
    m = _PRESENCE.match(expr)
    return m.group(1) if m else None


def presence_outcome(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(passes, fails) of ``<column> IS NOT NULL``: a null or NaN fails, anything else passes."""
    if pa.types.is_floating(column.type):
        passes = ~np.isnan(to_numpy(column))  # nulls read as NaN
    else:
        passes = ~to_numpy(column.is_null())
    return passes, ~passes


@functools.lru_cache(maxsize=4096)  # parsed once per process: a rule is evaluated on every file
def compile_rule(expr: str) -> pl.Expr:
    """The Polars expression of one rule (raises `RuleError` if it does not parse)."""
    import polars as pl

    try:
        return pl.sql_expr(expr)
    except Exception as exc:  # polars raises several SQL error types
        raise RuleError(f"does not parse as a SQL expression ({_first_line(exc)})") from None


def rule_columns(expr: str) -> list[str]:
    """The column names a rule reads."""
    column = presence_column(expr)
    if column is not None:
        return [column]
    return list(dict.fromkeys(compile_rule(expr).meta.root_names()))


def check_rule(expr: str, schema: Mapping[str, pl.DataType]) -> None:
    """Raise `RuleError` unless `expr` is a true/false test over columns of `schema`."""
    import polars as pl

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
    import polars as pl

    if not isinstance(table, pa.Table):
        table = pa.table(dict(table))
    if columns is not None:
        table = table.select(list(dict.fromkeys(columns)))
    # NaN to null in Arrow, and only in the columns holding one: a Polars query per file costs
    # more than the conversion on files of a few thousand rows.
    for i, field in enumerate(table.schema):
        if pa.types.is_floating(field.type):
            column = table.column(i)
            nan = pc.is_nan(column)
            if pc.any(nan).as_py():
                table = table.set_column(i, field, pc.if_else(nan, pa.scalar(None, field.type), column))
    return pl.from_arrow(table, rechunk=False)


def rule_outcomes(frame: pl.DataFrame, exprs: Sequence[str | pl.Expr]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(passes, fails) masks of each rule (a rule string or a boolean Polars expression) on
    `frame`; a null outcome is in neither."""
    tests = [compile_rule(e) if isinstance(e, str) else e for e in exprs]
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(tests)
    queried = []
    for i, t in enumerate(tests):
        flag = _boolean_column(frame, t)
        if flag is not None:  # a rule that is a true/false column (``imagenet21k_entity``) is read
            values = flag.to_arrow()
            valid = ~to_numpy(values.is_null())
            passes = to_numpy(values)  # nulls read as False
            results[i] = (passes, valid & ~passes)
        else:
            queried.append(i)
    if queried:
        # One query for the other rules, as a pass and a fail column each: on a file of a few
        # thousand rows a query costs more than its rules (about a millisecond of CPU), so a
        # query per rule (or per Series operation) would be most of the time.
        out = frame.select([c for i in queried for c in (tests[i].fill_null(False).alias(f"p{i}"),
                                                          (~tests[i]).fill_null(False).alias(f"f{i}"))])
        matrix = np.asfortranarray(out.to_numpy(), dtype=bool)
        if matrix.shape[0] != len(frame):  # only rules that read no column (``TRUE``): one row
            matrix = np.asfortranarray(np.broadcast_to(matrix[:1], (len(frame), matrix.shape[1])))
        for k, i in enumerate(queried):
            results[i] = (matrix[:, 2 * k], matrix[:, 2 * k + 1])
    return results


def _boolean_column(frame: pl.DataFrame, test: pl.Expr) -> pl.Series | None:
    """The column `test` is, when it is just a Boolean column of `frame`."""
    import polars as pl

    if not test.meta.is_column():
        return None
    name = test.meta.output_name()
    return frame.get_column(name) if frame.schema.get(name) == pl.Boolean else None


def all_pass(frame: pl.DataFrame, exprs: Sequence[str]) -> np.ndarray:
    """Rows that pass every rule in `exprs` (every row when there is none)."""
    keep = np.ones(len(frame), dtype=bool)
    for passes, _ in rule_outcomes(frame, exprs):
        keep &= passes
    return keep


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
