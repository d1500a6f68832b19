import numpy as np
import pyarrow as pa
import pytest

from pools.uids import (UID_DTYPE, read_subset, records_to_uids, subset_counts, uids_to_records,
                        write_subset)


def test_uid_to_records_matches_datacomp_int_parsing():
    uids = ["0123456789abcdef" "fedcba9876543210", "f" * 32, "0" * 32]
    recs = uids_to_records(uids)
    assert recs.dtype == UID_DTYPE
    for u, r in zip(uids, recs):
        # DataComp: (int(uid[:16], 16), int(uid[16:32], 16))
        assert (int(r["f0"]), int(r["f1"])) == (int(u[:16], 16), int(u[16:32], 16))


def test_round_trip_and_arrow_input():
    rng = np.random.default_rng(0)
    uids = [rng.bytes(16).hex() for _ in range(1000)]
    chunked = pa.chunked_array([pa.array(uids[:300]), pa.array(uids[300:])])
    assert records_to_uids(uids_to_records(chunked)) == uids
    # a sliced array (non-zero offset) converts the same
    assert records_to_uids(uids_to_records(pa.array(uids).slice(10, 20))) == uids[10:30]


def test_sorting_records_equals_hex_order():
    rng = np.random.default_rng(1)
    uids = [rng.bytes(16).hex() for _ in range(500)] + ["00" * 16, "ff" * 16]
    recs = np.sort(uids_to_records(uids))
    assert records_to_uids(recs) == sorted(uids)


def test_short_uids_are_left_padded_like_the_resharder():
    recs = uids_to_records(["abc"])
    assert (int(recs[0]["f0"]), int(recs[0]["f1"])) == divmod(int("abc", 16), 2**64)


@pytest.mark.parametrize("bad, message", [
    (["zz" * 16], "row 0 is not hexadecimal"),
    (["a" * 33], "row 0 has 33 characters"),
    ([("a" * 32), None], "row 1 is null"),
])
def test_bad_uids_name_the_row(bad, message):
    with pytest.raises(ValueError, match=message):
        uids_to_records(pa.array(bad, pa.string()))


def test_write_subset_is_sorted_npy_with_duplicates_kept(tmp_path):
    uids = ["b" * 32, "a" * 32, "b" * 32]
    path = tmp_path / "sub" / "subset.npy"
    assert write_subset(path, uids_to_records(uids)) == 3
    loaded = np.load(path)  # a standard .npy, as DataComp writes it
    assert loaded.dtype == UID_DTYPE and loaded.shape == (3,)
    assert records_to_uids(loaded) == ["a" * 32, "b" * 32, "b" * 32]
    assert not list(path.parent.glob(".*tmp*"))  # atomic write leaves no temporary file


def test_read_subset_accepts_npy_and_raw_memmap(tmp_path):
    recs = np.sort(uids_to_records(["1" * 32, "2" * 32, "2" * 32]))
    npy = tmp_path / "s.npy"
    write_subset(npy, recs)
    raw = tmp_path / "s.bin"
    recs.tofile(raw)
    for path in (npy, raw):
        sub = read_subset(path)
        assert sub.dtype == UID_DTYPE
        np.testing.assert_array_equal(sub, recs)
    counts = subset_counts(read_subset(raw), uids_to_records(["2" * 32, "1" * 32, "3" * 32]))
    assert counts.tolist() == [2, 1, 0]


def test_read_subset_rejects_wrong_dtype_and_ragged_raw(tmp_path):
    np.save(tmp_path / "wrong.npy", np.arange(4, dtype=np.int64))
    with pytest.raises(ValueError, match="wrong.npy: dtype"):
        read_subset(tmp_path / "wrong.npy")
    (tmp_path / "ragged.bin").write_bytes(b"x" * 17)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        read_subset(tmp_path / "ragged.bin")


def test_sort_records_equals_numpy_sort():
    from pools.uids import sort_records

    rng = np.random.default_rng(7)
    recs = np.empty(5000, UID_DTYPE)
    recs["f0"] = rng.integers(0, 2**64, 5000, dtype=np.uint64)
    recs["f1"] = rng.integers(0, 2**64, 5000, dtype=np.uint64)
    recs["f0"][::7] = 3  # equal upper halves: the lower ones decide
    recs = np.concatenate([recs, recs[:100]])  # duplicates (upsampling) stay
    assert sort_records(recs).tobytes() == np.sort(recs).tobytes()
    assert len(sort_records(recs[:1])) == 1 and len(sort_records(recs[:0])) == 0


def test_uid_keys_are_equal_exactly_where_the_records_are():
    import pyarrow as pa

    from pools.uids import uid_keys

    rng = np.random.default_rng(5)
    uids = [rng.bytes(16).hex() for _ in range(2000)]
    same = ["ab" * 16, "AB" * 16, "0" * 29 + "abc", "abc"]
    keys = uid_keys(pa.chunked_array([pa.array(["x"] + uids).slice(1), pa.array(same)]))
    assert len(np.unique(keys[:2000])) == 2000
    assert keys[2000] == keys[2001] and keys[2002] == keys[2003] and keys[2000] != keys[2002]
    with pytest.raises(ValueError, match="row 1 is null"):
        uid_keys(pa.array(["ab" * 16, None]))


@pytest.mark.parametrize("budget", [16 * 7, 16 * 1000, 1 << 30])
def test_subset_writer_spills_sorted_runs_and_merges_to_np_save_bytes(tmp_path, budget):
    from pools.uids import SubsetWriter

    rng = np.random.default_rng(3)
    records = np.empty(20_000, UID_DTYPE)
    records["f0"] = rng.integers(0, 40, len(records), dtype=np.uint64)  # many equal upper halves
    records["f1"] = rng.integers(0, 1 << 63, len(records), dtype=np.uint64)
    records[100:200] = records[:100]  # duplicates (upsampling) are kept
    write_subset(tmp_path / "want.npy", records)
    writer = SubsetWriter(tmp_path / "got.npy", budget_bytes=budget)
    for i in range(0, len(records), 777):
        writer.add(records[i:i + 777])
    assert writer.close() == len(records)
    assert (tmp_path / "got.npy").read_bytes() == (tmp_path / "want.npy").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got.npy", "want.npy"]  # runs removed


@pytest.mark.parametrize("budget", [16 * 50, 1 << 30])
def test_repeated_keys_in_memory_and_partitioned_on_disk(tmp_path, budget):
    from pools.uids import RepeatedKeys

    rng = np.random.default_rng(4)
    keys = rng.integers(0, 1 << 64, 5000, dtype=np.uint64)
    keys[[7, 4000, 4999]] = keys[[3, 3, 10]]
    found = RepeatedKeys(tmp_path, budget_bytes=budget)
    for i in range(0, len(keys), 300):
        found.add(keys[i:i + 300])
    assert found.repeated_positions().tolist() == [3, 7, 10, 4000, 4999]
    assert list(tmp_path.iterdir()) == []
