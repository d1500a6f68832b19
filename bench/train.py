"""Training throughput: ours (`trainer.train`) vs open_clip_train, same model, shards, processes.

    python bench/train.py                       # tiny on CPU, a fresh synthetic pool
    python bench/train.py --model ViT-B-32 --precision amp_bf16 --batch-size 256 --steps 60
                                                # on a GPU: ViT-B-32 at 224 px, bf16

Prints one JSON line: steady-state samples/s of each trainer (the first 3 steps left out;
per-step times, data wait included), their ratio (ours / open_clip_train), peak memory (the
largest max-RSS of any one process on CPU; max allocated on GPU) and the model's forward FLOPs per
sample (image + text tower, from torch's FLOP counter), from which MFU =
3 * flops_per_sample * samples/s / peak device FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def forward_flops_per_sample(model_name: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.models import create_model
    model, _, _, tok = create_model(model_name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images, texts = torch.zeros(2, 3, size, size), tok(["a photo of a red star"] * 2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images, texts)
    return counter.get_total_flops() / 2


def run_timed(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.time()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed:\n{res.stderr[-3000:]}")
    return res, time.time() - t, max(after, before) * 1024


def launcher(nproc: int, module: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", module]
    return [str(Path(sys.executable).with_name("torchrun")), "--standalone",
            "--nproc_per_node", str(nproc), "-m", module]


def bench_ours(a, shards: str, out: Path, env: dict) -> dict:
    cmd = launcher(a.nproc, "trainer.train") + [
        "--scale", "tiny", "--allow-nonstandard", "--model", a.model, "--data", shards,
        "--out", str(out), "--samples-seen", str(a.batch_size * a.steps), "--global-batch-size",
        str(a.batch_size), "--num-checkpoints", "1", "--workers", str(a.workers),
        "--precision", a.precision, "--no-progress", "--no-tensorboard", "--warmup", "10"]
    _, wall, rss = run_timed(cmd, env)
    m = json.loads((out / "manifest.json").read_text())
    return {"samples_per_s": m["steady_samples_per_second"], "wall_s": round(wall, 1),
            "peak_rss_bytes": rss, "peak_gpu_memory_bytes": m["peak_gpu_memory_bytes"]}


# open_clip_train 3.3.0's group_by_keys_nothrow chokes on the end-of-shard marker ({}) that
# webdataset >= 0.2.9x's tar_file_expander yields (KeyError: 'fname'): turn the marker off.
OPEN_CLIP_SHIM = ("import sys, functools, open_clip, open_clip_train.data as d, "
                  "webdataset.tariterators as t; "
                  "d.tar_file_expander = functools.partial(t.tar_file_expander, eof_value=None); "
                  "open_clip.add_model_config(sys.argv[1]); "
                  "from open_clip_train.main import main; main(sys.argv[2:])")


def bench_open_clip(a, shards: list[str], out: Path, env: dict, model_dir: Path) -> dict:
    folder = Path(shards[0]).parent
    stems = sorted(Path(s).stem for s in shards)
    pattern = str(folder / f"{{{stems[0]}..{stems[-1]}}}.tar")
    args = ["--train-data", pattern, "--train-num-samples", str(a.batch_size * a.steps),
            "--dataset-type", "webdataset", "--dataset-resampled",
            "--batch-size", str(a.batch_size // a.nproc), "--epochs", "1", "--model", a.model,
            "--workers", str(a.workers), "--lr", "2e-3", "--warmup", "10", "--wd", "0.2",
            "--precision", a.precision, "--logs", str(out), "--name", "bench",
            "--log-every-n-steps", "1", "--save-frequency", "0", "--seed", "0", "--report-to", ""]
    if a.nproc == 1:
        cmd = [sys.executable, "-c", OPEN_CLIP_SHIM, str(model_dir)] + args
    else:  # torchrun cannot run -c: write the shim as a file
        shim = out / "shim.py"
        out.mkdir(parents=True, exist_ok=True)
        shim.write_text(OPEN_CLIP_SHIM.replace("sys.argv[1]", repr(str(model_dir)))
                        .replace("sys.argv[2:]", "sys.argv[1:]"))
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone",
               "--nproc_per_node", str(a.nproc), str(shim)] + args
    res, wall, rss = run_timed(cmd, env)
    log = res.stdout + res.stderr + "".join(p.read_text() for p in out.rglob("out.log"))
    times = [float(x) for x in re.findall(r"Batch \(t\): ([0-9.]+)", log)]
    steady = times[3:-1] if len(times) > 4 else times
    if not steady:
        raise RuntimeError(f"no 'Batch (t)' lines in open_clip_train's log:\n{log[-2000:]}")
    return {"samples_per_s": round(a.batch_size * len(steady) / sum(steady), 2),
            "wall_s": round(wall, 1), "peak_rss_bytes": rss, "steps_logged": len(times)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="shard folder (default: a fresh 3,000-row synthetic pool)")
    p.add_argument("--model", default="tiny", help="tiny (CPU) or e.g. ViT-B-32 (GPU)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--nproc", type=int, default=1, help="training processes (torchrun when > 1)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "amp", "amp_bf16"])
    p.add_argument("--skip-open-clip", action="store_true")
    a = p.parse_args(argv)
    from trainer.data import expand_shards
    from trainer.models import model_config_record

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        data = a.data
        if data is None:
            from pools.synth import SynthConfig, generate
            generate(tmp / "pool", SynthConfig(samples=3000, seed=1))
            data = str(tmp / "pool" / "shards")
        shards = expand_shards(data)
        record = model_config_record(a.model)
        model_dir = tmp / "model_configs"
        model_dir.mkdir()
        (model_dir / f"{record['model_name']}.json").write_text(json.dumps(record["model_cfg"]))
        result = {"model": a.model, "precision": a.precision, "batch_size": a.batch_size,
                  "steps": a.steps, "nproc": a.nproc, "workers": a.workers,
                  "device": "cuda" if __import__("torch").cuda.is_available() else "cpu",
                  "forward_flops_per_sample": forward_flops_per_sample(a.model)}
        result["ours"] = bench_ours(a, data, tmp / "ours", env)
        if not a.skip_open_clip:
            result["open_clip_train"] = bench_open_clip(a, shards, tmp / "oc", env, model_dir)
            result["ratio_ours_over_open_clip"] = round(
                result["ours"]["samples_per_s"] / result["open_clip_train"]["samples_per_s"], 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
