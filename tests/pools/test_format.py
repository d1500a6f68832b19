import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pools.format import (METADATA_COLUMN_NAMES, METADATA_SCHEMA, NPZ_KEYS, Pool, PoolFormatError,
                          empty_columns, load_npz, npz_headers, read_metadata, validate_metadata_table,
                          validate_npz, validate_pool)


def _table(n=4, **overrides):
    rng = np.random.default_rng(0)
    cols = {
        "uid": [rng.bytes(16).hex() for _ in range(n)],
        "url": [f"http://x/{i}.jpg" for i in range(n)],
        "text": ["a red star"] * n,
        "original_width": [300] * n,
        "original_height": [200] * n,
        "clip_b32_similarity_score": [0.3] * n,
        "clip_l14_similarity_score": [0.25] * n,
        "face_bboxes": [[]] * n,
        "sha256": [rng.bytes(32).hex() for _ in range(n)],
    }
    cols.update(overrides)
    return pa.table({k: pa.array(v, METADATA_SCHEMA.field(k).type) for k, v in cols.items()})


def test_valid_table_passes():
    validate_metadata_table(_table(), "m.parquet")


def test_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "metadata" / "0007.parquet"
    path.parent.mkdir()
    pq.write_table(_table().drop(["original_height"]), path)
    with pytest.raises(PoolFormatError, match=r"0007.parquet: column 'original_height' is missing"):
        read_metadata(path)
    # reading only other columns is fine: a filter asks only for what it needs
    assert read_metadata(path, ["uid", "text"]).num_rows == 4


def test_mistyped_column(tmp_path):
    path = tmp_path / "m.parquet"
    t = _table()
    t = t.set_column(t.schema.get_field_index("original_width"), "original_width",
                     pa.array(["300"] * 4))
    pq.write_table(t, path)
    with pytest.raises(PoolFormatError, match=r"m.parquet: column 'original_width' has type string; expected integer"):
        read_metadata(path)


def test_bad_uid_value_names_row():
    t = _table(uid=["a" * 32, "A" * 32, "b" * 32, "c" * 32])
    with pytest.raises(PoolFormatError, match=r"column 'uid' row 1 is 'AAAA"):
        validate_metadata_table(t, "m.parquet")
    t = _table(uid=["a" * 32, None, "b" * 32, "c" * 32])
    with pytest.raises(PoolFormatError, match=r"column 'uid' is null at row 1"):
        validate_metadata_table(t, "m.parquet")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(PoolFormatError, match=r"bad.parquet: not a readable parquet file"):
        read_metadata(path)


def test_accepts_datacomp_variants():
    # large_string text, int32 sizes, float64 scores, null scores: all appear in the wild
    t = _table()
    t = t.set_column(2, "text", t.column("text").cast(pa.large_string()))
    t = t.set_column(3, "original_width", t.column("original_width").cast(pa.int32()))
    t = t.set_column(5, "clip_b32_similarity_score", t.column(5).cast(pa.float64()))
    validate_metadata_table(t, "m.parquet")


def test_npz_rows_must_match_parquet(tmp_path):
    parquet = tmp_path / "0007.parquet"
    pq.write_table(_table(n=5), parquet)
    np.savez(tmp_path / "0007.npz", **{k: np.zeros((4, d), np.float16) for k, d in NPZ_KEYS.items()})
    with pytest.raises(PoolFormatError, match=r"0007.npz has 4 rows for 'b32_img' but 0007.parquet has 5"):
        load_npz(parquet, ("b32_img",), 5)
    np.savez(tmp_path / "0007.npz", b32_img=np.zeros((5, 100), np.float16))
    with pytest.raises(PoolFormatError, match=r"'b32_img' has shape \(5, 100\); expected \(rows, 512\)"):
        load_npz(parquet, ("b32_img",), 5)
    with pytest.raises(PoolFormatError, match=r"key 'l14_img' is missing"):
        load_npz(parquet, ("l14_img",), 5)


def test_missing_npz_says_which_file(tmp_path):
    parquet = tmp_path / "0001.parquet"
    pq.write_table(_table(), parquet)
    with pytest.raises(PoolFormatError, match=r"0001.npz is missing: this step needs the embeddings l14_img"):
        load_npz(parquet, ("l14_img",), 4)


def test_pool_without_metadata(tmp_path):
    with pytest.raises(PoolFormatError, match="metadata"):
        Pool(tmp_path).metadata_files()


def test_layout_of_a_generated_pool(small_pool):
    pool = Pool(small_pool)
    files = pool.metadata_files()
    assert len(files) == 3 and all(len(f.stem) == 32 for f in files)
    assert [s.name for s in pool.shard_files()] == ["00000000.tar", "00000001.tar", "00000002.tar"]
    assert not pool.has_npz()
    summary = validate_pool(small_pool)
    assert summary["rows"] == 600 and summary["shards"] == 3
    assert set(read_metadata(files[0]).column_names) == set(METADATA_COLUMN_NAMES)


def test_scored_pool_validates_with_npz(scored_pool):
    summary = validate_pool(scored_pool)
    assert summary == {"metadata_files": 3, "rows": 900, "npz_files": 3, "npz_archs": {"b32": 3, "l14": 3},
                       "shards": 0, "shard_samples": 0}


def _one_file_pool(tmp_path, n=5, **arrays):
    """A pool of one 5-row parquet and an npz holding `arrays`."""
    parquet = tmp_path / "pool" / "metadata" / "0007.parquet"
    parquet.parent.mkdir(parents=True)
    pq.write_table(_table(n=n), parquet)
    np.savez_compressed(parquet.with_suffix(".npz"), **arrays)
    return tmp_path / "pool", parquet


def _pair(arch, n=5, dtype=np.float16):
    d = NPZ_KEYS[f"{arch}_img"]
    return {f"{arch}_img": np.zeros((n, d), dtype), f"{arch}_txt": np.zeros((n, d), dtype)}


@pytest.mark.parametrize("archs", [("b32",), ("l14",), ("b32", "l14")])
def test_an_npz_needs_one_arch_not_all(tmp_path, archs):
    # pipeline.score adds one arch at a time: a pool scored with b32 only is a valid pool
    arrays = {k: v for a in archs for k, v in _pair(a).items()}
    root, parquet = _one_file_pool(tmp_path, dedup=np.zeros((5, 256), np.float16), **arrays)
    summary = validate_pool(root)
    assert summary["npz_files"] == 1
    assert summary["npz_archs"] == {a: int(a in archs) for a in ("b32", "l14")}
    assert validate_npz(parquet, 5) == archs
    assert npz_headers(parquet.with_suffix(".npz"))["dedup"] == ((5, 256), np.dtype(np.float16))


@pytest.mark.parametrize("arrays,error", [
    ({"b32_img": np.zeros((5, 512), np.float16)}, r"0007.npz: has 'b32_img' but not 'b32_txt'.*--as b32"),
    ({**_pair("b32"), "l14_txt": np.zeros((5, 768), np.float16)}, r"0007.npz: has 'l14_txt' but not 'l14_img'"),
    ({"dedup": np.zeros((5, 256), np.float16)}, r"0007.npz: holds no CLIP embeddings \(keys present: dedup\)"),
    ({}, r"0007.npz: holds no CLIP embeddings \(keys present: none\)"),
    (_pair("l14", dtype=np.float32), r"0007.npz: key 'l14_img' is float32; CommonPool's embeddings are float16"),
    ({**_pair("b32"), "l14_img": np.zeros((5, 512), np.float16), "l14_txt": np.zeros((5, 768), np.float16)},
     r"0007.npz: key 'l14_img' has shape \(5, 512\); expected \(rows, 768\)"),
    (_pair("b32", n=4), r"0007.npz has 4 rows for 'b32_img' but 0007.parquet has 5"),
])
def test_an_incomplete_or_wrong_npz_names_file_and_key(tmp_path, arrays, error):
    root, _ = _one_file_pool(tmp_path, **arrays)
    with pytest.raises(PoolFormatError, match=error):
        validate_pool(root)


def test_missing_arch_key_says_how_to_add_it(tmp_path):
    root, parquet = _one_file_pool(tmp_path, **_pair("b32"))
    with pytest.raises(PoolFormatError, match=r"0007.npz: key 'l14_img' is missing \(keys present: b32_img, "
                       r"b32_txt\); the pool has no l14 embeddings: add them with `python -m pipeline.score "
                       r"--pool .*pool --model MODEL --as l14`"):
        load_npz(parquet, ("l14_img",), 5)


def test_empty_columns_from_the_footer(tmp_path):
    path = tmp_path / "m.parquet"
    t = _table(n=6)
    t = t.set_column(5, "clip_b32_similarity_score", pa.nulls(6, pa.float32()))  # never scored
    t = t.set_column(6, "clip_l14_similarity_score", pa.array([None, 0.2, None, None, None, None], pa.float32()))
    pq.write_table(t, path, row_group_size=4)
    assert empty_columns(path, ["clip_b32_similarity_score", "clip_l14_similarity_score", "absent"]) == [
        "clip_b32_similarity_score"]
    pq.write_table(t, path, write_statistics=False)  # no statistics: not reported
    assert empty_columns(path, ["clip_b32_similarity_score"]) == []
