"""Benchmark `pipeline.reshard`: input MB/s and samples/s, against the reference's approach.

    python bench/reshard.py [--samples 10000] [--image-px 256] [--fraction 0.3] [--workers 2]

Builds (once, cached under --work-dir) a synthetic pool whose images are --image-px JPEGs, picks
a subset of --fraction of its downloaded uids (10% of them listed twice), and times:

- ``ours_1proc``: pipeline.reshard in one process (no Ray), i.e. per-core throughput;
- ``ours_ray``: pipeline.reshard on Ray with --workers tasks (Ray start-up timed apart, as
  ``ray_init_s``: on a long job it is paid once);
- ``reference_1proc``: the reference resharder's inner loop in one process: a webdataset
  pipeline with group-by-key, json parse, two searchsorted calls on the memmap, and a
  webdataset TarWriter (no multiprocessing, no S3) — the same work, done the reference's way.

Prints one JSON line: MB/s is input tar bytes read per second of wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.execution import Execution  # noqa: E402
from pipeline.reshard import ReshardConfig, reshard  # noqa: E402
from pools.format import Pool  # noqa: E402
from pools.synth import SynthConfig, generate  # noqa: E402
from pools.uids import UID_DTYPE, read_subset, uids_to_records, write_subset  # noqa: E402


def reference_loop(shards: list[Path], subset_file: Path, out: Path, shard_size: int) -> int:
    """The reference's per-sample work (resharder.py copy_worker), single process."""
    import webdataset as wds

    subset = read_subset(subset_file)
    out.mkdir(parents=True, exist_ok=True)
    written, shard_id, count, writer = 0, 0, 0, None
    ds = wds.DataPipeline(wds.SimpleShardList([str(p) for p in shards]), wds.tarfile_to_samples())
    for d in ds:
        uid = json.loads(d["json"])["uid"]
        key = np.array([divmod(int(uid, 16), 2**64)], UID_DTYPE)[0]
        k = np.searchsorted(subset, key, "right") - np.searchsorted(subset, key, "left")
        for j in range(k):
            if writer is None or count >= shard_size:
                if writer is not None:
                    writer.close()
                writer = wds.TarWriter(str(out / f"{shard_id:08d}.tar"))
                shard_id, count = shard_id + 1, 0
            writer.write({**{e: v for e, v in d.items() if not e.startswith("__")}, "__key__": f"{uid}-{j}"})
            count += 1
            written += 1
    if writer is not None:
        writer.close()
    return written


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_000, help="pool rows (default %(default)s)")
    parser.add_argument("--image-px", type=int, default=256, help="stored image size (default %(default)s)")
    parser.add_argument("--fraction", type=float, default=0.3, help="subset fraction (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="Ray tasks (default %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=Path("bench/out/reshard"),
                        help="where the pool and outputs go (default %(default)s)")
    args = parser.parse_args(argv)

    pool = args.work_dir / f"pool_{args.samples}_{args.image_px}"
    generate(pool, SynthConfig(samples=args.samples, seed=0, rows_per_file=5_000, shard_size=2_000,
                               image_px=args.image_px, eval_per_class=1))
    truth = pq.read_table(pool / "ground_truth.parquet").to_pydict()
    downloaded = [u for u, ok in zip(truth["uid"], truth["downloaded"]) if ok]
    rng = np.random.default_rng(0)
    picked = rng.choice(downloaded, size=int(len(downloaded) * args.fraction), replace=False).tolist()
    subset_file = args.work_dir / "subset.npy"
    write_subset(subset_file, uids_to_records(picked + picked[: len(picked) // 10]))
    shards = Pool(pool).shard_files()
    input_mb = sum(p.stat().st_size for p in shards) / 1e6
    processed = len(downloaded)

    figures = {"samples_in": processed, "input_mb": round(input_mb, 1),
               "mean_sample_kb": round(input_mb * 1e3 / processed, 1), "fraction": args.fraction}
    runs = {"ours_1proc": dict(execution=Execution("local", num_workers=1)),
            "ours_ray": dict(execution=Execution("ray", num_workers=args.workers))}
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    figures["ray_init_s"] = round(time.perf_counter() - start, 2)
    for name, kw in runs.items():
        out = args.work_dir / name
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        meta = reshard(ReshardConfig(input_dir=Pool(pool).shards_dir, subset_file=subset_file, output_dir=out,
                                     max_task_samples=10**9, **kw))
        wall = time.perf_counter() - start
        figures[f"{name}_s"] = round(wall, 2)
        figures[f"{name}_mb_s"] = round(input_mb / wall, 1)
        figures[f"{name}_samples_s"] = round(processed / wall)
        figures["output_count"] = meta["output_count"]
    out = args.work_dir / "reference_1proc"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    written = reference_loop(shards, subset_file, out, 10_000)
    wall = time.perf_counter() - start
    assert written == figures["output_count"], (written, figures["output_count"])
    figures["reference_1proc_s"] = round(wall, 2)
    figures["reference_1proc_mb_s"] = round(input_mb / wall, 1)
    figures["reference_1proc_samples_s"] = round(processed / wall)
    figures["speedup_1proc_vs_reference"] = round(figures["reference_1proc_s"] / figures["ours_1proc_s"], 2)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
