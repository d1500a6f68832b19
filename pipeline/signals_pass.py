"""The signals pass: bring the signals of every metadata file of a pool up to a `SignalsSpec`.

Files whose stored signals already match are checked and reused here, from their headers;
the rest go to `pipeline.execution` as the stage ``signals``: a `pipeline.signals.SignalsWorker`
per process (or Ray worker), one metadata file per unit.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from pipeline.execution import Decision, Execution, Stage, run_stage
from pipeline.signals import SignalsSpec, SignalsWorker, groups_to_compute, signals_path
from pools import storage
from pools.format import PoolFormatError


def run_signals_pass(files: Sequence[Path], signals_dir: Path, spec: SignalsSpec,
                     execution: Execution | None = None, *, progress: bool = True, gpus: float = 0.0
                     ) -> tuple[list[dict], Decision | None]:
    """Bring the signals of every file up to `spec`; returns one summary per file and how the
    files that needed work were run (None when every file's signals were reused)."""
    execution = execution if execution is not None else Execution()
    signals_dir = storage.path(signals_dir)
    signals_dir.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict] = {}
    todo = []
    checker = SignalsWorker(spec)
    for parquet in files:
        out = signals_path(signals_dir, parquet)
        groups, header = groups_to_compute(parquet, out, spec)
        if groups:
            todo.append((str(parquet), str(out)))  # local paths or URIs (pools.storage.path reads both)
            continue
        try:
            # The strategies may need columns that the run which stored these signals did not.
            checker._check_schema(parquet)
        except PoolFormatError as exc:
            if not spec.skip_bad_files:
                raise
            summaries[parquet.name] = {"file": parquet.name, "status": "skipped", "reason": str(exc),
                                       "rows": None, "computed": [], "seconds": 0.0}
            continue
        summaries[parquet.name] = {"file": parquet.name, "status": "reused", "rows": header["rows"],
                                   "computed": [], "seconds": 0.0}
    decision = None
    if todo:
        if progress:
            print(f"signals: computing {', '.join(spec.groups)} for {len(todo)} of {len(files)} "
                  f"metadata files", file=sys.stderr)
        run = run_stage(Stage("signals", SignalsWorker, (spec,), gpus=gpus), todo, execution)
        step = max(1, len(todo) // 10)
        for done, (_, summary) in enumerate(run, 1):
            summaries[summary["file"]] = summary
            if progress and (done == len(todo) or done % step == 0):
                print(f"signals: {done}/{len(todo)} files ({run.decision.executor if run.decision else 'probe'})",
                      file=sys.stderr)
        decision = run.decision
    return [summaries[p.name] for p in files], decision
