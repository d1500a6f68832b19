"""Which curation made the better CLIP model: a table and a chart over finished runs.

    python -m trainer.compare runs/basic-seed0 runs/basic-seed1 runs/clip-seed0 --out comparison

Reads, per run folder (written by `trainer.train`, then `trainer.evaluate`):

- ``manifest.json``: scale, model, budget, samples seen and the data it trained on;
- ``config.json``: the training seed (optional; without it the seed is unknown);
- ``eval_results.jsonl``: DataComp's format, one ``{"key", "dataset", "metrics": {...,
  "main_metric"}}`` per task;
- the data's ``meta.json`` (`pipeline.reshard`, or DataComp's resharder): the subset file
  the shards were made from, whose name is the strategy (``subsets/clip.npy`` -> ``clip``),
  and the subset's size. Plain shard folders (no meta.json) count every sample in their
  ``_stats.json`` files, and the strategy is the run folder's name less a ``-seed<N>`` suffix;
- the ``stats.json`` that `pipeline.filter` wrote beside the subset file: the strategy's spec
  (its description and hash). Runs of two different specs under one name are two rows.

Runs of the same strategy, data, scale, model and budget are one row: mean ± sample std over
them (several training seeds) and their count n. Rows are sorted by the main metric, best
first: ImageNet top-1 when every run has ``imagenet1k``, else top-1 of the first task every
run has. The group averages of DataComp's ``aggregate_scores.py`` (ImageNet dist. shifts,
VTAB, Retrieval; `trainer.datacomp_tasks`) are columns where some row has a whole group, filled
for rows whose every run has it; DataComp's average (the mean of ``main_metric`` over its 38
tasks) is filled only for runs evaluated on all 38.

Writes to ``--out`` (atomically): ``comparison.md`` (also printed), ``comparison.csv`` (one
row per strategy, numbers unformatted), ``comparison_runs.csv`` (one row per run),
``comparison.png`` (the main metric per strategy, error bars = std over runs) and
``comparison.json`` (everything above, which `pipeline.report --comparison` reads).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from pools.files import atomic_path, write_json_atomic
from trainer.datacomp_tasks import (AVERAGE, GROUP_TASKS, GROUPS, IMAGENET_GROUP, MAIN_METRICS,
                                    aggregate_scores, main_metric_values)

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
RESULTS_FILE = "eval_results.jsonl"  # trainer.evaluate's (and DataComp's) name
META_FILE = "meta.json"  # pipeline.reshard's (and DataComp's resharder's) name
FILTER_STATS_FILE = "stats.json"  # pipeline.filter's, beside the subset files
IMAGENET_KEY = "imagenet1k"
OUTPUT_FILES = {"markdown": "comparison.md", "csv": "comparison.csv", "runs_csv": "comparison_runs.csv",
                "chart": "comparison.png", "json": "comparison.json"}

# DataComp's 38 scored tasks, key -> main metric, and aggregate_scores.py's groups: one table,
# trainer.datacomp_tasks, which trainer.evaluate --datacomp-dir also reads.
DATACOMP_TASKS = MAIN_METRICS
# The groups shown as columns; "ImageNet" is imagenet1k alone, already the main metric.
GROUP_COLUMNS = tuple(g for g in GROUPS if g != IMAGENET_GROUP)
MAIN_METRIC_ALIAS = "main_metric"
SEED_SUFFIX = re.compile(r"[-_]seed[-_]?\d+$")


class CompareError(ValueError):
    """A run cannot be compared; the message names the run and the file."""


# --- records ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubsetSpec:
    """What `pipeline.filter` recorded of the strategy that made a subset."""

    description: str
    spec_hash: str


@dataclass(frozen=True)
class RunRecord:
    """What one run contributes: where its data came from, its budget and its results."""

    run: str
    strategy: str
    seed: int | None
    scale: str
    model: str
    standard: bool  # the scale's fixed budget, unchanged
    samples_seen: int
    data: str
    subset_size: int | None  # unique uids in the subset
    with_image: int | None  # of those, the ones whose image is in the training shards
    results: dict[str, dict[str, float]]  # task key -> numeric metrics, as in the file
    spec: SubsetSpec | None = None  # the strategy's spec, from pipeline.filter's stats.json


    @property
    def repeats(self) -> float | None:
        return self.samples_seen / self.subset_size if self.subset_size else None


@dataclass(frozen=True)
class MetricColumn:
    task: str
    metric: str  # a key of the task's metrics
    header: str


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None  # sample std (ddof 1); None for a single run
    n: int


@dataclass(frozen=True)
class StrategyRow:
    """One strategy's runs (its seeds) summarised."""

    label: str
    strategy: str
    runs: tuple[str, ...]
    seeds: tuple[int | None, ...]
    scale: str
    model: str
    standard: bool
    samples_seen: int
    subset_size: int | None
    with_image: int | None
    spec: SubsetSpec | None
    main: Stat
    metrics: dict[str, Stat | None]  # column header -> stat (None: a run lacks it)
    average: Stat | None  # DataComp's 38-task average (None unless every run has all 38)
    # aggregate_scores.py's group means (GROUP_COLUMNS); None unless every run has the whole group
    groups: dict[str, Stat | None] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def repeats(self) -> float | None:
        return self.samples_seen / self.subset_size if self.subset_size else None


@dataclass(frozen=True)
class Comparison:
    main: MetricColumn
    main_rule: str
    columns: tuple[MetricColumn, ...]
    rows: tuple[StrategyRow, ...]  # best main metric first
    runs: tuple[RunRecord, ...]
    footnotes: tuple[str, ...]
    files: dict[str, str] = field(default_factory=dict)  # what write_comparison wrote

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Comparison":
        def stat(s):
            return Stat(**s) if s is not None else None

        def spec(s):  # comparisons written before specs were recorded have none
            return SubsetSpec(**s) if s else None

        rows = tuple(StrategyRow(**{**r, "runs": tuple(r["runs"]), "seeds": tuple(r["seeds"]),
                                    "spec": spec(r.get("spec")),
                                    "main": stat(r["main"]), "average": stat(r["average"]),
                                    "groups": {k: stat(v) for k, v in r.get("groups", {}).items()},
                                    "metrics": {k: stat(v) for k, v in r["metrics"].items()}})
                     for r in d["rows"])
        return cls(main=MetricColumn(**d["main"]), main_rule=d["main_rule"],
                   columns=tuple(MetricColumn(**c) for c in d["columns"]), rows=rows,
                   runs=tuple(RunRecord(**{**r, "spec": spec(r.get("spec"))}) for r in d["runs"]), footnotes=tuple(d["footnotes"]),
                   files=dict(d.get("files", {})))


# --- reading a run (the boundary where data enters) -------------------------------------------
def _read_json(run: Path, name: str, *, required: bool = True) -> dict | None:
    path = run / name
    if not path.is_file():
        if not required:
            return None
        hint = "; trainer.train writes it when the run finishes" if name == MANIFEST_FILE else ""
        raise CompareError(f"run {run}: {path} is missing{hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CompareError(f"run {run}: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CompareError(f"run {run}: {path} holds {type(data).__name__}, expected a JSON object")
    return data


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_eval_results(run: Path) -> dict[str, dict[str, float]]:
    """task key -> numeric metrics of `<run>/eval_results.jsonl`; later lines of a key win."""
    path = run / RESULTS_FILE
    if not path.is_file():
        raise CompareError(f"run {run}: {path} is missing; run `python -m trainer.evaluate --run {run} "
                           "--tasks NAME=DIR` (or --imagenet DIR) first")
    results: dict[str, dict[str, float]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise CompareError(f"run {run}: {path} line {n} is not JSON ({exc})") from None
        if not (isinstance(entry, dict) and isinstance(entry.get("key"), str)
                and isinstance(entry.get("metrics"), dict)):
            raise CompareError(f"run {run}: {path} line {n} is not a result line "
                               '{"key": TASK, "dataset": NAME, "metrics": {...}}')
        results[entry["key"]] = {k: float(v) for k, v in entry["metrics"].items() if _is_number(v)}
    if not results:
        raise CompareError(f"run {run}: {path} holds no results; run trainer.evaluate on it")
    return results


def _first_data_folder(spec: str) -> Path | None:
    parts = spec.split("::")
    return Path(parts[0]) if len(parts) == 1 and "{" not in spec else None


def _shard_folder_size(folder: Path) -> int | None:
    """Samples in a plain shard folder (a pool's shards/ or a hand-made one): its _stats.json."""
    if not folder.is_dir():
        return None
    shards = folder / "shards" if (folder / "shards").is_dir() else folder
    total, found = 0, False
    for stats in sorted(shards.glob("*_stats.json")):
        try:
            total += int(json.loads(stats.read_text())["successes"])
            found = True
        except (ValueError, KeyError, TypeError):
            return None
    return total if found else None


def _count_unique_uids(path: Path) -> int | None:
    from pools.uids import count_unique_sorted
    from pools.uids import read_subset

    try:
        return count_unique_sorted(read_subset(path))
    except (OSError, ValueError):
        return None


def subset_spec(subset_file: Path) -> SubsetSpec | None:
    """The spec of the strategy that wrote `subset_file`, from the ``stats.json`` beside it
    (`pipeline.filter`'s), or None (a subset made elsewhere, or moved without its stats)."""
    try:
        entry = json.loads((subset_file.parent / FILTER_STATS_FILE).read_text(encoding="utf-8"))
        entry = entry["strategies"][subset_file.stem]
        return SubsetSpec(description=str(entry["description"]), spec_hash=str(entry["spec_hash"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def data_provenance(run: Path, data: str) -> tuple[str, int | None, int | None, SubsetSpec | None, str | None]:
    """(strategy, subset size, samples with an image, the strategy's spec, note) of the data a
    run trained on."""
    fallback = SEED_SUFFIX.sub("", run.name) or run.name  # seeds of one strategy share a row
    folder = _first_data_folder(data)
    if folder is None:
        return (fallback, None, None, None,
                f"{run.name}: trained on several shard sources ({data}); subset size unknown")
    meta_path = folder / META_FILE
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CompareError(f"run {run}: its data's {meta_path} is not valid JSON ({exc})") from None
        subset_file = meta.get("subset_file")
        strategy = Path(subset_file).stem if subset_file else fallback
        unique = meta.get("subset_unique_uids")
        if unique is None:  # a meta.json without our counts: count the subset copied beside the shards
            unique = _count_unique_uids(folder / "sample_ids.npy")
        selected = meta.get("selected_count")
        spec = subset_spec(Path(subset_file)) if subset_file else None
        return strategy, (int(unique) if unique is not None else None), \
            (int(selected) if selected is not None else None), spec, None
    if not folder.exists():
        return fallback, None, None, None, f"{run.name}: its data {folder} no longer exists; subset size unknown"
    size = _shard_folder_size(folder)
    note = None if size is not None else f"{run.name}: {folder} has no meta.json or _stats.json; subset size unknown"
    return fallback, size, size, None, note


def read_run(run: str | Path) -> tuple[RunRecord, str | None]:
    """One run folder as a record, and a note when part of it could not be known."""
    run = Path(run)
    if not run.is_dir():
        raise CompareError(f"run {run}: no such folder")
    manifest = _read_json(run, MANIFEST_FILE)
    config = _read_json(run, CONFIG_FILE, required=False) or {}
    try:
        samples_seen = int(manifest["samples_seen"])
        data = str(manifest.get("data") or config["data"])
        scale = str(manifest["scale"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CompareError(f"run {run}: {run / MANIFEST_FILE} lacks {exc} (samples_seen, scale and "
                           "data are needed); was it written by trainer.train?") from None
    model = str(manifest.get("model_name") or manifest.get("budget", {}).get("model", "?"))
    seed = config.get("seed")
    results = read_eval_results(run)
    strategy, subset_size, with_image, spec, note = data_provenance(run, data)
    record = RunRecord(run=str(run), strategy=strategy, seed=int(seed) if seed is not None else None,
                       scale=scale, model=model, standard=bool(manifest.get("standard", True)),
                       samples_seen=samples_seen, data=data, subset_size=subset_size,
                       with_image=with_image, results=results, spec=spec)
    return record, note


# --- the comparison (pure) --------------------------------------------------------------------
def main_metric_name(task: str, metrics: dict[str, float]) -> str:
    """The metric a task's `main_metric` stands for: DataComp's table, else the one equal to it."""
    if task in DATACOMP_TASKS and DATACOMP_TASKS[task] in metrics:
        return DATACOMP_TASKS[task]
    main = metrics.get(MAIN_METRIC_ALIAS)
    for name, value in metrics.items():
        if name != MAIN_METRIC_ALIAS and value == main:
            return name
    return MAIN_METRIC_ALIAS


def choose_main(runs: Sequence[RunRecord]) -> tuple[MetricColumn, str]:
    """ImageNet top-1 when every run has it, else top-1 of the first task (in the first run's
    file order) that every run has; when no shared task has top-1, the first one's main_metric."""
    common = [t for t in runs[0].results if all(t in r.results for r in runs)]
    if not common:
        listing = "; ".join(f"{Path(r.run).name}: {', '.join(r.results)}" for r in runs)
        raise CompareError(f"the runs share no evaluation task, so there is nothing to compare ({listing}); "
                           "evaluate them on the same tasks")
    rule = ("main metric: ImageNet top-1 (imagenet1k acc1) when every run has it, else top-1 of the "
            "first task every run was evaluated on")
    with_acc1 = [t for t in common if all("acc1" in r.results[t] for r in runs)]
    if with_acc1:
        task = IMAGENET_KEY if IMAGENET_KEY in with_acc1 else with_acc1[0]
        header = ("ImageNet top-1 (main)" if task == IMAGENET_KEY
                  else f"{task} top-1 (main: no ImageNet, so the first task)")
        return MetricColumn(task, "acc1", header), rule
    with_main = [t for t in common if all(MAIN_METRIC_ALIAS in r.results[t] for r in runs)]
    if not with_main:
        raise CompareError(f"no task the runs share ({', '.join(common)}) has acc1 or main_metric in every run")
    task = with_main[0]
    metric = main_metric_name(task, runs[0].results[task])
    return MetricColumn(task, MAIN_METRIC_ALIAS, f"{task} {metric} (main)"), \
        rule + f"; no shared task has top-1, so {task}'s main_metric ({metric})"


def other_columns(runs: Sequence[RunRecord], main: MetricColumn) -> tuple[MetricColumn, ...]:
    """The main task's other metrics, then every other task's main metric (first-seen order).
    Counts (num_*) are not metrics; main_metric duplicates a named metric."""
    cols: list[MetricColumn] = []
    main_metrics: list[str] = []
    for r in runs:
        for m in r.results.get(main.task, {}):
            if m not in main_metrics and m not in (main.metric, MAIN_METRIC_ALIAS) and not m.startswith("num_"):
                main_metrics.append(m)
    cols += [MetricColumn(main.task, m, f"{main.task} {m}") for m in main_metrics]
    tasks: list[str] = []
    for r in runs:
        tasks += [t for t in r.results if t != main.task and t not in tasks]
    for t in tasks:
        first = next(r.results[t] for r in runs if t in r.results)
        metric = MAIN_METRIC_ALIAS if MAIN_METRIC_ALIAS in first else main_metric_name(t, first)
        cols.append(MetricColumn(t, metric, f"{t} {main_metric_name(t, first)}"))
    return tuple(cols)


def datacomp_average(results: dict[str, dict[str, float]]) -> float | None:
    """DataComp's average: the mean main metric over its 38 tasks; None unless all are present."""
    return group_average(results, AVERAGE)


def group_average(results: dict[str, dict[str, float]], group: str) -> float | None:
    """One of aggregate_scores.py's numbers for a run; None unless the run has the whole group."""
    score = aggregate_scores(main_metric_values(results))[group]
    return score.value if score.complete else None


def summarise(values: Sequence[float | None]) -> Stat | None:
    """Mean ± sample std (ddof 1) of runs' values; None when any run lacks the value."""
    if not values or any(v is None for v in values):
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Stat(mean=mean, std=std, n=n)


def _group_key(r: RunRecord) -> tuple:
    # Seeds of one strategy share all of these; a different spec, budget or data is another row.
    return (r.strategy, r.spec.spec_hash if r.spec else None, str(Path(r.data)), r.scale, r.samples_seen, r.model)


def _value(r: RunRecord, col: MetricColumn) -> float | None:
    return r.results.get(col.task, {}).get(col.metric)


def _labels(groups: list[list[RunRecord]]) -> list[str]:
    """Strategy names, made unique where two rows share one (other budget, scale or data)."""
    names = [g[0].strategy for g in groups]
    labels = []
    for g, name in zip(groups, names):
        if names.count(name) == 1:
            labels.append(name)
            continue
        same = [h for h, m in zip(groups, names) if m == name]
        r = g[0]
        if len({h[0].spec for h in same}) > 1:
            labels.append(f"{name} (spec {r.spec.spec_hash[:8]})" if r.spec else f"{name} (no spec)")
        elif len({h[0].samples_seen for h in same}) > 1 or len({h[0].scale for h in same}) > 1:
            labels.append(f"{name} ({r.scale}, {r.samples_seen:,} seen)")
        elif len({h[0].model for h in same}) > 1:
            labels.append(f"{name} ({r.model})")
        else:
            labels.append(f"{name} ({r.data})")
    return labels


def compare_records(runs: Sequence[RunRecord], notes: Sequence[str] = ()) -> Comparison:
    """The comparison of already-read runs: one row per strategy, best main metric first."""
    if not runs:
        raise CompareError("no runs to compare")
    main, rule = choose_main(runs)
    columns = other_columns(runs, main)
    groups: dict[tuple, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(_group_key(r), []).append(r)
    group_list = list(groups.values())
    rows = []
    for label, g in zip(_labels(group_list), group_list):
        first = g[0]
        rows.append(StrategyRow(
            label=label, strategy=first.strategy, runs=tuple(r.run for r in g),
            seeds=tuple(r.seed for r in g), scale=first.scale, model=first.model,
            standard=all(r.standard for r in g), samples_seen=first.samples_seen,
            subset_size=first.subset_size, with_image=first.with_image, spec=first.spec,
            main=summarise([_value(r, main) for r in g]),
            metrics={c.header: summarise([_value(r, c) for r in g]) for c in columns},
            average=summarise([datacomp_average(r.results) for r in g]),
            groups={grp: summarise([group_average(r.results, grp) for r in g]) for grp in GROUP_COLUMNS}))
    rows.sort(key=lambda row: (-row.main.mean, row.label))
    return Comparison(main=main, main_rule=rule, columns=columns, rows=tuple(rows), runs=tuple(runs),
                      footnotes=tuple(_footnotes(runs, rows, notes)))


def _footnotes(runs: Sequence[RunRecord], rows: Sequence[StrategyRow], notes: Sequence[str]) -> list[str]:
    """The DataComp-average note first (the table header points at it), then the others."""
    average = "DataComp's average: the mean main_metric over its 38 tasks (as its aggregate_scores.py)"
    if any(row.average is None for row in rows):
        missing = [r for r in runs if datacomp_average(r.results) is None]
        have = sorted({t for r in missing for t in r.results if t in DATACOMP_TASKS})
        average += (f"; blank unless every run of the row was evaluated on all 38, and {len(missing)} of the "
                    f"{len(runs)} run(s) were not (they have {len(have)} of the 38"
                    f"{': ' + ', '.join(have) if have else ''})")
    out = [average + "."]
    shown = shown_groups(rows)
    if shown:
        out.append("group averages as DataComp's aggregate_scores.py computes them ("
                   + ", ".join(f"{g}: {len(GROUP_TASKS[g])} tasks" for g in shown)
                   + "), filled where every run of the row was evaluated on the whole group.")
    short = [row for row in rows if row.with_image and row.subset_size and row.with_image < row.subset_size]
    if short:
        out.append("subset size counts the subset's unique uids, 'with image' those whose image is in the "
                   "training shards (the others failed to download); repeats per sample = samples seen / "
                   "subset size, so a sample with an image was seen more often: "
                   + ", ".join(f"{row.label} {row.samples_seen / row.with_image:.2f}" for row in short) + ".")
    nonstandard = [row.label for row in rows if not row.standard]
    if nonstandard:
        out.append("non-standard budget (flags changed the scale's fixed budget; see each run's "
                   f"manifest.json 'overrides'): {', '.join(nonstandard)}.")
    specified = [row for row in rows if row.spec]
    if specified:
        out.append("strategies, as pipeline.filter's stats.json beside each subset records them: "
                   + "; ".join(f"{row.label}: {row.spec.description} (spec {row.spec.spec_hash[:12]})"
                               for row in specified) + ".")
    out.extend(notes)
    return out


# --- rendering --------------------------------------------------------------------------------
def fmt_stat(s: Stat | None, digits: int = 4) -> str:
    if s is None:
        return ""
    return f"{s.mean:.{digits}f}" if s.std is None else f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def _fmt_int(v: int | None) -> str:
    return f"{v:,}" if v is not None else ""


def shown_groups(rows: Sequence[StrategyRow]) -> list[str]:
    """The group columns some row has a value for."""
    return [g for g in GROUP_COLUMNS if any(row.groups.get(g) is not None for row in rows)]


def table_cells(c: Comparison) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the comparison table (markdown and the HTML report)."""
    groups = shown_groups(c.rows)
    headers = ["strategy", "n", "seeds", "subset size", "with image", "samples seen", "repeats per sample",
               f"{c.main.header} ¹", *[col.header for col in c.columns],
               *[f"{g} ({len(GROUP_TASKS[g])} tasks)" for g in groups], "DataComp average (38 tasks) ²"]
    rows = []
    for row in c.rows:
        rows.append([row.label, str(row.n), ", ".join("?" if s is None else str(s) for s in row.seeds),
                     _fmt_int(row.subset_size), _fmt_int(row.with_image), _fmt_int(row.samples_seen),
                     f"{row.repeats:.2f}" if row.repeats is not None else "", fmt_stat(row.main),
                     *[fmt_stat(row.metrics[col.header]) for col in c.columns],
                     *[fmt_stat(row.groups.get(g)) for g in groups], fmt_stat(row.average)])
    return headers, rows


def footnote_lines(c: Comparison) -> list[str]:
    """¹ the main-metric rule, ² the DataComp average, then the other notes."""
    return [f"¹ {c.main_rule}; rows sorted by it, best first. a ± b: mean ± sample std over the n runs.",
            f"² {c.footnotes[0]}", *[f"- {note}" for note in c.footnotes[1:]]]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(c: Comparison) -> str:
    headers, rows = table_cells(c)
    lines = [f"| {' | '.join(map(_md_cell, headers))} |",
             "|" + "|".join("---" if h in ("strategy", "seeds") else "---:" for h in headers) + "|"]
    lines += [f"| {' | '.join(map(_md_cell, r))} |" for r in rows]
    return "\n".join([*lines, "", *footnote_lines(c)]) + "\n"


def _num(v) -> str:
    return "" if v is None else repr(v) if isinstance(v, float) else str(v)


def csv_rows(c: Comparison) -> list[list[str]]:
    """One row per strategy, numbers unformatted (mean and std in separate columns)."""
    head = ["strategy", "n", "seeds", "scale", "model", "standard", "subset_size", "with_image", "samples_seen",
            "repeats_per_sample", "main_task", "main_metric", "main_mean", "main_std"]
    for col in c.columns:
        head += [f"{col.header} mean", f"{col.header} std"]
    groups = shown_groups(c.rows)
    for g in groups:
        head += [f"{g} mean", f"{g} std"]
    head += ["datacomp_average_mean", "datacomp_average_std", "description", "spec_hash", "runs"]
    out = [head]
    for row in c.rows:
        line = [row.label, str(row.n), ";".join("" if s is None else str(s) for s in row.seeds), row.scale,
                row.model, str(row.standard).lower(), _num(row.subset_size), _num(row.with_image),
                str(row.samples_seen), _num(row.repeats), c.main.task, c.main.metric,
                _num(row.main.mean), _num(row.main.std)]
        for col in c.columns:
            s = row.metrics[col.header]
            line += [_num(s.mean if s else None), _num(s.std if s else None)]
        for g in groups:
            s = row.groups.get(g)
            line += [_num(s.mean if s else None), _num(s.std if s else None)]
        line += [_num(row.average.mean if row.average else None),
                 _num(row.average.std if row.average else None), *_spec_cells(row.spec), ";".join(row.runs)]
        out.append(line)
    return out


def runs_csv_rows(c: Comparison) -> list[list[str]]:
    """One row per run: its own values, before averaging over seeds."""
    head = ["run", "strategy", "seed", "scale", "model", "standard", "subset_size", "with_image", "samples_seen",
            "repeats_per_sample", f"{c.main.task} {c.main.metric}", *[col.header for col in c.columns],
            *shown_groups(c.rows), "datacomp_average", "spec_hash"]
    out = [head]
    for r in sorted(c.runs, key=lambda r: (r.strategy, r.seed if r.seed is not None else -1, r.run)):
        out.append([r.run, r.strategy, _num(r.seed), r.scale, r.model, str(r.standard).lower(),
                    _num(r.subset_size), _num(r.with_image), str(r.samples_seen), _num(r.repeats),
                    _num(_value(r, c.main)), *[_num(_value(r, col)) for col in c.columns],
                    *[_num(group_average(r.results, g)) for g in shown_groups(c.rows)],
                    _num(datacomp_average(r.results)), _spec_cells(r.spec)[1]])
    return out


def _spec_cells(spec: SubsetSpec | None) -> list[str]:
    return [spec.description, spec.spec_hash] if spec else ["", ""]


def _csv_text(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def chart_png(c: Comparison) -> bytes:
    """Bar chart of the main metric per row, error bars = std over runs, each run a dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = c.rows
    fig = Figure(figsize=(max(4.5, 0.9 * len(rows) + 2), 3.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = range(len(rows))
    means = [r.main.mean for r in rows]
    errs = [r.main.std or 0.0 for r in rows]
    ax.bar(xs, means, color="#4C78A8", edgecolor="#2a4a6b")
    several = [(x, r) for x, r in zip(xs, rows) if r.main.std is not None]
    if several:  # a single run has no spread to draw
        ax.errorbar([x for x, _ in several], [r.main.mean for _, r in several],
                    yerr=[r.main.std for _, r in several], fmt="none", capsize=5, elinewidth=1.2, ecolor="#222")
    by_run = {r.run: r for r in c.runs}
    for x, row in zip(xs, rows):
        vals = [_value(by_run[run], c.main) for run in row.runs]
        if len(vals) > 1:
            offsets = [(i - (len(vals) - 1) / 2) * 0.08 for i in range(len(vals))]
            ax.scatter([x + o for o in offsets], vals, s=12, color="#E45756", zorder=3)
        ax.annotate(f"{row.main.mean:.3f}" + (f"\nn={row.n}" if row.n > 1 else ""),
                    (x, row.main.mean + (row.main.std or 0)), textcoords="offset points", xytext=(0, 3),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [r.label for r in rows], rotation=30 if len(rows) > 4 else 0, ha="right"
                  if len(rows) > 4 else "center", fontsize=8)
    metric = c.main.header.split(" (main")[0]
    ax.set_ylabel(metric)
    top = max((m + e for m, e in zip(means, errs)), default=1.0)
    ax.set_ylim(0, top * 1.25 if top > 0 else 1.0)
    ax.set_title(f"{metric} by strategy"
                 + (" (mean ± std over runs; dots: runs)" if several else ""), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --- files ------------------------------------------------------------------------------------
def write_comparison(c: Comparison, out: str | Path) -> Comparison:
    """Write every output file atomically; returns `c` with the paths it wrote."""
    out = Path(out)
    files = {k: str(out / name) for k, name in OUTPUT_FILES.items()}
    c = replace(c, files=files)
    for key, text in (("markdown", markdown_table(c)), ("csv", _csv_text(csv_rows(c))),
                      ("runs_csv", _csv_text(runs_csv_rows(c)))):
        with atomic_path(files[key]) as tmp:
            tmp.write_text(text, encoding="utf-8")
    with atomic_path(files["chart"]) as tmp:
        tmp.write_bytes(chart_png(c))
    write_json_atomic(files["json"], c.to_json())
    return c


def collect_runs(runs: Sequence[str | Path]) -> Comparison:
    """Read the run folders and compare them (nothing written)."""
    if not runs:
        raise CompareError("no runs to compare")
    records, notes = [], []
    for run in runs:
        record, note = read_run(run)
        records.append(record)
        if note:
            notes.append(note)
    return compare_records(records, notes)


def compare_runs(runs: Sequence[str | Path], out: str | Path) -> Comparison:
    """Read, compare and write: the whole `python -m trainer.compare`."""
    return write_comparison(collect_runs(runs), out)


def load_comparison(folder: str | Path) -> Comparison:
    """A comparison written by `write_comparison` (its comparison.json)."""
    path = Path(folder) / OUTPUT_FILES["json"]
    if not path.is_file():
        raise CompareError(f"{path} is missing: write it with `python -m trainer.compare RUN ... --out {folder}`")
    try:
        return Comparison.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise CompareError(f"{path} is not a comparison written by trainer.compare ({exc!r})") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.compare",
        description="Compare finished runs (trainer.train + trainer.evaluate): a table per strategy "
                    "(mean ± std over seeds), CSV, a bar chart and JSON.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m trainer.compare runs/basic-seed0 runs/basic-seed1 runs/clip-seed0 "
               "--out comparison\n\nwrites comparison.md (printed too), comparison.csv, comparison_runs.csv, "
               "comparison.png, comparison.json")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders, each with manifest.json and eval_results.jsonl")
    p.add_argument("--out", type=Path, default=Path("comparison"),
                   help="folder for the outputs (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> Comparison:
    args = build_parser().parse_args(argv)
    from pools.cli import one_line_errors

    with one_line_errors(argv, CompareError):
        c = compare_runs(args.runs, args.out)
    print(markdown_table(c), end="")
    print(f"\nwrote {', '.join(Path(f).name for f in c.files.values())} to {args.out}", file=sys.stderr)
    return c


if __name__ == "__main__":
    main()
