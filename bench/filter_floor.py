"""The floor of a filter strategy: the work no implementation of it can skip, timed.

    python bench/filter_floor.py --pool POOL --strategy basic [text ...] [--workers 2] [--lid-model M]

For the strategies given (together, as one `pipeline.filter` command would run them), the
floor is

- reading, from every metadata file, exactly the columns the strategies need (``uid`` plus
  what their rules read: `pipeline.strategies.required_metadata`), and
- running each language model (fastText, CLD3, and the WordNet lookup of the text filter) on
  the rows that need its label: those passing every cheaper rule of a strategy that reads it
  (`pipeline.strategies.signals_needed`, the gates the signals pass uses), each distinct
  caption once per worker (the model objects of `pipeline.models.MODELS`: captions repeat).

Everything else a filter command does is not in the floor: interpreter start-up and imports,
loading the models (``load_s``, reported), computing the cheap signals that decide which rows
need a label (``gate_s``, reported), scheduling, storing signals, the rule queries, sorting and
writing uid files. The files are dealt round-robin to ``--workers`` spawned processes (one
runs here), each loading its models before its clock starts; ``floor_s`` is the busiest
worker's read + label seconds, the wall time of the floor on that many cores.

Prints one JSON object: ``floor_s``, per-worker seconds, ``read_s`` and ``label_s`` (per
model group, summed over workers), ``labeled_rows`` per model group, ``gate_s``, ``load_s``.
Only strategies over metadata columns are supported (the image rules read the npz and a
centroid model; their floor is not defined here).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


class FloorError(ValueError):
    """The strategies have no floor here (e.g. they read embeddings)."""


@dataclass(frozen=True)
class FloorPlan:
    """What the floor of a set of strategies reads and labels (picklable: sent to each worker)."""

    strategies: tuple[str, ...]
    columns: tuple[str, ...]  # metadata columns read
    groups: tuple[str, ...]  # signal groups computed, in the pass's order
    model_groups: tuple[str, ...]  # the groups whose compute time is the floor's labelling
    gates: dict  # model group -> tuple of rule tuples (a row needs the label if it passes one)
    lid_model: str | None = None


def floor_plan(strategies: list[str], lid_model: str | None = None) -> FloorPlan:
    """The columns, model groups and gates of `strategies`, derived from the signal registry."""
    from filters.expressions import rule_columns
    from pipeline.models import ModelSettings
    from pipeline.signals import SIGNAL_GROUPS, column_groups, expand_groups, group_keys
    from pipeline.strategies import groups_needed, required_metadata, resolve_strategies, signals_needed

    specs = resolve_strategies(strategies)
    needed = groups_needed(specs)
    embedding = [g for g in needed if SIGNAL_GROUPS[g].npz_keys]
    if embedding:
        raise FloorError(f"{', '.join(strategies)} read embeddings ({', '.join(embedding)}): no floor defined")
    gates = signals_needed(specs, group_keys(needed, ModelSettings(lid_model=lid_model)))
    model_groups = tuple(g for g in needed if SIGNAL_GROUPS[g].models)
    rules = {g: tuple(gate.rules for gate in gates.get(g, ())) or ((),) for g in model_groups}
    # The groups computed: the model groups and whatever their gates and inputs read.
    owners = column_groups()
    gate_groups = {owners[c] for clauses in rules.values() for clause in clauses for r in clause
                   for c in rule_columns(r)}
    wanted = set(expand_groups([*model_groups, *gate_groups]))
    if "base" not in gate_groups:
        wanted.discard("base")  # uids and scores: only a gate over a score needs them here
    groups = tuple(g for g in expand_groups(wanted) if g in wanted)
    columns = tuple(dict.fromkeys(["uid", *required_metadata(specs, needed)]))
    return FloorPlan(strategies=tuple(s.name for s in specs), columns=columns, groups=groups,
                     model_groups=model_groups, gates=rules, lid_model=lid_model)


def _gate(clauses: tuple[tuple[str, ...], ...], columns: dict, n: int) -> np.ndarray:
    """Rows passing every rule of at least one clause."""
    from filters.expressions import rule_columns, rule_outcomes, signal_frame
    from pipeline.signals import _combined

    needed = sorted({c for clause in clauses for r in clause for c in rule_columns(r)})
    flat = list(dict.fromkeys(r for clause in clauses for r in clause))
    passes = {}
    if flat:
        frame = signal_frame({c: _combined(columns[c]) for c in needed})
        passes = {r: p for r, (p, _) in zip(flat, rule_outcomes(frame, flat))}
    mask = np.zeros(n, dtype=bool)
    for clause in clauses:
        keep = np.ones(n, dtype=bool)
        for r in clause:
            keep &= passes[r]
        mask |= keep
    return mask


def _load_models(plan: FloorPlan) -> dict:
    from pipeline.models import MODELS, ModelSettings
    from pipeline.signals import SIGNAL_GROUPS

    settings = ModelSettings(lid_model=plan.lid_model)
    return {m: MODELS[m].load(settings) for g in plan.groups for m in SIGNAL_GROUPS[g].models}


def _floor_files(plan: FloorPlan, files: list[str], models: dict) -> dict:
    from pipeline.signals import SIGNAL_GROUPS, _scatter, _take

    out = {"read_s": 0.0, "gate_s": 0.0, "rows": 0, "label_s": dict.fromkeys(plan.model_groups, 0.0),
           "labeled_rows": dict.fromkeys(plan.model_groups, 0)}
    for path in files:
        t = time.perf_counter()
        table = pq.ParquetFile(path).read(columns=list(plan.columns))
        out["read_s"] += time.perf_counter() - t
        n = table.num_rows
        out["rows"] += n
        columns: dict = {}
        for name in plan.groups:
            group = SIGNAL_GROUPS[name]
            inputs = {**{c: table.column(c) for c in group.reads},
                      **{c: table.column(c) if c in table.column_names else None for c in group.optional_reads},
                      **{m: models[m] for m in group.models}, **{c: columns[c] for c in group.signals}}
            if group.wants_file_name:
                inputs["file_name"] = Path(path).name
            rows = None
            if name in plan.gates:
                t = time.perf_counter()
                rows = np.flatnonzero(_gate(plan.gates[name], columns, n))
                inputs = {k: _take(v, rows) for k, v in inputs.items()}
                out["gate_s"] += time.perf_counter() - t
            t = time.perf_counter()
            result = group.compute(**inputs)
            seconds = time.perf_counter() - t
            if name in plan.model_groups:
                out["label_s"][name] += seconds
                out["labeled_rows"][name] += n if rows is None else len(rows)
            else:
                out["gate_s"] += seconds
            columns.update({c: _scatter(v, rows, n, None) if rows is not None else v for c, v in result.items()})
    out["floor_s"] = out["read_s"] + sum(out["label_s"].values())
    return out


def run_worker(plan: FloorPlan, files: list[str]) -> dict:
    """One worker's floor over `files`. A first, untimed pass over one file pays the one-time
    costs (lazy imports of Polars and Arrow's readers, first allocations) with throwaway
    models; then fresh models (their memos empty) are loaded and every file is timed."""
    _floor_files(plan, files[:1], _load_models(plan))
    started = time.perf_counter()
    models = _load_models(plan)
    load_s = time.perf_counter() - started
    return {**_floor_files(plan, files, models), "load_s": load_s}


def measure_floor(pool: Path, strategies: list[str], workers: int = 1, lid_model: str | None = None) -> dict:
    """The floor of `strategies` on `pool` with `workers` processes (see the module's doc)."""
    plan = floor_plan(strategies, lid_model)
    files = sorted(str(p) for p in (Path(pool) / "metadata").glob("*.parquet"))
    if not files:
        raise FloorError(f"{pool}/metadata holds no .parquet files")
    shares = [files[i::workers] for i in range(min(workers, len(files)))]
    if len(shares) == 1:
        per_worker = [run_worker(plan, shares[0])]
    else:
        with ProcessPoolExecutor(len(shares), mp_context=multiprocessing.get_context("spawn")) as pool_:
            per_worker = list(pool_.map(run_worker, [plan] * len(shares), shares))
    return {
        "strategies": list(plan.strategies), "columns": list(plan.columns), "files": len(files),
        "rows": sum(w["rows"] for w in per_worker), "workers": len(shares),
        "floor_s": round(max(w["floor_s"] for w in per_worker), 4),
        "per_worker_s": [round(w["floor_s"], 4) for w in per_worker],
        "read_s": round(sum(w["read_s"] for w in per_worker), 4),
        "label_s": {g: round(sum(w["label_s"][g] for w in per_worker), 4) for g in plan.model_groups},
        "labeled_rows": {g: sum(w["labeled_rows"][g] for w in per_worker) for g in plan.model_groups},
        "gate_s": round(sum(w["gate_s"] for w in per_worker), 4),
        "load_s": round(max(w["load_s"] for w in per_worker), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, required=True, help="pool folder (metadata/*.parquet)")
    parser.add_argument("--strategy", nargs="+", required=True, help="strategies, as pipeline.filter takes them")
    parser.add_argument("--workers", type=int, default=1, help="processes the files are dealt to (default %(default)s)")
    parser.add_argument("--lid-model", help="fastText model (default: the bundled lid.176.ftz, as pipeline.filter)")
    args = parser.parse_args(argv)
    from pipeline.strategies import SpecError

    try:
        result = measure_floor(args.pool, args.strategy, max(1, args.workers), args.lid_model)
    except (FloorError, SpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
