"""Benchmark negCLIPLoss (`pipeline.negclip`) and NormSim (`filters.negclip`): rows/s of each.

    python bench/negclip.py [--rows 2000000] [--targets 10000] [--batch-size 32768] [--batches 10]

On the same cached synthetic pool as ``bench/semdedup.py`` (random 768-d embeddings), runs one
``python -m pipeline.filter --strategy negclip_normsim`` from a cold start with --targets
random unit vectors (ImageNet-1k's 1.28M train embeddings would be the real ones) and prints
two JSON lines from the run's manifest: negCLIPLoss (the global step: K rounds of random
batches over the whole pool) and NormSim (the per-file signals pass), each with seconds and
rows/s, and the command's total seconds and peak memory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

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
    records = []
    for name, seconds in (("negclip", timings.get("global_steps_s")), ("normsim", timings.get("signals_s"))):
        records.append({"bench": name, "rows": args.rows, "seconds": seconds,
                        "rows_per_s": round(args.rows / seconds, 1) if seconds else None,
                        "command_seconds": measured["seconds"], "peak_rss_mb": measured["peak_rss_mb"],
                        **({"batch_size": args.batch_size, "batches": args.batches} if name == "negclip"
                           else {"targets": args.targets})})
        print(json.dumps(records[-1]))
    return records


if __name__ == "__main__":
    main()
