"""TableSource: the filter's columns are kept in memory between passes only when the whole
pool fits, and a pool that will not fit is never cached (its peak memory would grow)."""

import pyarrow as pa

from pipeline.filter import TableSource


def _source(budget: int, files: int = 4, rows: int = 1000):
    reads = []

    def read(path):
        reads.append(path)
        return pa.table({"x": pa.array(range(rows), pa.int64())})  # 8 bytes a row

    return TableSource([f"f{i}" for i in range(files)], read, budget=budget, threads=1), reads


def test_a_pool_that_fits_is_read_once():
    source, reads = _source(budget=4 * 8000)
    first = [t.num_rows for _, t in source]
    second = [t.num_rows for _, t in source]
    assert first == second == [1000] * 4 and len(reads) == 4


def test_a_pool_that_will_not_fit_is_not_cached_at_all():
    source, reads = _source(budget=4 * 8000 - 1)
    seen = []
    for _, table in source:
        seen.append(source._cache)  # nothing held while the first pass runs
    assert seen == [None] * 4
    assert sum(t.num_rows for _, t in source) == 4000 and len(reads) == 8
