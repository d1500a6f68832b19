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
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pools.files import atomic_path, write_json_atomic
from trainer.checkpoint import find_resume, load_checkpoint, save_checkpoint, write_open_clip_dir
from trainer.config import (TRAIN_SCALES, TrainConfig, apply_overrides, budget_overrides,
                            get_train_scale)
from trainer.data import StreamSpec, epoch_loader, epoch_plan, expand_shards, rank_share
from trainer.distributed import (DistEnv, all_reduce_mean, all_reduce_sum_counts, barrier,
                                 init_distributed, shutdown)
from trainer.models import (MODEL_CONFIG_FILE, MODEL_CONFIGS_DIR, count_parameters, create_model,
                            model_config_record)


# --- pure pieces ------------------------------------------------------------------------------
def cosine_lr(step: int, base_lr: float, warmup: int, total_steps: int) -> float:
    """open_clip's schedule: linear warmup to base_lr, then cosine decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e, es = step - warmup, total_steps - warmup
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr if es > 0 else base_lr


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, norms and the logit scale."""
    def no_decay(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": wd}]


def autocast_for(precision: str, device: str):
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    if precision == "amp":
        return torch.autocast(dev_type, dtype=torch.float16)
    if precision in ("amp_bf16", "amp_bfloat16"):
        return torch.autocast(dev_type, dtype=torch.bfloat16)
    return nullcontext()


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
    out = Path(cfg.out)
    budget, scale = cfg.budget, get_train_scale(cfg.scale)
    overrides = budget_overrides(scale, budget)
    shards = tuple(expand_shards(cfg.data))
    plan = epoch_plan(budget.samples_seen, budget.batch_size, cfg.num_checkpoints)
    check_plan(plan, env.world_size)
    total_steps = sum(len(p) for p in plan)

    resume_from = find_resume(out, cfg.resume)
    if resume_from is None and (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("*.pt")):
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume latest to continue "
                              "it, or choose another --out")
    if env.is_master:
        out.mkdir(parents=True, exist_ok=True)
        _check_same_config(out, cfg, resuming=resume_from is not None)
        write_json_atomic(out / "config.json", cfg.to_json())
        record = model_config_record(budget.model)
        write_json_atomic(out / MODEL_CONFIG_FILE, record)
        write_json_atomic(out / MODEL_CONFIGS_DIR / f"{record['model_name']}.json", record["model_cfg"])
    barrier(env)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model, preprocess_train, _, tokenizer = create_model(budget.model, device=env.device)
    record = model_config_record(budget.model)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    bare = model
    if env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device] if env.device.startswith("cuda") else None,
            static_graph=True)
    optimizer = torch.optim.AdamW(param_groups(bare, budget.wd), lr=budget.lr,
                                  betas=(budget.beta1, budget.beta2), eps=budget.eps)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "amp" and env.device.startswith("cuda") else None
    from open_clip.loss import ClipLoss
    loss_fn = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                       cache_labels=True, rank=env.rank, world_size=env.world_size)

    start_epoch, step, seen = 0, 0, 0
    counters: Counter = Counter()
    losses: list[float] = []
    if resume_from is not None:
        ck = load_checkpoint(resume_from)
        bare.load_state_dict(ck["state_dict"])
        optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None and "scaler" in ck:
            scaler.load_state_dict(ck["scaler"])
        start_epoch, step, seen = ck["epoch"], ck["step"], ck["samples_seen"]
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
    for epoch in range(start_epoch, cfg.num_checkpoints):
        model.train()
        local = tuple(rank_share(n, env.world_size, env.rank) for n in plan[epoch])
        spec = StreamSpec(shards=shards, seed=cfg.seed, epoch=epoch, rank=env.rank,
                          local_batches=local, shuffle_buffer=cfg.shuffle_buffer)
        t_data = time.time()
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
            step_seconds.append(step_time)
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
            t_data = time.time()
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
        "scale": cfg.scale, "standard": not overrides, "overrides": overrides,
        "budget": asdict(budget), "samples_seen": seen, "steps": step,
        "checkpoint_intervals": cfg.num_checkpoints,
        "samples_per_interval": [sum(p) for p in plan],
        "world_size": env.world_size, "device": env.device, "precision": cfg.precision,
        "model_name": record["model_name"], "parameters": count_parameters(bare),
        "shards": len(shards), "data": cfg.data, "counters": counts,
        "final_loss": losses[-1] if losses else None,
        "resumed_from": str(resume_from) if resume_from else None,
        "wall_s_this_process": round(time.time() - t_start, 2),
        "steady_samples_per_second": _steady_rate(step_seconds, budget.batch_size),
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


def _steady_rate(step_seconds: list[float], global_batch: int, skip: int = 3) -> float | None:
    """Global samples per second over full steps, the first `skip` (warm-up) left out."""
    steady = step_seconds[skip:-1] if len(step_seconds) > skip + 1 else step_seconds
    return round(global_batch * len(steady) / sum(steady), 2) if steady and sum(steady) > 0 else None


def _check_same_config(out: Path, cfg: TrainConfig, *, resuming: bool) -> None:
    path = out / "config.json"
    if not resuming or not path.is_file():
        return
    old = TrainConfig.from_json(json.loads(path.read_text()))
    if old.budget != cfg.budget or old.data != cfg.data or old.seed != cfg.seed \
            or old.num_checkpoints != cfg.num_checkpoints:
        raise ValueError(f"{path}: the run was started with another budget, data, seed or "
                         "--num-checkpoints; resuming must keep them")


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
    p.add_argument("--scale", required=True, choices=list(TRAIN_SCALES), help="the fixed budget to train for")
    p.add_argument("--data", required=True,
                   help="shards: a folder of .tar, a resharded folder (meta.json), a pool root, a "
                        "brace pattern 'dir/{00000000..00000009}.tar'; join several with '::'")
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
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and every data stream (default 0)")
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
    g.add_argument("--model", default=None)
    g.add_argument("--global-batch-size", type=int, default=None, help="all processes together")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--warmup", type=int, default=None)
    g.add_argument("--beta1", type=float, default=None)
    g.add_argument("--beta2", type=float, default=None)
    g.add_argument("--eps", type=float, default=None)
    g.add_argument("--wd", type=float, default=None)
    g.add_argument("--samples-seen", type=int, default=None)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    scale = get_train_scale(args.scale)
    budget = apply_overrides(scale, model=args.model, batch_size=args.global_batch_size, lr=args.lr,
                             warmup=args.warmup, beta1=args.beta1, beta2=args.beta2, eps=args.eps,
                             wd=args.wd, samples_seen=args.samples_seen)
    changed = budget_overrides(scale, budget)
    if changed and not args.allow_nonstandard:
        raise SystemExit(f"these flags change the {scale.name} budget: {', '.join(changed)}; "
                         "add --allow-nonstandard to run anyway (recorded as non-standard)")
    return TrainConfig(scale=args.scale, data=args.data, out=args.out, budget=budget,
                       num_checkpoints=args.num_checkpoints,
                       delete_previous_checkpoint=args.delete_previous_checkpoint, precision=args.precision,
                       workers=args.workers, seed=args.seed, local_loss=args.local_loss,
                       gather_with_grad=args.gather_with_grad,
                       grad_checkpointing=args.grad_checkpointing,
                       grad_clip_norm=args.grad_clip_norm, shuffle_buffer=args.shuffle_buffer,
                       log_every=args.log_every_n_steps, resume=args.resume, device=args.device,
                       tensorboard=not args.no_tensorboard, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    env = init_distributed(cfg.device)
    try:
        manifest = train(cfg, env)
    except FileNotFoundError as exc:  # the data or a checkpoint to resume from: one line, no traceback
        if argv is not None:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        shutdown(env)
    if env.is_master:
        print(json.dumps({k: manifest[k] for k in ("scale", "standard", "samples_seen", "steps",
                                                     "final_loss", "counters", "checkpoint")}))
    return manifest


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
