"""Where a training step's time goes: per-phase wall and CPU time, and torch.profiler's top ops.

    python bench/profile_step.py                      # tiny, batch 256, this process's threads
    python bench/profile_step.py --threads 1          # one compute thread (the 2-core default
                                                      # of trainer.train with one loader worker)
    python bench/profile_step.py --unfused            # the per-tensor AdamW loop, for comparison
    python bench/profile_step.py --loader             # also the data loader's CPU per batch

The step is trainer.train's (model, ClipLoss, trainer.train's AdamW) on random inputs, so the
data path is left out unless `--loader`, which times `trainer.data.epoch_loader` in this process
(decode, open_clip's transform, tokenizer) on a fresh synthetic pool. CPU time counts every
thread of this process: on a shared machine it is steadier than wall time, but spinning OpenMP
threads count too. Prints one JSON line, then the profiler's table.
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a trainer.models name (default tiny)")
    p.add_argument("--batch-size", type=int, default=256, help="samples a step (default 256, tiny's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps, after 3 warm-up ones")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--unfused", action="store_true", help="AdamW's per-tensor loop instead of fused")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--loader", action="store_true", help="also time the data loader per batch")
    p.add_argument("--table-rows", type=int, default=15, help="profiler rows to print")
    a = p.parse_args(argv)

    import torch
    from open_clip.loss import ClipLoss

    from trainer.config import get_train_scale
    from trainer.models import create_model
    from trainer.train import make_optimizer, param_groups

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, preprocess, _, tokenizer = create_model(a.model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    budget = get_train_scale("tiny")  # its optimiser settings
    optimizer = (torch.optim.AdamW(param_groups(model, budget.wd), lr=budget.lr,
                                   betas=(budget.beta1, budget.beta2), eps=budget.eps)
                 if a.unfused else make_optimizer(model, budget, "cpu"))
    run = torch.compile(model) if a.compile else model
    loss_fn = ClipLoss()
    images = torch.randn(a.batch_size, 3, size, size)
    texts = tokenizer(["a photo of a red star on a blue square"] * a.batch_size)
    state = {}

    def forward():
        optimizer.zero_grad(set_to_none=True)
        state["loss"] = loss_fn(*run(images, texts))

    parts = [("forward", forward), ("backward", lambda: state["loss"].backward()),
             ("optimizer", optimizer.step)]
    phase_times(parts, 3)  # warm-up (and compilation)
    result = {"model": a.model, "batch_size": a.batch_size, "threads": torch.get_num_threads(),
              "fused_adamw": not a.unfused, "compile": a.compile,
              "phases": phase_times(parts, a.steps)}
    result["step_ms"] = {k: round(sum(v[k] for v in result["phases"].values()), 1)
                         for k in ("wall_ms", "cpu_ms")}
    if a.loader:
        result["loader_cpu_ms_per_batch"] = loader_cpu_ms(preprocess, tokenizer, a.batch_size, 5)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        phase_times(parts, 2)
    print(json.dumps(result))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.table_rows))
    return result


if __name__ == "__main__":
    main()
