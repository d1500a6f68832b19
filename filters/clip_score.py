"""CLIP-score rules: a threshold, or the threshold that keeps a fraction of the whole pool.

DataComp (reference section 2): ``--threshold t`` keeps ``score >= t``. ``--fraction f`` first
loads the score column of the *whole pool*, takes ``n = int(len * f)`` and
``t = -np.sort(-scores)[n]`` (the (n+1)-th largest score, NaN sorting last), then keeps
``score >= t``: ties at the threshold are kept, NaN scores never pass (and if the (n+1)-th
largest is NaN, nothing does). Comparisons happen in the score column's own dtype (float32
in CommonPool), as NumPy and pandas compare a float32 column with a Python float.

DataComp needs the whole column in one process (4 bytes per row: about 51 GB at xlarge).
`DescendingRankSelector` finds the same value exactly with 65,536 counters: a histogram of the
top 16 bits of each score's order-preserving bit pattern, then of the next 16 bits inside the
one bucket that holds the wanted rank (two passes for float32, four for float64).
"""

from __future__ import annotations

import numpy as np

_DIGIT_BITS = 16
_BUCKETS = 1 << _DIGIT_BITS
_FLUSH_VALUES = 1 << 20  # digits buffered before a histogram update (2 MiB)


def threshold_rank(num_rows: int, fraction: float) -> int:
    """DataComp's ``n = int(len(df) * fraction)``: the threshold is the (n+1)-th largest score."""
    return int(num_rows * fraction)


def _uint_for(dtype: np.dtype) -> np.dtype:
    return {4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}[np.dtype(dtype).itemsize]


def ascending_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned keys whose order is the values' order, with every NaN below -inf (key 0)."""
    values = np.ascontiguousarray(values)
    if values.dtype not in (np.float32, np.float64):
        raise TypeError(f"scores must be float32 or float64, got {values.dtype}")
    utype = _uint_for(values.dtype)
    bits = values.view(utype)
    sign = utype.type(1) << utype.type(values.dtype.itemsize * 8 - 1)
    keys = np.where(bits & sign, ~bits, bits | sign)
    keys[np.isnan(values)] = 0
    return keys


def key_to_value(key: int, dtype: np.dtype) -> float:
    """Inverse of `ascending_keys` for one key (key 0 is NaN)."""
    dtype = np.dtype(dtype)
    utype = _uint_for(dtype)
    if key == 0:
        return dtype.type(np.nan)
    nbits = dtype.itemsize * 8
    sign = 1 << (nbits - 1)
    bits = key ^ sign if key & sign else ~key & ((1 << nbits) - 1)
    return np.array([bits], dtype=utype).view(dtype)[0]


class DescendingRankSelector:
    """The (rank+1)-th largest value of a column seen in chunks, exactly, in constant memory.

    Feed every chunk of the column to `add`, call `end_pass`, and repeat until `done`; the
    chunks must be the same values on every pass (their order does not matter). The rank is
    fixed after the first pass, when the number of rows is known: ``int(rows * fraction)``.
    """

    def __init__(self, dtype: np.dtype, fraction: float):
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"scores must be float32 or float64, got {self.dtype}")
        self.fraction = fraction
        self.nbits = self.dtype.itemsize * 8
        self.rows: int | None = None  # known after the first pass
        self.rank: int | None = None
        self.non_nan_rows = 0
        self._position: int | None = None  # ascending position of the wanted value
        self._prefix = 0
        self._prefix_bits = 0
        self._hist = np.zeros(_BUCKETS, dtype=np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_count = 0
        self._seen = 0
        self.passes = 0

    @property
    def done(self) -> bool:
        return self._prefix_bits == self.nbits

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        if values.dtype != self.dtype:
            values = values.astype(self.dtype)
        keys = ascending_keys(values)
        self._seen += len(keys)
        if self.passes == 0:
            self.non_nan_rows += int(np.count_nonzero(keys))
        if self._prefix_bits:
            keys = keys[(keys >> (self.nbits - self._prefix_bits)) == self._prefix]
        shift = self.nbits - self._prefix_bits - _DIGIT_BITS
        self._pending.append(((keys >> shift) & (_BUCKETS - 1)).astype(np.uint16))
        self._pending_count += len(keys)
        if self._pending_count >= _FLUSH_VALUES:
            self._flush()

    def _flush(self) -> None:
        """Histogram the buffered digits at once (a bincount per small chunk costs more than it counts)."""
        if self._pending:
            self._hist += np.bincount(np.concatenate(self._pending), minlength=_BUCKETS)
            self._pending.clear()
            self._pending_count = 0

    def end_pass(self) -> None:
        self._flush()
        if self.passes == 0:
            self.rows = self._seen
            if self.rows == 0:
                raise ValueError("no rows: cannot compute a fraction threshold over an empty pool")
            self.rank = threshold_rank(self.rows, self.fraction)
            if self.rank >= self.rows:
                raise ValueError(f"fraction {self.fraction} of {self.rows} rows leaves no (n+1)-th score")
            self._position = self.rows - 1 - self.rank
        elif self._seen != self.rows:
            raise RuntimeError(f"pass {self.passes + 1} saw {self._seen} rows, the first saw {self.rows}: "
                               "the scores changed while the threshold was computed")
        cumulative = np.cumsum(self._hist)
        digit = int(np.searchsorted(cumulative, self._position, side="right"))
        if digit > 0:
            self._position -= int(cumulative[digit - 1])
        self._prefix = (self._prefix << _DIGIT_BITS) | digit
        self._prefix_bits += _DIGIT_BITS
        self._hist[:] = 0
        self._seen = 0
        self.passes += 1

    @property
    def threshold(self) -> float:
        """The selected value (NaN when the wanted rank falls among NaN scores)."""
        if not self.done:
            raise RuntimeError("threshold not known yet: feed another pass")
        return key_to_value(self._prefix, self.dtype)


def fraction_threshold_in_memory(scores: np.ndarray, fraction: float) -> float:
    """DataComp's ``-np.sort(-scores)[int(len(scores) * fraction)]``, for small inputs and tests."""
    scores = np.asarray(scores)
    return -np.sort(-scores)[threshold_rank(len(scores), fraction)]
