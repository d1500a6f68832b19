"""Benchmark negCLIPLoss (`pipeline.negclip`) and NormSim (`filters.negclip`): rows/s of each.

    python bench/negclip.py [--rows 2000000] [--targets 10000] [--batch-size 32768] [--batches 10]

On the same cached synthetic pool as ``bench/semdedup.py`` (random 768-d embeddings), runs one
``python -m pipeline.filter --strategy negclip_normsim`` from a cold start with --targets
random unit vectors (ImageNet-1k's 1.28M train embeddings would be the real ones) and prints
two JSON lines from the run's manifest: negCLIPLoss (the global step: K rounds of random
batches over the whole pool, each batch a unit of a stage) and NormSim (the per-file signals
pass), each with seconds and rows/s, and the command's total seconds and peak memory.
Side by side, the negCLIPLoss line gives the same computation done the straightforward way
(``reference_*``: the whole pool's embeddings in memory, `filters.negclip.negclip_loss`, in a
process of its own) and the largest difference between the two columns.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.filter import filter_command, run_measured  # noqa: E402
from bench.semdedup import make_pool, pool_parser  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    p = pool_parser(__doc__)
    p.add_argument("--targets", type=int, default=10_000, help="NormSim target embeddings (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32_768, help="negCLIPLoss batch (default %(default)s)")
    p.add_argument("--batches", type=int, default=10, help="negCLIPLoss rounds K (default %(default)s)")
    args = p.parse_args(argv)
    pool = make_pool(args.work_dir, args.rows, args.rows_per_file, args.seed)
    targets = args.work_dir / f"targets_{args.targets}.npy"
    rng = np.random.default_rng(1)
    t = rng.standard_normal((args.targets, 768)).astype(np.float32)
    np.save(targets, t / np.linalg.norm(t, axis=1, keepdims=True))
    out = args.work_dir / "negclip_out"
    extra = ["--targets", str(targets), "--negclip-batch-size", str(args.batch_size),
             "--negclip-batches", str(args.batches)]
    measured = run_measured(filter_command(pool, ["negclip_normsim"], out, args.workers, args.executor, extra))
    timings = json.loads((out / "manifest.json").read_text())["timings"]
    reference = run_measured([sys.executable, __file__, "--reference", str(pool), str(args.batch_size),
                              str(args.batches), str(out / "reference.npy")])
    ours = np.concatenate([pq.read_table(p, columns=["negclip_loss_l14"]).column(0).to_numpy()
                           for p in sorted((out / "signals").glob("*.parquet"))])
    records = []
    for name, seconds in (("negclip", timings.get("global_steps_s")), ("normsim", timings.get("signals_s"))):
        records.append({"bench": name, "rows": args.rows, "seconds": seconds,
                        "rows_per_s": round(args.rows / seconds, 1) if seconds else None,
                        "command_seconds": measured["seconds"], "peak_rss_mb": measured["peak_rss_mb"],
                        **({"batch_size": args.batch_size, "batches": args.batches,
                            **json.loads(reference["stdout"]), "reference_peak_rss_mb": reference["peak_rss_mb"],
                            "max_abs_difference": float(np.nanmax(np.abs(ours - np.load(out / "reference.npy"))))}
                           if name == "negclip" else {"targets": args.targets})})
        print(json.dumps(records[-1]))
    return records


def reference(pool: Path, batch_size: int, batches: int, out: Path) -> None:
    """negCLIPLoss with every embedding in memory (the filter's defaults: l14, tau 0.01, seed 0)."""
    from filters.image_based import missing_embedding_mask
    from filters.negclip import negclip_loss, random_batches

    t = time.perf_counter()
    files = sorted((pool / "metadata").glob("*.npz"))
    image = np.concatenate([np.load(p)["l14_img"] for p in files])
    text = np.concatenate([np.load(p)["l14_txt"] for p in files])
    valid = np.flatnonzero(~missing_embedding_mask(image) & ~missing_embedding_mask(text))
    values = np.full(len(image), np.nan, dtype=np.float32)
    values[valid] = negclip_loss(image[valid], text[valid], random_batches(len(valid), batch_size, batches, 0))
    np.save(out, values)
    print(json.dumps({"reference_seconds": round(time.perf_counter() - t, 2)}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reference"]:
        reference(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    else:
        main()
