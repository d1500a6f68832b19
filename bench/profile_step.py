"""Where a training step's time goes: per-phase wall and CPU time, and torch.profiler's top ops.

    python bench/profile_step.py                      # tiny, batch 256, this process's threads
    python bench/profile_step.py --threads 1          # one compute thread (the 2-core default
                                                      # of trainer.train with one loader worker)
    python bench/profile_step.py --precision amp_bf16 # trainer.train's bf16 autocast (on a CPU
                                                      # with its plain attention path)
    python bench/profile_step.py --unfused            # the per-tensor AdamW loop, for comparison
    python bench/profile_step.py --loader             # also the data loader's CPU per batch
    python bench/profile_step.py --model-config old_tiny.json   # another open_clip config file

The step is trainer.train's (model, ClipLoss, its autocast and AdamW) on random inputs, so the
data path is left out unless `--loader`, which times `trainer.data.epoch_loader` in this process
(decode, open_clip's transform, tokenizer) on a fresh synthetic pool. CPU time counts every
thread of this process: on a shared machine it is steadier than wall time, but spinning OpenMP
threads count too. Prints one JSON line (phases, forward FLOPs per sample of each tower, the
top ops by self CPU time per step), then the profiler's table. `bench/train.py` prints the same
breakdown beside its throughput figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def phase_times(step_parts, steps: int) -> dict[str, dict[str, float]]:
    """Mean wall and CPU milliseconds of each named phase over `steps` steps."""
    totals: dict[str, list[float]] = {}
    for _ in range(steps):
        for name, part in step_parts:
            w, c = time.perf_counter(), time.process_time()
            part()
            t = totals.setdefault(name, [0.0, 0.0])
            t[0] += time.perf_counter() - w
            t[1] += time.process_time() - c
    return {n: {"wall_ms": round(1000 * w / steps, 1), "cpu_ms": round(1000 * c / steps, 1)}
            for n, (w, c) in totals.items()}


def loader_cpu_ms(preprocess, tokenizer, batch_size: int, batches: int) -> float:
    """CPU milliseconds per batch of trainer.data's loader, read in this process."""
    from pools.synth import SynthConfig, generate
    from trainer.data import StreamSpec, epoch_loader, expand_shards

    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        generate(Path(tmp) / "pool", SynthConfig(samples=2000, seed=1))
        spec = StreamSpec(shards=tuple(expand_shards(str(Path(tmp) / "pool" / "shards"))), seed=0,
                          epoch=0, rank=0, local_batches=(batch_size,) * (batches + 1))
        it = iter(epoch_loader(spec, preprocess, tokenizer, workers=0))
        next(it)  # the shuffle buffer fills on the first batch
        c = time.process_time()
        for _ in range(batches):
            next(it)
        return round(1000 * (time.process_time() - c) / batches, 1)


def tower_flops_per_sample(model, tokenizer, size: int) -> dict[str, float]:
    """Forward FLOPs per sample of each tower (torch's FLOP counter: matmuls, attention, conv)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    images, texts = torch.zeros(2, 3, size, size), tokenizer(["a photo of a red star"] * 2)
    flops = {}
    for tower, run in (("image", lambda: model.encode_image(images)),
                       ("text", lambda: model.encode_text(texts))):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            run()
        flops[tower] = counter.get_total_flops() / 2
    return flops


def step_breakdown(model_name: str | dict = "tiny", *, batch_size: int = 256, steps: int = 10,
                   threads: int | None = None, precision: str = "fp32", unfused: bool = False,
                   compile_model: bool = False, loader: bool = False, top_ops: int = 10):
    """(breakdown dict, profiler) of trainer.train's step on random inputs, on the CPU; the
    model is a trainer.models name or a {"model_name", "model_cfg"} record."""
    import torch
    from open_clip.loss import ClipLoss
    from torch.profiler import ProfilerActivity, profile

    from trainer.config import get_train_scale
    from trainer.models import create_model
    from trainer.train import autocast_for, make_optimizer, param_groups

    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model, preprocess, _, tokenizer = create_model(model_name)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        budget = get_train_scale("tiny")  # its optimiser settings
        optimizer = (torch.optim.AdamW(param_groups(model, budget.wd), lr=budget.lr,
                                       betas=(budget.beta1, budget.beta2), eps=budget.eps)
                     if unfused else make_optimizer(model, budget, "cpu"))
        run = torch.compile(model) if compile_model else model
        loss_fn = ClipLoss()
        images = torch.randn(batch_size, 3, size, size)
        texts = tokenizer(["a photo of a red star on a blue square"] * batch_size)
        state = {}

        def forward():
            optimizer.zero_grad(set_to_none=True)
            with autocast_for(precision, "cpu"):
                state["loss"] = loss_fn(*run(images, texts))

        parts = [("forward", forward), ("backward", lambda: state["loss"].backward()),
                 ("optimizer", optimizer.step)]
        phase_times(parts, 3)  # warm-up (and compilation)
        result = {"model": model_name, "batch_size": batch_size, "threads": torch.get_num_threads(),
                  "precision": precision, "fused_adamw": not unfused, "compile": compile_model,
                  "phases": phase_times(parts, steps)}
        result["step_ms"] = {k: round(sum(v[k] for v in result["phases"].values()), 1)
                             for k in ("wall_ms", "cpu_ms")}
        result["forward_flops_per_sample"] = tower_flops_per_sample(model, tokenizer, size)
        if loader:
            result["loader_cpu_ms_per_batch"] = loader_cpu_ms(preprocess, tokenizer, batch_size, 5)
        profiled = 2
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            phase_times(parts, profiled)
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        result["top_ops_self_cpu_ms_per_step"] = {
            e.key: round(e.self_cpu_time_total / 1000 / profiled, 1) for e in ops[:top_ops]}
        return result, prof
    finally:
        torch.set_num_threads(threads_before)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a trainer.models name (default tiny)")
    p.add_argument("--model-config", default=None, metavar="FILE.json",
                   help="an open_clip model config file instead of --model (e.g. an older tiny)")
    p.add_argument("--batch-size", type=int, default=256, help="samples a step (default 256, tiny's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps, after 3 warm-up ones")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "amp_bf16"],
                   help="trainer.train's --precision (default fp32)")
    p.add_argument("--unfused", action="store_true", help="AdamW's per-tensor loop instead of fused")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--loader", action="store_true", help="also time the data loader per batch")
    p.add_argument("--table-rows", type=int, default=15, help="profiler rows to print")
    a = p.parse_args(argv)
    model = a.model
    if a.model_config:
        from trainer.models import read_model_config_file
        name, cfg = read_model_config_file(a.model_config)
        model = {"model_name": name, "model_cfg": cfg}
    result, prof = step_breakdown(model, batch_size=a.batch_size, steps=a.steps, threads=a.threads,
                                  precision=a.precision, unfused=a.unfused, compile_model=a.compile,
                                  loader=a.loader)
    print(json.dumps(result))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.table_rows))
    return result


if __name__ == "__main__":
    main()
