"""pools.storage against a loopback S3 server (moto): paths, reads, atomic writes, stale temporaries."""

import io
import sys
from pathlib import Path, PosixPath

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared helpers

from object_store import create_bucket, loopback_s3, object_bytes, upload_folder  # noqa: E402
from pools import storage  # noqa: E402
from pools.files import atomic_path, file_fingerprint, remove_stale_temporaries, write_json_atomic  # noqa: E402

BUCKET = "unit"


@pytest.fixture(scope="module")
def s3():
    with loopback_s3():
        create_bucket(BUCKET)
        yield f"s3://{BUCKET}"


def test_local_paths_stay_pathlib_paths(tmp_path):
    assert type(storage.path(str(tmp_path))) is PosixPath
    p = tmp_path / "x"
    assert storage.path(p) is p
    assert storage.readable(p) is p and storage.whole(p) is p
    assert storage.scratch_dir(tmp_path, ".runs") == tmp_path / ".runs"


def test_uri_paths_behave_like_pathlib_paths():
    p = storage.path("s3://bucket/pool/")
    assert str(p) == "s3://bucket/pool" and p.bucket == "bucket"
    parquet = p / "metadata" / "0001.parquet"
    assert str(parquet) == "s3://bucket/pool/metadata/0001.parquet"
    assert (parquet.name, parquet.stem, parquet.suffix) == ("0001.parquet", "0001", ".parquet")
    assert str(parquet.with_suffix(".npz")) == "s3://bucket/pool/metadata/0001.npz"
    assert str(parquet.with_name("x.json")) == "s3://bucket/pool/metadata/x.json"
    assert parquet.parent.parent == p and hash(parquet.parent.parent) == hash(p)
    assert sorted([p / "b", p / "a"]) == [p / "a", p / "b"]
    assert str(storage.path("gs://b/k")) == "gs://b/k"
    # what pathlib leaves of a URI (the signals executor wraps paths in Path) is repaired
    assert storage.path(Path("s3://bucket/pool/metadata/0001.parquet")) == parquet
    import pickle

    assert pickle.loads(pickle.dumps(parquet)) == parquet
    with pytest.raises(TypeError):
        Path(parquet)  # no __fspath__: local code never writes a folder named "s3:"
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        storage.path("ftp://host/pool")
    with pytest.raises(ValueError, match="needs a bucket"):
        storage.path("s3://")


def test_writes_are_atomic_and_reads_see_whole_objects(s3, tmp_path):
    target = storage.path(f"{s3}/out/subset.npy")
    with atomic_path(target) as tmp:
        assert isinstance(tmp, Path) and not str(tmp).startswith("s3")
        np.save(tmp, np.arange(10))
        assert not target.exists()  # nothing under the final name until the block succeeds
    assert target.is_file() and not target.is_dir() and target.parent.is_dir()
    np.testing.assert_array_equal(np.load(storage.whole(target)), np.arange(10))
    with pytest.raises(RuntimeError):
        with atomic_path(storage.path(f"{s3}/out/failed.json")) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert sorted(object_bytes(f"{s3}/out")) == ["subset.npy"]  # neither the object nor its temporary key
    write_json_atomic(target.with_name("a.json"), {"a": 1})
    assert target.with_name("a.json").read_text() == '{\n  "a": 1\n}\n'
    with target.with_name("a.json").open("r") as f:
        assert f.read().startswith("{")
    assert len(file_fingerprint(target)) == 32


@pytest.mark.parametrize("failure", ["connection dropped", "truncated"])
def test_an_upload_cut_short_never_appears_under_the_final_name(s3, tmp_path, monkeypatch, failure):
    import pyarrow.fs as pafs

    target = storage.path(f"{s3}/fail/x.bin")
    staged = []

    def cut_short(source, destination, *, source_filesystem, destination_filesystem, **kw):
        staged.append(destination)
        with destination_filesystem.open_output_stream(destination) as f:  # half of it reaches the store
            f.write(Path(source).read_bytes()[:3])
        if failure == "connection dropped":
            raise OSError("connection reset by peer")

    monkeypatch.setattr(pafs, "copy_files", cut_short)
    (tmp_path / "x").write_bytes(b"payload")
    with pytest.raises(storage.StorageError, match=f"^{target.parent}/.x.bin.tmp-x: connection reset"
                       if failure == "connection dropped" else f"^{target}: upload incomplete \\(3 of 7 bytes\\)"):
        storage.upload_atomic(tmp_path / "x", target, ".x.bin.tmp-x")
    assert staged == [f"{BUCKET}/fail/.x.bin.tmp-x"]  # it went to a temporary key beside the final one
    assert object_bytes(f"{s3}/fail") == {}  # neither the object nor the temporary key


def test_stale_temporary_keys_of_dead_writers_are_removed(s3):
    folder = storage.path(f"{s3}/stale")
    (folder / ".a.json.tmp-999999999@not-this-host-0123abcd.json").write_bytes(b"other machine: kept")
    import socket

    dead = f".b.json.tmp-999999999@{socket.gethostname()}-0123abcd.json"
    (folder / dead).write_bytes(b"a killed run of this machine")
    (folder / "b.json").write_bytes(b"{}")
    assert remove_stale_temporaries(folder) == 1
    assert sorted(object_bytes(str(folder))) == [".a.json.tmp-999999999@not-this-host-0123abcd.json", "b.json"]


def test_pool_readers_give_the_local_answers(s3, small_pool):
    from pools.format import Pool, npz_headers, read_metadata, validate_pool
    from pools.tars import iter_samples
    from pools.uids import read_subset, uids_to_records, write_subset

    upload_folder(small_pool, f"{s3}/pool")
    local, remote = Pool(small_pool), Pool(f"{s3}/pool")
    assert [p.name for p in remote.metadata_files()] == [p.name for p in local.metadata_files()]
    assert [p.name for p in remote.shard_files()] == [p.name for p in local.shard_files()]
    assert validate_pool(f"{s3}/pool") == validate_pool(small_pool)
    for a, b in zip(local.metadata_files(), remote.metadata_files()):
        assert read_metadata(a).equals(read_metadata(b))
    for a, b in zip(local.shard_files(), remote.shard_files()):
        assert list(iter_samples(str(a))) == list(iter_samples(str(b)))
    uids = read_metadata(local.metadata_files()[0], ["uid"]).column("uid")
    write_subset(f"{s3}/pool/subset.npy", uids_to_records(uids))
    write_subset(small_pool.parent / "subset.npy", uids_to_records(uids))
    np.testing.assert_array_equal(read_subset(f"{s3}/pool/subset.npy"), read_subset(small_pool.parent / "subset.npy"))
    assert storage.read_bytes(f"{s3}/pool/subset.npy") == (small_pool.parent / "subset.npy").read_bytes()
    buf = io.BytesIO()
    np.savez(buf, b32_img=np.zeros((3, 512), np.float16))
    storage.path(f"{s3}/pool/x.npz").write_bytes(buf.getvalue())
    assert npz_headers(f"{s3}/pool/x.npz") == {"b32_img": ((3, 512), np.dtype(np.float16))}


def test_subset_writer_spills_its_runs_locally_for_an_object(s3, tmp_path):
    from pools.uids import UID_DTYPE, SubsetWriter

    rng = np.random.default_rng(0)
    records = np.empty(5000, dtype=UID_DTYPE)
    records["f0"], records["f1"] = rng.integers(0, 2**63, 5000), rng.integers(0, 2**63, 5000)
    for out in (tmp_path / "s.npy", f"{s3}/subsets/s.npy"):
        writer = SubsetWriter(out, budget_bytes=16 * 700)  # several sorted runs, then a merge
        for part in np.array_split(records, 9):
            writer.add(part)
        assert writer.close() == 5000
    assert storage.read_bytes(f"{s3}/subsets/s.npy") == (tmp_path / "s.npy").read_bytes()
    assert sorted(object_bytes(f"{s3}/subsets")) == ["s.npy"]
    scratch = storage.scratch_dir(storage.path(f"{s3}/subsets"), "")
    assert not list(scratch.parent.glob(scratch.name + "*"))  # the sorted runs' local folder is gone
