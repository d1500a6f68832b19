"""Pool centroids for the image-based filter: ``python -m pipeline.centroids``.

    python -m pipeline.centroids --pool P --scale S [--k K] [--out FILE]

DataComp's ``image_based_clustering.py`` (reference section 2), with its settings:

1. the caption pre-filter first (fastText English, more than 1 fastText token, more than 5
   characters), taken from the signals table (`pipeline.signals`, computed and stored if
   missing, so `pipeline.filter` reuses it);
2. ``l14_img`` of the surviving rows, per metadata file, sampled with replacement at the
   scale's ratio (all rows for tiny/small/medium, 0.3 for large, 0.03 for xlarge); rows whose
   embedding is all zeros (no image, see `pipeline.score`) are left out and counted first;
3. faiss k-means: L2, ``niter=20``, ``seed=0``, ``max_points_per_centroid=10_000_000`` (no
   subsampling), on GPUs with ``GpuIndexFlatL2`` (float32) when faiss sees any, else on CPU;
4. the centroids as a float32 ``.npy`` of shape (K, 768), plus a ``.json`` beside it with the
   settings and counts.

DataComp samples with ``np.random.choice`` in spawned workers, so its sample is not
reproducible; here file i is sampled with ``np.random.default_rng([seed, i])``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from filters.expressions import all_pass, rule_columns, signal_frame
from filters.image_based import missing_embedding_mask
from pools import storage
from pools.files import atomic_path, write_json_atomic
from pools.format import PoolFormatError, load_npz
from pools.scales import SCALES, get_scale

from pipeline.execution import add_execution_flags, execution_from_args
from pipeline.filter import (FilterError, default_centroids, default_data_root, default_pool,
                             default_signals_dir, missing_embeddings, pool_files)


def train_kmeans(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, use_gpu: bool | None = None,
                 verbose: bool = False) -> tuple[np.ndarray, str]:
    """faiss k-means with DataComp's settings; returns (centroids (k, d) float32, device used)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise FilterError(f"k-means with k={k} needs at least {k} points, but only {n} embeddings passed "
                          "the caption pre-filter and sampling; lower --k or use a larger pool")
    clustering = faiss.Clustering(d, k)
    clustering.verbose = verbose
    clustering.niter = niter
    clustering.seed = seed
    clustering.max_points_per_centroid = 10_000_000  # DataComp: never subsample the training set
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu is None:
        use_gpu = gpus > 0
    if use_gpu and gpus == 0:
        raise FilterError("--gpu asked for, but faiss sees no GPU (install the gpu extra: pip install -e '.[gpu]')")
    if use_gpu:
        resources, indexes = [], []
        for i in range(gpus):
            res = faiss.StandardGpuResources()
            cfg = faiss.GpuIndexFlatConfig()
            cfg.useFloat16 = False
            cfg.device = i
            resources.append(res)
            indexes.append(faiss.GpuIndexFlatL2(res, d, cfg))
        if len(indexes) == 1:
            index = indexes[0]
        else:
            index = faiss.IndexReplicas()
            for sub in indexes:
                index.addIndex(sub)
        device = f"cuda x{gpus}"
    else:
        index = faiss.IndexFlatL2(d)
        device = "cpu"
    clustering.train(x, index)
    centroids = faiss.vector_float_to_array(clustering.centroids).reshape(k, d)
    return centroids.astype(np.float32), device


def sample_rows(n: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Row indices to use from a file of `n` rows: all (ratio -1), else int(n*ratio) with replacement."""
    if ratio is None or ratio <= 0:
        return np.arange(n)
    return rng.choice(n, size=int(n * ratio), replace=True) if n else np.empty(0, dtype=np.int64)


def caption_prefilter_spec():
    """DataComp's caption pre-filter: the image-based strategy's rules up to fastText English."""
    from dataclasses import replace

    from pipeline.strategies import builtin_spec

    image = builtin_spec("image")
    rules = tuple(r for r in image.rules if not {"image_embedding_missing", "nearest_centroid_in_targets"}
                  & set(rule_columns(r.expr)))
    return replace(image, name="caption_prefilter", rules=rules)


def collect_embeddings(files: list[Path], signals_dir: Path, *, ratio: float, seed: int,
                       caption_filter: bool, key: str = "l14_img") -> tuple[np.ndarray, dict]:
    """The embeddings k-means trains on, in file order, and counts of what was used."""
    from pipeline.signals import iter_signal_tables

    parts = []
    counts = {"rows": 0, "after_caption_filter": 0, "image_embedding_missing": 0, "sampled": 0}
    prefilter = caption_prefilter_spec()
    tables = (iter_signal_tables(files, signals_dir, prefilter.columns()) if caption_filter
              else ((p, None) for p in files))
    for i, (parquet, table) in enumerate(tables):
        import pyarrow.parquet as pq

        n = table.num_rows if table is not None else pq.ParquetFile(storage.readable(parquet)).metadata.num_rows
        emb = load_npz(parquet, (key,), n)[key]
        if table is not None:
            emb = emb[all_pass(signal_frame(table), [r.expr for r in prefilter.rules])]
        counts["rows"] += n
        counts["after_caption_filter"] += len(emb)
        missing = missing_embedding_mask(emb)
        if missing.any():
            emb = emb[~missing]
            counts["image_embedding_missing"] += int(missing.sum())
        rows = sample_rows(len(emb), ratio, np.random.default_rng([seed, i]))
        counts["sampled"] += len(rows)
        if len(rows):
            parts.append(emb[rows].astype(np.float32))
    if not parts:
        raise FilterError("no embeddings left to cluster after the caption pre-filter "
                          f"({counts['image_embedding_missing']} rows passing it have no image embedding)")
    return np.concatenate(parts), counts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.centroids", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m pipeline.centroids --pool data/tiny --scale tiny --k 64\n"
               "  python -m pipeline.filter --pool data/tiny --strategy image --targets in1k.npy --out subsets")
    parser.add_argument("--pool", type=storage.path, help="pool folder (default <data root>/<scale>)")
    parser.add_argument("--scale", default="tiny", choices=list(SCALES), help="picks k and the sample ratio "
                        "(default %(default)s)")
    parser.add_argument("--data-root", type=storage.path, help="folder of pools, one per scale (default $DATACOMP_DATA_ROOT or ./data)")
    parser.add_argument("--k", type=int, help="number of centroids (default: the scale's, 100,000 for "
                        "DataComp's scales, 64 for tiny)")
    parser.add_argument("--sample-ratio", type=float, help="fraction of each file's rows sampled with "
                        "replacement; -1 = all (default: the scale's: -1, -1, -1, 0.3, 0.03)")
    parser.add_argument("--out", type=storage.path, help="centroids .npy (default <pool>/centroids/<scale>_centroids_l14.npy)")
    parser.add_argument("--seed", type=int, default=0, help="k-means and sampling seed (default 0)")
    parser.add_argument("--niter", type=int, default=20, help="k-means iterations (default 20)")
    parser.add_argument("--no-caption-filter", action="store_true",
                        help="cluster every row (DataComp's --disable_caption_filtering)")
    parser.add_argument("--signals-dir", type=storage.path, help="the pool's signals folder, read or filled "
                        "(default <pool>/signals, shared with pipeline.filter)")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help="k-means on faiss GPUs when available (auto, default), or force cpu/gpu")
    add_execution_flags(parser, workers_help="workers for the caption pre-filter's signals pass")
    args = parser.parse_args(argv)

    scale = get_scale(args.scale)
    pool = args.pool if args.pool is not None else default_pool(args.scale, args.data_root or default_data_root())
    k = args.k if args.k is not None else scale.num_centroids
    ratio = args.sample_ratio if args.sample_ratio is not None else scale.kmeans_sample_ratio
    out = args.out if args.out is not None else default_centroids(pool, args.scale)
    signals_dir = args.signals_dir if args.signals_dir is not None else default_signals_dir(pool, out.parent)
    started = time.perf_counter()

    files = pool_files(pool, args.scale)
    why = missing_embeddings(files, "l14_img", pool, "k-means")
    if why is not None:
        raise FilterError(why)
    if not args.no_caption_filter:
        from pipeline.models import ModelSettings
        from pipeline.signals import SignalsSpec, group_keys
        from pipeline.signals_pass import run_signals_pass
        from pipeline.strategies import groups_needed, required_metadata, signals_needed

        prefilter = [caption_prefilter_spec()]
        groups = groups_needed(prefilter)
        keys = group_keys(groups, ModelSettings())
        spec = SignalsSpec(groups=groups, keys=keys, required_columns=required_metadata(prefilter, groups),
                           gates=signals_needed(prefilter, keys))
        run_signals_pass(files, signals_dir, spec, execution_from_args(args))
    x, counts = collect_embeddings(files, signals_dir, ratio=ratio, seed=args.seed,
                                   caption_filter=not args.no_caption_filter)
    print(f"k-means: {len(x):,} embeddings of width {x.shape[1]} into {k} centroids", file=sys.stderr)
    t = time.perf_counter()
    use_gpu = {"auto": None, "cpu": False, "gpu": True}[args.device]
    centroids, device = train_kmeans(x, k, niter=args.niter, seed=args.seed, use_gpu=use_gpu)
    kmeans_s = time.perf_counter() - t
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, centroids)
    summary = {"pool": str(pool), "scale": args.scale, "k": k, "sample_ratio": ratio, "seed": args.seed,
               "niter": args.niter, "caption_filter": not args.no_caption_filter, "device": device,
               "metric": "L2 (faiss k-means; the filter assigns by inner product, as DataComp)",
               **counts, "out": str(out), "kmeans_s": round(kmeans_s, 3),
               "total_s": round(time.perf_counter() - started, 3)}
    write_json_atomic(out.with_suffix(".json"), summary)
    print(f"centroids ({k} x {centroids.shape[1]}) -> {out}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    from pools.cli import one_line_errors

    with one_line_errors(None, FilterError, PoolFormatError, OSError):
        main()
