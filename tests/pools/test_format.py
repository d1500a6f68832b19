import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pools.format import (METADATA_COLUMN_NAMES, METADATA_SCHEMA, NPZ_KEYS, Pool, PoolFormatError,
                          load_npz, read_metadata, validate_metadata_table, validate_pool)


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
    assert summary == {"metadata_files": 3, "rows": 900, "npz_files": 3, "shards": 0, "shard_samples": 0}
