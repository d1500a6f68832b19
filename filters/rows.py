"""The base signal group: which row a signal belongs to, and the pool's own CLIP scores.

``uid_hi``/``uid_lo`` are DataComp's ``u8,u8`` uid records (what a subset file holds), ``file``
and ``row`` say where the row is in the pool, and the CLIP score columns are copied from the
metadata with nulls and infinities as NaN (as pandas reads nulls; the rules then see NaN as
missing). A cosine similarity is never infinite: an infinite score is a broken row, and in
DataComp it would pass every threshold (and top the ranking); here it never passes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from filters.arrays import to_numpy
from pools.uids import uids_to_records


def nan_for_null(scores: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A score column as NumPy, nulls and infinities as NaN, float32 unless it was float64.

    (Not ``pc.fill_null(col, nan)``: making a NaN scalar makes pyarrow import pandas.)
    """
    dtype = np.float64 if pa.types.is_float64(scores.type) else np.float32
    if pa.types.is_null(scores.type):
        return np.full(len(scores), np.nan, dtype=dtype)
    values = np.asarray(to_numpy(scores), dtype=dtype)
    infinite = np.isinf(values)
    if infinite.any():
        values = np.where(infinite, np.nan, values).astype(dtype)
    return values


def row_signals(uid, file_name: str, clip_b32_similarity_score=None, clip_l14_similarity_score=None) -> dict:
    """uid records, file and row of every row, and the CLIP scores present in the metadata."""
    n = len(uid)
    try:
        records = uids_to_records(uid)
    except ValueError as exc:
        raise ValueError(f"column 'uid': {exc}") from None
    out = {"uid_hi": records["f0"], "uid_lo": records["f1"],
           "file": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([file_name])),
           "row": np.arange(n, dtype=np.int32)}
    for name, scores in (("clip_b32_similarity_score", clip_b32_similarity_score),
                         ("clip_l14_similarity_score", clip_l14_similarity_score)):
        if scores is not None:
            out[name] = nan_for_null(scores)
    return out


def precomputed_columns(uid, file_name: str, **result) -> dict:
    """The columns a global step computed for this file (`pipeline.global_steps`): `result` is
    the one step result the group reads, anything with ``columns(file_name)``."""
    (stored,) = result.values()
    columns = stored.columns(file_name)
    for name, values in columns.items():
        if len(values) != len(uid):
            raise ValueError(f"{name}: the global step stored {len(values)} rows for {file_name}, which has "
                             f"{len(uid)}; delete its result folder to recompute")
    return columns
