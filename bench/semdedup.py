"""Benchmark SemDeDup (`pipeline.semdedup`): the whole ``pipeline.filter --strategy semdedup`` command.

    python bench/semdedup.py [--rows 2000000] [--rows-per-file 10000] [--clusters K] [--work-dir DIR]

Generates (once, cached under --work-dir) a metadata-only synthetic pool of --rows rows with
random 768-d float16 ``l14_img`` embeddings (``pools.synth --random-scores``) in which 15% of
the rows are planted near-duplicate groups of 2-5 (``--duplicates 0.15``), then times one
``python -m pipeline.filter --strategy semdedup`` from a cold start (fresh signals folder: the
k-means, the partition files, the within-cluster similarities and the signals pass included)
and prints one JSON line: seconds, rows/s, peak memory of the command's process tree, the
cluster count (default sqrt(rows): the assignment cost N*K*d equals the within-cluster cost
N*(N/K)*d there), and how the kept set compares with the planted groups (groups kept exactly
once, rows without a planted copy kept). Target (issue 11): 2M rows under 3 minutes and 4 GB
on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.filter import filter_command, run_measured  # noqa: E402

DUPLICATES = 0.15


def make_pool(work_dir: Path, rows: int, rows_per_file: int, seed: int) -> Path:
    from pools.synth import SynthConfig, generate

    pool = work_dir / f"dup_pool_{rows}_{rows_per_file}_{seed}"
    generate(pool, SynthConfig(samples=rows, seed=seed, rows_per_file=rows_per_file, images=False,
                               random_scores=True, duplicates=DUPLICATES))
    return pool


def planted_recall(pool: Path, kept_path: Path) -> dict:
    """Planted groups kept exactly once, and rows without a planted copy kept."""
    from pools.uids import uids_to_records

    truth = pq.read_table(pool / "ground_truth.parquet", columns=["uid", "duplicate_group"])
    group = truth.column("duplicate_group").to_numpy()
    kept = np.isin(uids_to_records(truth.column("uid")), np.load(kept_path))
    planted = group >= 0
    per_group = np.bincount(group[planted], weights=kept[planted]) if planted.any() else np.zeros(0)
    return {"planted_groups": int(len(per_group)), "groups_kept_once": int((per_group == 1).sum()),
            "rows_without_copy": int((~planted).sum()), "rows_without_copy_kept": int(kept[~planted].sum())}


def pool_parser(doc: str) -> argparse.ArgumentParser:
    """The flags of the cached pool and of the filter command (shared with bench/negclip.py)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000, help="pool rows (default %(default)s)")
    p.add_argument("--rows-per-file", type=int, default=10_000, help="rows per metadata file (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the pool's seed (default 0)")
    p.add_argument("--workers", type=int, default=2, help="signal workers (default 2)")
    p.add_argument("--executor", choices=["auto", "ray", "local"], default="auto",
                   help="the filter's executor (default auto)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/datacomp_bench"),
                   help="where the pool is cached and the outputs go (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = pool_parser(__doc__)
    p.add_argument("--clusters", type=int, help="k-means clusters (default: the filter's, sqrt(rows))")
    args = p.parse_args(argv)
    pool = make_pool(args.work_dir, args.rows, args.rows_per_file, args.seed)
    out = args.work_dir / "semdedup_out"
    extra = ["--semdedup-clusters", str(args.clusters)] if args.clusters else []
    measured = run_measured(filter_command(pool, ["semdedup"], out, args.workers, args.executor, extra))
    stats = json.loads((out / "stats.json").read_text())
    step = stats["global_steps"]["semdedup"]
    manifest = json.loads((out / "manifest.json").read_text())
    record = {"bench": "semdedup", "rows": args.rows, **measured,
              "rows_per_s": round(args.rows / measured["seconds"], 1),
              "global_step_s": manifest["timings"].get("global_steps_s"), "clusters": step["clusters"],
              "partitions": step["partitions"], "largest_cluster": step["largest_cluster"],
              "kept": stats["strategies"]["semdedup"]["kept"], **planted_recall(pool, out / "semdedup.npy")}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
