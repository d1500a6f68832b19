"""Turn a subset file (uid .npy) into training shards: DataComp's resharder, on Ray, resumable.

    python -m pipeline.reshard --pool data/pool --subset subsets/clip_l14_30pct.npy --out data/train

Semantics are DataComp's ``resharder.py`` (reference section 4):

- every input shard ``{:08d}.tar`` is streamed once; a sample's uid comes from its ``.json``;
- the uid is looked up in the sorted, memory-mapped subset by binary search; a uid that occurs
  k times in the subset is written k times (upsampling) with keys ``<uid>-0 .. <uid>-(k-1)``;
- every file of a selected sample (jpg, txt, json, ...) is copied byte for byte (no decode);
- output shards hold at most ``--shard-size`` (10,000) samples, each with ``{:08d}_stats.json``
  ``{"successes": n}``; the subset is copied to ``sample_ids.npy``; ``meta.json`` carries the
  arguments and the counts (``processed_count``, ``output_count``, ``output_shard_count``, ...),
  which both our trainer and DataComp's ``train.py`` read.

Where it differs from the reference, it is on purpose: work is split into tasks over contiguous
input shard ranges (as the reference splits it over workers) and run as Ray tasks; each task
writes into ``_parts/`` and leaves a marker when done, so a killed job resumes where it stopped;
output shard ids are assigned at the end in input order, so the same inputs always give the same
files (the reference numbers shards in completion order). Subset uids that were not found (their
image failed to download) are counted in ``meta.json``, not treated as errors.

What the reference does not guard against is refused or counted: a shard that is not a readable
tar or holds fewer samples than its ``_stats.json`` says stops the job naming it
(``--on-bad-shard skip``: the shard is left out whole and listed in ``input_shards_failed``); a
subset uid found in two samples of the shards (a shard copied under another id) stops the job
naming both places (``--on-duplicate-uid keep-first``: the first in input order is written, the
others are counted as ``dropped_duplicate_uid``); tar members whose names are not a plain
``<key>.<ext>`` are skipped and counted (``members_skipped_bad_name``).

Reads:  <pool>/shards/{:08d}.tar + {:08d}_stats.json, the subset (.npy or raw u8,u8 memmap).
Writes: <out>/{:08d}.tar, <out>/{:08d}_stats.json, <out>/sample_ids.npy, <out>/meta.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
from tqdm import tqdm

from pipeline.cluster import RayStartError, current_node
from pipeline.execution import Execution, Stage, add_execution_flags, execution_from_args, run_stage
from pools.cli import one_line_errors
from pools import storage
from pools.files import atomic_path, file_fingerprint, remove_stale_temporaries, write_json_atomic
from pools.format import SAMPLES_PER_SHARD, SHARD_FORMAT, SHARD_STATS_FORMAT, Pool, PoolFormatError
from pools.tars import MEMBERS_SKIPPED, iter_samples
from pools.uids import UID_DTYPE, UID_HEX_CHARS, check_sorted, count_unique_sorted, read_subset

PARTS_DIR = "_parts"
META_FILE = "meta.json"
SAMPLE_IDS_FILE = "sample_ids.npy"
# Counters every task returns; processed == selected + not_in_subset + no_json + bad_uid +
# duplicate_uid (samples of failed shards are not processed: input_samples_failed counts them).
TASK_COUNTERS = ("processed_count", "selected_count", "output_count", "dropped_not_in_subset",
                 "dropped_no_json", "dropped_bad_uid", "dropped_duplicate_uid", MEMBERS_SKIPPED,
                 "input_bytes", "output_bytes")
# Per selected sample: its uid's row in the subset (first of equal rows) and its place in the
# input (samples before it in all shards); the job finds uids selected twice from these.
FOUND_DTYPE = np.dtype([("subset_row", "<i8"), ("sample", "<i8")])
BAD_SHARD_POLICIES = ("fail", "skip")
DUPLICATE_UID_POLICIES = ("error", "keep-first")


class ReshardError(ValueError):
    """An input the resharder cannot use; the message names the file and what to do."""


@dataclass(frozen=True, kw_only=True)
class ReshardConfig:
    input_dir: Path  # folder of input shards and their _stats.json
    subset_file: Path
    output_dir: Path
    shard_size: int = SAMPLES_PER_SHARD  # max samples per output shard
    execution: Execution = Execution()  # where the tasks run (pipeline.execution); num_workers also plans them
    max_task_samples: int = 2_000_000  # input samples per task at most: the unit of resumption
    shard_format: str = SHARD_FORMAT
    shard_stats_format: str = SHARD_STATS_FORMAT
    output_shard_format: str = SHARD_FORMAT
    output_shard_stats_format: str = SHARD_STATS_FORMAT
    overwrite: bool = False
    on_bad_shard: str = "fail"  # "skip": leave an unreadable or truncated shard out, listed in meta.json
    on_duplicate_uid: str = "error"  # "keep-first": write the first sample of a uid found twice

    def __post_init__(self) -> None:
        if self.on_bad_shard not in BAD_SHARD_POLICIES:
            raise ValueError(f"--on-bad-shard must be one of {BAD_SHARD_POLICIES}, got {self.on_bad_shard!r}")
        if self.on_duplicate_uid not in DUPLICATE_UID_POLICIES:
            raise ValueError(f"--on-duplicate-uid must be one of {DUPLICATE_UID_POLICIES}, "
                             f"got {self.on_duplicate_uid!r}")
        if self.shard_size <= 0:
            raise ValueError(f"--shard-size must be positive, got {self.shard_size}")
        if self.max_task_samples <= 0:
            raise ValueError(f"max_task_samples must be positive, got {self.max_task_samples}")


@dataclass(frozen=True)
class InputShard:
    shard_id: int
    path: str
    size: int  # samples, from _stats.json "successes"
    data_start: int  # samples in all earlier shards


@dataclass(frozen=True)
class Task:
    task_id: int
    shards: tuple[InputShard, ...]

    @property
    def samples(self) -> int:
        return sum(s.size for s in self.shards)


# --- planning ---------------------------------------------------------------------------------
def discover_shards(input_dir: Path, shard_format: str = SHARD_FORMAT,
                    stats_format: str = SHARD_STATS_FORMAT) -> tuple[list[InputShard], list[str]]:
    """Input shards with their sample counts, and the names of shards skipped (no stats file).

    Like the reference, a shard without a readable ``successes`` count is skipped with a
    warning: img2dataset writes the stats file last, so such a shard is unfinished.
    """
    pattern = re.compile("^" + re.escape(shard_format).replace(r"\{:08d\}", r"(\d+)") + "$")
    ids = sorted(int(m.group(1)) for p in input_dir.iterdir() if (m := pattern.match(p.name)))
    shards, skipped, offset = [], [], 0
    for shard_id in ids:
        path = input_dir / shard_format.format(shard_id)
        stats = input_dir / stats_format.format(shard_id)
        try:
            size = int(json.loads(stats.read_text())["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            skipped.append(path.name)
            continue
        shards.append(InputShard(shard_id, str(path), size, offset))
        offset += size
    return shards, skipped


def plan_tasks(shards: list[InputShard], num_tasks: int) -> list[Task]:
    """Split shards into at most `num_tasks` contiguous ranges of about equal sample counts.

    The reference's split: cut at multiples of ceil(total / num_tasks) samples.
    """
    if not shards:
        return []
    total = shards[-1].data_start + shards[-1].size
    step = max(1, -(-total // max(1, num_tasks)))
    starts = [s.data_start for s in shards]
    cuts = sorted({int(np.searchsorted(starts, i, side="left")) for i in range(0, max(total, 1), step)})
    cuts = [0] + [c for c in cuts if c > 0] + [len(shards)]
    tasks = []
    for lo, hi in zip(cuts, cuts[1:]):
        if lo < hi:
            tasks.append(Task(len(tasks), tuple(shards[lo:hi])))
    return tasks


# --- writing tars -----------------------------------------------------------------
def uid_to_record(uid: str) -> np.void:
    """One hex uid to a u8,u8 record; uids shorter than 32 characters are left-padded as in the reference."""
    value = int(uid, 16)
    if value >> 128:
        raise ValueError(f"uid {uid!r} is longer than {UID_HEX_CHARS} hex characters")
    return np.array([(value >> 64, value & 0xFFFF_FFFF_FFFF_FFFF)], dtype=UID_DTYPE)[0]


def _sample_uid(files: list[tuple[str, bytes]]) -> tuple[str | None, str | None]:
    """(uid, None) or (None, reason) for one sample."""
    raw = next((data for ext, data in files if ext == "json"), None)
    if raw is None:
        return None, "dropped_no_json"
    try:
        uid = json.loads(raw).get("uid")
        if not isinstance(uid, str):
            return None, "dropped_bad_uid"
        return uid, None
    except (ValueError, AttributeError):
        return None, "dropped_bad_uid"


class ShardSink:
    """Writes samples into numbered tars of at most `shard_size` samples, atomically."""

    def __init__(self, folder: Path, shard_format: str, shard_size: int):
        self.folder, self.shard_format, self.shard_size = folder, shard_format, shard_size
        self.sizes: list[int] = []
        self.bytes = 0
        self._tar: tarfile.TarFile | None = None
        self._ctx = None

    def write(self, key: str, files: list[tuple[str, bytes]]) -> None:
        if self._tar is None or self.sizes[-1] >= self.shard_size:
            self._open_next()
        for ext, data in files:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o444
            self._tar.addfile(info, _BytesReader(data))
            self.bytes += len(data)
        self.sizes[-1] += 1

    def _open_next(self) -> None:
        self._close_current()
        self._ctx = atomic_path(self.folder / self.shard_format.format(len(self.sizes)))
        tmp = self._ctx.__enter__()
        self._tar = tarfile.open(tmp, "w")
        self.sizes.append(0)

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._ctx.__exit__(None, None, None)
            self._tar = self._ctx = None

    def close(self) -> None:
        self._close_current()

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._tar = self._ctx = None


class _BytesReader:
    """Minimal file object over bytes for tarfile.addfile (no copy, unlike io.BytesIO(bytes))."""

    def __init__(self, data: bytes):
        self._view, self._pos = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else self._pos + n
        out = self._view[self._pos:end]
        self._pos += len(out)
        return out


class _BadShard(Exception):
    """An input shard failed while its task runs with --on-bad-shard skip: the task restarts without it."""

    def __init__(self, shard: InputShard, reason: str):
        super().__init__(reason)
        self.shard, self.reason = shard, reason


def reshard_task(task: Task, subset_file: str, part_dir: str, shard_size: int, output_shard_format: str,
                 on_bad_shard: str = "fail", skip_samples: tuple[int, ...] = ()) -> dict:
    """Stream the task's input shards and write the selected samples into `part_dir`.

    `skip_samples` are input sample numbers not to write (later copies of a uid, found by the
    job). With ``on_bad_shard="skip"`` a shard that fails leaves the task's output as if it were
    not there: the task starts again without it (shards are rarely bad; a partial shard's
    samples must not stay in the output). Returns the task's counters plus ``shard_sizes`` and
    ``input_shards_failed``; also writes them to ``<part_dir>.json``, the marker that says the
    task is done, after the selected samples' places in ``<part_dir>.found.npy``.
    """
    failed: list[dict] = []
    while True:
        shards = tuple(s for s in task.shards if s.path not in {f["path"] for f in failed})
        try:
            result, found = _write_task(shards, subset_file, storage.path(part_dir), shard_size, output_shard_format,
                                        on_bad_shard == "skip", set(skip_samples))
            break
        except _BadShard as bad:
            failed.append({"shard": Path(bad.shard.path).name, "path": bad.shard.path,
                           "expected_samples": bad.shard.size, "reason": bad.reason})
    result = {"task_id": task.task_id, **result, "node": current_node(), "input_shards_failed": failed,
              "skip_samples": sorted(skip_samples)}
    folder = storage.path(part_dir)
    with atomic_path(folder.with_suffix(".found.npy")) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, found)
    write_json_atomic(folder.with_suffix(".json"), result)
    return result


def _write_task(shards: tuple[InputShard, ...], subset_file: str, folder: Path, shard_size: int,
                output_shard_format: str, skip_bad: bool, skip_samples: set[int]) -> tuple[dict, np.ndarray]:
    subset = read_subset(subset_file)
    if folder.exists():
        storage.rmtree(folder)  # leftovers of an interrupted attempt
    folder.mkdir(parents=True)
    counts = dict.fromkeys(TASK_COUNTERS, 0)
    found: list[tuple[int, int]] = []
    warnings: list[str] = []
    sink = ShardSink(folder, output_shard_format, shard_size)
    try:
        for shard in shards:
            seen = 0
            counts["input_bytes"] += storage.path(shard.path).stat().st_size
            for files in _shard_samples(shard, counts, skip_bad):
                sample = shard.data_start + seen
                seen += 1
                uid, reason = _sample_uid(files)
                if uid is not None:
                    try:
                        record = uid_to_record(uid)
                    except ValueError:
                        uid, reason = None, "dropped_bad_uid"
                if uid is None:
                    counts[reason] += 1
                    continue
                first = int(np.searchsorted(subset, record, "left"))
                k = int(np.searchsorted(subset, record, "right")) - first
                if k == 0:
                    counts["dropped_not_in_subset"] += 1
                    continue
                found.append((first, sample))  # skipped copies too: the job's duplicate search stays the same
                if sample in skip_samples:
                    counts["dropped_duplicate_uid"] += 1
                    continue
                counts["selected_count"] += 1
                uid = uid.zfill(UID_HEX_CHARS)
                for j in range(k):
                    sink.write(f"{uid}-{j}", files)
                counts["output_count"] += k
            counts["processed_count"] += seen
            if seen != shard.size:
                warnings.append(f"{shard.path}: _stats.json says {shard.size} samples, the tar holds {seen}")
        sink.close()
    except BaseException:
        sink.abort()
        raise
    counts["output_bytes"] = sink.bytes
    result = {**counts, "shard_sizes": sink.sizes, "warnings": warnings,
              "input_shards": [Path(s.path).name for s in shards]}
    return result, np.array(found, dtype=FOUND_DTYPE)


def _shard_samples(shard: InputShard, counts: dict, skip_bad: bool) -> Iterator[list[tuple[str, bytes]]]:
    """The samples of one input shard, streamed; a shard that is not a readable tar or is
    truncated raises a one-line error naming it (`_BadShard` when bad shards are skipped)."""
    seen = 0
    try:
        for _key, files in iter_samples(shard.path, counts):
            seen += 1
            yield files
        if seen < shard.size:  # tarfile ends a truncated stream quietly at the last whole member
            raise ReshardError(f"{shard.path}: holds {seen} samples but its _stats.json says {shard.size}: "
                               "truncated? re-download it, or move it and its _stats.json out of the input "
                               "folder (or pass --on-bad-shard skip)")
    except (ReshardError, PoolFormatError) as exc:
        if skip_bad:
            raise _BadShard(shard, str(exc)) from None
        raise


# --- the job ----------------------------------------------------------------------------------
def _plan_signature(cfg: ReshardConfig, shards: list[InputShard]) -> dict:
    """What makes two runs the same job: a mismatch means the staged parts cannot be reused."""
    return {"subset_file": str(cfg.subset_file), "subset_fingerprint": file_fingerprint(cfg.subset_file),
            "input_dir": str(cfg.input_dir), "shard_size": cfg.shard_size,
            "output_shard_format": cfg.output_shard_format,
            "shards": [[Path(s.path).name, s.size] for s in shards]}


def _prepare_output(cfg: ReshardConfig, signature: dict) -> str:
    """Decide between 'done', 'resume' and 'fresh'; refuses to clobber unrelated files."""
    out, parts = cfg.output_dir, cfg.output_dir / PARTS_DIR
    plan_file = parts / "plan.json"
    meta_file = out / META_FILE
    if cfg.overwrite and out.exists():
        storage.rmtree(out)
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("plan_signature") == signature:
            return "done"
        raise FileExistsError(f"{out} holds the output of a different reshard ({meta_file}); "
                              "pass --overwrite to replace it or choose another --out")
    if plan_file.is_file():
        if json.loads(plan_file.read_text()) == signature:
            return "resume"
        raise FileExistsError(f"{out} holds an unfinished reshard of other inputs ({plan_file}); "
                              "pass --overwrite to start again or choose another --out")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; pass --overwrite to delete its contents or "
                              "choose another --out")
    parts.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_file, signature)
    return "fresh"


class ReshardWorker:
    """The execution layer's worker: a unit is (task, input samples it must not write)."""

    def __init__(self, subset_file: str, parts: str, shard_size: int, output_shard_format: str, on_bad_shard: str):
        self.subset_file, self.parts, self.shard_size = subset_file, parts, shard_size
        self.output_shard_format, self.on_bad_shard = output_shard_format, on_bad_shard

    def __call__(self, unit: tuple[Task, tuple[int, ...]]) -> dict:
        task, skip_samples = unit
        return reshard_task(task, self.subset_file, str(storage.path(self.parts) / f"task_{task.task_id:05d}"),
                            self.shard_size, self.output_shard_format, self.on_bad_shard, skip_samples)


def _run_tasks(cfg: ReshardConfig, tasks: list[Task], total_samples: int,
               skips: Mapping[int, tuple[int, ...]] | None = None) -> tuple[list[dict], dict | None]:
    """Run the tasks not done yet; `skips`: per task, the input samples it must not write (a task
    done with other skips runs again); None: any finished task is taken as it is. Returns every
    task's result and how the ones run now were run."""
    parts = cfg.output_dir / PARTS_DIR
    results: dict[int, dict] = {}
    todo = []
    for task in tasks:
        marker = parts / f"task_{task.task_id:05d}.json"
        done = json.loads(marker.read_text()) if marker.is_file() else None
        if done is not None and (skips is None or done["skip_samples"] == sorted(skips.get(task.task_id, ()))):
            results[task.task_id] = done
        else:
            todo.append((task, tuple((skips or {}).get(task.task_id, ()))))
    done_samples = sum(r["processed_count"] for r in results.values()) if skips is None else 0
    stage = Stage("reshard", ReshardWorker, (str(cfg.subset_file), str(parts), cfg.shard_size,
                                             cfg.output_shard_format, cfg.on_bad_shard))
    run = run_stage(stage, todo, cfg.execution)
    with tqdm(total=total_samples, initial=done_samples, desc="resharding", unit="sample",
              file=sys.stderr, smoothing=0) as bar:
        for _, result in run:
            results[result["task_id"]] = result
            bar.update(result["processed_count"])
    return [results[t.task_id] for t in tasks], run.decision.as_json() if run.decision else None


def _found_samples(cfg: ReshardConfig, tasks: list[Task]) -> np.ndarray:
    """Every selected sample's (subset row, input sample number), from the tasks' found files."""
    parts = cfg.output_dir / PARTS_DIR
    found = [np.load(storage.whole(parts / f"task_{t.task_id:05d}.found.npy"), allow_pickle=False) for t in tasks]
    return np.concatenate(found) if found else np.empty(0, dtype=FOUND_DTYPE)


def later_copies(found: np.ndarray, subset: np.ndarray, shards: list[InputShard], tasks: list[Task],
                 policy: str) -> dict[int, tuple[int, ...]]:
    """Per task, the input samples whose uid an earlier sample (in input order) already has.

    With policy "error", the first such uid raises `ReshardError` naming both places.
    """
    found = found[np.lexsort((found["sample"], found["subset_row"]))]
    repeated = np.flatnonzero(found["subset_row"][1:] == found["subset_row"][:-1]) + 1
    if not len(repeated):
        return {}
    if policy == "error":
        i = int(repeated[0])
        from pools.uids import records_to_uids

        uid = records_to_uids(subset[int(found["subset_row"][i]):int(found["subset_row"][i]) + 1])[0]
        starts = np.array([s.data_start for s in shards])

        def place(sample: int) -> str:
            shard = shards[int(np.searchsorted(starts, sample, side="right")) - 1]
            return f"{shard.path} (sample {sample - shard.data_start})"

        raise ReshardError(f"uid {uid} is in two samples of the shards: {place(int(found['sample'][i - 1]))} and "
                           f"{place(int(found['sample'][i]))} ({len(repeated)} such copies in all; a shard copied "
                           "under another id?); remove the copies, or pass --on-duplicate-uid keep-first to write "
                           "the first and count the others")
    task_starts = np.array([t.shards[0].data_start for t in tasks])
    samples = np.sort(found["sample"][repeated])
    owner = np.searchsorted(task_starts, samples, side="right") - 1
    return {tasks[int(k)].task_id: tuple(int(x) for x in samples[owner == k]) for k in np.unique(owner)}


def _finalize(cfg: ReshardConfig, results: list[dict]) -> int:
    """Move each task's shards to their global ids (input order) and write their _stats.json.

    Idempotent: a shard already moved by an interrupted earlier finalize is left as it is.
    """
    out, parts = cfg.output_dir, cfg.output_dir / PARTS_DIR
    global_id = 0
    for result in results:
        part_dir = parts / f"task_{result['task_id']:05d}"
        for local_id, size in enumerate(result["shard_sizes"]):
            src = part_dir / cfg.output_shard_format.format(local_id)
            dst = out / cfg.output_shard_format.format(global_id)
            if src.is_file():
                storage.replace(src, dst)
            elif not dst.is_file():
                raise FileNotFoundError(f"{src} is missing and {dst} was never written; rerun with "
                                        "--overwrite to start this reshard again")
            write_json_atomic(out / cfg.output_shard_stats_format.format(global_id), {"successes": size})
            global_id += 1
    return global_id


def reshard(cfg: ReshardConfig) -> dict:
    """Run the whole job; returns the contents of meta.json."""
    start = time.perf_counter()
    if not cfg.input_dir.is_dir():
        raise FileNotFoundError(f"input shard folder {cfg.input_dir} does not exist")
    try:
        subset = read_subset(cfg.subset_file)
        check_sorted(subset, cfg.subset_file)
    except ValueError as exc:
        raise ReshardError(str(exc)) from None
    shards, skipped = discover_shards(cfg.input_dir, cfg.shard_format, cfg.shard_stats_format)
    if not shards:
        raise FileNotFoundError(f"{cfg.input_dir} holds no input shards with a _stats.json "
                                f"(expected names like {cfg.shard_format.format(0)})")
    for name in skipped:
        print(f"warning: {cfg.input_dir / name} has no readable _stats.json; skipped (unfinished "
              "download?)", file=sys.stderr)
    signature = _plan_signature(cfg, shards)
    for folder in (cfg.output_dir, cfg.output_dir / PARTS_DIR):  # what a killed run was writing
        remove_stale_temporaries(folder)
    state = _prepare_output(cfg, signature)
    if state == "done":
        meta = json.loads((cfg.output_dir / META_FILE).read_text())
        print(f"{cfg.output_dir} already holds this reshard; nothing to do", file=sys.stderr)
        return meta

    total = shards[-1].data_start + shards[-1].size
    num_tasks = min(len(shards), max(cfg.execution.num_workers, math.ceil(total / cfg.max_task_samples)))
    tasks = plan_tasks(shards, num_tasks)
    results, execution = _run_tasks(cfg, tasks, total)
    found = _found_samples(cfg, tasks)
    skips = later_copies(found, subset, shards, tasks, cfg.on_duplicate_uid)
    if skips:
        print(f"{sum(map(len, skips.values()))} input samples repeat a uid selected earlier: writing the first "
              f"only (--on-duplicate-uid keep-first); redoing {len(skips)} task(s)", file=sys.stderr)
        results, execution = _run_tasks(cfg, tasks, total, skips)
    output_shard_count = _finalize(cfg, results)
    with atomic_path(cfg.output_dir / SAMPLE_IDS_FILE) as tmp:
        storage.download(cfg.subset_file, tmp)

    counts = {k: sum(r[k] for r in results) for k in TASK_COUNTERS}
    subset_size = len(subset)
    subset_unique = count_unique_sorted(subset)
    warnings = [w for r in results for w in r["warnings"]]
    failed = [{k: v for k, v in f.items() if k != "path"} for r in results for f in r["input_shards_failed"]]
    meta = {
        # the reference's argument names
        "input_dir": str(cfg.input_dir), "output_dir": str(cfg.output_dir),
        "subset_file": str(cfg.subset_file), "num_workers": cfg.execution.num_workers,
        "shard_size": cfg.shard_size, "shard_format": cfg.shard_format,
        "output_shard_format": cfg.output_shard_format,
        "shard_stats_format": cfg.shard_stats_format,
        "output_shard_stats_format": cfg.output_shard_stats_format,
        # the reference's state
        "processed_count": counts["processed_count"], "output_count": counts["output_count"],
        "output_shard_count": output_shard_count, "worker_success": len(results),
        # our accounting
        "subset_size": subset_size, "subset_unique_uids": subset_unique,
        "selected_count": counts["selected_count"],
        "subset_uids_not_found": subset_size - counts["output_count"],
        "subset_unique_uids_not_found": subset_unique - len(np.unique(found["subset_row"])),
        "dropped_not_in_subset": counts["dropped_not_in_subset"],
        "dropped_no_json": counts["dropped_no_json"], "dropped_bad_uid": counts["dropped_bad_uid"],
        "dropped_duplicate_uid": counts["dropped_duplicate_uid"],
        MEMBERS_SKIPPED: counts[MEMBERS_SKIPPED],
        "input_shards": len(shards), "input_shards_skipped": skipped,
        "input_shards_failed": failed, "input_samples_failed": sum(f["expected_samples"] for f in failed),
        "expected_input_samples": total, "input_bytes": counts["input_bytes"],
        "output_bytes": counts["output_bytes"], "tasks": len(tasks),
        "warnings": warnings, "nodes": sorted({r["node"] for r in results}), "execution": execution,
        "elapsed_s": round(time.perf_counter() - start, 3),
        "cwd": str(Path.cwd()), "plan_signature": signature,
    }
    write_json_atomic(cfg.output_dir / META_FILE, meta)
    storage.rmtree(cfg.output_dir / PARTS_DIR)
    return meta


def describe(meta: dict) -> str:
    lines = [f"read {meta['processed_count']} samples from {meta['input_shards']} shard(s) of {meta['input_dir']}",
             f"wrote {meta['output_count']} samples ({meta['selected_count']} distinct) in "
             f"{meta['output_shard_count']} shard(s) to {meta['output_dir']}"]
    if meta["subset_uids_not_found"]:
        lines.append(f"{meta['subset_uids_not_found']} of the subset's {meta['subset_size']} uids were "
                     f"not found in the shards ({meta['subset_unique_uids_not_found']} distinct; "
                     "usually images that failed to download)")
    for reason in ("dropped_no_json", "dropped_bad_uid", "dropped_duplicate_uid"):
        if meta[reason]:
            lines.append(f"{meta[reason]} input samples {reason.replace('_', ' ')[8:]}")
    if meta[MEMBERS_SKIPPED]:
        lines.append(f"{meta[MEMBERS_SKIPPED]} tar members skipped: not a plain <key>.<ext> name")
    for f in meta["input_shards_failed"]:
        lines.append(f"skipped shard {f['shard']} ({f['expected_samples']} samples): {f['reason']}")
    for w in meta["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _input_dir(pool: Path) -> Path:
    """A pool root (with shards/) or a folder of shards."""
    shards = Pool(pool).shards_dir
    return shards if shards.is_dir() else pool


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.reshard", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m pipeline.reshard --pool data/pool --subset subsets/basic.npy "
               "--out data/train/basic\n\noutput: {:08d}.tar + {:08d}_stats.json shards, sample_ids.npy, "
               "meta.json (counts)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--pool", type=storage.path, help="pool folder (its shards/ are read), or s3://bucket/pool")
    src.add_argument("-i", "--input-dir", type=storage.path,
                     help="folder of webdataset shards (the reference's flag), or s3://bucket/prefix")
    parser.add_argument("-s", "--subset", "--subset-file", dest="subset", type=storage.path, required=True,
                        help="subset file: sorted uids as a .npy of dtype u8,u8 (or a raw memmap of it); "
                             "a uid listed k times is written k times")
    parser.add_argument("-o", "--out", "--output-dir", dest="out", type=storage.path, required=True,
                        help="output folder for the training shards, or s3://bucket/prefix")
    parser.add_argument("--shard-size", type=int, default=SAMPLES_PER_SHARD,
                        help="maximum samples per output shard (default %(default)s)")
    parser.add_argument("--max-task-samples", type=int, default=ReshardConfig.max_task_samples,
                        help="input samples per task at most; smaller = finer resumption "
                             "(default %(default)s)")
    parser.add_argument("--shard-format", default=SHARD_FORMAT, help="input shard names (default %(default)s)")
    parser.add_argument("--shard-stats-format", default=SHARD_STATS_FORMAT,
                        help="input shard stats names (default %(default)s)")
    parser.add_argument("--output-shard-format", default=SHARD_FORMAT,
                        help="output shard names (default %(default)s)")
    parser.add_argument("--output-shard-stats-format", default=SHARD_STATS_FORMAT,
                        help="output shard stats names (default %(default)s)")
    parser.add_argument("--on-bad-shard", choices=BAD_SHARD_POLICIES, default="fail",
                        help="an input shard that is not a readable tar or is truncated stops the job (fail, "
                             "default) or is left out whole and listed in meta.json's input_shards_failed (skip)")
    parser.add_argument("--on-duplicate-uid", choices=DUPLICATE_UID_POLICIES, default="error",
                        help="a subset uid found in two samples of the shards stops the job naming both (error, "
                             "default), or only the first in input order is written and the others counted as "
                             "dropped_duplicate_uid (keep-first)")
    add_execution_flags(parser, workers_help="parallel tasks (processes or Ray tasks)",
                        worker_flags=("-j", "--num-workers"))
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the output folder's contents first (default: resume or refuse)")
    args = parser.parse_args(argv)
    try:
        cfg = ReshardConfig(input_dir=args.input_dir or _input_dir(args.pool), subset_file=args.subset,
                            output_dir=args.out, shard_size=args.shard_size, execution=execution_from_args(args),
                            max_task_samples=args.max_task_samples, shard_format=args.shard_format,
                            shard_stats_format=args.shard_stats_format,
                            output_shard_format=args.output_shard_format,
                            output_shard_stats_format=args.output_shard_stats_format,
                            overwrite=args.overwrite,
                            on_bad_shard=args.on_bad_shard,
                            on_duplicate_uid=args.on_duplicate_uid)
    except ValueError as exc:
        parser.error(str(exc))
    with one_line_errors(argv, ReshardError, PoolFormatError, RayStartError, OSError):  # inputs and outputs; anything else is a bug
        meta = reshard(cfg)
    print(describe(meta))
    return meta


if __name__ == "__main__":
    main()
