"""SemDeDup over a whole pool: the global step behind the ``semdedup`` signal group.

    python -m pipeline.filter --pool P --strategy semdedup --out DIR [--semdedup-embedding l14_img|b32_img]
        [--semdedup-clusters K] [--semdedup-keep clip|hard|easy|random] [--semdedup-seed S]

1. **Clusters.** faiss's spherical k-means (`faiss.Kmeans(spherical=True)`) is trained on a
   seeded sample of the image embeddings, at most `sample_per_cluster` rows per cluster (faiss's
   own ``max_points_per_centroid`` default, 256: more rows barely move the centroids). The
   default cluster count is sqrt(rows with an embedding): assigning the rows costs N*K*d and
   the within-cluster similarities N*(N/K)*d, and K = sqrt(N) makes the two equal (1,414
   clusters of ~1,400 rows for 2M rows; the paper used 50,000 clusters of ~8,800 for LAION-440M).
2. **Partitions.** One pass over the files (a stage of `pipeline.execution`: this machine's
   processes or Ray tasks, one file each) assigns every row to its nearest centroid (exact
   inner-product search, `faiss.IndexFlatIP`) and appends the row's embedding, position,
   cluster, similarity to the centroid and CLIP score to one of P partition files (cluster
   modulo P), P chosen so that a partition's embeddings take at most `partition_bytes`: the
   whole pool is never in memory at once.
3. **Clusters' similarities.** Each partition is read alone (a stage again: one partition
   per unit, so the shuffle runs on the cluster's workers); each of its clusters is ordered by
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
from pipeline.execution import Execution, Stage, run_stage
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


class _Assigner:
    """Stage ``semdedup_assign`` (step 2): a unit is one metadata file, (index, path, rows, first
    row's position in the pool); its rows with an embedding go to the partition files
    ``<parts>/<p>/<file index>.npz``."""

    def __init__(self, s: SemDeDupSettings, centroids: str, parts: str, partitions: int):
        import faiss

        self.s, self.parts, self.partitions = s, Path(parts), partitions
        centroids_ = np.load(centroids, allow_pickle=False)
        self.index = faiss.IndexFlatIP(centroids_.shape[1])
        self.index.add(centroids_)

    def __call__(self, unit: tuple[int, str, int, int]) -> dict:
        i, parquet, n, offset = unit
        s = self.s
        emb, valid = _embeddings(Path(parquet), s.embedding, n)
        where = np.flatnonzero(valid)
        similarity, nearest = self.index.search(normalised(emb[where]), 1)
        cluster = nearest[:, 0].astype(np.int32)
        clip = None
        if s.keep == "clip":
            clip = nan_for_null(read_metadata(parquet, [SCORE_COLUMNS[s.arch]]).column(SCORE_COLUMNS[s.arch]))[where]
        for p in range(self.partitions):
            mine = np.flatnonzero(cluster % self.partitions == p)
            if not len(mine):
                continue
            folder = self.parts / str(p)
            folder.mkdir(parents=True, exist_ok=True)
            columns = {"embedding": emb[where[mine]], "position": (offset + where[mine]).astype(np.int64),
                       "cluster": cluster[mine], "centroid_similarity": similarity[mine, 0]}
            if clip is not None:
                columns["clip"] = clip[mine]
            np.savez(folder / f"{i}.npz", **columns)
        return {"rows": n}


class _ClusterDeduper:
    """Stage ``semdedup_clusters`` (step 3): a unit is one partition; each of its clusters is
    ordered by the keep rule and its similarities computed; per row (position in the pool):
    cluster, largest and preferred similarity, saved as ``<parts>/<p>.result.npz``."""

    def __init__(self, s: SemDeDupSettings, parts: str):
        self.s, self.parts = s, Path(parts)

    def __call__(self, p: int) -> dict:
        s = self.s
        chunks = sorted((self.parts / str(p)).glob("*.npz"), key=lambda f: int(f.stem))
        if not chunks:
            return {"largest_cluster": 0}
        loaded = []
        for chunk in chunks:
            with np.load(chunk, allow_pickle=False) as npz:
                loaded.append({k: npz[k] for k in npz.files})
        part = {k: np.concatenate([c[k] for c in loaded]) for k in loaded[0]}
        del loaded
        by_cluster = np.argsort(part["cluster"], kind="stable")
        bounds = np.flatnonzero(np.diff(part["cluster"][by_cluster])) + 1
        out = {k: [] for k in ("position", "cluster", "largest", "preferred")}
        biggest = 0
        for members in np.split(by_cluster, bounds):
            order = keep_order(s.keep, centroid_similarity=part["centroid_similarity"][members],
                               clip_score=part["clip"][members] if "clip" in part else None,
                               position=part["position"][members], seed=s.seed)
            rows = members[order]
            big, pref = cluster_similarities(part["embedding"][rows], block_rows=s.block_rows)
            for k, v in (("position", part["position"][rows]), ("cluster", part["cluster"][rows]),
                         ("largest", big), ("preferred", pref)):
                out[k].append(v)
            biggest = max(biggest, len(rows))
        np.savez(self.parts / f"{p}.result.npz", **{k: np.concatenate(v) for k, v in out.items()})
        return {"largest_cluster": biggest}


def _deduplicate(files: Sequence[Path], rows: Sequence[int], s: SemDeDupSettings, centroids: np.ndarray,
                 parts: Path, partitions: int, execution: Execution
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Steps 2 and 3, each a stage of the execution layer (the shuffle: files -> partitions ->
    clusters); per pool row: cluster (-1: none), largest and preferred similarity; the largest
    cluster."""
    parts.mkdir(parents=True, exist_ok=True)
    np.save(parts / "centroids.npy", centroids)
    offsets = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int).tolist()
    units = [(i, str(f), n, o) for i, (f, n, o) in enumerate(zip(files, rows, offsets))]
    for _ in run_stage(Stage("semdedup_assign", _Assigner, (s, str(parts / "centroids.npy"), str(parts), partitions)),
                       units, execution):
        pass
    total = sum(rows)
    cluster_of = np.full(total, -1, dtype=np.int32)
    largest = np.full(total, NO_OTHER_ROW, dtype=np.float32)
    preferred = np.full(total, NO_OTHER_ROW, dtype=np.float32)
    biggest = 0
    for p, result in run_stage(Stage("semdedup_clusters", _ClusterDeduper, (s, str(parts))), range(partitions),
                               execution):
        biggest = max(biggest, result["largest_cluster"])
        if result["largest_cluster"]:
            with np.load(parts / f"{p}.result.npz", allow_pickle=False) as r:
                at = r["position"]
                cluster_of[at], largest[at], preferred[at] = r["cluster"], r["largest"], r["preferred"]
    return cluster_of, largest, preferred, biggest


def run_semdedup(files: Sequence[Path], s: SemDeDupSettings, folder: Path, execution: Execution) -> dict:
    """Write the semdedup columns of every file into `folder`; the counts for result.json."""
    files = list(files)
    rows = pool_rows(files)
    total = sum(rows)
    centroids, valid_rows = _train_centroids(files, rows, s)
    width = centroids.shape[1]
    partitions = max(1, math.ceil(valid_rows * width * 2 / s.partition_bytes))
    parts = folder / "partitions"
    cluster_of, largest, preferred, biggest = _deduplicate(files, rows, s, centroids, parts, partitions, execution)
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
