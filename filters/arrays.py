"""Arrow columns to NumPy without pandas.

``pyarrow``'s own ``to_numpy`` and ``pa.array(ndarray)`` import pandas on first use (about
0.2 s), which is most of the run time of the strategies that only read a column or two
(``no_filter``, ``clip``). Fixed-width numeric and boolean columns are read straight from
their Arrow buffers here; anything else falls back to ``to_numpy``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_NUMPY_TYPES = {
    pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
    pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
    pa.float32(): np.float32, pa.float64(): np.float64,
}


def _bits(buffer: pa.Buffer, offset: int, length: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(buffer, dtype=np.uint8), bitorder="little")
    return bits[offset:offset + length].astype(bool)


def to_numpy(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric or boolean Arrow column as a NumPy array (a copy). Nulls become NaN in float
    columns and False in boolean ones; integer columns with nulls go through ``to_numpy``."""
    if isinstance(values, pa.ChunkedArray):
        if values.num_chunks == 1:
            values = values.chunk(0)
        elif values.num_chunks == 0:
            values = pa.array([], type=values.type)
        else:
            return np.concatenate([to_numpy(c) for c in values.chunks])
    typ = values.type
    n = len(values)
    if pa.types.is_null(typ):  # a column with no values at all (e.g. scores never computed)
        return np.full(n, np.nan)
    if pa.types.is_boolean(typ):
        out = _bits(values.buffers()[1], values.offset, n) if n else np.zeros(0, bool)
        if values.null_count:
            out &= _bits(values.buffers()[0], values.offset, n)
        return out
    dtype = _NUMPY_TYPES.get(typ)
    if dtype is None or (values.null_count and not pa.types.is_floating(typ)):
        return values.to_numpy(zero_copy_only=False)
    itemsize = np.dtype(dtype).itemsize
    out = np.frombuffer(values.buffers()[1], dtype=dtype, count=n, offset=values.offset * itemsize).copy()
    if values.null_count:
        out[~_bits(values.buffers()[0], values.offset, n)] = np.nan
    return out


def from_numpy(values: np.ndarray) -> pa.Array:
    """A numeric NumPy array as an Arrow array without nulls (zero-copy, no pandas)."""
    values = np.ascontiguousarray(values)
    typ = {np.dtype(v): k for k, v in _NUMPY_TYPES.items()}.get(values.dtype)
    if typ is None:
        return pa.array(values)
    return pa.Array.from_buffers(typ, len(values), [None, pa.py_buffer(values)])
