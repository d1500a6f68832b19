import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pools.format import Pool, read_metadata
from pools.synth import CONCEPTS, SynthConfig, generate, main


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _metadata(root):
    import pyarrow as pa
    return pa.concat_tables(read_metadata(p) for p in Pool(root).metadata_files())


def test_shards_are_readable_by_webdataset_and_match_metadata(small_pool):
    meta = _metadata(small_pool)
    truth = pq.read_table(small_pool / "ground_truth.parquet")
    samples = list(wds.WebDataset([str(p) for p in Pool(small_pool).shard_files()], shardshuffle=False)
                   .decode("pil"))
    downloaded = truth.column("downloaded").to_numpy(zero_copy_only=False)
    assert len(samples) == int(downloaded.sum())
    assert 0 < len(samples) < 600  # some downloads "failed"
    text_by_uid = dict(zip(meta.column("uid").to_pylist(), meta.column("text").to_pylist()))
    sha_by_uid = dict(zip(meta.column("uid").to_pylist(), meta.column("sha256").to_pylist()))
    for s in samples:
        info = s["json"]
        assert info["status"] == "success" and info["key"] == s["__key__"]
        assert s["txt"] == (text_by_uid[info["uid"]] or "")
        assert s["jpg"].size[0] <= 64 and s["jpg"].size[1] <= 64
        assert info["sha256"] == sha_by_uid[info["uid"]]
    # per-shard stats agree with the tars, as img2dataset's do
    for shard in Pool(small_pool).shard_files():
        stats = Pool(small_pool).shard_stats(shard)
        n = sum(1 for _ in wds.WebDataset(str(shard), shardshuffle=False))
        assert stats["successes"] == n and stats["count"] == 200
        status = pq.read_table(shard.with_suffix(".parquet"))
        assert status.num_rows == 200


def test_ground_truth_is_beside_not_inside_metadata(small_pool):
    meta = _metadata(small_pool)
    truth = pq.read_table(small_pool / "ground_truth.parquet")
    assert truth.column("uid").to_pylist() == meta.column("uid").to_pylist()
    assert "caption_kind" not in meta.column_names
    assert not list((small_pool / "metadata").glob("*truth*"))


def test_composition_follows_the_configured_fractions(tmp_path):
    cfg = SynthConfig(samples=4000, seed=1, images=False)
    summary = generate(tmp_path / "p", cfg)
    for kind, want in cfg.captions.fractions().items():
        got = summary["composition"]["caption_kind"][kind]["fraction"]
        assert abs(got - want) < 0.03, (kind, got, want)
    meta = _metadata(tmp_path / "p")
    truth = pq.read_table(tmp_path / "p" / "ground_truth.parquet").to_pandas()
    df = meta.to_pandas().assign(kind=truth.caption_kind, size_kind=truth.size_kind)
    short = np.minimum(df.original_width, df.original_height)
    aspect = np.maximum(df.original_width, df.original_height) / short
    assert (short[df.size_kind == "small"] < 200).all()
    assert (aspect[df.size_kind == "extreme_aspect"] > 3).all()
    normal = df.size_kind == "normal"
    assert (short[normal] >= 200).all() and (aspect[normal] <= 3).all()
    # the boundary rows sit exactly on the basic filter's limits
    boundary = df[df.size_kind == "boundary"]
    assert (np.minimum(boundary.original_width, boundary.original_height) == 200).all()
    assert (aspect[df.size_kind == "boundary"] == 3.0).any()
    # every caption kind looks like what it claims to be
    names = [f"{c} {s}" for c, s in CONCEPTS]
    concept_name = truth.concept_name
    matching = df.kind.isin(["match_entity", "match_plain"])
    assert all(n in t for n, t in zip(concept_name[matching], df.text[matching]))
    mism = df.kind == "mismatch"
    assert not any(n in t for n, t in zip(concept_name[mism], df.text[mism]))
    assert any(name in t for t in df.text[mism] for name in names)
    junk = df[df.kind == "junk"].text
    assert junk.isna().any() and (junk == "").any() and junk.str.contains("\n").any()
    assert junk.str.contains("\u00a0").any()
    off = df.kind == "off_target"  # images of no concept, captions that name none
    assert (truth.concept[off] == -1).all() and (truth.concept[~off] >= 0).all()
    assert set(truth.language[off]) == {"en"}
    words = {w for c, s in CONCEPTS for w in (c, s)}
    assert not any(w in t.split() for t in df.text[off] for w in words)
    langs = set(truth.language[df.kind == "non_english"])
    assert {"de", "fr", "es", "ru", "ja", "zh"} <= langs
    assert summary["scores"].startswith("CLIP score columns are empty")
    assert meta.column("clip_l14_similarity_score").null_count == 4000


def test_same_seed_gives_identical_files_other_seed_differs(tmp_path):
    cfg = dict(samples=150, rows_per_file=100, shard_size=60, eval_per_class=1)
    generate(tmp_path / "a", SynthConfig(seed=5, **cfg))
    generate(tmp_path / "b", SynthConfig(seed=5, **cfg))
    generate(tmp_path / "c", SynthConfig(seed=6, **cfg))
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert a.keys() != c.keys() or a != c


def test_eval_set_layout(small_pool):
    eval_dir = small_pool / "eval"
    classnames = (eval_dir / "classnames.txt").read_text().splitlines()
    templates = (eval_dir / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert len(classnames) == len(CONCEPTS) and classnames[0] == "red square"
    assert all("{c}" in t for t in templates)
    nshards = int((eval_dir / "test" / "nshards.txt").read_text())
    assert nshards == 4 and sorted(p.name for p in (eval_dir / "test").glob("*.tar")) == \
        ["0.tar", "1.tar", "2.tar", "3.tar"]
    samples = list(wds.WebDataset(str(eval_dir / "test" / f"{{0..{nshards - 1}}}.tar"), shardshuffle=False))
    labels = [int(s["cls"]) for s in samples]
    assert len(samples) == 3 * len(CONCEPTS) and len({s["__key__"] for s in samples}) == len(samples)
    assert np.bincount(labels).tolist() == [3] * len(CONCEPTS)


def test_eval_set_reads_as_datacomps_loader_does(small_pool):
    """DataComp's evaluation (clip_benchmark's wds builder) reads `test/{0..n-1}.tar` from
    nshards.txt with 4 loader workers; webdataset splits the shards over them (newer versions
    refuse fewer shards than workers): each worker gets one and every sample comes once."""
    import torch
    test = small_pool / "eval" / "test"
    n = int((test / "nshards.txt").read_text().strip())
    dataset = wds.WebDataset(str(test / f"{{0..{n - 1}}}.tar"), shardshuffle=False).to_tuple("__key__", "cls")
    loader = torch.utils.data.DataLoader(dataset.batched(8), batch_size=None, shuffle=False, num_workers=4)
    keys, labels = [], []
    for batch_keys, batch_labels in loader:
        keys += list(batch_keys)
        labels += [int(l) for l in batch_labels]
    assert sorted(keys) == [f"{i:06d}" for i in range(3 * len(CONCEPTS))]
    assert np.bincount(labels).tolist() == [3] * len(CONCEPTS)


def test_random_scores_equal_embedding_dot_products(scored_pool):
    from pools.format import load_npz
    for parquet in Pool(scored_pool).metadata_files():
        meta = read_metadata(parquet)
        emb = load_npz(parquet, ("b32_img", "b32_txt", "l14_img", "l14_txt"), meta.num_rows)
        for arch in ("b32", "l14"):
            img = emb[f"{arch}_img"].astype(np.float32)
            txt = emb[f"{arch}_txt"].astype(np.float32)
            np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=2e-3)
            score = meta.column(f"clip_{arch}_similarity_score").to_numpy()
            np.testing.assert_allclose(score, (img * txt).sum(1), atol=1e-5)
            assert score.min() < 0.1 and score.max() > 0.3


def test_cli_reuses_a_finished_pool_and_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "pool"
    summary = main(["--out", str(out), "--samples", "80", "--metadata-only"])
    printed = capsys.readouterr().out
    assert f"synthetic pool at {out}" in printed and "80 rows" in printed
    mtime = (out / "pool.json").stat().st_mtime_ns
    assert main(["--out", str(out), "--samples", "80", "--metadata-only"]) == summary
    assert (out / "pool.json").stat().st_mtime_ns == mtime  # reused, not regenerated
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["--out", str(out), "--samples", "90", "--metadata-only"])
    main(["--out", str(out), "--samples", "90", "--metadata-only", "--overwrite"])
    assert json.loads((out / "pool.json").read_text())["rows"] == 90


def test_random_embeddings_per_file_equal_one_pool_wide_draw():
    # generate() draws each file's rows on their own (memory follows the file, not the pool):
    # the values must be those of one draw over the whole pool, whatever the file size.
    from pools.synth import RandomEmbeddings
    whole_emb, whole_scores = RandomEmbeddings(3, 1000).take(1000)
    parts = RandomEmbeddings(3, 1000, chunk_rows=64)
    pieces = [parts.take(rows) for rows in (1, 333, 400, 266)]
    for key, value in whole_emb.items():
        np.testing.assert_array_equal(np.concatenate([emb[key] for emb, _ in pieces]), value)
    for arch, value in whole_scores.items():
        np.testing.assert_array_equal(np.concatenate([scores[arch] for _, scores in pieces]), value)
    with pytest.raises(ValueError, match="rows up to 1001 of a pool of 1000"):
        parts.take(1)
