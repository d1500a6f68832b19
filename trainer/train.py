"""Train a CLIP model on webdataset shards for a scale's fixed budget.

    python -m trainer.train --scale tiny --data POOL/shards --out runs/tiny
    torchrun --nproc_per_node 8 -m trainer.train --scale small --data RESHARDED --out runs/small \
        --precision amp_bf16 --local-loss --gather-with-grad --grad-checkpointing

Reads: shards (a folder, a resharded folder with meta.json, a brace pattern; '::' joins several).
Writes the run folder (see `trainer.models` for the layout): config.json, model_config.json,
model_configs/<model>.json, checkpoints/epoch_<n>.pt + epoch_latest.pt after each of the
`--num-checkpoints` intervals, tensorboard/, train_loss.npy (mean loss of every step),
info.pkl (what DataComp's evaluate.py reads) and manifest.json (budget, overrides, samples
seen, skipped-sample counters, timings).

The loop: build model, data, optimiser and schedule; for each interval, for each step: set the
lr, forward, ClipLoss, backward, (clip), step, clamp the logit scale; then checkpoint.
A rewind (`--rewind-from`, see `trainer.rewind`) enters the same loop from a parent run's
checkpoint with the rest of the parent's budget to train.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import sys
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from pools.files import atomic_path, write_json_atomic
from trainer.checkpoint import find_resume, load_checkpoint, save_checkpoint, write_open_clip_dir
from trainer.config import (TRAIN_SCALES, TrainConfig, apply_overrides, aug_cfg_for_open_clip,
                            budget_overrides, get_train_scale)
from trainer.data import StreamSpec, epoch_loader, epoch_plan, expand_shards, rank_share
from trainer.distributed import (DistEnv, all_reduce_mean, all_reduce_sum_counts, barrier,
                                 init_distributed, shutdown)
from trainer.models import (MODEL_CONFIG_FILE, MODEL_CONFIGS_DIR, count_parameters, create_model,
                            model_config_record, read_model_config_file, with_image_drop_path)
from trainer.rewind import find_rewind_point, parent_config


# --- pure pieces ------------------------------------------------------------------------------
def cosine_lr(step: int, base_lr: float, warmup: int, total_steps: int) -> float:
    """open_clip's schedule: linear warmup to base_lr, then cosine decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e, es = min(step, total_steps) - warmup, total_steps - warmup
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr if es > 0 else base_lr


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, norms and the logit scale."""
    def no_decay(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": wd}]


def compute_threads(requested: int | None, workers: int, device: str, procs_per_machine: int = 1) -> int | None:
    """Torch threads for this process's compute; None leaves torch's default alone.

    On a CPU the loader processes decode on the same cores as the step, and OpenMP threads
    that lose their core to a loader spin at every barrier: two threads plus a loader on two
    cores burned ~30% more CPU than one thread plus a loader for the same run (measured on
    the project's 2-core machine). So the compute gets the cores the loaders leave, at least
    one; OMP_NUM_THREADS (torchrun sets it) or --threads win.
    """
    if requested is not None:
        return requested
    if not device.startswith("cpu") or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // procs_per_machine - workers)


def make_optimizer(model: torch.nn.Module, budget, device: str) -> torch.optim.Optimizer:
    """open_clip's AdamW; fused (one kernel per tensor, the same update) where torch has it.

    On the tiny model most parameters are the 49,408-token embedding table, and the per-tensor
    loop of the unfused AdamW cost ~4x the fused one (23 vs 5 ms a step, 1 CPU thread).
    """
    return torch.optim.AdamW(param_groups(model, budget.wd), lr=budget.lr,
                             betas=(budget.beta1, budget.beta2), eps=budget.eps,
                             fused=device.startswith(("cpu", "cuda")))


AUTOCAST_DTYPES = {"amp": torch.float16, "amp_bf16": torch.bfloat16, "amp_bfloat16": torch.bfloat16}


@contextmanager
def autocast_for(precision: str, device: str):
    """The forward's mixed precision; on a CPU also torch's plain ("math") attention.

    torch's fused CPU attention kernel is slow in bf16 (fp16, not measured, is treated alike):
    on the tiny model its backward took ~50 ms a call against ~5 ms in fp32, which made
    amp_bf16 slower than fp32 on a CPU whose matmuls are ~7x faster in bf16 (AMX). The math
    path (matmul, softmax, matmul) has no such cliff: a bf16 tiny step took ~270 ms of CPU
    instead of ~570 (the 32-token tiny of then, one thread).
    """
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        yield
        return
    on_cpu = not device.startswith("cuda")
    with torch.autocast("cpu" if on_cpu else "cuda", dtype=dtype), \
            (sdpa_kernel([SDPBackend.MATH]) if on_cpu else nullcontext()):
        yield


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX), where amp_bf16 pays.

    Only AMX was measured to pay (bf16 matmuls ~7x fp32's on the tiny model's shapes); without
    it bf16 runs on AVX-512 at best, untried, so callers keep fp32 there.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch's own check, private
    try:
        return bool(probe and probe())
    except RuntimeError:
        return False


def check_plan(plan: list[list[int]], world_size: int) -> None:
    """Every step's global batch must split evenly over the processes (ClipLoss gathers)."""
    for e, steps in enumerate(plan):
        for n in set(steps):
            if n % world_size:
                raise ValueError(f"a step of {n} samples (interval {e + 1}) does not split over "
                                 f"{world_size} processes; pick a process count dividing it")


# --- the run ----------------------------------------------------------------------------------
def train(cfg: TrainConfig, env: DistEnv | None = None) -> dict:
    """Run (or resume) training as `cfg` says; returns the manifest (on every rank)."""
    env = env or init_distributed(cfg.device)
    threads_before = torch.get_num_threads()
    try:
        return _train(cfg, env)
    finally:  # a caller that goes on in this process (the demo) keeps its own thread count
        torch.set_num_threads(threads_before)


def _train(cfg: TrainConfig, env: DistEnv) -> dict:
    out = Path(cfg.out)
    budget, scale = cfg.budget, get_train_scale(cfg.scale)
    overrides = budget_overrides(scale, budget)
    shards = tuple(expand_shards(cfg.data))
    rewind = find_rewind_point(cfg.rewind_from, cfg.rewind_at) if cfg.rewind_from else None
    if rewind is not None and rewind.budget_samples != budget.samples_seen:
        raise ValueError(f"a rewind finishes its parent's budget ({rewind.budget_samples:,} "
                         f"samples), not {budget.samples_seen:,}")
    # a rewind trains only what its parent had left, and continues the parent's cosine schedule
    # as open_clip_train's --resume does with new flags: recomputed for the new batch size and
    # LR, entered at the checkpoint's place in it
    plan = epoch_plan(budget.samples_seen - (rewind.samples_seen if rewind else 0),
                      budget.batch_size, cfg.num_checkpoints)
    check_plan(plan, env.world_size)
    total_steps = sum(len(p) for p in plan)
    step_offset = 0
    if rewind is not None:
        step_offset = max(0, math.ceil(budget.samples_seen / budget.batch_size) - total_steps)
        total_steps += step_offset
    stream_epoch_offset = rewind.interval if rewind else 0
    model_spec = ({"model_name": budget.model, "model_cfg": cfg.model_cfg}
                  if cfg.model_cfg is not None else budget.model)

    resume_from = find_resume(out, cfg.resume)
    if resume_from is None and (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("*.pt")):
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume latest to continue "
                              "it, or choose another --out")
    if env.is_master:
        out.mkdir(parents=True, exist_ok=True)
        _check_same_config(out, cfg, resuming=resume_from is not None)
        write_json_atomic(out / "config.json", cfg.to_json())
        record = model_config_record(model_spec)
        write_json_atomic(out / MODEL_CONFIG_FILE, record)
        write_json_atomic(out / MODEL_CONFIGS_DIR / f"{record['model_name']}.json", record["model_cfg"])
    barrier(env)

    threads = compute_threads(cfg.threads, min(cfg.workers, total_steps), env.device,
                              int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model, preprocess_train, _, tokenizer = create_model(
        model_spec, device=env.device, aug_cfg=aug_cfg_for_open_clip(cfg.aug_cfg))
    record = model_config_record(model_spec)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    bare = model
    if env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device] if env.device.startswith("cuda") else None,
            static_graph=True)
    if cfg.torch_compile:
        model = torch.compile(model)
    optimizer = make_optimizer(bare, budget, env.device)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "amp" and env.device.startswith("cuda") else None
    from open_clip.loss import ClipLoss
    loss_fn = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                       cache_labels=True, rank=env.rank, world_size=env.world_size)

    start_epoch, step, seen = 0, 0, 0
    counters: Counter = Counter()
    losses: list[float] = []
    if resume_from is not None or rewind is not None:
        ck = load_checkpoint(resume_from if resume_from is not None else Path(rewind.checkpoint))
        if resume_from is not None:  # e.g. a run of an older `tiny` config
            _check_same_model(ck, record, str(resume_from), "resuming keeps the run's model")
        else:
            _check_same_model(ck, record, rewind.checkpoint, "a rewind keeps the parent's model")
        bare.load_state_dict(ck["state_dict"])
        optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None and "scaler" in ck:
            scaler.load_state_dict(ck["scaler"])
        if resume_from is not None:
            start_epoch, step, seen = ck["epoch"], ck["step"], ck["samples_seen"]
        else:  # the parent's history up to the checkpoint is this run's too
            step, seen = step_offset, ck["samples_seen"]
        counters.update(ck.get("counters", {}))
        losses = list(ck.get("losses", []))

    writer = None
    if env.is_master and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=step)
    bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.scale}", unit="step",
               disable=not (env.is_master and cfg.progress), dynamic_ncols=True)
    t_start = time.time()
    step_seconds: list[float] = []  # this process's steps, data wait included
    wait_seconds: list[float] = []  # the part of each step spent waiting for its batch
    # this process's CPU time a step (its compute threads; loader workers are other processes):
    # steadier than wall time on a shared machine
    cpu_seconds: list[float] = []
    for epoch in range(start_epoch, cfg.num_checkpoints):
        model.train()
        local = tuple(rank_share(n, env.world_size, env.rank) for n in plan[epoch])
        spec = StreamSpec(shards=shards, seed=cfg.seed, epoch=stream_epoch_offset + epoch, rank=env.rank,
                          local_batches=local, shuffle_buffer=cfg.shuffle_buffer)
        t_data, c_data = time.time(), time.process_time()
        for i, images, texts, batch_counts in epoch_loader(spec, preprocess_train, tokenizer,
                                                           cfg.workers):
            data_time = time.time() - t_data
            lr = cosine_lr(step, budget.lr, budget.warmup, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            images, texts = images.to(env.device, non_blocking=True), texts.to(env.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast_for(cfg.precision, env.device):
                image_features, text_features, logit_scale = model(images, texts)
                loss = loss_fn(image_features, text_features, logit_scale)
            if scaler is not None:
                scaler.scale(loss).backward()
                if cfg.grad_clip_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if cfg.grad_clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
                optimizer.step()
            with torch.no_grad():
                bare.logit_scale.clamp_(0, math.log(100))
            step_time = time.time() - t_data
            cpu_seconds.append(time.process_time() - c_data)
            step_seconds.append(step_time)
            wait_seconds.append(data_time)
            loss_value = all_reduce_mean(loss.item(), env)
            losses.append(loss_value)
            counters.update(batch_counts)
            seen += plan[epoch][i]
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", epoch=epoch + 1)
            if writer is not None and (step % cfg.log_every == 0 or step == total_steps):
                writer.add_scalar("train/loss", loss_value, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/logit_scale", bare.logit_scale.exp().item(), step)
                writer.add_scalar("train/samples_per_second", plan[epoch][i] / max(step_time, 1e-9), step)
                writer.add_scalar("train/data_time", data_time, step)
                writer.add_scalar("train/step_time", step_time, step)
            t_data, c_data = time.time(), time.process_time()
        all_counts = all_reduce_sum_counts(dict(counters), env)
        if env.is_master:
            state = {"epoch": epoch + 1, "name": out.name, "state_dict": bare.state_dict(),
                     "optimizer": optimizer.state_dict(), "step": step, "samples_seen": seen,
                     "model_name": record["model_name"], "model_cfg": record["model_cfg"],
                     "counters": dict(counters), "all_counters": all_counts, "losses": losses}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            save_checkpoint(out, state, keep_numbered=not cfg.delete_previous_checkpoint)
            write_open_clip_dir(out, bare, record["model_cfg"])  # `local-dir:<run>` for open_clip
        barrier(env)
    bar.close()
    if writer is not None:
        writer.close()

    counts = all_reduce_sum_counts(dict(counters), env)
    manifest = {
        "scale": cfg.scale, "standard": not overrides and cfg.aug_cfg is None,
        "overrides": overrides, "aug_cfg": cfg.aug_cfg,
        "train_transform": repr(preprocess_train),
        "budget": asdict(budget), "samples_seen": seen, "steps": step,
        "checkpoint_intervals": cfg.num_checkpoints,
        "samples_per_interval": [sum(p) for p in plan],
        "world_size": env.world_size, "device": env.device, "precision": cfg.precision,
        "torch_threads": torch.get_num_threads(), "loader_workers": cfg.workers,
        "model_name": record["model_name"], "parameters": count_parameters(bare),
        "shards": len(shards), "data": cfg.data, "counters": counts,
        "final_loss": losses[-1] if losses else None,
        "resumed_from": str(resume_from) if resume_from else None,
        "rewound_from": rewind.to_json() if rewind else None,
        "wall_s_this_process": round(time.time() - t_start, 2),
        "steady_samples_per_second": _steady_rate(step_seconds, budget.batch_size),
        "data_wait_fraction": _steady_wait_fraction(step_seconds, wait_seconds),
        "steady_cpu_ms_per_step": _steady_mean_ms(cpu_seconds),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if env.device.startswith("cuda") else None,
        "checkpoint": str(out / "checkpoints" / "epoch_latest.pt"),
        "versions": _versions(),
    }
    if seen != budget.samples_seen:
        raise AssertionError(f"samples seen {seen} != budget {budget.samples_seen}")
    if env.is_master:
        with atomic_path(out / "train_loss.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(losses, dtype=np.float64))
        info = {"scale": cfg.scale, "checkpoint": manifest["checkpoint"],
                "scale_config": {"model": budget.model, "batch_size": budget.batch_size,
                                 "learning_rate": budget.lr, "train_num_samples": budget.samples_seen,
                                 "warmup": budget.warmup, "beta2": budget.beta2},
                "data_dir": cfg.data}
        with atomic_path(out / "info.pkl") as tmp:
            tmp.write_bytes(pickle.dumps(info))
        write_json_atomic(out / "manifest.json", manifest)
    barrier(env)
    return manifest


def _steady(values: list[float], skip: int = 3) -> list[float]:
    """Full steps after the first `skip` (warm-up); the last (often partial) step left out."""
    return values[skip:-1] if len(values) > skip + 1 else values


def _steady_rate(step_seconds: list[float], global_batch: int) -> float | None:
    """Global samples per second over steady steps."""
    steady = _steady(step_seconds)
    return round(global_batch * len(steady) / sum(steady), 2) if steady and sum(steady) > 0 else None


def _steady_mean_ms(seconds: list[float]) -> float | None:
    """Mean milliseconds over steady steps."""
    steady = _steady(seconds)
    return round(1000 * sum(steady) / len(steady), 1) if steady else None


def _steady_wait_fraction(step_seconds: list[float], wait_seconds: list[float]) -> float | None:
    """The share of steady step time spent waiting for data."""
    total = sum(_steady(step_seconds))
    return round(sum(_steady(wait_seconds)) / total, 4) if total > 0 else None


# What a resumed run must share with the run it continues.
RESUME_KEPT = ("budget", "data", "seed", "num_checkpoints", "aug_cfg", "model_cfg", "rewind_from",
               "rewind_at")


def _check_same_config(out: Path, cfg: TrainConfig, *, resuming: bool) -> None:
    path = out / "config.json"
    if not resuming or not path.is_file():
        return
    old = TrainConfig.from_json(json.loads(path.read_text()))
    changed = [f for f in RESUME_KEPT if getattr(old, f) != getattr(cfg, f)]
    if changed:
        raise ValueError(f"{path}: the run was started with another {', '.join(changed)}; "
                         "resuming must keep them")


def _check_same_model(checkpoint: dict, record: dict, path: str, rule: str) -> None:
    if "model_cfg" in checkpoint and checkpoint["model_cfg"] != record["model_cfg"]:
        raise ValueError(f"{path}: its model ({checkpoint.get('model_name')}) is not this run's "
                         f"({record['model_name']} as configured now); {rule}")


def _versions() -> dict:
    import open_clip
    return {"python": platform.python_version(), "torch": torch.__version__,
            "open_clip": open_clip.__version__}


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) // 2))


# --- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.train",
        description="Train CLIP on webdataset shards for a scale's fixed DataComp budget.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m trainer.train --scale tiny --data data/pool/shards --out runs/tiny\n"
               "  torchrun --nproc_per_node 2 -m trainer.train --scale tiny --data SHARDS --out RUN\n\n"
               "Budget flags (--model, --global-batch-size, --lr, --warmup, --beta1, --beta2,\n"
               "--eps, --wd, --samples-seen) change the fixed budget: they need\n"
               "--allow-nonstandard and the run is marked non-standard in manifest.json.\n"
               f"Scales: {', '.join(f'{s.name} ({s.model}, batch {s.batch_size}, {s.samples_seen:,} samples)' for s in TRAIN_SCALES.values())}")
    p.add_argument("--scale", choices=list(TRAIN_SCALES),
                   help="the fixed budget to train for (required, except for a rewind, which "
                        "takes its parent's)")
    p.add_argument("--data",
                   help="shards: a folder of .tar, a resharded folder (meta.json), a pool root, a "
                        "brace pattern 'dir/{00000000..00000009}.tar', 'pipe:COMMAND' (writes a "
                        "tar to stdout), http(s)://, gs:// or s3:// URLs (brace patterns too); "
                        "join several with '::' (required, except for a rewind: its parent's)")
    p.add_argument("--out", required=True, help="run folder to write (config, checkpoints, manifest)")
    p.add_argument("--delete-previous-checkpoint", action="store_true",
                   help="keep only checkpoints/epoch_latest.pt, not epoch_<n>.pt of every interval")
    p.add_argument("--num-checkpoints", type=int, default=5,
                   help="checkpoint intervals over the budget, DataComp's 'epochs' (default 5)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "amp", "amp_bf16", "amp_bfloat16"],
                   help="fp32 (default; CPU), amp (fp16 autocast + grad scaler) or amp_bf16")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help=f"data loader processes per training process (default {default_workers()}: "
                        "half the cores, at most 4)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch compute threads per process (default on CPU: the cores the loader "
                        "workers leave, at least 1; OMP_NUM_THREADS wins)")
    p.add_argument("--torch-compile", action="store_true",
                   help="torch.compile the model (for GPUs; it did not speed up the tiny CPU model)")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds the weights and every data stream (default 0; a rewind: its parent's)")
    p.add_argument("--local-loss", action="store_true", help="loss over local rows against all gathered features")
    p.add_argument("--gather-with-grad", action="store_true", help="all-gather features with gradients")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--grad-clip-norm", type=float, default=None, help="clip the gradient norm to this")
    p.add_argument("--resume", default=None, help="'latest' (continue this run if it has a checkpoint) or a checkpoint path")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="samples held per data stream for shuffling")
    p.add_argument("--log-every-n-steps", type=int, default=10, help="TensorBoard interval (default 10)")
    p.add_argument("--device", default="auto", help="auto (GPU of this rank if any, else cpu), cpu or cuda")
    p.add_argument("--no-tensorboard", action="store_true", help="skip TensorBoard logging")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("budget overrides (need --allow-nonstandard)")
    g.add_argument("--allow-nonstandard", action="store_true",
                   help="allow changing the fixed budget; the run is recorded as non-standard")
    g.add_argument("--model", default=None,
                   help="an open_clip model name (open_clip.list_models()) or one of ours (tiny)")
    g.add_argument("--model-config", default=None, metavar="FILE.json",
                   help="an open_clip model config file (embed_dim, vision_cfg, text_cfg; timm "
                        "image towers via vision_cfg.timm_model_name, Hugging Face text towers "
                        "via text_cfg.hf_model_name, which may be a local folder); its name is "
                        "the file's stem")
    g.add_argument("--image-drop-path", type=float, default=None, metavar="RATE",
                   help="stochastic depth on a timm image tower (vision_cfg.timm_drop_path; "
                        "the ConvNeXt cards use 0.1)")
    g.add_argument("--aug-cfg", nargs="+", default=None, action=AugCfgAction, metavar="KEY=VALUE",
                   help="open_clip's AugmentationCfg, as open_clip_train takes it: "
                        "use_timm=True scale='(0.4, 1.0)' color_jitter='(0.32, 0.32, 0.32, 0.08)' "
                        "re_prob=0.35 ... (DataComp uses none: the run is non-standard)")
    g.add_argument("--global-batch-size", type=int, default=None, help="all processes together")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--warmup", type=int, default=None, help="linear warmup steps")
    g.add_argument("--beta1", type=float, default=None, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=None, help="AdamW beta2 (xlarge: 0.95)")
    g.add_argument("--eps", type=float, default=None, help="AdamW epsilon")
    g.add_argument("--wd", type=float, default=None, help="AdamW weight decay")
    g.add_argument("--samples-seen", type=int, default=None, help="the whole budget in samples")
    r = p.add_argument_group("rewind (the ConvNeXt-XXLarge card's recipe)")
    r.add_argument("--rewind-from", default=None, metavar="RUN_OR_CHECKPOINT",
                   help="continue a run from its checkpoint nearest to --rewind-at of its budget "
                        "(or from the checkpoint given) with this run's batch, LR and "
                        "augmentation flags, to the same finished budget, in a new --out")
    r.add_argument("--rewind-at", type=float, default=None, metavar="FRACTION",
                   help="fraction of the parent's budget to rewind to, e.g. 0.9")
    return p


class AugCfgAction(argparse.Action):
    """KEY=VALUE pairs to a dict, values read as Python literals (else kept as strings), exactly
    as open_clip_train's ParseKwargs reads --aug-cfg; a pair without '=' is a usage error."""

    def __call__(self, parser, namespace, values, option_string=None):
        import ast

        kw = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string}: {item!r} is not KEY=VALUE")
            try:
                kw[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kw[key] = value
        setattr(namespace, self.dest, kw)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config; ValueError names the flag when the flags do not fit together."""
    if args.rewind_from is not None:
        return _rewind_config(args)
    if args.rewind_at is not None:
        raise ValueError("--rewind-at needs --rewind-from")
    if args.scale is None or args.data is None:
        raise ValueError("--scale and --data are required (except for a rewind)")
    scale = get_train_scale(args.scale)
    model, model_cfg = args.model, None
    if args.model_config is not None:
        if args.model is not None:
            raise ValueError("give --model or --model-config, not both")
        model, model_cfg = read_model_config_file(args.model_config)
    if args.image_drop_path is not None:
        from trainer.models import resolve_model
        name, base_cfg = resolve_model(model or scale.model) if model_cfg is None else (model, model_cfg)
        model, model_cfg = with_image_drop_path(name, base_cfg, args.image_drop_path)
    budget = apply_overrides(scale, model=model, batch_size=args.global_batch_size, lr=args.lr,
                             warmup=args.warmup, beta1=args.beta1, beta2=args.beta2, eps=args.eps,
                             wd=args.wd, samples_seen=args.samples_seen)
    return _checked_config(args, scale, budget, data=args.data, seed=args.seed or 0,
                           model_cfg=model_cfg)


def _rewind_config(args: argparse.Namespace) -> TrainConfig:
    """A rewind's config: the parent's budget and model with the new batch/LR/... flags."""
    given = [f for f, v in (("--model", args.model), ("--model-config", args.model_config),
                            ("--image-drop-path", args.image_drop_path),
                            ("--samples-seen", args.samples_seen)) if v is not None]
    if given:
        raise ValueError(f"a rewind keeps its parent's model and budget: drop {', '.join(given)}")
    _, parent = parent_config(args.rewind_from)
    if args.scale is not None and args.scale != parent.scale:
        raise ValueError(f"--scale {args.scale}: the parent ran at {parent.scale}")
    scale = get_train_scale(parent.scale)
    budget = apply_overrides(parent.budget, batch_size=args.global_batch_size, lr=args.lr,
                             warmup=args.warmup, beta1=args.beta1, beta2=args.beta2,
                             eps=args.eps, wd=args.wd)
    return _checked_config(args, scale, budget, data=args.data or parent.data,
                           seed=parent.seed if args.seed is None else args.seed,
                           model_cfg=parent.model_cfg, rewind_from=args.rewind_from,
                           rewind_at=args.rewind_at)


def _checked_config(args: argparse.Namespace, scale, budget, **run) -> TrainConfig:
    changed = list(budget_overrides(scale, budget)) + (["aug_cfg"] if args.aug_cfg else [])
    if changed and not args.allow_nonstandard:
        raise SystemExit(f"these flags change the {scale.name} budget: {', '.join(changed)}; "
                         "add --allow-nonstandard to run anyway (recorded as non-standard)")
    # JSON's form (tuples as lists), so that the config compares equal to config.json's
    aug_cfg = json.loads(json.dumps(args.aug_cfg)) if args.aug_cfg else None
    return TrainConfig(scale=scale.name, out=args.out, budget=budget, aug_cfg=aug_cfg, **run,
                       num_checkpoints=args.num_checkpoints,
                       delete_previous_checkpoint=args.delete_previous_checkpoint, precision=args.precision,
                       workers=args.workers, threads=args.threads,
                       torch_compile=args.torch_compile, local_loss=args.local_loss,
                       gather_with_grad=args.gather_with_grad,
                       grad_checkpointing=args.grad_checkpointing,
                       grad_clip_norm=args.grad_clip_norm, shuffle_buffer=args.shuffle_buffer,
                       log_every=args.log_every_n_steps, resume=args.resume, device=args.device,
                       tensorboard=not args.no_tensorboard, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> dict:
    from pools.cli import one_line_errors

    args = build_parser().parse_args(argv)
    with one_line_errors(argv, FileNotFoundError, ValueError):  # flags that do not fit: one line
        cfg = config_from_args(args)
    env = init_distributed(cfg.device)
    # the data, a checkpoint to resume or rewind from, a config that does not fit, a full disk
    try:
        with one_line_errors(argv, FileNotFoundError, ValueError, OSError):
            manifest = train(cfg, env)
    finally:
        shutdown(env)
    if env.is_master:
        print(json.dumps({k: manifest[k] for k in ("scale", "standard", "samples_seen", "steps",
                                                     "final_loss", "counters", "checkpoint")}))
    return manifest


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
