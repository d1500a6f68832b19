import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the DataComp re-statement

import datacomp_reference as ref  # noqa: E402
from pipeline.filter import main as filter_main  # noqa: E402
from pipeline.score import main  # noqa: E402
from pools.format import NPZ_KEYS, SCORE_COLUMNS, Pool, read_metadata, validate_pool  # noqa: E402
from pools.uids import uids_to_records  # noqa: E402
from trainer.models import load_model  # noqa: E402


CORRUPT_SHARD, CORRUPT_INDEX = 1, 3


@pytest.fixture
def pool(small_pool, tmp_path):
    """A copy of the session's pool (scoring rewrites it) with one image made undecodable."""
    root = tmp_path / "pool"
    shutil.copytree(small_pool, root)
    shard = Pool(root).shard_files()[CORRUPT_SHARD]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    jpgs = [m.name for m, _ in members if m.name.endswith(".jpg")]
    bad_key = jpgs[CORRUPT_INDEX][:-4]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == bad_key + ".jpg":
                data = b"\xff\xd8 this is not a jpeg"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    bad_uid = next(json.loads(d)["uid"] for m, d in members if m.name == bad_key + ".json")
    return root, bad_uid


def _columns(root, arch):
    files = Pool(root).metadata_files()
    table = pa.concat_tables(read_metadata(p, ["uid", "text", SCORE_COLUMNS[arch]]) for p in files)
    npz = [np.load(Pool.npz_for(p)) for p in files]
    img = np.concatenate([z[f"{arch}_img"] for z in npz])
    txt = np.concatenate([z[f"{arch}_txt"] for z in npz])
    return table, img, txt


def test_scores_are_dot_products_of_the_models_embeddings(pool, checkpoints):
    root, bad_uid = pool
    summary = main(["--pool", str(root), "--model", str(checkpoints["b32"]), "--executor", "local",
                    "--batch-size", "64", "--cpus-per-actor", "1"])
    assert summary["arch"] == "b32"  # picked from the model's width
    table, img, txt = _columns(root, "b32")
    assert img.dtype == np.float16 and img.shape == (600, 512) and txt.shape == (600, 512)
    truth = pq.read_table(root / "ground_truth.parquet").to_pydict()
    downloaded = dict(zip(truth["uid"], truth["downloaded"]))
    uids = table.column("uid").to_pylist()
    scores = table.column(SCORE_COLUMNS["b32"]).to_numpy(zero_copy_only=False)
    assert table.schema.field(SCORE_COLUMNS["b32"]).type == pa.float32()

    has_image = np.array([downloaded[u] and u != bad_uid for u in uids])
    assert summary["rows"] == 600 == summary["scored"] + summary["missing_from_shards"] + summary["image_decode_failed"]
    assert summary["missing_from_shards"] == sum(not downloaded[u] for u in uids)
    assert summary["image_decode_failed"] == 1
    assert summary["scored"] == int(has_image.sum())
    # rows without an image: NaN score, zero embeddings
    assert np.isnan(scores[~has_image]).all()
    assert not img[~has_image].any() and not txt[~has_image].any()
    # rows with one: unit-norm float16 embeddings whose dot product is the score
    assert not np.isnan(scores[has_image]).any()
    np.testing.assert_allclose(np.linalg.norm(img[has_image].astype(np.float32), axis=1), 1, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(txt[has_image].astype(np.float32), axis=1), 1, atol=2e-3)
    dots = (img.astype(np.float32) * txt.astype(np.float32)).sum(1)
    np.testing.assert_allclose(scores[has_image], dots[has_image], rtol=1e-6, atol=1e-6)
    assert np.std(scores[has_image]) > 0

    # the embeddings are the model's: recompute a few directly from the shards
    model, preprocess, tokenizer = load_model(checkpoints["b32"])
    import webdataset as wds
    samples = list(wds.WebDataset([str(p) for p in Pool(root).shard_files()[:1]], shardshuffle=False)
                   .decode("pil"))[:5]
    row_of = {u: i for i, u in enumerate(uids)}
    with torch.no_grad():
        ref_img = model.encode_image(torch.stack([preprocess(s["jpg"]) for s in samples]))
        ref_txt = model.encode_text(tokenizer([s["txt"] for s in samples]))
    ref_img = torch.nn.functional.normalize(ref_img, dim=-1).numpy()
    ref_txt = torch.nn.functional.normalize(ref_txt, dim=-1).numpy()
    rows = [row_of[s["json"]["uid"]] for s in samples]
    np.testing.assert_allclose(img[rows].astype(np.float32), ref_img, atol=2e-3)
    np.testing.assert_allclose(txt[rows].astype(np.float32), ref_txt, atol=2e-3)
    assert not (root / ".scoring").exists()


@pytest.mark.slow
def test_ray_scoring_both_archs_then_a_filter_runs(pool, checkpoints):
    root, _ = pool
    main(["--pool", str(root), "--model", str(checkpoints["b32"]), "--as", "b32", "--executor", "local",
          "--batch-size", "128", "--cpus-per-actor", "1"])
    before = {p.name: p.stat().st_mtime_ns for p in Pool(root).metadata_files()}
    summary = main(["--pool", str(root), "--model", str(checkpoints["l14"]), "--as", "l14",
                    "--num-actors", "1", "--batch-size", "128", "--cpus-per-actor", "1"])
    assert summary["shards_embedded_this_run"] == 3
    # both archs present, row-aligned, in CommonPool's format
    assert validate_pool(root)["npz_files"] == len(Pool(root).metadata_files())
    for p in Pool(root).metadata_files():
        with np.load(Pool.npz_for(p)) as z:
            assert sorted(z.files) == sorted(NPZ_KEYS)
    b32_table, _, _ = _columns(root, "b32")
    l14_table, img, txt = _columns(root, "l14")
    assert b32_table.column("uid").equals(l14_table.column("uid"))
    assert b32_table.column(SCORE_COLUMNS["b32"]).null_count == 0  # b32 kept when l14 was added
    l14 = l14_table.column(SCORE_COLUMNS["l14"]).to_numpy(zero_copy_only=False)
    b32 = b32_table.column(SCORE_COLUMNS["b32"]).to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(np.isnan(l14), np.isnan(b32))  # same rows lack an image
    assert not np.allclose(l14[~np.isnan(l14)], b32[~np.isnan(b32)])  # two different models

    # pipeline.filter on the scored pool: DataComp's clip_score rule on the filled column (NaN
    # rows, which have no image, never pass)
    threshold = float(np.nanquantile(l14, 0.7))
    kept = l14 >= threshold
    assert 0 < kept.sum() < np.isfinite(l14).sum()
    out = root.parent / "subsets"
    stats = filter_main(["--pool", str(root), "--strategy", "no_filter", "clip", "--arch", "l14",
                         "--threshold", repr(threshold), "--out", str(out), "--executor", "local", "--quiet"])
    records = uids_to_records(l14_table.column("uid"))
    assert (np.load(out / "no_filter.npy") == np.sort(records)).all()
    clip = np.load(out / "clip.npy")
    assert len(clip) == stats["strategies"]["clip"]["kept"] == int(kept.sum())
    assert (clip == np.sort(records[kept])).all()
    funnel = {step["rule"]: step for step in stats["strategies"]["clip"]["funnel"]}
    assert funnel["clip_l14_similarity_score_present"]["dropped"] == int(np.isnan(l14).sum())
    assert funnel["clip_l14_similarity_score_ge_threshold"]["dropped"] == int((np.isfinite(l14) & ~kept).sum())
    # the fraction form on the b32 column: DataComp's threshold over the whole pool (NaN rows
    # count in N and never pass)
    filter_main(["--pool", str(root), "--strategy", "clip", "--arch", "b32", "--fraction", "0.3", "--out",
                 str(out / "b32"), "--executor", "local", "--quiet"])
    want = ref.clip_score(root, "b32", fraction=0.3)
    assert len(want) >= int(0.3 * 600) + 1  # ties at the threshold are kept
    assert (np.load(out / "b32" / "clip.npy") == want).all()

    # a rerun with the same model does nothing
    assert {p.name: p.stat().st_mtime_ns for p in Pool(root).metadata_files()} != before
    after = {p.name: p.stat().st_mtime_ns for p in Pool(root).metadata_files()}
    again = main(["--pool", str(root), "--model", str(checkpoints["l14"]), "--executor", "local"])
    assert again["signature"] == summary["signature"]
    assert {p.name: p.stat().st_mtime_ns for p in Pool(root).metadata_files()} == after


def test_width_must_match_the_columns(pool, checkpoints):
    root, _ = pool
    with pytest.raises(ValueError, match="--as l14 needs 768-d embeddings .* 512-d"):
        main(["--pool", str(root), "--model", str(checkpoints["b32"]), "--as", "l14", "--executor", "local"])
    with pytest.raises(ValueError, match="64-d embeddings; CommonPool's columns are b32"):
        main(["--pool", str(root), "--model", "tiny", "--executor", "local"])
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pipeline.score", "--pool", str(root), "--model", "tiny", "--as",
                           "b32", "--executor", "local"], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --as b32 needs 512-d embeddings but tiny")
    # nothing was written
    assert read_metadata(Pool(root).metadata_files()[0], ["clip_b32_similarity_score"]).column(0).null_count > 0
    assert not any(Pool.npz_for(p).exists() for p in Pool(root).metadata_files())


@pytest.mark.parametrize("use_ray", [False, True])
def test_an_unreadable_shard_is_named_in_one_line(pool, checkpoints, use_ray):
    import subprocess
    import sys

    root, _ = pool
    bad = Pool(root).shard_files()[0]
    bad.write_bytes(np.random.default_rng(0).bytes(3000))  # not a tar
    proc = subprocess.run([sys.executable, "-m", "pipeline.score", "--pool", str(root), "--model",
                           str(checkpoints["b32"]), "--num-actors", "1", "--cpus-per-actor", "1",
                           "--executor", "ray" if use_ray else "local"],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}: not a readable tar"), last
    assert not any(Pool.npz_for(p).exists() for p in Pool(root).metadata_files())  # nothing half-written


def test_on_bad_shard_skip_scores_the_rest_and_lists_the_shard(pool, checkpoints, tmp_path):
    root, _ = pool
    reference = tmp_path / "reference"
    shutil.copytree(root, reference)
    bad = Pool(root).shard_files()[0]
    in_bad = {json.loads(f["json"])["uid"] for f in _tar_members(bad)}
    bad.write_bytes(np.random.default_rng(0).bytes(3000))  # not a tar
    args = ["--model", str(checkpoints["b32"]), "--executor", "local", "--batch-size", "64", "--cpus-per-actor", "1"]
    summary = main(["--pool", str(root), "--on-bad-shard", "skip", *args])
    main(["--pool", str(reference), *args])
    expected = json.loads(Pool(root).shard_files()[0].with_name("00000000_stats.json").read_text())["successes"]
    assert [(f["shard"], f["expected_samples"]) for f in summary["input_shards_failed"]] == [("00000000.tar", expected)]
    assert "not a readable tar" in summary["input_shards_failed"][0]["reason"]
    table, img, _ = _columns(root, "b32")
    ref_table, ref_img, _ = _columns(reference, "b32")
    uids = np.array(table.column("uid").to_pylist())
    scores = table.column(SCORE_COLUMNS["b32"]).to_numpy(zero_copy_only=False)
    ref_scores = ref_table.column(SCORE_COLUMNS["b32"]).to_numpy(zero_copy_only=False)
    lost = np.isin(uids, list(in_bad))
    assert lost.sum() == expected and np.isnan(scores[lost]).all() and not img[lost].any()
    np.testing.assert_array_equal(scores[~lost], ref_scores[~lost])  # nothing else changed
    assert summary["rows"] == summary["scored"] + summary["missing_from_shards"] + summary["image_decode_failed"]
    assert summary["missing_from_shards"] >= expected


def _tar_members(path):
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return list(samples.values())
