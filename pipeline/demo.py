"""The researcher's whole loop on a CPU, in minutes: ``python -m pipeline.demo``.

    python -m pipeline.demo [--out demo_out] [--seed 0] [--train-seeds 0 1 2]

Stages, each a call into the project's own command-line modules, in order:

1. **pool**: a synthetic CommonPool-style pool at the ``tiny`` scale (`pools.synth`), with its
   held-out evaluation set of the same concepts (``<out>/pool/eval``).
2. **teachers**: CommonPool's scores come from OpenAI's ViT-B/32 and ViT-L/14, trained on other
   data. Our stand-ins are trained here on *another* synthetic pool (a different seed: other
   images) restricted, by its ground truth, to English captions that match their image, then
   resharded (`pipeline.reshard`) and trained (`trainer.train`, models ``teacher-b32``
   (512-d) and ``teacher-l14`` (768-d)).
3. **score**: both teachers embed the pool's images and captions into CommonPool's score
   columns and npz (`pipeline.score`).
4. **centroids**: k-means over the pool's l14 image embeddings (`pipeline.centroids`).
5. **filter**: every DataComp strategy (`pipeline.filter --strategy all`) and the methods
   beyond them (`RESEARCH_STRATEGIES`: SemDeDup, CLIP after SemDeDup, negCLIPLoss with
   NormSim, CLIP without eval near-copies). The image-based and NormSim targets, DataComp's
   ImageNet training images, are here the teachers' clean training images of the same
   concepts, embedded by the l14 teacher; the contamination check embeds the eval set with it.
   The pool plants near-duplicate groups (`DEMO_DUPLICATES` of its rows) for SemDeDup to find
   and near-copies of eval images (`DEMO_EVAL_COPIES` rows) for the contamination check.
6. **reshard**: each subset into training shards (`pipeline.reshard`).
7. **train**: a ``tiny`` fixed-budget run per strategy and training seed (`trainer.train`).
8. **evaluate**: zero-shot top-1 on the synthetic eval set (`trainer.evaluate`).
9. **compare**: the table, CSV and chart (`trainer.compare`) and the HTML report
   (`pipeline.report`).

Every stage is resumable: finished stages leave a marker in ``<out>/.stages/`` recording the
settings they ran with, and are skipped by a rerun with the same settings; the modules
themselves resume half-done work (scoring per shard, resharding per task, training from the
last checkpoint). ``<out>/demo.json`` records each stage's wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.execution import EXECUTORS
from pools.files import write_json_atomic
from pools.scales import get_scale
from pools.uids import uids_to_records, write_subset

ARCHS = ("b32", "l14")
TEACHER_MODELS = {arch: f"teacher-{arch}" for arch in ARCHS}
# The teachers see only captions that describe their image, in English: the "clean web data"
# that OpenAI's CLIP stands for here.
TEACHER_CAPTION_KINDS = ("match_entity", "match_plain")
TEACHER_POOL_SEED_OFFSET = 1_000  # the teachers' pool: other images than the pool they score
DEMO_CHECKPOINTS = 5  # checkpoint intervals per run, as trainer.train's default
# Beyond DataComp's baselines (pipeline/specs/): filtered, trained and compared beside them.
RESEARCH_STRATEGIES = ("semdedup", "semdedup_clip", "negclip_normsim", "decontaminated")
DEMO_DUPLICATES = 0.15  # rows of the demo pool in planted near-duplicate groups (pools.synth --duplicates)
DEMO_EVAL_COPIES = 200  # rows of the demo pool whose image is a near-copy of an eval image (--eval-copies)
# negCLIPLoss's random batches: the paper's 32,768 would be most of a tiny pool; 4,096 keeps ten
# batches per round and the step to seconds on two cores.
DEMO_NEGCLIP_BATCH = 4096


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    out: Path = Path("demo_out")
    seed: int = 0  # the pool's seed; the teachers' pool uses seed + TEACHER_POOL_SEED_OFFSET
    scale: str = "tiny"
    pool_samples: int | None = None  # None: the scale's pool size
    teacher_pool_samples: int | None = None  # None: as pool_samples
    teacher_samples_seen: int | None = None  # None: half the scale's budget (clean pairs learn fast)
    samples_seen: int | None = None  # None: the scale's fixed budget (anything else is non-standard)
    strategies: tuple[str, ...] = ("all", *RESEARCH_STRATEGIES)
    train_seeds: tuple[int, ...] = (0,)
    eval_per_class: int | None = None  # None: pools.synth's default
    workers: int = 2  # data loader processes per training run
    executor: str = "auto"  # the pipeline stages' --executor (pipeline.execution)
    # trainer.train's --precision for every run; "auto": amp_bf16 where the CPU multiplies bf16
    # in hardware (AMX: the tiny step ~1.6x cheaper than in fp32), fp32 elsewhere
    precision: str = "auto"

    @property
    def pool(self) -> Path:
        return self.out / "pool"

    @property
    def eval_dir(self) -> Path:
        return self.pool / "eval"

    def teacher_budget(self) -> int:
        if self.teacher_samples_seen is not None:
            return self.teacher_samples_seen
        return get_scale(self.scale).samples_seen // 2

    def train_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        import torch

        from trainer.train import cpu_has_bf16_matmul
        return "amp_bf16" if not torch.cuda.is_available() and cpu_has_bf16_matmul() else "fp32"

    def pool_size(self) -> int:
        return self.pool_samples if self.pool_samples is not None else get_scale(self.scale).pool_samples


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


class Stages:
    """Runs named stages once: a stage whose marker records the same settings is skipped."""

    def __init__(self, out: Path):
        self.dir = out / ".stages"
        self.timings: dict[str, float] = {}

    def run(self, name: str, settings: dict[str, Any], fn: Callable[[], Any],
            outputs: Sequence[Path] = ()) -> Any:
        """`fn()` unless done with these settings; `outputs` made with other settings are removed."""
        marker = self.dir / f"{name}.json"
        settings = json.loads(json.dumps(settings, default=str))
        if marker.is_file():
            record = json.loads(marker.read_text())
            if record.get("settings") == settings:
                _log(f"{name}: done before, reused")
                self.timings[name] = 0.0
                return record.get("result")
            # Made from other inputs: resuming into it would mix old and new work.
            _log(f"{name}: settings changed since the last run; starting it again")
            for path in outputs:
                shutil.rmtree(path, ignore_errors=True)
            marker.unlink()
        _log(f"{name}: running")
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        self.timings[name] = round(elapsed, 2)
        write_json_atomic(marker, {"settings": settings, "result": result, "seconds": round(elapsed, 2)})
        _log(f"{name}: done in {elapsed:.1f} s")
        return result


# --- the stages -------------------------------------------------------------------------------
def make_pool(cfg: DemoConfig) -> dict:
    from pools.synth import SynthConfig, generate

    synth = SynthConfig(samples=cfg.pool_size(), seed=cfg.seed, duplicates=DEMO_DUPLICATES,
                        eval_copies=DEMO_EVAL_COPIES)
    if cfg.eval_per_class is not None:
        synth = replace(synth, eval_per_class=cfg.eval_per_class)
    summary = generate(cfg.pool, synth)
    return {"rows": summary["rows"], "shard_samples": summary["shard_samples"],
            "composition": summary["composition"]}


def teacher_data(cfg: DemoConfig, teachers: Path) -> dict:
    """Clean pairs for the teachers: another synthetic pool, kept to its matching English captions."""
    from pipeline.reshard import main as reshard_main
    from pools.synth import SynthConfig, generate

    pool = teachers / "pool"
    samples = cfg.teacher_pool_samples if cfg.teacher_pool_samples is not None else cfg.pool_size()
    generate(pool, SynthConfig(samples=samples, seed=cfg.seed + TEACHER_POOL_SEED_OFFSET,
                               eval_per_class=1))
    truth = pq.read_table(pool / "ground_truth.parquet", columns=["uid", "caption_kind", "downloaded"])
    clean = pc.and_(pc.is_in(truth["caption_kind"], value_set=pa.array(TEACHER_CAPTION_KINDS)),
                    truth["downloaded"])
    subset = teachers / "clean_pairs.npy"
    write_subset(subset, uids_to_records(truth.filter(clean)["uid"]))
    meta = reshard_main(["--pool", str(pool), "--subset", str(subset), "--out", str(teachers / "data"),
                         "--executor", cfg.executor])
    return {"clean_pairs": int(pc.sum(clean).as_py()), "shards": meta.get("output_shard_count")}


def train_run(cfg: DemoConfig, data: Path, out: Path, *, seed: int, model: str | None = None,
              samples_seen: int | None = None) -> dict:
    from trainer.config import get_train_scale
    from trainer.train import main as train_main

    budget = get_train_scale(cfg.scale)
    # A small demo's budget may hold fewer batches than the usual checkpoint intervals.
    batches = (samples_seen or budget.samples_seen) // budget.batch_size
    argv = ["--scale", cfg.scale, "--data", str(data), "--out", str(out), "--seed", str(seed),
            "--resume", "latest", "--workers", str(cfg.workers), "--delete-previous-checkpoint",
            "--precision", cfg.train_precision(),
            "--num-checkpoints", str(max(1, min(DEMO_CHECKPOINTS, batches)))]
    nonstandard = []
    if model is not None:
        nonstandard += ["--model", model]
    if samples_seen is not None:
        nonstandard += ["--samples-seen", str(samples_seen)]
    manifest = train_main(argv + (nonstandard + ["--allow-nonstandard"] if nonstandard else []))
    return {k: manifest[k] for k in ("samples_seen", "steps", "final_loss", "standard")}


def score_pool(cfg: DemoConfig, teacher: Path, arch: str) -> dict:
    from pipeline.score import main as score_main

    summary = score_main(["--pool", str(cfg.pool), "--model", str(teacher), "--as", arch,
                          "--executor", cfg.executor])
    return {k: summary[k] for k in ("rows", "scored", "missing_from_shards", "image_decode_failed")}


def run_demo(cfg: DemoConfig) -> dict:
    from pipeline.centroids import main as centroids_main
    from pipeline.filter import main as filter_main
    from pipeline.reshard import main as reshard_main
    from pipeline.strategies import is_spec_path, resolve_strategies
    from trainer.config import get_train_scale
    from trainer.evaluate import evaluate
    from trainer.models import model_config_record

    started = time.perf_counter()
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    executor = ["--executor", cfg.executor]
    specs = {s.name: s for s in resolve_strategies(list(cfg.strategies))}
    strategies = list(specs)
    spec_files = [name for name in cfg.strategies if is_spec_path(name)]

    # What each stage's outputs depend on: a change upstream invalidates everything below it.
    pool_settings = {"seed": cfg.seed, "scale": cfg.scale, "pool_samples": cfg.pool_size(),
                     "eval_per_class": cfg.eval_per_class, "duplicates": DEMO_DUPLICATES,
                     "eval_copies": DEMO_EVAL_COPIES}
    teacher_data_settings = {"seed": cfg.seed, "teacher_pool_samples": cfg.teacher_pool_samples}
    # a run's model and precision: a changed tiny config or precision retrains, never resumes
    precision = cfg.train_precision()
    model_settings = {"precision": precision, "model": model_config_record(get_train_scale(cfg.scale).model)}
    teacher_settings = {**teacher_data_settings, "teacher_samples_seen": cfg.teacher_budget(),
                        "precision": precision,
                        "model": [model_config_record(TEACHER_MODELS[a]) for a in ARCHS]}
    scored_settings = {**pool_settings, "teachers": teacher_settings}

    stages.run("pool", pool_settings, lambda: make_pool(cfg), outputs=[cfg.pool])
    teachers = out / "teachers"
    stages.run("teacher_data", teacher_data_settings, lambda: teacher_data(cfg, teachers),
               outputs=[teachers / "pool", teachers / "data"])
    for arch in ARCHS:
        stages.run(f"teacher_{arch}", teacher_settings,
                   lambda arch=arch: train_run(cfg, teachers / "data", teachers / arch, seed=cfg.seed,
                                               model=TEACHER_MODELS[arch],
                                               samples_seen=cfg.teacher_budget()),
                   outputs=[teachers / arch])
    for arch in ARCHS:
        stages.run(f"score_{arch}", scored_settings, lambda arch=arch: score_pool(cfg, teachers / arch, arch))
    centroids = cfg.pool / "centroids" / f"{cfg.scale}_centroids_l14.npy"
    stages.run("centroids", scored_settings,
               lambda: centroids_main(["--pool", str(cfg.pool), "--scale", cfg.scale, "--out", str(centroids),
                                       "--seed", str(cfg.seed), *executor]))
    subsets = out / "subsets"
    # Every built-in strategy is filtered (seconds), with the user's spec files; --strategy picks
    # what trains. A strategy's later stages depend on its own spec only.
    filter_settings = {**scored_settings, "spec_files": {specs[n].source: specs[n].hash for n in specs
                                                         if specs[n].source != "builtin"},
                       "research": [specs[n].hash if n in specs else n for n in RESEARCH_STRATEGIES],
                       "negclip_batch": DEMO_NEGCLIP_BATCH}
    strategy_settings = {n: {**scored_settings, "spec": specs[n].hash} for n in strategies}
    stages.run("filter", filter_settings,
               lambda: _filter_summary(filter_main([
                   "--pool", str(cfg.pool), "--scale", cfg.scale, "--strategy", "all", *RESEARCH_STRATEGIES,
                   *spec_files, "--centroids", str(centroids), "--targets", str(teachers / "data"),
                   "--targets-model", str(teachers / "l14"), "--eval-sets", f"synth={cfg.eval_dir}",
                   "--negclip-batch-size", str(DEMO_NEGCLIP_BATCH), "--out", str(subsets), *executor])),
               outputs=[subsets])
    empty = []
    for name in strategies:
        resharded = stages.run(f"reshard_{name}", strategy_settings[name],
                               lambda name=name: _reshard_summary(reshard_main([
                                   "--pool", str(cfg.pool), "--subset", str(subsets / f"{name}.npy"),
                                   "--out", str(out / "shards" / name),
                                   *executor])),
                               outputs=[out / "shards" / name])
        if resharded["output_count"] == 0:
            empty.append(name)
    if empty:
        _log(f"not trained: {', '.join(empty)} kept no sample with an image (see {subsets / 'stats.json'})")

    runs = []
    for name in (s for s in strategies if s not in empty):
        train_settings = {**strategy_settings[name], "samples_seen": cfg.samples_seen, **model_settings}
        for seed in cfg.train_seeds:
            run = out / "runs" / f"{name}-seed{seed}"
            runs.append(run)
            stages.run(f"train_{name}_seed{seed}", train_settings,
                       lambda name=name, run=run, seed=seed: train_run(
                           cfg, out / "shards" / name, run, seed=seed, samples_seen=cfg.samples_seen),
                       outputs=[run])
            stages.run(f"evaluate_{name}_seed{seed}", {**train_settings, "eval": str(cfg.eval_dir)},
                       lambda run=run: evaluate(run, tasks=[f"synth={cfg.eval_dir}"]))

    from pipeline.report import main as report_main
    from trainer.compare import compare_runs

    comparison = out / "comparison"
    compare_runs(runs, comparison)  # the table is printed once, at the end
    report = out / "report.html"
    report_main(["--pool", str(cfg.pool), "--subsets", str(subsets), "--runs", *map(str, runs),
                 "--out", str(report)])
    summary = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
               "stage_seconds": stages.timings, "total_s": round(time.perf_counter() - started, 1),
               "comparison": str(comparison), "report": str(report), "runs": [str(r) for r in runs],
               "not_trained_empty_subset": empty}
    write_json_atomic(out / "demo.json", summary)
    return summary


def _filter_summary(stats: dict) -> dict:
    return {name: s.get("kept") for name, s in stats.get("strategies", {}).items()}


def _reshard_summary(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("output_count", "output_shard_count")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DemoConfig.out, help="folder for everything (default %(default)s)")
    p.add_argument("--seed", type=int, default=DemoConfig.seed, help="the synthetic pool's seed (default 0)")
    p.add_argument("--train-seeds", type=int, nargs="+", default=list(DemoConfig.train_seeds),
                   help="a training run per strategy and seed; several give the seed-to-seed noise "
                        "(default: 0)")
    p.add_argument("--strategy", nargs="+", default=list(DemoConfig.strategies), dest="strategies",
                   help="strategies to compare: built-in names, all (DataComp's baselines), and strategy files "
                        "(.toml), which are filtered, trained and compared beside the built-ins (default: all "
                        f"{' '.join(RESEARCH_STRATEGIES)})")
    p.add_argument("--workers", type=int, default=DemoConfig.workers, help="data loader processes per run")
    p.add_argument("--executor", choices=EXECUTORS, default=DemoConfig.executor,
                   help="the pipeline stages' executor: auto (default), local or ray (see pipeline/execution.py)")
    p.add_argument("--precision", default=DemoConfig.precision, choices=["auto", "fp32", "amp_bf16"],
                   help="trainer.train's --precision for the teachers and every run (default auto: "
                        "amp_bf16 on a CPU with AMX, which multiplies bf16 in hardware; else fp32)")
    g = p.add_argument_group("a smaller demo (tests, quick looks; the runs are then non-standard)")
    g.add_argument("--pool-samples", type=int, default=None, help="rows in the pool (default: the scale's)")
    g.add_argument("--teacher-pool-samples", type=int, default=None)
    g.add_argument("--teacher-samples-seen", type=int, default=None)
    g.add_argument("--samples-seen", type=int, default=None, help="training budget per run")
    g.add_argument("--eval-per-class", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = DemoConfig(out=args.out, seed=args.seed, train_seeds=tuple(args.train_seeds),
                     strategies=tuple(args.strategies), workers=args.workers, executor=args.executor,
                     precision=args.precision,
                     pool_samples=args.pool_samples, teacher_pool_samples=args.teacher_pool_samples,
                     teacher_samples_seen=args.teacher_samples_seen, samples_seen=args.samples_seen,
                     eval_per_class=args.eval_per_class)
    summary = run_demo(cfg)
    table = Path(summary["comparison"]) / "comparison.md"
    if table.is_file():
        print(table.read_text())
    print(f"report: {summary['report']}\ncomparison: {summary['comparison']}\n"
          f"total: {summary['total_s']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
