"""pipeline.centroids: DataComp's k-means settings, the caption pre-filter first, reproducible."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the DataComp re-statement

import datacomp_reference as ref  # noqa: E402
from pipeline.centroids import main, sample_rows  # noqa: E402
from pipeline.filter import FilterError, main as filter_main  # noqa: E402


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from pools.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("centroids") / "pool"
    generate(out, SynthConfig(samples=900, seed=4, rows_per_file=300, images=False, random_scores=True))
    return out


def test_centroids_from_prefiltered_rows(pool):
    summary = main(["--pool", str(pool), "--k", "8", "--executor", "local"])
    out = pool / "centroids" / "tiny_centroids_l14.npy"
    c = np.load(out)
    assert c.shape == (8, 768) and c.dtype == np.float32
    models = ref.Models()
    passing = sum(int(ref.caption_filter(pd.read_parquet(p, columns=["uid", "text"]), models).sum())
                  for p in ref.parquet_paths(pool))
    assert summary["after_caption_filter"] == summary["sampled"] == passing < 900
    assert json.loads(out.with_suffix(".json").read_text())["k"] == 8
    # same settings, same centroids
    main(["--pool", str(pool), "--k", "8", "--executor", "local", "--out", str(pool / "again.npy")])
    assert np.load(pool / "again.npy").tobytes() == c.tobytes()
    # the filter finds them where pipeline.centroids puts them by default
    targets = pool / "targets.npy"
    np.save(targets, c[:2] * 3)
    stats = filter_main(["--pool", str(pool), "--strategy", "image", "--targets", str(targets), "--out",
                         str(pool.parent / "subsets"), "--executor", "local", "--quiet"])
    assert 0 < stats["strategies"]["image"]["kept"] < passing


def test_sampling_with_replacement_per_file(pool, tmp_path):
    summary = main(["--pool", str(pool), "--k", "4", "--sample-ratio", "0.5", "--no-caption-filter",
                    "--executor", "local", "--out", str(tmp_path / "c.npy")])
    assert summary["sampled"] == 3 * 150 and summary["after_caption_filter"] == 900
    rows = sample_rows(10, 0.5, np.random.default_rng(0))
    assert len(rows) == 5 and rows.max() < 10
    assert len(sample_rows(10, -1, np.random.default_rng(0))) == 10


def test_too_few_points_is_a_clear_error(pool, tmp_path):
    with pytest.raises(FilterError, match="k=5000 needs at least 5000 points"):
        main(["--pool", str(pool), "--k", "5000", "--executor", "local", "--out", str(tmp_path / "c.npy")])


def test_rows_without_an_image_embedding_are_not_clustered(pool, tmp_path):
    import shutil

    from pipeline.centroids import train_kmeans

    copy = tmp_path / "pool"
    shutil.copytree(pool / "metadata", copy / "metadata")
    kept = []
    for i, npz in enumerate(sorted((copy / "metadata").glob("*.npz"))):
        with np.load(npz) as z:
            arrays = {k: z[k].copy() for k in z.files}
        arrays["l14_img"][i::10] = 0  # no image: pipeline.score writes zeros
        np.savez_compressed(npz, **arrays)
        kept.append(np.delete(arrays["l14_img"], np.s_[i::10], axis=0))
    summary = main(["--pool", str(copy), "--k", "4", "--no-caption-filter", "--executor", "local",
                    "--out", str(tmp_path / "c.npy")])
    assert summary["after_caption_filter"] == 900 and summary["image_embedding_missing"] == 90
    assert summary["sampled"] == 810
    want, _ = train_kmeans(np.concatenate(kept), 4, use_gpu=False)
    assert np.load(tmp_path / "c.npy").tobytes() == want.tobytes()
