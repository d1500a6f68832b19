"""Benchmark `pipeline.score`: images/s, with decode and model time split.

    python bench/score.py [--samples 2000] [--image-px 256] [--model-width 512] [--batch-size 128]

Builds (once, cached under --work-dir) a synthetic pool and a randomly initialised open_clip
model (a small ViT at --vision-px with CommonPool's 512-d embeddings unless --model NAME is
given), then scores the pool in one process (no Ray: the per-actor figure; a Ray actor pool
multiplies it by the number of actors/GPUs). Prints one JSON line: images/s over the embedding
stage, and the seconds spent reading tars, decoding+preprocessing (in the decode threads), waiting
for decode (time the model was starved) and in the model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.execution import Execution  # noqa: E402
from pipeline.score import ScoreConfig, score_pool  # noqa: E402
from pools.synth import SynthConfig, generate  # noqa: E402
from trainer.models import create_model, model_config_record  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2_000, help="pool rows (default %(default)s)")
    parser.add_argument("--image-px", type=int, default=256, help="stored image size (default %(default)s)")
    parser.add_argument("--vision-px", type=int, default=64, help="model input size (default %(default)s)")
    parser.add_argument("--model", default=None, help="score with this model instead (name, run or checkpoint)")
    parser.add_argument("--batch-size", type=int, default=128, help="(default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    parser.add_argument("--decode-threads", type=int, default=2, help="(default %(default)s)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="use CUDA + bf16 when > 0")
    parser.add_argument("--work-dir", type=Path, default=Path("bench/out/score"), help="(default %(default)s)")
    args = parser.parse_args(argv)

    source = args.work_dir / f"pool_{args.samples}_{args.image_px}"
    generate(source, SynthConfig(samples=args.samples, seed=0, rows_per_file=5_000, shard_size=1_000,
                                 image_px=args.image_px, eval_per_class=1))
    model = args.model
    if model is None:
        cfg = {"embed_dim": 512,
               "vision_cfg": {"image_size": args.vision_px, "layers": 4, "width": 256, "head_width": 64,
                              "patch_size": 8},
               "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}
        net, *_ = create_model(cfg)
        model = str(args.work_dir / f"model_{args.vision_px}.pt")
        torch.save({"epoch": 0, "state_dict": net.state_dict(), **model_config_record(cfg)}, model)
        params = sum(p.numel() for p in net.parameters())
    else:
        params = None
    pool = args.work_dir / "pool"
    shutil.rmtree(pool, ignore_errors=True)
    shutil.copytree(source, pool)
    summary = score_pool(ScoreConfig(pool=pool, model=model, batch_size=args.batch_size, execution=Execution("local", num_workers=1),
                                     cpus_per_actor=args.threads, decode_threads=args.decode_threads,
                                     num_gpus=args.num_gpus, overwrite=True))
    t = summary["timing_per_shard"]
    images = summary["shard_samples"]
    figures = {"images": images, "model": args.model or f"random ViT {args.vision_px}px 512-d",
               "params": params, "device": "cuda" if args.num_gpus and torch.cuda.is_available() else "cpu",
               "batch_size": args.batch_size, "images_per_s": round(images / summary["embed_s"], 1),
               "embed_s": summary["embed_s"], "read_s": t["read_s"], "decode_s": t["decode_s"],
               "decode_wait_s": t["decode_wait_s"], "model_s": t["model_s"],
               "model_images_per_s": round(images / t["model_s"], 1),
               "decode_images_per_s": round(images / t["decode_s"], 1)}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
