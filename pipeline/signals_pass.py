"""The signals pass: bring the signals of every metadata file of a pool up to a `SignalsSpec`.

Files whose stored signals already match are checked and reused here, from their headers;
the rest go to `pipeline.execution` (a Ray Data job, or this process with
``Executor(kind="local")``), which runs a `pipeline.signals.SignalsWorker` per file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from dataclasses import replace

from pipeline.execution import Executor, run_local, run_ray
from pipeline.signals import SignalsSpec, SignalsWorker, groups_to_compute, signals_path
from pools import storage
from pools.format import PoolFormatError


def _find_cause(exc: BaseException, types: tuple[type, ...]) -> BaseException | None:
    """The first exception of `types` in `exc`'s chain (Ray wraps a worker's error)."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, types):
            return e
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return None


def run_signals_pass(files: Sequence[Path], signals_dir: Path, spec: SignalsSpec,
                     executor: Executor | None = None, *, progress: bool = True) -> list[dict]:
    """Bring the signals of every file up to `spec`; returns one summary per file."""
    executor = executor if executor is not None else Executor()
    signals_dir = storage.path(signals_dir)
    signals_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(signals_dir, storage.ObjectPath) and executor.kind != "local":
        # The Ray job's per-file claim markers are local files beside the signals: with the
        # signals in object storage the pass runs in this process (the pool itself may be
        # anywhere; keep --signals-dir local to fan out).
        if progress:
            print(f"signals: {signals_dir} is in object storage: computing them in this process",
                  file=sys.stderr)
        executor = replace(executor, kind="local")
    summaries: dict[str, dict] = {}
    todo = []
    checker = SignalsWorker(spec)
    for parquet in files:
        out = signals_path(signals_dir, parquet)
        groups, header = groups_to_compute(parquet, out, spec)
        if groups:
            # `pipeline.execution` wraps what it is handed in pathlib.Path: a file in object
            # storage goes as pathlib leaves its URI (s3:/bucket/...), which the worker repairs
            todo.append((parquet if isinstance(parquet, Path) else Path(str(parquet)), out))
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
    if todo:
        if progress:
            print(f"signals: computing {', '.join(spec.groups)} for {len(todo)} of {len(files)} "
                  f"metadata files ({executor.kind}, {executor.num_workers} workers)", file=sys.stderr)
        run = run_ray if executor.kind == "ray" else run_local
        try:
            for summary in run(todo, spec, executor, progress):
                summaries[summary["file"]] = summary
        except Exception as exc:
            from pipeline.models import ModelInputError

            cause = _find_cause(exc, (PoolFormatError, ModelInputError, FileNotFoundError))
            if cause is not None and cause is not exc:
                raise type(cause)(str(cause)) from exc
            raise
    return [summaries[p.name] for p in files]
