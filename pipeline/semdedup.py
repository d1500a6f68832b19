"""SemDeDup over a whole pool: the global step behind the ``semdedup`` signal group.

    python -m pipeline.filter --pool P --strategy semdedup --out DIR [--semdedup-embedding l14_img|b32_img]
        [--semdedup-clusters K] [--semdedup-keep clip|hard|easy|random] [--semdedup-seed S]

1. **Clusters.** faiss's spherical k-means (`faiss.Kmeans(spherical=True)`) is trained on a
   seeded sample of the image embeddings, at most `sample_per_cluster` rows per cluster (faiss's
   own ``max_points_per_centroid`` default, 256: more rows barely move the centroids). The
   default cluster count is sqrt(rows with an embedding): assigning the rows costs N*K*d and
   the within-cluster similarities N*(N/K)*d, and K = sqrt(N) makes the two equal (1,414
   clusters of ~1,400 rows for 2M rows; the paper used 50,000 clusters of ~8,800 for LAION-440M).
2. **Partitions.** One pass over the files assigns every row to its nearest centroid (exact
   inner-product search, `faiss.IndexFlatIP`) and appends the row's embedding, position,
   cluster, similarity to the centroid and CLIP score to one of P partition files (cluster
   modulo P), P chosen so that a partition's embeddings take at most `partition_bytes`: the
   whole pool is never in memory at once.
3. **Clusters' similarities.** Each partition is read alone; each of its clusters is ordered by
   the keep rule (`filters.semdedup.KEEP_RULES`) and its similarities computed in blocks
   (`filters.semdedup.cluster_similarities`).

Rows without an image embedding (all zeros, NaN or infinite) are in no cluster (-1), never
anyone's duplicate, and counted (``rows_without_embedding`` in result.json and stats.json).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from filters.image_based import missing_embedding_mask
from filters.rows import nan_for_null
from filters.semdedup import KEEP_RULES, NO_OTHER_ROW, cluster_similarities, keep_order, normalised
from pipeline.global_steps import GlobalStep, GlobalStepError, pool_rows, register_global_step, write_file_columns
from pools import storage
from pools.format import SCORE_COLUMNS, load_npz, read_metadata

EMBEDDINGS = ("l14_img", "b32_img")
REPORTED_THRESHOLDS = (0.9, 0.95, 0.99)  # result.json counts the rows each would drop


@dataclass(frozen=True)
class SemDeDupSettings:
    embedding: str = "l14_img"
    clusters: int | None = None  # default: round(sqrt(rows with an embedding))
    keep: str = "clip"  # a key of filters.semdedup.KEEP_RULES
    seed: int = 0
    niter: int = 20  # k-means iterations
    sample_per_cluster: int = 256  # k-means training rows per cluster
    partition_bytes: int = 256 << 20  # embeddings held at once in step 3
    block_rows: int = 4096  # similarity blocks: block_rows^2 float32

    def __post_init__(self) -> None:
        if self.embedding not in EMBEDDINGS:
            raise GlobalStepError(f"--semdedup-embedding must be one of {', '.join(EMBEDDINGS)}, got {self.embedding!r}")
        if self.keep not in KEEP_RULES:
            raise GlobalStepError(f"--semdedup-keep must be one of {', '.join(KEEP_RULES)}, got {self.keep!r}")
        if self.clusters is not None and self.clusters < 1:
            raise GlobalStepError(f"--semdedup-clusters must be at least 1, got {self.clusters}")

    @property
    def arch(self) -> str:
        return self.embedding.split("_", 1)[0]


def default_clusters(rows_with_embedding: int) -> int:
    return max(1, round(math.sqrt(rows_with_embedding)))


def _embeddings(parquet: Path, key: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
    emb = load_npz(parquet, (key,), rows)[key]
    return emb, ~missing_embedding_mask(emb)


def _train_centroids(files: Sequence[Path], rows: Sequence[int], s: SemDeDupSettings) -> tuple[np.ndarray, int]:
    """Spherical k-means centroids (K, d) float32 and the number of rows with an embedding."""
    import faiss

    total = sum(rows)
    planned = s.clusters if s.clusters is not None else default_clusters(total)
    take = min(1.0, planned * s.sample_per_cluster / max(1, total))
    sample, valid_rows = [], 0
    for i, (parquet, n) in enumerate(zip(files, rows)):
        emb, valid = _embeddings(parquet, s.embedding, n)
        valid_rows += int(valid.sum())
        chosen = valid & (np.random.default_rng([s.seed, i]).random(n) < take)
        sample.append(normalised(emb[chosen]))
    k = s.clusters if s.clusters is not None else default_clusters(valid_rows)
    if k > valid_rows:
        raise GlobalStepError(
            f"SemDeDup: {k} clusters is more than the {valid_rows} rows with a {s.embedding} embedding in "
            f"{storage.path(files[0]).parent.parent if files else 'the pool'}: pass --semdedup-clusters at most "
            f"{valid_rows} (or leave it out: the default is sqrt(rows))")
    data = np.concatenate(sample) if sample else np.empty((0, 1), np.float32)
    if len(data) < k:  # (a pool whose rows mostly lack an embedding: train on all of them)
        data = np.concatenate([normalised(emb[valid]) for emb, valid in
                               (_embeddings(p, s.embedding, n) for p, n in zip(files, rows))])
    kmeans = faiss.Kmeans(data.shape[1], k, niter=s.niter, seed=s.seed, spherical=True,
                          max_points_per_centroid=s.sample_per_cluster, min_points_per_centroid=1, verbose=False)
    kmeans.train(np.ascontiguousarray(data, dtype=np.float32))
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32), valid_rows


def _partition(files: Sequence[Path], rows: Sequence[int], s: SemDeDupSettings, centroids: np.ndarray,
               parts: Path, partitions: int) -> None:
    """Every row with an embedding into partition file ``<parts>/<p>/<file index>.npz``."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    offset = 0
    for i, (parquet, n) in enumerate(zip(files, rows)):
        emb, valid = _embeddings(parquet, s.embedding, n)
        where = np.flatnonzero(valid)
        similarity, nearest = index.search(normalised(emb[where]), 1)
        cluster = nearest[:, 0].astype(np.int32)
        clip = None
        if s.keep == "clip":
            clip = nan_for_null(read_metadata(parquet, [SCORE_COLUMNS[s.arch]]).column(SCORE_COLUMNS[s.arch]))[where]
        for p in range(partitions):
            mine = np.flatnonzero(cluster % partitions == p)
            if not len(mine):
                continue
            folder = parts / str(p)
            folder.mkdir(parents=True, exist_ok=True)
            columns = {"embedding": emb[where[mine]], "position": (offset + where[mine]).astype(np.int64),
                       "cluster": cluster[mine], "centroid_similarity": similarity[mine, 0]}
            if clip is not None:
                columns["clip"] = clip[mine]
            np.savez(folder / f"{i}.npz", **columns)
        offset += n


def _deduplicate(parts: Path, partitions: int, total: int, s: SemDeDupSettings
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per pool row: cluster (-1: none), largest and preferred similarity; the largest cluster."""
    cluster_of = np.full(total, -1, dtype=np.int32)
    largest = np.full(total, NO_OTHER_ROW, dtype=np.float32)
    preferred = np.full(total, NO_OTHER_ROW, dtype=np.float32)
    biggest = 0
    for p in range(partitions):
        chunks = sorted((parts / str(p)).glob("*.npz"), key=lambda f: int(f.stem))
        if not chunks:
            continue
        loaded = []
        for chunk in chunks:
            with np.load(chunk, allow_pickle=False) as npz:
                loaded.append({k: npz[k] for k in npz.files})
        part = {k: np.concatenate([c[k] for c in loaded]) for k in loaded[0]}
        del loaded
        by_cluster = np.argsort(part["cluster"], kind="stable")
        bounds = np.flatnonzero(np.diff(part["cluster"][by_cluster])) + 1
        for members in np.split(by_cluster, bounds):
            position = part["position"][members]
            order = keep_order(s.keep, centroid_similarity=part["centroid_similarity"][members],
                               clip_score=part["clip"][members] if "clip" in part else None,
                               position=position, seed=s.seed)
            rows = members[order]
            big, pref = cluster_similarities(part["embedding"][rows], block_rows=s.block_rows)
            at = part["position"][rows]
            cluster_of[at] = part["cluster"][rows]
            largest[at], preferred[at] = big, pref
            biggest = max(biggest, len(rows))
    return cluster_of, largest, preferred, biggest


def run_semdedup(files: Sequence[Path], s: SemDeDupSettings, folder: Path) -> dict:
    """Write the semdedup columns of every file into `folder`; the counts for result.json."""
    files = list(files)
    rows = pool_rows(files)
    total = sum(rows)
    centroids, valid_rows = _train_centroids(files, rows, s)
    width = centroids.shape[1]
    partitions = max(1, math.ceil(valid_rows * width * 2 / s.partition_bytes))
    parts = folder / "partitions"
    _partition(files, rows, s, centroids, parts, partitions)
    cluster_of, largest, preferred, biggest = _deduplicate(parts, partitions, total, s)
    shutil.rmtree(parts)
    np.save(folder / "centroids.npy", centroids)
    offset = 0
    for parquet, n in zip(files, rows):
        write_file_columns(folder, parquet, {"semdedup_cluster": cluster_of[offset:offset + n],
                                             "semdedup_max_similarity": largest[offset:offset + n],
                                             "semdedup_preferred_similarity": preferred[offset:offset + n]})
        offset += n
    return {"rows": total, "rows_without_embedding": total - valid_rows, "clusters": len(centroids),
            "partitions": partitions, "largest_cluster": biggest,
            "rows_dropped_at": {str(t): int((preferred > t).sum()) for t in REPORTED_THRESHOLDS}}


register_global_step(GlobalStep(
    meaning="SemDeDup over the pool (--semdedup-*): clusters and similarities within them",
    model="semdedup",
    settings=lambda cfg: SemDeDupSettings(embedding=cfg.semdedup_embedding, clusters=cfg.semdedup_clusters,
                                          keep=cfg.semdedup_keep, seed=cfg.semdedup_seed),
    run=run_semdedup))
