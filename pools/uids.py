"""uids and subset files, exactly as DataComp stores them.

A uid is 32 lowercase hex characters (a 128-bit hash). DataComp's subset files hold uids as
a NumPy structured array of dtype ``"u8,u8"`` (upper 64 bits, lower 64 bits), sorted, saved
with ``np.save``; its resharder also accepts the same records as a raw memmap with no header.
Sorting the records is lexicographic on (hi, lo), which equals hex-string order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from pools.files import atomic_path

UID_DTYPE = np.dtype("u8,u8")
UID_HEX_CHARS = 32
_NPY_MAGIC = b"\x93NUMPY"


def uids_to_records(uids: pa.Array | pa.ChunkedArray | Sequence[str] | np.ndarray) -> np.ndarray:
    """Convert hex uids to DataComp's ``u8,u8`` records (unsorted, same order).

    Shorter uids are left-padded with zeros as DataComp's resharder does. Raises ValueError
    naming the first bad row when a uid is null, too long or not hexadecimal.
    """
    arr = _as_string_array(uids)
    if arr.null_count:
        row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"uid at row {row} is null")
    if len(arr) == 0:
        return np.empty(0, dtype=UID_DTYPE)
    lengths = np.diff(np.frombuffer(arr.buffers()[1], dtype=np.int32,
                                    count=len(arr) + 1, offset=arr.offset * 4))
    if (lengths != UID_HEX_CHARS).any():
        if (lengths > UID_HEX_CHARS).any():
            row = int(np.flatnonzero(lengths > UID_HEX_CHARS)[0])
            raise ValueError(f"uid at row {row} has {lengths[row]} characters; expected {UID_HEX_CHARS}")
        arr = pa.array([u.zfill(UID_HEX_CHARS) for u in arr.to_pylist()], type=pa.string())
    # One bytes.fromhex over the whole contiguous character buffer: no per-row Python.
    offsets = arr.buffers()[1]
    start = int(np.frombuffer(offsets, dtype=np.int32, count=1, offset=arr.offset * 4)[0])
    chars = arr.buffers()[2].to_pybytes()[start:start + UID_HEX_CHARS * len(arr)]
    try:
        raw = bytes.fromhex(chars.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        for row, u in enumerate(arr.to_pylist()):
            try:
                bytes.fromhex(u)
            except ValueError:
                raise ValueError(f"uid at row {row} is not hexadecimal: {u!r}") from None
        raise
    words = np.frombuffer(raw, dtype=">u8").reshape(-1, 2)
    out = np.empty(len(arr), dtype=UID_DTYPE)
    out["f0"] = words[:, 0]
    out["f1"] = words[:, 1]
    return out


_MIX = tuple(np.uint64(m) for m in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                                     0x27D4EB2F165667C5))  # odd multipliers: every word moves the key
_FOLD_CASE = np.uint64(0x2020202020202020)  # 'A'-'F' as 'a'-'f'; digits unchanged


def uid_keys(uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit key per uid, equal for equal uids: a cheap first look for repeated uids.

    Keys of different uids may collide (confirm with `uids_to_records`). The key mixes the
    32 characters' bytes, case folded, with no hex parsing (a few times cheaper than
    parsing); shorter uids are left-padded with zeros first, as `uids_to_records` reads them.
    """
    arr = _as_string_array(uids)
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    if arr.null_count:
        uids_to_records(arr)  # raises, naming the row
    start, end = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)[[0, -1]]
    if end - start != UID_HEX_CHARS * n:
        uids_to_records(arr)  # a uid longer than 32 characters raises, naming the row
        arr = pa.array([u.zfill(UID_HEX_CHARS) for u in arr.to_pylist()], type=pa.string())
        start = 0
    # every uid is 32 characters: four 8-byte words each, viewed in place
    words = np.frombuffer(arr.buffers()[2], dtype="<u8", count=4 * n, offset=int(start)).reshape(n, 4)
    with np.errstate(over="ignore"):
        key = (words[:, 0] | _FOLD_CASE) * _MIX[0]
        for i in (1, 2, 3):
            key ^= (words[:, i] | _FOLD_CASE) * _MIX[i]
    return key


def records_to_uids(records: np.ndarray) -> list[str]:
    """Convert ``u8,u8`` records back to 32-char lowercase hex uids."""
    records = np.asarray(records)
    if records.dtype != UID_DTYPE:
        raise ValueError(f"expected dtype {UID_DTYPE}, got {records.dtype}")
    words = np.empty((len(records), 2), dtype=">u8")
    words[:, 0] = records["f0"]
    words[:, 1] = records["f1"]
    hexed = words.tobytes().hex()
    return [hexed[i:i + UID_HEX_CHARS] for i in range(0, len(hexed), UID_HEX_CHARS)]


def write_subset(path: str | os.PathLike, records: np.ndarray | Iterable[np.ndarray]) -> int:
    """Sort uid records and save them as DataComp does (``np.save``), atomically.

    Duplicates are kept: in DataComp a repeated uid means the sample is upsampled.
    Returns the number of uids written.
    """
    if not isinstance(records, np.ndarray):
        parts = list(records)
        records = np.concatenate(parts) if parts else np.empty(0, dtype=UID_DTYPE)
    if records.dtype != UID_DTYPE:
        raise ValueError(f"subset records must have dtype {UID_DTYPE}, got {records.dtype}")
    records = sort_records(records)
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"subset file {path} must end in .npy (np.save format)")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, records)
    return len(records)


def sort_records(records: np.ndarray) -> np.ndarray:
    """``np.sort`` of ``u8,u8`` records (by upper, then lower 64 bits), several times faster.

    NumPy sorts structured arrays field by field through generic comparisons (about 1 s for
    2M uids); an integer sort of the upper halves, then a lexsort only if two are equal, gives
    the same bytes.
    """
    if len(records) < 2:
        return records.copy()
    hi = records["f0"]
    ordered = records[np.argsort(hi)]
    if (ordered["f0"][1:] == ordered["f0"][:-1]).any():  # equal upper halves: also order the lower
        ordered = records[np.lexsort((records["f1"], hi))]
    return ordered


def read_subset(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a subset file: a ``.npy`` of ``u8,u8`` or a raw headerless memmap of it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subset file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_NPY_MAGIC):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # truncated, a bad header, an object array
            raise ValueError(f"{path}: not a readable .npy subset ({exc}); write subsets with "
                             "pools.uids.write_subset or np.save") from None
        if arr.dtype != UID_DTYPE:
            raise ValueError(f"{path}: dtype is {arr.dtype}; DataComp subsets are {UID_DTYPE}")
        if arr.ndim != 1:
            raise ValueError(f"{path}: shape is {arr.shape}; DataComp subsets are one-dimensional")
        return arr
    if b"\n" in head and set(head) <= set(b"0123456789abcdefABCDEF\r\n"):
        raise ValueError(f"{path}: a text file (hex uids, one per line?), not a u8,u8 subset: convert it with "
                         "pools.uids.write_subset(out, pools.uids.uids_to_records(lines))")
    size = path.stat().st_size
    if size % UID_DTYPE.itemsize:
        raise ValueError(f"{path}: not a .npy file and its size {size} is not a multiple of "
                         f"{UID_DTYPE.itemsize} bytes, so it is not a raw u8,u8 memmap either")
    if size == 0:
        return np.empty(0, dtype=UID_DTYPE)
    return np.memmap(path, dtype=UID_DTYPE, mode="r")


def subset_counts(subset: np.ndarray, records: np.ndarray) -> np.ndarray:
    """How many times each record occurs in the sorted `subset` (0 = not selected)."""
    return (np.searchsorted(subset, records, side="right")
            - np.searchsorted(subset, records, side="left"))


def _as_string_array(uids) -> pa.Array:
    if isinstance(uids, pa.ChunkedArray):
        uids = uids.combine_chunks()
    if not isinstance(uids, pa.Array):
        uids = pa.array(list(uids) if isinstance(uids, np.ndarray) else uids, type=pa.string())
    if pa.types.is_large_string(uids.type):
        uids = uids.cast(pa.string())
    if not pa.types.is_string(uids.type):
        raise ValueError(f"uids must be strings, got {uids.type}")
    return uids


def records_from_halves(hi, lo, rows: np.ndarray | None = None) -> np.ndarray:
    """``u8,u8`` records from uint64 columns of upper and lower halves (Arrow or NumPy), at `rows`."""
    hi = hi if isinstance(hi, np.ndarray) else hi.to_numpy()  # uint64, never null: no pandas
    lo = lo if isinstance(lo, np.ndarray) else lo.to_numpy()
    if rows is not None:
        hi, lo = hi[rows], lo[rows]
    records = np.empty(len(hi), dtype=UID_DTYPE)
    records["f0"] = hi
    records["f1"] = lo
    return records


def count_unique_sorted(subset: np.ndarray, chunk: int = 1 << 22) -> int:
    """Distinct uids in a sorted subset, read in chunks (the subset may not fit in memory)."""
    n = len(subset)
    if n == 0:
        return 0
    unique = 1
    for lo in range(0, n, chunk):
        part = np.asarray(subset[max(0, lo - 1):min(n, lo + chunk)])
        unique += int(np.count_nonzero(part[1:] != part[:-1]))
    return unique


def check_sorted(subset: np.ndarray, path: Path, chunk: int = 1 << 22) -> None:
    """Binary search needs a sorted subset; DataComp's baselines always sort before saving."""
    n = len(subset)
    for lo in range(0, n, chunk):
        part = np.asarray(subset[max(0, lo - 1):min(n, lo + chunk)])
        hi, lo_ = part["f0"], part["f1"]
        bad = np.flatnonzero((hi[1:] < hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo_[1:] < lo_[:-1])))
        if len(bad):
            row = max(0, lo - 1) + int(bad[0]) + 1
            raise ValueError(f"{path} is not sorted (row {row} is smaller than row {row - 1}); "
                             "sort it first, e.g. with pools.uids.write_subset")
