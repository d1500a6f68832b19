"""uids and subset files, exactly as DataComp stores them.

A uid is 32 lowercase hex characters (a 128-bit hash). DataComp's subset files hold uids as
a NumPy structured array of dtype ``"u8,u8"`` (upper 64 bits, lower 64 bits), sorted, saved
with ``np.save``; its resharder also accepts the same records as a raw memmap with no header.
Sorting the records is lexicographic on (hi, lo), which equals hex-string order.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from pools import storage
from pools.files import atomic_path, owner_tag

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


def halves_keys(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """`uid_keys` for uids given as upper and lower 64-bit halves (equal for equal uids; not
    the keys `uid_keys` gives for the same uids as strings)."""
    with np.errstate(over="ignore"):
        return hi * _MIX[0] ^ lo * _MIX[1]


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
    path = storage.path(path)
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
    """Memory-map a subset file: a ``.npy`` of ``u8,u8`` or a raw headerless memmap of it.
    A subset in object storage is read into memory (one request)."""
    path = storage.path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subset file {path} does not exist")
    if isinstance(path, storage.ObjectPath):
        data = storage.read_bytes(path)
        head, size, whole = data[:64], len(data), io.BytesIO(data)
    else:
        with open(path, "rb") as f:
            head = f.read(64)
        size, whole = None, None
    if head.startswith(_NPY_MAGIC):
        try:
            arr = np.load(whole or path, mmap_mode=None if whole else "r", allow_pickle=False)
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
    size = path.stat().st_size if size is None else size
    if size % UID_DTYPE.itemsize:
        raise ValueError(f"{path}: not a .npy file and its size {size} is not a multiple of "
                         f"{UID_DTYPE.itemsize} bytes, so it is not a raw u8,u8 memmap either")
    if size == 0:
        return np.empty(0, dtype=UID_DTYPE)
    if whole is not None:
        return np.frombuffer(whole.getbuffer(), dtype=UID_DTYPE)
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


# --- bounded memory: subsets and uid keys past what fits -------------------------------------
SPILL_BYTES = 32 << 20  # records kept in memory before they go to a sorted run on disk


class SubsetWriter:
    """`write_subset` with memory that does not grow with the subset: records are buffered up to
    `budget_bytes`, then sorted into run files beside `path`, and the runs are merged k-way
    into the final ``.npy`` (the same bytes ``np.save`` of the sorted records gives).

    At xlarge a CLIP top-30% subset is 3.8B uids (61 GB of records): no process holds it.
    """

    def __init__(self, path: str | os.PathLike, budget_bytes: int | None = None):
        self.path = storage.path(path)
        if self.path.suffix != ".npy":
            raise ValueError(f"subset file {self.path} must end in .npy (np.save format)")
        self._budget = max(1, (budget_bytes or SPILL_BYTES) // UID_DTYPE.itemsize)
        self._parts: list[np.ndarray] = []
        self._buffered = 0
        self._runs: list[Path] = []
        self.count = 0
        self._run_dir = storage.scratch_dir(self.path.parent, f".{self.path.name}.runs-{owner_tag()}")
        self.discard()  # what an earlier writer of this process left after an error

    def add(self, records: np.ndarray) -> None:
        if records.dtype != UID_DTYPE:
            raise ValueError(f"subset records must have dtype {UID_DTYPE}, got {records.dtype}")
        if not len(records):
            return
        self._parts.append(records)
        self._buffered += len(records)
        self.count += len(records)
        if self._buffered >= self._budget:
            self._spill()

    def _spill(self) -> None:
        run = sort_records(np.concatenate(self._parts))
        self._parts, self._buffered = [], 0
        self._run_dir.mkdir(parents=True, exist_ok=True)
        path = self._run_dir / f"{len(self._runs):06d}.u8u8"
        run.tofile(path)
        self._runs.append(path)

    def discard(self) -> None:
        """Drop what was added (a strategy that turned out not to run)."""
        self._parts = []
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def close(self) -> int:
        """Write the subset atomically; returns the number of uids written."""
        try:
            if not self._runs:
                return write_subset(self.path, self._parts)
            if self._parts:
                self._spill()
            runs = [_RunFile(p) for p in self._runs]
            with atomic_path(self.path) as tmp:
                with open(tmp, "wb") as f:
                    header = {"descr": np.lib.format.dtype_to_descr(UID_DTYPE), "fortran_order": False,
                              "shape": (self.count,)}
                    np.lib.format.write_array_header_1_0(f, header)  # what np.save writes for this dtype
                    # (each round holds the runs' windows, what it takes of them and their sorted
                    # union: about twice the windows, so they share half the budget)
                    for block in merge_sorted_runs(runs, max(1 << 10, self._budget // (2 * len(runs)))):
                        block.tofile(f)
            return self.count
        finally:
            self.discard()


class _RunFile:
    """A sorted run on disk, read window by window with plain reads: a memory map would keep
    every page it read resident (and counted in the process's memory) until the merge ends."""

    def __init__(self, path: Path):
        self.path = path
        self.length = path.stat().st_size // UID_DTYPE.itemsize

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, window: slice) -> np.ndarray:
        start, stop, _ = window.indices(self.length)
        return np.fromfile(self.path, dtype=UID_DTYPE, count=max(0, stop - start),
                           offset=start * UID_DTYPE.itemsize)


def merge_sorted_runs(runs: Sequence[np.ndarray], window: int) -> Iterable[np.ndarray]:
    """Merge sorted ``u8,u8`` runs into sorted blocks, holding at most `window` records of each.

    Each round takes, from every run's next window, the records up to the smallest of the
    windows' last records: all of them precede whatever is left, so their sorted union is the
    next block (and the run whose window ends there is consumed whole: every round moves on).
    """
    pos = [0] * len(runs)
    while True:
        windows = [(i, runs[i][pos[i]:pos[i] + window]) for i in range(len(runs)) if pos[i] < len(runs[i])]
        if not windows:
            return
        cut = sort_records(np.array([w[-1] for _, w in windows], dtype=UID_DTYPE))[0]
        taken = []
        for i, w in windows:
            n = int(np.searchsorted(w, cut, side="right"))
            taken.append(np.asarray(w[:n]))
            pos[i] += n
        yield sort_records(np.concatenate(taken))


KEY_POSITION = np.dtype([("key", "<u8"), ("position", "<i8")])


class RepeatedKeys:
    """Which positions hold a 64-bit key that occurs more than once, in bounded memory.

    Keys (with their positions) stay in memory up to `budget_bytes`; past that they go to
    partition files by their top bits, and each partition is checked alone.
    """

    PARTITION_BITS = 6

    def __init__(self, folder: str | os.PathLike, budget_bytes: int | None = None):
        # (held as 8-byte keys; their positions are added only when they spill)
        self._budget = max(1, (budget_bytes or SPILL_BYTES) // np.dtype(np.uint64).itemsize)
        self._keys: list[np.ndarray] = []  # consecutive positions from self._first: only keys are held
        self._first = 0
        self._buffered = 0
        self._dir = storage.scratch_dir(storage.path(folder), f".uid-keys-{owner_tag()}")
        self._spilled = False
        shutil.rmtree(self._dir, ignore_errors=True)  # what an earlier search of this process left after an error

    def add(self, keys: np.ndarray) -> None:
        """The keys of the next positions (the first call's start at 0)."""
        self._keys.append(keys)
        self._buffered += len(keys)
        if self._buffered >= self._budget:
            self._spill()

    def _held(self) -> np.ndarray:
        keys = np.concatenate(self._keys) if self._keys else np.empty(0, np.uint64)
        data = np.empty(len(keys), dtype=KEY_POSITION)
        data["key"] = keys
        data["position"] = np.arange(self._first, self._first + len(keys))
        self._first += len(keys)
        self._keys, self._buffered = [], 0
        return data

    def _spill(self) -> None:
        data = self._held()
        self._dir.mkdir(parents=True, exist_ok=True)
        bucket = (data["key"] >> np.uint64(64 - self.PARTITION_BITS)).astype(np.int64)
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange((1 << self.PARTITION_BITS) + 1))
        for b in range(1 << self.PARTITION_BITS):
            if bounds[b] < bounds[b + 1]:
                with open(self._dir / f"{b:03d}.bin", "ab") as f:
                    f.write(data[order[bounds[b]:bounds[b + 1]]].tobytes())
        self._spilled = True

    def repeated_positions(self) -> np.ndarray:
        """Sorted positions whose key some other position has too (the keys may still differ
        in the full uid: confirm)."""
        try:
            if not self._spilled:
                keys = np.concatenate(self._keys) if self._keys else np.empty(0, np.uint64)
                ordered = np.sort(keys)
                if not (ordered[1:] == ordered[:-1]).any():
                    return np.empty(0, np.int64)  # the usual case: no key twice, nothing more to build
                return _repeated(self._held())
            if self._keys:
                self._spill()
            found = [_repeated(np.fromfile(p, dtype=KEY_POSITION)) for p in sorted(self._dir.glob("*.bin"))]
            return np.sort(np.concatenate(found)) if found else np.empty(0, np.int64)
        finally:
            self._keys = []
            shutil.rmtree(self._dir, ignore_errors=True)


def _repeated(data: np.ndarray) -> np.ndarray:
    ordered = np.sort(data["key"])
    twice = ordered[1:] == ordered[:-1]
    if not twice.any():
        return np.empty(0, np.int64)
    return np.sort(data["position"][np.isin(data["key"], ordered[1:][twice])])
