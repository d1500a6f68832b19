"""Signals that need the whole pool at once, computed before the per-file signals pass.

SemDeDup (`pipeline.semdedup`: k-means over every image embedding, then similarities within
clusters that span files) and negCLIPLoss (`pipeline.negclip`: random batches drawn from the
whole pool) cannot be computed one metadata file at a time. Each is a *global step*: declared
once in `GLOBAL_STEPS` with the model name its signal group reads (`pipeline.models.MODELS`),
it writes its per-row columns as one ``<stem>.npz`` per metadata file into a result folder,
``<signals>/global/<step>/<key>/``, with ``result.json`` (its settings, its inputs'
fingerprints and its counts). The key is a hash of the settings and the inputs, so a rerun
with the same ones reuses the folder, and the folder is written under a temporary name and
renamed, so a killed run leaves none. The signal group then hands each file its columns
(`filters.rows.stored_columns`) like any other signal, and the group's reuse key includes the
result's key, so new results recompute the signals that came from the old ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq

from pipeline.execution import Execution
from pools import storage
from pools.files import file_fingerprint, owner_is_dead, owner_tag, write_json_atomic
from pools.format import Pool

RESULT_FILE = "result.json"


class GlobalStepError(ValueError):
    """A global step cannot run on these inputs; the message names the input and what to do."""


@dataclass(frozen=True)
class GlobalStep:
    """One global step: `run(files, settings, folder, execution)` writes the per-file columns into
    `folder` (fanning out through `pipeline.execution` where it can) and returns the counts for
    ``result.json``; `settings(cfg)` picks its settings
    (a frozen dataclass) from the run's configuration."""

    model: str  # the name in pipeline.models.MODELS the step's signal group reads
    meaning: str
    settings: Callable[[object], object]
    run: Callable[[Sequence[Path], object, Path, Execution], dict]


GLOBAL_STEPS: dict[str, GlobalStep] = {}


def register_global_step(step: GlobalStep) -> GlobalStep:
    GLOBAL_STEPS[step.model] = step
    return step


def input_fingerprints(files: Sequence[Path]) -> dict[str, dict[str, str]]:
    """Per metadata file: the fingerprints of its parquet and npz (what a step reads)."""
    out = {}
    for parquet in files:
        npz = Pool.npz_for(parquet)
        out[parquet.name] = {"parquet": file_fingerprint(parquet),
                             "npz": file_fingerprint(npz) if npz.is_file() else "missing"}
    return out


def result_key(name: str, settings, fingerprints: Mapping) -> str:
    blob = json.dumps({"step": name, "settings": asdict(settings), "inputs": fingerprints}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pool_rows(files: Sequence[Path]) -> list[int]:
    """Rows of each metadata file, from the parquet footers."""
    return [pq.ParquetFile(storage.readable(p)).metadata.num_rows for p in files]


def run_global_step(name: str, files: Sequence[Path], settings, signals_dir: Path, execution: Execution,
                    log: Callable[[str], None] = lambda m: None) -> Path:
    """The result folder of step `name` over `files` with `settings`: reused when stored, else
    computed into a temporary folder and renamed."""
    step = GLOBAL_STEPS[name]
    fingerprints = input_fingerprints(files)
    key = result_key(name, settings, fingerprints)
    root = storage.path(signals_dir) / "global" / name
    folder = root / key
    if (folder / RESULT_FILE).is_file():
        log(f"{name}: reusing {folder}")
        return folder
    if isinstance(root, storage.ObjectPath):
        # Object storage renames no folders: computed locally, uploaded file by file, and the
        # result file (what marks the step finished) written last.
        import tempfile

        work = Path(tempfile.mkdtemp(prefix=f"datacomp-{name}-"))
        try:
            counts = step.run(files, settings, work, execution)
            storage.upload_folder(work, folder)
            write_json_atomic(folder / RESULT_FILE, {"step": name, "key": key, "settings": asdict(settings),
                                                     "inputs": fingerprints, **counts})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return folder
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".*.tmp-*"):  # what a killed run of this step left (the owner: <pid>@<host>)
        pid, _, host = stale.name.split(".tmp-", 1)[1].rsplit("-", 1)[0].partition("@")
        if pid.isdigit() and owner_is_dead(int(pid), host):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{key}.tmp-{owner_tag()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        counts = step.run(files, settings, tmp, execution)
        record = {"step": name, "key": key, "settings": asdict(settings), "inputs": fingerprints, **counts}
        (tmp / RESULT_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / RESULT_FILE).is_file():  # (another run finishing the same result first is fine)
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_file_columns(folder: Path, parquet: Path, columns: Mapping[str, np.ndarray]) -> None:
    """One metadata file's columns of a step (inside the step's temporary folder)."""
    np.savez(Path(folder) / f"{storage.path(parquet).stem}.npz", **columns)


class StepResult:
    """A finished step's folder, as a worker reads it: the columns of one metadata file."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = storage.path(folder)
        try:
            self.record = json.loads((self.folder / RESULT_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise GlobalStepError(f"{self.folder}: not a finished global step ({exc}); delete it to recompute") from None

    def columns(self, file_name: str) -> dict[str, np.ndarray]:
        path = self.folder / f"{Path(file_name).stem}.npz"
        if not path.is_file():
            raise GlobalStepError(f"{path} is missing: the global step {self.record['step']} did not cover "
                                  f"{file_name}")
        with np.load(storage.whole(path), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}


class ScorerResult(StepResult):
    """A named scorer's folder (`pipeline.score --as NAME`): its score column of one file (the
    embeddings beside it are not signals)."""

    def columns(self, file_name: str) -> dict[str, np.ndarray]:
        return {k: v for k, v in super().columns(file_name).items() if k.startswith("score_")}

