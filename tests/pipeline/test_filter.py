"""Every strategy's uids equal a row-by-row re-statement of DataComp's rule, quirks included."""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the DataComp re-statement

import datacomp_reference as ref  # noqa: E402
from filter_pools import make_centroids_and_targets, make_quirky_pool  # noqa: E402
from pipeline.filter import main  # noqa: E402
from pipeline.strategies import STRATEGIES  # noqa: E402
from pools.uids import UID_DTYPE  # noqa: E402


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_quirky_pool(tmp_path_factory.mktemp("filter") / "pool")


@pytest.fixture(scope="module")
def image_inputs(pool, tmp_path_factory):
    return make_centroids_and_targets(pool, tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="module")
def models():
    return ref.Models()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of this process's own for the module's commands (never another job's)."""
    from pipeline.cluster import join_ray, leave_ray

    started = join_ray(num_cpus=2)
    yield
    if started:
        leave_ray()


@pytest.fixture(scope="module")
def all_run(pool, image_inputs, ray_cluster, tmp_path_factory):
    """`--strategy all` once, as a Ray Data job with 2 workers."""
    out = tmp_path_factory.mktemp("all")
    centroids, targets = image_inputs
    stats = main(["--pool", str(pool), "--strategy", "all", "--centroids", str(centroids), "--targets",
                  str(targets), "--out", str(out), "--num-workers", "2", "--executor", "ray",
                  "--signals-dir", str(out / "signals"), "--quiet"])
    return out, stats


def _uids(path: Path) -> np.ndarray:
    arr = np.load(path)
    assert arr.dtype == UID_DTYPE and arr.ndim == 1
    assert (np.sort(arr) == arr).all()
    return arr


def test_pool_has_the_quirks(pool):
    import pandas as pd

    df = pd.concat([pd.read_parquet(p) for p in ref.parquet_paths(pool)])
    assert df.text.isna().any() and (df.text == "").any() and df.text.str.contains("\n", na=False).any()
    assert df.clip_l14_similarity_score.isna().sum() > 30
    t = ref.get_threshold(pool, "clip_l14_similarity_score", 0.3)
    assert (df.clip_l14_similarity_score == t).sum() >= 12  # ties at the fraction threshold
    assert (df.clip_b32_similarity_score == np.float32(0.28)).sum() >= 3


def test_no_filter(all_run, pool):
    assert (_uids(all_run[0] / "no_filter.npy") == ref.no_filter(pool)).all()


def test_basic(all_run, pool, models):
    got, want = _uids(all_run[0] / "basic.npy"), ref.basic(pool, models)
    assert len(want) > 100 and (got.shape == want.shape) and (got == want).all()


def test_text(all_run, pool, models):
    got, want = _uids(all_run[0] / "text.npy"), ref.text_based(pool, models)
    assert len(want) > 100 and (got.shape == want.shape) and (got == want).all()


def test_clip_fraction_with_ties_and_nan(all_run, pool):
    got, want = _uids(all_run[0] / "clip.npy"), ref.clip_score(pool, "l14", fraction=0.3)
    assert got.shape == want.shape and (got == want).all()
    n = int(1200 * 0.3)
    assert len(got) > n + 1  # the ties at the threshold are all kept


def test_laion(all_run, pool, models):
    got, want = _uids(all_run[0] / "laion.npy"), ref.laion2b(pool, models)
    assert len(want) > 20 and got.shape == want.shape and (got == want).all()


def test_image(all_run, pool, models, image_inputs):
    c, t = (np.load(p) for p in image_inputs)
    got, want = _uids(all_run[0] / "image.npy"), ref.image_based(pool, models, c, t)
    assert len(want) > 20 and got.shape == want.shape and (got == want).all()


def test_image_clip(all_run, pool, models, image_inputs):
    c, t = (np.load(p) for p in image_inputs)
    got = _uids(all_run[0] / "image_clip.npy")
    want = ref.image_based(pool, models, c, t, arch="l14", fraction=0.3)
    assert len(want) > 5 and got.shape == want.shape and (got == want).all()


def test_stats_account_for_every_row(all_run):
    out, stats = all_run
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == json.loads(json.dumps(stats))
    assert set(on_disk["strategies"]) == set(STRATEGIES)
    assert on_disk["rows_read"] == 1200
    assert on_disk["captions_unreadable"]["null"] > 0
    for name, s in on_disk["strategies"].items():
        assert s["rows"] == 1200
        assert s["rows"] == s["kept"] + sum(s["dropped"].values()), name
        assert s["kept"] == len(np.load(out / f"{name}.npy")), name
        if s["funnel"]:
            assert s["funnel"][-1]["passed"] == s["kept"]
            assert s["funnel"][0]["in"] == 1200
            for step, following in zip(s["funnel"], s["funnel"][1:]):
                assert step["passed"] == following["in"] == step["in"] - step["dropped"]
    basic = on_disk["strategies"]["basic"]
    assert [f["rule"] for f in basic["funnel"]] == ["caption_readable", "caption_words_gt_2", "caption_chars_gt_5",
                                                    "min_side_ge_200", "aspect_le_3", "fasttext_en"]
    assert on_disk["fraction_threshold"]["rank"] == 360


def test_manifest(all_run):
    out, _ = all_run
    m = json.loads((out / "manifest.json").read_text())
    assert m["signals"]["groups"] == ["base", "size", "text", "entity", "fasttext", "cld3", "image_embedding",
                                      "centroid", "target_centroid"]
    assert m["signals"]["files_computed"] == 4
    assert m["signals"]["computed_by"] == {"ray": 4}
    assert m["models"]["fasttext"]["path"].endswith("lid.176.ftz")
    assert m["models"]["centroids"]["shape"] == [13, 768]
    assert {"numpy", "pyarrow", "ray", "nltk"} <= set(m["versions"])
    assert m["timings"]["total_s"] > 0
    assert len(m["pool"]["inputs"]) == 4
    for name, s in m["strategies"].items():
        assert s["output"]["uids"] == len(np.load(out / f"{name}.npy"))


def test_signals_table(all_run, pool):
    out, _ = all_run
    table = pq.read_table(out / "signals")
    assert table.num_rows == 1200
    for col in ("uid_hi", "uid_lo", "file", "row", "fasttext_lang", "caption_words", "imagenet21k_entity",
                "cld3_lang", "nearest_centroid", "min_side", "clip_l14_similarity_score"):
        assert col in table.column_names


@pytest.mark.parametrize("arch,threshold,fraction", [("b32", 0.28, None), ("l14", None, 0.1), ("b32", None, 0.0),
                                                     ("l14", 0.25, None)])
def test_clip_variants(pool, tmp_path, arch, threshold, fraction):
    args = ["--pool", str(pool), "--strategy", "clip_score", "--arch", arch, "--out", str(tmp_path), "--quiet"]
    args += ["--threshold", str(threshold)] if threshold is not None else ["--fraction", str(fraction)]
    main(args)
    got = _uids(tmp_path / "clip.npy")
    want = ref.clip_score(pool, arch, threshold=threshold, fraction=fraction)
    assert got.shape == want.shape and (got == want).all()


def test_image_clip_b32_threshold_and_datacomp_names(pool, models, image_inputs, tmp_path):
    centroids, targets = image_inputs
    main(["--pool", str(pool), "--strategy", "image_based_intersect_clip_score", "basic_filter", "--arch", "b32",
          "--threshold", "0.2", "--centroids", str(centroids), "--targets", str(targets), "--out", str(tmp_path),
          "--executor", "local", "--signals-dir", str(tmp_path / "signals"), "--quiet"])
    c, t = np.load(centroids), np.load(targets)
    want = ref.image_based(pool, models, c, t, arch="b32", threshold=0.2)
    assert (_uids(tmp_path / "image_clip.npy") == want).all()
    assert (_uids(tmp_path / "basic.npy") == ref.basic(pool, models)).all()
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == ["basic.npy", "image_clip.npy"]


def test_text_with_current_nltk_morphy(pool, models, tmp_path):
    main(["--pool", str(pool), "--strategy", "text", "--nltk-morphy", "current", "--out", str(tmp_path),
          "--executor", "local", "--signals-dir", str(tmp_path / "signals"), "--quiet"])
    got = _uids(tmp_path / "text.npy")
    assert (got == ref.text_based(pool, models, nltk_381=False)).all()
    assert len(got) < len(ref.text_based(pool, models, nltk_381=True))  # "my dogss ..." rows differ


def test_later_runs_add_strategies_to_the_same_folder(pool, tmp_path):
    common = ["--pool", str(pool), "--out", str(tmp_path), "--executor", "local", "--quiet",
              "--signals-dir", str(tmp_path / "signals")]
    main(common + ["--strategy", "no_filter"])
    main(common + ["--strategy", "basic"])
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert list(stats["strategies"]) == ["no_filter", "basic"]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_alone_equals_its_part_of_all(all_run, pool, image_inputs, tmp_path, strategy):
    centroids, targets = image_inputs
    main(["--pool", str(pool), "--strategy", strategy, "--centroids", str(centroids), "--targets", str(targets),
          "--out", str(tmp_path), "--executor", "local", "--signals-dir", str(tmp_path / "signals"), "--quiet"])
    assert (tmp_path / f"{strategy}.npy").read_bytes() == (all_run[0] / f"{strategy}.npy").read_bytes()


def test_strategies_run_one_after_another_on_shared_signals(all_run, pool, image_inputs, tmp_path):
    """fastText labels are computed only where a requested strategy needs them; later runs
    with other strategies fill in the rest and still agree with the all-at-once run."""
    from pipeline.signals import read_signals_header

    centroids, targets = image_inputs
    signals = tmp_path / "signals"
    common = ["--pool", str(pool), "--centroids", str(centroids), "--targets", str(targets), "--out",
              str(tmp_path), "--executor", "local", "--signals-dir", str(signals), "--quiet"]
    gates = []
    for strategy in ["basic", "text", "laion", "image", "image_clip", "clip", "no_filter"]:
        main(common + ["--strategy", strategy])
        assert (tmp_path / f"{strategy}.npy").read_bytes() == (all_run[0] / f"{strategy}.npy").read_bytes()
        header = read_signals_header(sorted(signals.glob("*.parquet"))[0])
        gates.append(len(header.get("gates", {}).get("fasttext", [])))
    assert gates[:4] == [1, 2, 2, 3]
    labels = pq.read_table(signals, columns=["fasttext_lang", "text_status"])
    assert labels.column("fasttext_lang").null_count > labels.column("text_status").to_numpy().astype(bool).sum()


def test_a_gate_not_covered_is_filled_in(all_run, pool, tmp_path):
    """Labels a stored file lacks for a gate it does not claim are computed by the next run,
    keeping the others: the subset equals the all-at-once run's."""
    import json as _json

    from pipeline.signals import METADATA_KEY

    signals = tmp_path / "signals"
    common = ["--pool", str(pool), "--out", str(tmp_path), "--executor", "local", "--signals-dir", str(signals),
              "--quiet"]
    main(common + ["--strategy", "basic", "text"])
    path = sorted(signals.glob("*.parquet"))[0]
    table = pq.read_table(path)
    header = _json.loads(table.schema.metadata[METADATA_KEY])
    labels = table.column("fasttext_lang").to_pylist()
    entity = table.column("imagenet21k_entity").to_pylist()
    words = table.column("caption_words").to_pylist()
    # forget the labels of entity rows that the basic gate would not have labelled, and the text gate
    forget = [bool(e) and w <= 2 and lab is not None for lab, e, w in zip(labels, entity, words)]
    assert sum(forget) >= 1
    labels = [None if f else lab for lab, f in zip(labels, forget)]
    header["gates"]["fasttext"] = [t for t in header["gates"]["fasttext"] if "imagenet21k_entity" not in t]
    table = table.set_column(table.schema.get_field_index("fasttext_lang"), "fasttext_lang",
                             pa.array(labels, pa.string()).dictionary_encode())
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: _json.dumps(header)}), path)
    main(common + ["--strategy", "text"])
    assert (tmp_path / "text.npy").read_bytes() == (all_run[0] / "text.npy").read_bytes()
    refilled = pq.read_table(path).column("fasttext_lang").to_pylist()
    assert all(refilled[i] is not None for i, f in enumerate(forget) if f)


@pytest.fixture(scope="module")
def pool_with_missing_images(pool, tmp_path_factory):
    """The quirky pool with 1 row in 12 as `pipeline.score` leaves a row without an image:
    every embedding all zeros, both scores NaN. Returns (pool, uids of those rows)."""
    import shutil

    out = tmp_path_factory.mktemp("missing") / "pool"
    shutil.copytree(pool / "metadata", out / "metadata")
    rng = np.random.default_rng(3)
    missing = []
    for parquet in ref.parquet_paths(out):
        table = pq.read_table(parquet)
        rows = rng.choice(table.num_rows, table.num_rows // 12, replace=False)
        npz = Path(parquet).with_suffix(".npz")
        with np.load(npz) as z:
            arrays = {k: z[k].copy() for k in z.files}
        for v in arrays.values():
            v[rows] = 0
        np.savez_compressed(npz, **arrays)
        for col in ("clip_b32_similarity_score", "clip_l14_similarity_score"):
            s = table.column(col).to_numpy(zero_copy_only=False).astype(np.float32)
            s[rows] = np.nan
            table = table.set_column(table.schema.get_field_index(col), table.schema.field(col),
                                     pa.array(s, pa.float32(), mask=table.column(col).is_null().to_numpy(
                                         zero_copy_only=False)))
        pq.write_table(table, parquet)
        missing += [table.column("uid")[int(r)].as_py() for r in rows]
    return out, missing


def test_rows_without_an_image_embedding_are_never_kept(pool_with_missing_images, models, image_inputs, tmp_path):
    pool, missing = pool_with_missing_images
    c, t = (np.load(p) for p in image_inputs)
    # DataComp's argmax would put a zero row on centroid 0, which is a target here: the rows
    # below would be kept if a zero embedding counted as an embedding
    assert 0 in set(ref.nearest_centroid_rowwise(t, c).tolist())
    stats = main(["--pool", str(pool), "--strategy", "image", "image_clip", "--arch", "b32", "--threshold", "0.1",
                  "--centroids", str(image_inputs[0]), "--targets", str(image_inputs[1]), "--out", str(tmp_path),
                  "--executor", "local", "--quiet"])
    # rows with an embedding: exactly DataComp's rule; rows without: never kept
    image = _uids(tmp_path / "image.npy")
    assert len(image) > 20 and (image == ref.image_based(pool, models, c, t)).all()
    assert (_uids(tmp_path / "image_clip.npy") == ref.image_based(pool, models, c, t, arch="b32", threshold=0.1)).all()
    missing_records = np.sort(np.array([(int(u[:16], 16), int(u[16:], 16)) for u in missing], UID_DTYPE))
    assert not np.isin(image, missing_records).any()
    # counted, with a reason: in the funnel (rows passing the caption pre-filter) and in stats.json
    import pandas as pd

    df = pd.concat([pd.read_parquet(p, columns=["uid", "text"]) for p in ref.parquet_paths(pool)])
    prefiltered_missing = int(df.uid.isin(missing).to_numpy()[ref.caption_filter(df, models)].sum())
    assert prefiltered_missing > 5
    funnel = {f["rule"]: f for f in stats["strategies"]["image"]["funnel"]}
    assert list(funnel)[-2:] == ["image_embedding_present", "nearest_centroid_in_targets"]
    assert funnel["image_embedding_present"]["dropped"] == prefiltered_missing
    assert stats["strategies"]["image"]["rows"] == stats["strategies"]["image"]["kept"] + sum(
        stats["strategies"]["image"]["dropped"].values())
    # (image_clip drops them earlier: their scores are NaN)
    assert stats["strategies"]["image_clip"]["dropped"].get("image_embedding_present", 0) == 0
    assert stats["image_embeddings_missing"] == len(missing) == 4 * (300 // 12)
    signals = pq.read_table(pool / "signals", columns=["uid_hi", "nearest_centroid", "image_embedding_missing"])
    no_image = signals.column("image_embedding_missing").to_numpy()
    assert no_image.sum() == len(missing)
    nearest = signals.column("nearest_centroid").to_pylist()  # -1: no embedding; null: not needed
    assert all(nearest[i] in (-1, None) for i in np.flatnonzero(no_image))
