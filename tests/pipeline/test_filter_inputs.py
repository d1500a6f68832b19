"""Bad input: each is a clear error naming the file, or a skip that stats.json accounts for."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the DataComp re-statement

import datacomp_reference as ref  # noqa: E402
from filter_pools import make_centroids_and_targets  # noqa: E402
from pipeline.filter import FilterError, main  # noqa: E402
from pipeline.models import ModelInputError  # noqa: E402
from pools.format import PoolFormatError  # noqa: E402


@pytest.fixture(scope="module")
def base_pool(tmp_path_factory):
    from pools.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("inputs") / "pool"
    generate(out, SynthConfig(samples=600, seed=21, rows_per_file=200, images=False, random_scores=True))
    return out


@pytest.fixture
def pool(base_pool, tmp_path):
    """A fresh copy of the pool for each test to break."""
    dst = tmp_path / "pool"
    shutil.copytree(base_pool, dst)
    return dst


def _files(pool):
    return sorted((pool / "metadata").glob("*.parquet"))


def _run(pool, out, *strategy, extra=()):
    return main(["--pool", str(pool), "--strategy", *strategy, "--out", str(out), "--executor", "local",
                 "--quiet", *extra])


@pytest.mark.parametrize("strategy,column", [("basic", "original_width"), ("clip", "clip_l14_similarity_score"),
                                             ("laion", "clip_b32_similarity_score"), ("text", "text")])
def test_missing_column_names_file_and_column(pool, tmp_path, strategy, column):
    bad = _files(pool)[1]
    table = pq.read_table(bad)
    pq.write_table(table.drop_columns([column]), bad)
    with pytest.raises(PoolFormatError, match=rf"{bad.name}.*'{column}' is missing"):
        _run(pool, tmp_path / "out", strategy)


def test_npz_rows_differ_from_parquet(pool, tmp_path):
    bad = _files(pool)[2]
    npz = bad.with_suffix(".npz")
    with np.load(npz) as z:
        arrays = {k: z[k][:-3] for k in z.files}
    np.savez(npz, **arrays)
    c, t = make_centroids_and_targets(pool, tmp_path / "image", k=6)
    with pytest.raises(PoolFormatError, match=rf"{npz.name} has 197 rows for 'l14_img' but {bad.name} has 200"):
        _run(pool, tmp_path / "out", "image", extra=("--centroids", str(c), "--targets", str(t)))


def test_image_without_npz_says_which_file(pool, tmp_path):
    missing = _files(pool)[0].with_suffix(".npz")
    missing.unlink()
    c, t = make_centroids_and_targets(pool, tmp_path / "image", k=6)
    with pytest.raises(FilterError, match=rf"{missing.name} is missing"):
        _run(pool, tmp_path / "out", "image", extra=("--centroids", str(c), "--targets", str(t)))
    # with "all", the image strategies are skipped and say why; the others run
    stats = _run(pool, tmp_path / "out", "all", extra=("--centroids", str(c), "--targets", str(t)))
    assert set(stats["strategies_skipped"]) == {"image", "image_clip"}
    assert "npz" in stats["strategies_skipped"]["image"]
    assert (tmp_path / "out" / "basic.npy").is_file() and not (tmp_path / "out" / "image.npy").exists()


def test_image_without_centroids_or_targets(pool, tmp_path):
    with pytest.raises(FilterError, match="pipeline.centroids"):
        _run(pool, tmp_path / "out", "image")
    c, _ = make_centroids_and_targets(pool, tmp_path / "image", k=6)
    with pytest.raises(FilterError, match="--targets"):
        _run(pool, tmp_path / "out", "image", extra=("--centroids", str(c)))
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 512), np.float32))
    with pytest.raises(ModelInputError, match="width 512"):
        _run(pool, tmp_path / "out", "image", extra=("--centroids", str(bad), "--targets", str(bad)))


@pytest.mark.parametrize("strategy", ["basic", "clip"])
def test_corrupt_parquet_is_an_error_or_an_accounted_skip(pool, tmp_path, strategy):
    bad = _files(pool)[0]
    bad.write_bytes(b"PAR1 this is not a parquet file" * 10)
    with pytest.raises(PoolFormatError, match=rf"{bad.name}: not a readable parquet file"):
        _run(pool, tmp_path / "out", strategy)
    stats = _run(pool, tmp_path / "skip", strategy, extra=("--on-bad-file", "skip"))
    assert [s["file"] for s in stats["files_skipped"]] == [bad.name]
    assert "not a readable parquet" in stats["files_skipped"][0]["reason"]
    assert stats["rows_read"] == 400
    kept = np.load(tmp_path / "skip" / f"{strategy}.npy")
    assert stats["strategies"][strategy]["kept"] == len(kept)
    # the other files are filtered exactly as if the bad one were not there
    bad.unlink()
    bad.with_suffix(".npz").unlink()
    want = ref.basic(pool, ref.Models()) if strategy == "basic" else ref.clip_score(pool, "l14", fraction=0.3)
    if strategy == "basic":
        assert (kept == want).all()
    else:  # the fraction is of the rows read
        assert len(kept) == len(want)


def _with_invalid_utf8(path: Path, rows: list[int]) -> None:
    table = pq.read_table(path)
    texts = [(t or "").encode() for t in table.column("text").to_pylist()]
    for r in rows:
        texts[r] = b"caf\xe9 au lait \xff\xfe photo"  # Latin-1 bytes, not UTF-8
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in texts])]).astype(np.int32)
    arr = pa.Array.from_buffers(pa.string(), len(texts), [None, pa.py_buffer(offsets.tobytes()),
                                                         pa.py_buffer(b"".join(texts))])
    pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", arr), path)


def test_non_utf8_captions_are_counted_not_fatal(pool, tmp_path):
    bad = _files(pool)[1]
    _with_invalid_utf8(bad, [3, 50, 51])
    stats = _run(pool, tmp_path / "out", "no_filter", "basic", "text", "laion")
    assert stats["captions_unreadable"]["not_utf8"] == 3
    assert stats["strategies"]["no_filter"]["kept"] == 600
    for name in ("basic", "text"):
        funnel = stats["strategies"][name]["funnel"]
        assert funnel[0]["rule"] == "caption_readable" and funnel[0]["dropped"] >= 3
    uid = pq.read_table(bad, columns=["uid"]).column("uid")[3].as_py()
    rec = (int(uid[:16], 16), int(uid[16:], 16))
    for name in ("basic", "text", "laion"):
        assert rec not in set(map(tuple, np.load(tmp_path / "out" / f"{name}.npy").tolist()))


def test_bad_uid_names_file_and_row(pool, tmp_path):
    bad = _files(pool)[2]
    table = pq.read_table(bad)
    uids = table.column("uid").to_pylist()
    uids[7] = "z" * 32
    pq.write_table(table.set_column(0, "uid", pa.array(uids)), bad)
    for strategy in ("no_filter", "basic"):
        with pytest.raises(PoolFormatError, match=rf"{bad.name}.*uid.*row 7"):
            _run(pool, tmp_path / strategy, strategy)


def test_missing_pool_says_how_to_get_one(tmp_path):
    with pytest.raises(FilterError, match=r"pools\.synth.*|pools\.download"):
        main(["--pool", str(tmp_path / "nowhere"), "--strategy", "basic", "--out", str(tmp_path / "o"), "--quiet"])
    with pytest.raises(FilterError, match=r"pools\.download --scale small"):
        main(["--scale", "small", "--data-root", str(tmp_path), "--strategy", "basic", "--out",
              str(tmp_path / "o"), "--quiet"])


def test_unscored_pool_is_an_error_not_an_empty_subset(tmp_path):
    from pools.synth import SynthConfig, generate

    pool = generate(tmp_path / "unscored", SynthConfig(samples=200, seed=2, images=False)) and tmp_path / "unscored"
    with pytest.raises(FilterError, match="clip_l14_similarity_score is empty.*pipeline.score"):
        _run(pool, tmp_path / "out", "clip")
    stats = _run(pool, tmp_path / "all", "all")  # the strategies that need scores are skipped
    assert set(stats["strategies"]) == {"no_filter", "basic", "text"}
    assert set(stats["strategies_skipped"]) == {"clip", "laion", "image", "image_clip"}
    assert "pipeline.score" in stats["strategies_skipped"]["laion"]
    assert sorted(p.name for p in (tmp_path / "all").glob("*.npy")) == ["basic.npy", "no_filter.npy", "text.npy"]


@pytest.mark.parametrize("executor", [["--executor", "local"], ["--executor", "ray", "--num-workers", "2"]])
def test_cli_exit_code_and_message(pool, tmp_path, executor):
    """Also when a Ray Data task meets the bad file: one line naming it, no traceback."""
    import subprocess

    bad = _files(pool)[0]
    bad.write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "pipeline.filter", "--pool", str(pool), "--strategy", "basic",
                           "--out", str(tmp_path / "o"), "--quiet", *executor], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "UserCodeException" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: not a readable parquet file")


def test_unreachable_ray_address_is_a_clear_error(pool, tmp_path):
    from pipeline.cluster import RayStartError

    with pytest.raises(RayStartError, match=r"no Ray cluster answers at 127\.0\.0\.1:1"):
        _run(pool, tmp_path / "out", "basic", extra=("--executor", "ray", "--ray-address", "127.0.0.1:1"))


def _scored_with_only(pool, arch):
    """The pool as `pipeline.score` leaves an unscored pool scored with one arch: that arch's score
    column and npz pair; the other arch's column null and its keys absent."""
    from pools.format import SCORE_COLUMNS

    other = next(a for a in SCORE_COLUMNS if a != arch)
    for parquet in _files(pool):
        table = pq.read_table(parquet)
        col = SCORE_COLUMNS[other]
        pq.write_table(table.set_column(table.schema.get_field_index(col), table.schema.field(col),
                                        pa.nulls(table.num_rows, pa.float32())), parquet)
        npz = parquet.with_suffix(".npz")
        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files if k.startswith(arch)}
        np.savez_compressed(npz, **arrays)


def test_pool_scored_with_b32_only_is_valid_and_l14_strategies_name_what_is_missing(pool, tmp_path):
    from pipeline.centroids import main as centroids_main
    from pools.format import validate_pool

    _scored_with_only(pool, "b32")
    assert validate_pool(pool)["npz_archs"] == {"b32": 3, "l14": 0}
    first = _files(pool)[0]
    c, t = tmp_path / "c.npy", tmp_path / "t.npy"  # never reached: the npz check comes first
    np.save(c, np.ones((4, 768), np.float32))
    np.save(t, np.ones((2, 768), np.float32))
    image = ("--centroids", str(c), "--targets", str(t))
    for strategy in ("image", "image_clip"):
        with pytest.raises(FilterError, match=rf"{first.with_suffix('.npz').name} has no 'l14_img' key \(keys "
                           r"present: b32_img, b32_txt; 3 of 3 npz files lack it\).*pipeline\.score --pool .* --as l14"):
            _run(pool, tmp_path / "out", strategy, extra=(*image, "--arch", "b32"))
    with pytest.raises(FilterError, match=rf"strategy clip: clip_l14_similarity_score is empty \(null\) in every row "
                       rf"of .*{first.name} \(3 of 3 metadata files\).*--as l14`, or use --arch b32"):
        _run(pool, tmp_path / "out", "clip")
    with pytest.raises(FilterError, match=rf"{first.with_suffix('.npz').name} has no 'l14_img' key"):
        centroids_main(["--pool", str(pool), "--k", "4", "--executor", "local", "--out", str(tmp_path / "k.npy")])
    # what needs only b32 runs, and equals DataComp's rules on the b32 column
    stats = _run(pool, tmp_path / "b32", "clip", "laion", extra=("--arch", "b32", "--threshold", "0.2"))
    assert (np.load(tmp_path / "b32" / "clip.npy") == ref.clip_score(pool, "b32", threshold=0.2)).all()
    assert stats["strategies"]["laion"]["kept"] > 0
    # with "all", what cannot run is skipped with its reason, the rest runs
    stats = _run(pool, tmp_path / "all", "all", extra=image)
    assert set(stats["strategies"]) == {"no_filter", "basic", "text", "laion"}
    assert "l14_img" in stats["strategies_skipped"]["image"]
    assert "clip_l14_similarity_score is empty" in stats["strategies_skipped"]["clip"]
    assert "clip_l14_similarity_score is empty" in stats["strategies_skipped"]["image_clip"]


def test_pool_scored_with_l14_only_b32_strategies_name_what_is_missing(pool, tmp_path):
    _scored_with_only(pool, "l14")
    first = _files(pool)[0]
    for strategy, extra in (("laion", ()), ("clip", ("--arch", "b32"))):
        with pytest.raises(FilterError, match=rf"strategy {strategy}: clip_b32_similarity_score is empty \(null\) "
                           rf"in every row of .*{first.name}.*pipeline\.score --pool .* --as b32"):
            _run(pool, tmp_path / "out", strategy, extra=extra)
    c, t = make_centroids_and_targets(pool, tmp_path / "image", k=6)
    stats = _run(pool, tmp_path / "l14", "clip", "image", extra=("--centroids", str(c), "--targets", str(t)))
    assert stats["strategies"]["clip"]["kept"] == len(ref.clip_score(pool, "l14", fraction=0.3))
    assert stats["strategies"]["image"]["kept"] > 0


def test_out_or_signals_dir_that_is_a_file(pool, tmp_path):
    import subprocess

    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for flags, flag in ((["--out", str(a_file)], "--out"),
                        (["--out", str(tmp_path / "o"), "--signals-dir", str(a_file)], "--signals-dir")):
        proc = subprocess.run([sys.executable, "-m", "pipeline.filter", "--pool", str(pool), "--strategy", "basic",
                               "--executor", "local", "--quiet", *flags], capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip() == f"error: {flag} {a_file} is a file, not a folder"
    assert a_file.read_text() == "mine"


def _copy_file_as(pool, index, new_stem):
    """A metadata file (and its npz) copied under another name: every uid of it twice in the pool."""
    src = _files(pool)[index]
    shutil.copy(src, src.with_name(f"{new_stem}.parquet"))
    shutil.copy(src.with_suffix(".npz"), src.with_name(f"{new_stem}.npz"))
    return src, src.with_name(f"{new_stem}.parquet")


def _repeat_rows(path, rows_from, rows_to):
    """Within one file, rows `rows_to` get the uids of `rows_from`."""
    table = pq.read_table(path)
    uids = table.column("uid").to_pylist()
    for a, b in zip(rows_from, rows_to):
        uids[b] = uids[a].upper()  # the same uid, upper case: the same u8,u8 record
    pq.write_table(table.set_column(table.schema.get_field_index("uid"), "uid", pa.array(uids)), path)


@pytest.mark.parametrize("strategy", ["no_filter", "clip", "basic"])
def test_duplicate_uids_are_an_error_naming_both_places(pool, tmp_path, strategy):
    first, copy = _copy_file_as(pool, 1, "zz_copy")
    with pytest.raises(FilterError, match=rf"is in {first} row 0 and in {copy} row 0 \(200 rows repeat"):
        _run(pool, tmp_path / "out", strategy)
    assert not (tmp_path / "out" / f"{strategy}.npy").exists()


@pytest.mark.parametrize("strategy", ["no_filter", "clip", "basic"])
def test_keep_first_duplicate_gives_the_subset_of_the_pool_without_copies(base_pool, pool, tmp_path, strategy):
    """Copies across files and within a file: the subset (and the clip threshold) equal the
    pool's without them; the copies are counted as duplicate_uid in every funnel."""
    _copy_file_as(pool, 1, "zz_copy")
    _repeat_rows(_files(pool)[2], [0, 1, 2], [150, 160, 170])  # rows 150.. of file 2 lose their own uid
    clean = tmp_path / "clean"
    shutil.copytree(base_pool, clean)
    _repeat_rows(_files(clean)[2], [0, 1, 2], [150, 160, 170])
    table = pq.read_table(_files(clean)[2])
    pq.write_table(table.filter(pa.array([i not in (150, 160, 170) for i in range(table.num_rows)])),
                   _files(clean)[2])  # the reference: those rows are simply not there
    with np.load(_files(clean)[2].with_suffix(".npz")) as z:
        np.savez(_files(clean)[2].with_suffix(".npz"),
                 **{k: np.delete(z[k], [150, 160, 170], axis=0) for k in z.files})
    stats = _run(pool, tmp_path / "out", strategy, extra=("--on-duplicate-uid", "keep-first"))
    want = _run(clean, tmp_path / "want", strategy)
    assert np.array_equal(np.load(tmp_path / "out" / f"{strategy}.npy"), np.load(tmp_path / "want" / f"{strategy}.npy"))
    entry = stats["strategies"][strategy]
    assert stats["duplicate_uid"]["rows"] == 200 + 3
    assert entry["rows"] == 600 + 200 == entry["kept"] + sum(entry["dropped"].values())
    assert entry["dropped"]["duplicate_uid"] == 203
    assert entry["funnel"][0] == {"rule": "duplicate_uid", "in": 800, "passed": 597, "dropped": 203}
    assert entry["kept"] == want["strategies"][strategy]["kept"]
    if strategy == "clip":
        assert stats["fraction_threshold"]["rows"] == 597 == want["fraction_threshold"]["rows"]
        assert stats["fraction_threshold"]["threshold"] == want["fraction_threshold"]["threshold"]


def test_infinite_scores_never_pass_and_are_counted(pool, tmp_path):
    path = _files(pool)[0]
    table = pq.read_table(path)
    col = "clip_l14_similarity_score"
    scores = table.column(col).to_numpy(zero_copy_only=False).astype(np.float32)
    uids = table.column("uid").to_pylist()
    scores[[3, 4]] = [np.inf, -np.inf]
    pq.write_table(table.set_column(table.schema.get_field_index(col), col, pa.array(scores)), path)
    from pools.uids import records_to_uids

    for strategy, extra in (("clip", ()), ("clip", ("--threshold", "-1"))):
        out = tmp_path / f"out_{strategy}_{len(extra)}"
        stats = _run(pool, out, strategy, "laion", extra=extra)  # laion makes the signals path run
        kept = set(records_to_uids(np.load(out / f"{strategy}.npy")))
        assert uids[3] not in kept and uids[4] not in kept
        assert stats["scores_missing"][col] >= 2
    # the metadata-only path (clip alone reads no signals) too
    stats = _run(pool, tmp_path / "only_clip", "clip", extra=("--threshold", "-1"))
    kept = set(records_to_uids(np.load(tmp_path / "only_clip" / "clip.npy")))
    assert uids[3] not in kept and uids[4] not in kept
    assert stats["scores_missing"] == {col: 2 + int(np.isnan(scores).sum()) + table.column(col).null_count}


def test_spilled_subsets_and_uid_keys_give_the_same_outputs(pool, tmp_path, monkeypatch):
    """Past the memory budget, kept uids go to sorted runs and uid keys to partition files:
    the subsets (and the duplicate search) are the same as in memory."""
    import pools.uids

    _copy_file_as(pool, 1, "zz_copy")
    strategies = ("no_filter", "clip", "basic")
    want = _run(pool, tmp_path / "memory", *strategies, extra=("--on-duplicate-uid", "keep-first"))
    monkeypatch.setattr(pools.uids, "SPILL_BYTES", 16 * 64)
    got = _run(pool, tmp_path / "spilled", *strategies, extra=("--on-duplicate-uid", "keep-first"))
    for n in strategies:
        assert (tmp_path / "spilled" / f"{n}.npy").read_bytes() == (tmp_path / "memory" / f"{n}.npy").read_bytes()
        assert got["strategies"][n]["kept"] == want["strategies"][n]["kept"]
    assert got["duplicate_uid"] == want["duplicate_uid"] and got["duplicate_uid"]["rows"] == 200
    assert sorted(p.name for p in (tmp_path / "spilled").iterdir() if p.name.startswith(".")) == []
