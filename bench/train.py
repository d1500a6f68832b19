"""Training throughput: ours (`trainer.train`) vs open_clip_train, same model, shards, processes.

    python bench/train.py                       # tiny on CPU, a fresh synthetic pool, A B A B
    python bench/train.py --gpu                 # ViT-B-32 at 224 px in bf16, batch 256, on a GPU
    python bench/train.py --gpu --torch-compile # the same, both trainers compiled

The two trainers run in turn, `--repeats` times each (A B A B ...), so that load which changes
during the benchmark falls on both; the ratio reported is the median of the per-round ratios.
Prints one JSON line: per run, steady-state samples/s (the first 3 steps and the last left out;
per-step times, data wait included) and the share of step time spent waiting for data (ours
also its training process's CPU milliseconds a step, steadier on a shared machine); their
medians; the median ratio (ours / open_clip_train); peak memory (the largest max-RSS of any one
process on CPU; max allocated on GPU); the model's forward FLOPs per sample (image + text
tower, from torch's FLOP counter) and MFU = 3 * flops_per_sample * samples/s / peak FLOP/s
(the device's bf16 peak from a small table, or `--peak-flops`). With a GPU it also prints the
seed's reference figure: ViT-B/32 on LAION-400M, 128 A100s for ~36 h, ~770 samples/s per GPU.
On a CPU it adds `step_breakdown` (`bench/profile_step.py`'s, at trainer.train's thread count
and ours' precision): CPU milliseconds of forward, backward and optimizer, the loader's CPU per
batch, forward FLOPs of each tower and the top ops by self CPU time (`--no-breakdown` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # trainer, pools and bench.profile_step, without an install
STEADY_SKIP = 3  # warm-up steps left out of steady-state figures (as trainer.train's manifest)

# Dense bf16 peak FLOP/s by device name (vendor data sheets, SXM parts), for MFU.
PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L4": 121e12,
                   "A10G": 70e12, "L40S": 362e12}
# The seed's reference: ViT-B/32 trained on LAION-400M with 128 A100s for about 36 h
# (open_clip's README); 32 epochs of ~407M samples / (128 GPUs * 36 h) ~ 770 samples/s per GPU.
SEED_A100_SAMPLES_PER_S_PER_GPU = 770


def device_peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def steady(values: list[float], skip: int = STEADY_SKIP) -> list[float]:
    return values[skip:-1] if len(values) > skip + 1 else values


def forward_flops_per_sample(model_name: str) -> dict[str, float]:
    """Forward FLOPs per sample of each tower (`image`, `text`) and their `total`."""
    from bench.profile_step import tower_flops_per_sample
    from trainer.models import create_model

    model, _, _, tok = create_model(model_name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    flops = tower_flops_per_sample(model, tok, size)
    return {**flops, "total": sum(flops.values())}


def cpu_step_breakdown(a) -> dict:
    """Where ours' step goes, timed in this process with the threads trainer.train would use."""
    from bench.profile_step import step_breakdown
    from trainer.train import compute_threads

    threads = compute_threads(a.threads, a.workers, "cpu", a.nproc)
    breakdown, _ = step_breakdown(a.model, batch_size=a.batch_size // a.nproc, steps=5,
                                  threads=threads, precision=a.precision, loader=True)
    return breakdown


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
    if a.torch_compile:
        cmd.append("--torch-compile")
    if a.threads is not None:
        cmd += ["--threads", str(a.threads)]
    _, wall, rss = run_timed(cmd, env)
    m = json.loads((out / "manifest.json").read_text())
    return {"samples_per_s": m["steady_samples_per_second"], "data_wait_share": m["data_wait_fraction"],
            "train_process_cpu_ms_per_step": m["steady_cpu_ms_per_step"], "wall_s": round(wall, 1),
            "peak_rss_bytes": rss,
            "peak_gpu_memory_bytes": m["peak_gpu_memory_bytes"], "torch_threads": m["torch_threads"]}


# open_clip_train 3.3.0's group_by_keys_nothrow chokes on the end-of-shard marker ({}) that
# webdataset >= 0.2.9x's tar_file_expander yields (KeyError: 'fname'); pyproject pins 0.2.86,
# which yields none, but where a newer one is installed the marker is turned off.
OPEN_CLIP_SHIM = ("import sys, functools, inspect, open_clip, open_clip_train.data as d, "
                  "webdataset.tariterators as t; "
                  "d.tar_file_expander = functools.partial(t.tar_file_expander, eof_value=None) "
                  "if 'eof_value' in inspect.signature(t.tar_file_expander).parameters else "
                  "d.tar_file_expander; "
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
    if a.torch_compile:
        args.append("--torch-compile")
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
    # open_clip_train logs to the console and to <logs>/<name>/out.log: read one of them
    log = "".join(p.read_text() for p in out.rglob("out.log")) or res.stdout + res.stderr
    # one line a step (--log-every-n-steps 1): "Data (t): <wait> Batch (t): <step, wait included>"
    pairs = [(float(d), float(b)) for d, b in
             re.findall(r"Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+)", log)]
    kept = steady(pairs)
    if not kept:
        raise RuntimeError(f"no 'Batch (t)' lines in open_clip_train's log:\n{log[-2000:]}")
    step_s = sum(b for _, b in kept)
    return {"samples_per_s": round(a.batch_size * len(kept) / step_s, 2),
            "data_wait_share": round(sum(d for d, _ in kept) / step_s, 4),
            "wall_s": round(wall, 1), "peak_rss_bytes": rss, "steps_logged": len(pairs)}


def summary(runs: list[dict], flops_per_sample: float, peak: float | None) -> dict:
    """Medians over the repeats, and MFU at the median rate when the peak is known."""
    rate = statistics.median(r["samples_per_s"] for r in runs)
    out = {"runs": runs, "median_samples_per_s": rate,
           "median_data_wait_share": statistics.median(r["data_wait_share"] for r in runs)}
    if peak:
        out["mfu"] = round(3 * flops_per_sample * rate / peak, 4)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="shard folder (default: a fresh 3,000-row synthetic pool)")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU benchmark: ViT-B-32 at 224 px, amp_bf16, batch 256, 60 steps, "
                        "4 loader workers (other flags still override)")
    p.add_argument("--model", default=None, help="tiny (CPU default) or e.g. ViT-B-32 (--gpu default)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 256)")
    p.add_argument("--steps", type=int, default=None, help="steps a run (default 40; --gpu 60)")
    p.add_argument("--workers", type=int, default=None, help="loader processes (default 1; --gpu 4)")
    p.add_argument("--nproc", type=int, default=1, help="training processes (torchrun when > 1)")
    p.add_argument("--precision", default=None, choices=["fp32", "amp", "amp_bf16"],
                   help="default fp32; --gpu amp_bf16")
    p.add_argument("--torch-compile", action="store_true", help="torch.compile the model in both trainers")
    p.add_argument("--threads", type=int, default=None,
                   help="trainer.train's --threads (default: its own policy; open_clip_train keeps torch's)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each trainer, alternated A B A B ... (default 3)")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="the device's peak FLOP/s for MFU (default: a bf16 table of GPUs by name)")
    p.add_argument("--skip-open-clip", action="store_true", help="time ours only")
    p.add_argument("--no-breakdown", action="store_true",
                   help="skip the in-process per-phase breakdown of one step (CPU runs)")
    a = p.parse_args(argv)
    defaults = ({"model": "ViT-B-32", "batch_size": 256, "steps": 60, "workers": 4, "precision": "amp_bf16"}
                if a.gpu else {"model": "tiny", "batch_size": 256, "steps": 40, "workers": 1, "precision": "fp32"})
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
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
        import torch
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        peak = a.peak_flops or device_peak_flops(device)
        flops = forward_flops_per_sample(a.model)
        result = {"model": a.model, "precision": a.precision, "batch_size": a.batch_size,
                  "steps": a.steps, "nproc": a.nproc, "workers": a.workers, "repeats": a.repeats,
                  "torch_compile": a.torch_compile, "threads_ours": a.threads, "device": device, "peak_flops": peak,
                  "forward_flops_per_sample": flops}
        ours, oc = [], []
        for r in range(a.repeats):  # A B A B ...: a change of load falls on both
            ours.append(bench_ours(a, data, tmp / f"ours{r}", env))
            if not a.skip_open_clip:
                oc.append(bench_open_clip(a, shards, tmp / f"oc{r}", env, model_dir))
        result["ours"] = summary(ours, flops["total"], peak)
        if oc:
            result["open_clip_train"] = summary(oc, flops["total"], peak)
            ratios = [o["samples_per_s"] / c["samples_per_s"] for o, c in zip(ours, oc)]
            result["ratios_ours_over_open_clip"] = [round(x, 3) for x in ratios]
            result["median_ratio_ours_over_open_clip"] = round(statistics.median(ratios), 3)
        if device == "cpu" and not a.no_breakdown:
            result["step_breakdown"] = cpu_step_breakdown(a)
        if device != "cpu":
            per_gpu = result["ours"]["median_samples_per_s"] / a.nproc
            result["seed_reference"] = {
                "what": "ViT-B/32 on LAION-400M, 128 A100 for ~36 h (open_clip README)",
                "samples_per_s_per_gpu": SEED_A100_SAMPLES_PER_S_PER_GPU,
                "ours_per_gpu_over_seed": round(per_gpu / SEED_A100_SAMPLES_PER_S_PER_GPU, 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
