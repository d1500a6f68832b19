"""SemDeDup (`pipeline.semdedup`, spec ``semdedup``) on a pool with planted near-duplicate groups.

The reading implemented (filters/semdedup.py): within a k-means cluster, walk the rows in keep
order and drop a row whose cosine similarity to an earlier row of the order is above the
threshold (SemDeDup's column max of the upper triangle), 0.95 by default.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from filters.semdedup import NO_OTHER_ROW, cluster_similarities, keep_order
from pipeline.filter import main
from pools.uids import uids_to_records

ROWS, FILES_ROWS = 900, 300


@pytest.fixture(scope="module")
def dup_pool(tmp_path_factory):
    """900 rows in 3 files, 15% in planted groups of 2-5 spread over the files; two rows with no
    image embedding (all zeros, NaN) outside the groups."""
    from pools.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("semdedup") / "pool"
    generate(out, SynthConfig(samples=ROWS, seed=21, rows_per_file=FILES_ROWS, images=False, random_scores=True,
                              duplicates=0.15))
    truth = pq.read_table(out / "ground_truth.parquet").to_pandas()
    lonely = np.flatnonzero(truth.duplicate_group.to_numpy() < 0)
    npz_files = sorted((out / "metadata").glob("*.npz"))
    for row, value in ((int(lonely[3]), 0.0), (int(lonely[-3]), np.nan)):
        path = npz_files[row // FILES_ROWS]
        with np.load(path) as npz:
            arrays = {k: npz[k].copy() for k in npz.files}
        arrays["l14_img"][row % FILES_ROWS] = value
        np.savez_compressed(path, **arrays)
    return out


def _truth(pool: Path, arch: str = "l14"):
    truth = pq.read_table(pool / "ground_truth.parquet").to_pandas()
    scores = np.concatenate([pq.read_table(p, columns=[f"clip_{arch}_similarity_score"]).column(0).to_numpy()
                             for p in sorted((pool / "metadata").glob("*.parquet"))])
    return truth, scores


def _kept_rows(out: Path, name: str, truth) -> np.ndarray:
    kept = np.load(out / f"{name}.npy")
    records = uids_to_records(truth.uid.tolist())
    return np.flatnonzero(np.isin(records, kept))


def test_cluster_similarities_match_the_full_matrix():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((23, 8)).astype(np.float32)
    emb[5] = emb[2] + 0.01  # a near-copy after its source
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    for block in (3, 7, 100):
        largest, preferred = cluster_similarities(emb, block_rows=block)
        np.testing.assert_allclose(largest, sims.max(axis=1), atol=1e-6)
        expected = [sims[i, :i].max() if i else NO_OTHER_ROW for i in range(len(emb))]
        np.testing.assert_allclose(preferred, expected, atol=1e-6)
    assert preferred[5] > 0.99 and preferred[2] < 0.99  # the copy is dropped, its source kept
    assert cluster_similarities(emb[:1])[0][0] == NO_OTHER_ROW  # a lone row is no one's duplicate


def test_keep_orders():
    sim = np.array([0.5, 0.9, 0.1, 0.9])
    clip = np.array([0.2, np.nan, 0.3, 0.3], dtype=np.float32)
    pos = np.array([10, 11, 12, 13])
    assert keep_order("hard", centroid_similarity=sim, clip_score=None, position=pos, seed=0).tolist() == [2, 0, 1, 3]
    assert keep_order("easy", centroid_similarity=sim, clip_score=None, position=pos, seed=0).tolist() == [1, 3, 0, 2]
    assert keep_order("clip", centroid_similarity=sim, clip_score=clip, position=pos, seed=0).tolist() == [2, 3, 0, 1]
    random = keep_order("random", centroid_similarity=sim, clip_score=None, position=pos, seed=4)
    shuffled = np.array([3, 0, 2, 1])  # the same rows gathered in another order: the same rows first
    again = keep_order("random", centroid_similarity=sim[shuffled], clip_score=None, position=pos[shuffled], seed=4)
    assert pos[random].tolist() == pos[shuffled][again].tolist()


@pytest.mark.parametrize("embedding", ["l14_img", "b32_img"])
def test_semdedup_keeps_one_row_per_planted_group(dup_pool, tmp_path, embedding):
    out = tmp_path / "out"
    stats = main(["--pool", str(dup_pool), "--strategy", "semdedup", "--out", str(out), "--executor", "local",
                  "--semdedup-clusters", "6", "--semdedup-embedding", embedding, "--quiet"])
    truth, scores = _truth(dup_pool, embedding.split("_")[0])
    group = truth.duplicate_group.to_numpy()
    kept = np.zeros(len(truth), bool)
    kept[_kept_rows(out, "semdedup", truth)] = True
    assert kept[group < 0].all()  # every row without a planted copy, the two without embeddings too
    for g in np.unique(group[group >= 0]):
        members = np.flatnonzero(group == g)
        assert kept[members].sum() == 1, (g, members)
        assert scores[members[kept[members]][0]] == scores[members].max()  # the keep rule: highest CLIP score
    step = stats["global_steps"]["semdedup"]
    assert step["rows_without_embedding"] == (2 if embedding == "l14_img" else 0)  # (the l14 rows were blanked)
    assert step["clusters"] == 6 and step["rows"] == ROWS and step["settings"]["embedding"] == embedding
    assert step["rows_dropped_at"]["0.95"] == int((group >= 0).sum() - len(np.unique(group[group >= 0])))
    assert stats["strategies"]["semdedup"]["kept"] == int(kept.sum())


def test_keep_rule_hard_and_threshold_parameter(dup_pool, tmp_path):
    spec = tmp_path / "loose.toml"
    spec.write_text('name = "semdedup_loose"\nrules = ["semdedup_preferred_similarity <= 0.999"]\n')
    out = tmp_path / "out"
    main(["--pool", str(dup_pool), "--strategy", "semdedup", str(spec), "--out", str(out), "--executor", "local",
          "--semdedup-clusters", "6", "--semdedup-keep", "hard", "--signals-dir", str(tmp_path / "signals"),
          "--quiet"])
    truth, _ = _truth(dup_pool)
    group = truth.duplicate_group.to_numpy()
    assert len(_kept_rows(out, "semdedup_loose", truth)) == ROWS  # no planted copy is that close
    kept = np.zeros(len(truth), bool)
    kept[_kept_rows(out, "semdedup", truth)] = True
    folder = next((tmp_path / "signals" / "global" / "semdedup").iterdir())
    centroids = np.load(folder / "centroids.npy")
    signals = pq.read_table(sorted((tmp_path / "signals").glob("*.parquet"))[0]).to_pandas()
    emb = np.concatenate([np.load(p)["l14_img"] for p in sorted((dup_pool / "metadata").glob("*.npz"))])
    emb = emb.astype(np.float32)
    clusters = np.concatenate([pq.read_table(p, columns=["semdedup_cluster"]).column(0).to_numpy()
                               for p in sorted((tmp_path / "signals").glob("*.parquet"))])
    assert (clusters[group < 0] >= -1).all() and "semdedup_max_similarity" in signals
    for g in np.unique(group[group >= 0]):
        members = np.flatnonzero(group == g)
        unit = emb[members] / np.linalg.norm(emb[members], axis=1, keepdims=True)
        to_centroid = (unit * centroids[clusters[members]]).sum(1)
        assert members[kept[members]][0] == members[np.argmin(to_centroid)]  # hard: farthest from the centroid


def test_more_clusters_than_rows_is_one_line(dup_pool, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.filter", "--pool", str(dup_pool), "--strategy", "semdedup",
                           "--out", str(tmp_path / "out"), "--signals-dir", str(tmp_path / "s"), "--executor", "local",
                           "--semdedup-clusters", "5000"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "5000 clusters is more than the 898 rows with a l14_img embedding" in proc.stderr
    assert not list((tmp_path / "s" / "global" / "semdedup").iterdir())  # nothing half-written left


def test_result_is_reused_and_records_its_settings(dup_pool, tmp_path):
    args = ["--pool", str(dup_pool), "--strategy", "semdedup", "--out", str(tmp_path / "out"), "--executor", "local",
            "--signals-dir", str(tmp_path / "signals"), "--quiet", "--semdedup-clusters", "4"]
    import socket

    killed = tmp_path / "signals" / "global" / "semdedup" / f".0123.tmp-999999999@{socket.gethostname()}-abcdef12"
    (killed / "partitions").mkdir(parents=True)  # what a killed run left
    main(args)
    assert not killed.exists()
    first = list((tmp_path / "signals" / "global" / "semdedup").iterdir())
    record = json.loads((first[0] / "result.json").read_text())
    assert record["settings"]["clusters"] == 4 and record["settings"]["keep"] == "clip"
    before = (tmp_path / "out" / "semdedup.npy").read_bytes()
    main(args)
    assert list((tmp_path / "signals" / "global" / "semdedup").iterdir()) == first
    assert (tmp_path / "out" / "semdedup.npy").read_bytes() == before


@pytest.mark.parametrize("executor", ["processes", "ray"])
def test_the_shuffle_gives_the_same_columns_on_every_executor(dup_pool, tmp_path, monkeypatch, executor):
    """Steps 2 and 3 (files -> partitions -> clusters) as stages: several partitions, run in
    worker processes or as Ray tasks, give exactly the columns of one process."""
    from pipeline.semdedup import SemDeDupSettings, run_semdedup
    from tests.pipeline.conftest import run_here_and_on

    files = sorted((dup_pool / "metadata").glob("*.parquet"))
    settings = SemDeDupSettings(clusters=12, partition_bytes=200_000)  # 900 x 768 x 2 bytes: 7 partitions
    here, there, columns = run_here_and_on(executor, run_semdedup, files, settings, tmp_path, monkeypatch)
    assert here == there and here["partitions"] == 7
    for a, b in columns:
        assert sorted(a) == sorted(b)
        assert all(np.array_equal(a[k], b[k]) for k in a)
