"""The signals pass: every per-row quantity a DataComp rule looks at, computed once per pool.

One signals file per metadata file, ``<signals>/<stem>.parquet``, one row per pool row in the
same order, holding the columns of the signal groups computed so far:

=========  ===========================================================================  =========
group      columns                                                                      needs
=========  ===========================================================================  =========
base       uid_hi, uid_lo (DataComp's u8,u8), file, row, clip_b32_similarity_score,     parquet
           clip_l14_similarity_score (copied), min_side, aspect_ratio
caption    text_status (0 ok, 1 null, 2 not UTF-8), fasttext_lang (top-1 label),       fastText
           caption_words (``len(text.split())``), caption_chars (``len(text)``),
           fasttext_tokens (``len(fasttext.tokenize(text))``)
entity     imagenet21k_entity (some word's first WordNet synset is an IN-21k class)     WordNet
cld3       cld3_lang (CLD3 label; computed only where the B/32 score >= 0.28, the      CLD3
           only rows LAION-2B can keep; null elsewhere)
centroid   nearest_centroid (pool centroid with the largest inner product with          npz,
           ``l14_img``; computed where the caption pre-filter passes, -1 elsewhere)     centroids
=========  ===========================================================================  =========

The parquet's schema metadata records the source file's fingerprint and, per group, a key
made of the group's version and the fingerprints of what it depends on (models, WordNet,
centroids, npz). A rerun reuses every group whose key still matches and computes only the
rest; files are written under a temporary name and renamed, so a killed run leaves either
the old file or the new one. Models run once per distinct caption in a file, not per row.

The work is one task per metadata file: a Ray Data job with an actor pool (each actor loads
fastText, CLD3 and WordNet once), or the same worker class in this process.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.clip_score import score_mask
from filters.image_based import nearest_centroid
from filters.image_size import aspect_ratio, min_side
from filters.language import language_id_input, language_mask
from filters.laion import Laion2B, cld3_needed
from filters.text import (CaptionPrefilter, TextStatus, caption_array, caption_prefilter_mask,
                          char_count, fasttext_token_count, readable_captions, text_status,
                          whitespace_word_count)
from pools.files import atomic_path, file_fingerprint
from pools.format import SCORE_COLUMNS, Pool, PoolFormatError, load_npz, validate_metadata_schema
from pools.uids import uids_to_records

SIGNALS_FORMAT_VERSION = 1
METADATA_KEY = b"datacomp_signals"

# Bump a group's version whenever what it computes changes: stored signals are then recomputed.
GROUP_VERSIONS = {"base": 1, "caption": 1, "entity": 1, "cld3": 1, "centroid": 1}
GROUP_COLUMNS: dict[str, tuple[str, ...]] = {
    "base": ("uid_hi", "uid_lo", "file", "row", *SCORE_COLUMNS.values(), "min_side", "aspect_ratio"),
    "caption": ("text_status", "fasttext_lang", "caption_words", "caption_chars", "fasttext_tokens"),
    "entity": ("imagenet21k_entity",),
    "cld3": ("cld3_lang",),
    "centroid": ("nearest_centroid",),
}
GROUP_ORDER = tuple(GROUP_COLUMNS)
# Signal groups that other groups are computed from.
GROUP_DEPENDS = {"base": (), "caption": ("base",), "entity": ("base", "caption"), "cld3": ("base",),
                 "centroid": ("base", "caption")}
# Metadata columns each group reads (beyond what earlier groups stored).
GROUP_SOURCE_COLUMNS = {"base": ("uid",), "caption": ("text",), "entity": ("text",), "cld3": ("text",),
                        "centroid": ()}
OPTIONAL_BASE_COLUMNS = ("original_width", "original_height", *SCORE_COLUMNS.values())


class SignalsError(RuntimeError):
    """The signals pass failed; the message names the file."""


@dataclass(frozen=True)
class SignalsSpec:
    """What the workers compute: picklable, sent once to every actor."""

    groups: tuple[str, ...]
    keys: dict[str, str]  # group -> key that a stored group must match to be reused
    required_columns: tuple[str, ...]  # metadata columns the strategies need, checked per file
    lid_model: str | None = None
    morphy_repeat_rules: bool = True
    centroids: str | None = None
    device: str | None = None
    skip_bad_files: bool = False
    laion: Laion2B = field(default_factory=Laion2B)
    caption_prefilter: CaptionPrefilter = field(default_factory=CaptionPrefilter)


def expand_groups(groups: Iterable[str]) -> tuple[str, ...]:
    """`groups` plus the groups they are computed from, in computation order."""
    wanted = set()
    stack = list(groups)
    while stack:
        g = stack.pop()
        if g not in GROUP_COLUMNS:
            raise ValueError(f"unknown signal group {g!r}")
        if g not in wanted:
            wanted.add(g)
            stack.extend(GROUP_DEPENDS[g])
    return tuple(g for g in GROUP_ORDER if g in wanted)


def group_keys(groups: Sequence[str], *, lid_model: Path | None, morphy_repeat_rules: bool,
               centroids: Path | None, laion: Laion2B = Laion2B(),
               caption_prefilter: CaptionPrefilter = CaptionPrefilter()) -> dict[str, str]:
    """The reuse key of each group: its version plus fingerprints of its inputs."""
    from pipeline import models

    keys: dict[str, str] = {}
    for g in groups:
        k = f"{g}/v{GROUP_VERSIONS[g]}"
        if g in ("caption", "centroid"):
            k += f"/lid={file_fingerprint(models.resolve_lid_model(lid_model))[:16]}"
        if g == "entity":
            k += (f"/wordnet={models.wordnet_fingerprint()}/ids={models.entity_ids_fingerprint()}"
                  f"/repeat_rules={int(morphy_repeat_rules)}")
        if g == "cld3":
            k += (f"/min={laion.cld3.min_num_bytes}/max={laion.cld3.max_num_bytes}"
                  f"/gate_b32>={laion.min_b32_score!r}")
        if g == "centroid":
            if centroids is None:
                raise ValueError("the centroid signal needs a centroids file")
            k += (f"/centroids={file_fingerprint(centroids)[:16]}/prefilter="
                  f"{caption_prefilter.min_tokens},{caption_prefilter.min_chars}")
        keys[g] = k
    return keys


def signals_path(signals_dir: Path, parquet: Path) -> Path:
    return Path(signals_dir) / (Path(parquet).stem + ".parquet")


def read_signals_header(path: Path) -> dict | None:
    """The stored header of a signals file (source fingerprint, rows, group keys), or None."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:
        return None
    raw = meta.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        header = json.loads(raw)
    except ValueError:
        return None
    return header if header.get("format") == SIGNALS_FORMAT_VERSION else None


def source_fingerprints(parquet: Path, groups: Sequence[str]) -> dict[str, str]:
    """Fingerprints of the inputs a file's signals are computed from (parquet, and npz if used)."""
    out = {"parquet": file_fingerprint(parquet)}
    if "centroid" in groups:
        npz = Pool.npz_for(parquet)
        out["npz"] = file_fingerprint(npz) if npz.is_file() else "missing"
    return out


def groups_to_compute(parquet: Path, signals_file: Path, spec: SignalsSpec) -> tuple[list[str], dict | None]:
    """Which of `spec.groups` must be (re)computed for one file, and the reusable header."""
    header = read_signals_header(signals_file) if signals_file.is_file() else None
    if header is None:
        return list(spec.groups), None
    sources = source_fingerprints(parquet, spec.groups)
    if header.get("sources", {}).get("parquet") != sources["parquet"]:
        return list(spec.groups), None
    stored = dict(header.get("groups", {}))
    if "npz" in sources and header.get("sources", {}).get("npz") != sources["npz"]:
        stored.pop("centroid", None)
    todo = [g for g in spec.groups if stored.get(g) != spec.keys[g]]
    # A group computed from a recomputed group must be recomputed too.
    changed = set(todo)
    for g in spec.groups:
        if g not in changed and any(d in changed for d in GROUP_DEPENDS[g]):
            todo.append(g)
            changed.add(g)
    return [g for g in spec.groups if g in changed], header


def _map_unique(texts: pa.Array, fn) -> pa.Array:
    """`fn` (list of str -> list of str) applied to each distinct non-null text once, mapped back."""
    encoded = pc.dictionary_encode(texts)
    labels = pa.array(fn(encoded.dictionary.to_pylist()), type=pa.string())
    return labels.take(encoded.indices)


def _per_unique(texts: pa.Array, fn) -> np.ndarray:
    """`fn` (Arrow strings -> NumPy values) on each distinct text once, mapped back (nulls -> 0)."""
    encoded = pc.dictionary_encode(texts)
    values = np.asarray(fn(encoded.dictionary))
    idx = encoded.indices.to_numpy(zero_copy_only=False)
    if encoded.indices.null_count:
        valid = ~encoded.indices.is_null().to_numpy(zero_copy_only=False)
        out = np.zeros(len(texts), dtype=values.dtype)
        out[valid] = values[idx[valid].astype(np.int64)]
        return out
    return values[idx.astype(np.int64)]


class SignalsWorker:
    """Computes and stores the signals of metadata files; models load on first use."""

    def __init__(self, spec: SignalsSpec):
        self.spec = spec
        self._lid = None
        self._cld3 = None
        self._entity = None
        self._centroids = None

    # Ray Data calls the worker with a batch of tasks and wants a batch back.
    def __call__(self, batch: dict) -> dict:
        summaries = [self.process(Path(p), Path(s)) for p, s in zip(batch["parquet"], batch["signals"])]
        return {"summary": [json.dumps(s) for s in summaries]}

    # --- models ---
    @property
    def lid(self):
        if self._lid is None:
            from pipeline.models import FastTextLanguageID, resolve_lid_model

            self._lid = FastTextLanguageID(resolve_lid_model(self.spec.lid_model))
        return self._lid

    @property
    def cld3(self):
        if self._cld3 is None:
            from pipeline.models import Cld3LanguageID

            s = self.spec.laion.cld3
            self._cld3 = Cld3LanguageID(s.min_num_bytes, s.max_num_bytes)
        return self._cld3

    @property
    def entity(self):
        if self._entity is None:
            from pipeline.models import build_entity_lookup

            self._entity = build_entity_lookup(self.spec.morphy_repeat_rules)
        return self._entity

    @property
    def centroids(self) -> np.ndarray:
        if self._centroids is None:
            from pipeline.models import load_centroids

            self._centroids = load_centroids(self.spec.centroids)
        return self._centroids

    # --- one file ---
    def process(self, parquet: Path, out: Path) -> dict:
        started = time.perf_counter()
        try:
            todo, header = groups_to_compute(parquet, out, self.spec)
            if not todo:
                self._check_schema(parquet)
                return {"file": parquet.name, "status": "reused", "rows": header["rows"], "computed": [],
                        "seconds": time.perf_counter() - started}
            rows = self._compute(parquet, out, todo, header)
        except PoolFormatError as exc:
            if not self.spec.skip_bad_files:
                raise
            return {"file": parquet.name, "status": "skipped", "reason": str(exc), "rows": None,
                    "computed": [], "seconds": time.perf_counter() - started}
        return {"file": parquet.name, "status": "computed", "rows": rows, "computed": todo,
                "seconds": time.perf_counter() - started}

    def _check_schema(self, parquet: Path) -> pa.Schema:
        try:
            schema = pq.read_schema(parquet)
        except Exception as exc:
            raise PoolFormatError(f"{parquet}: not a readable parquet file ({exc})") from exc
        validate_metadata_schema(schema, parquet, ("uid", *self.spec.required_columns))
        return schema

    def _read(self, parquet: Path, columns: Sequence[str]) -> pa.Table:
        try:
            return pq.ParquetFile(parquet).read(columns=list(columns))
        except Exception as exc:
            raise PoolFormatError(f"{parquet}: failed to read columns {list(columns)} ({exc})") from exc

    def _compute(self, parquet: Path, out: Path, todo: list[str], header: dict | None) -> int:
        schema = self._check_schema(parquet)
        wanted = {c for g in todo for c in GROUP_SOURCE_COLUMNS[g]}
        if "base" in todo:
            wanted |= {c for c in OPTIONAL_BASE_COLUMNS if c in schema.names}
        source = self._read(parquet, [c for c in schema.names if c in wanted])
        n = source.num_rows
        stored = {}
        if header is not None:
            if header["rows"] != n:
                raise PoolFormatError(f"{out}: holds {header['rows']} rows but {parquet} has {n}")
            keep = [c for g, cols in GROUP_COLUMNS.items() if g not in todo and g in header["groups"]
                    for c in cols]
            existing = pq.ParquetFile(out).schema_arrow.names
            stored_table = pq.read_table(out, columns=[c for c in keep if c in existing])
            stored = {c: stored_table.column(c) for c in stored_table.column_names}
        columns: dict[str, pa.Array | pa.ChunkedArray] = dict(stored)
        if "base" in todo:
            columns.update(self._base(parquet, source))
        texts = status = None
        if any(g in todo for g in ("caption", "entity", "cld3")):
            raw = caption_array(source.column("text"))
            status = text_status(raw)
            texts = readable_captions(raw, status)
        if "caption" in todo:
            columns.update(self._caption(texts, status))
        if "entity" in todo:
            columns["imagenet21k_entity"] = pa.array(
                _per_unique(texts, lambda u: self._entity_hits(u)).astype(bool))
        if "cld3" in todo:
            columns["cld3_lang"] = self._cld3_labels(texts, _np(columns["clip_b32_similarity_score"]))
        if "centroid" in todo:
            columns["nearest_centroid"] = self._nearest(parquet, n, columns)
        groups = dict(header["groups"]) if header is not None else {}
        for g in todo:
            groups[g] = self.spec.keys[g]
        groups = {g: groups[g] for g in GROUP_ORDER if g in groups}
        order = [c for g in GROUP_ORDER if g in groups for c in GROUP_COLUMNS[g] if c in columns]
        table = pa.table({c: columns[c] for c in order})
        sources = source_fingerprints(parquet, list(groups))
        meta = {"format": SIGNALS_FORMAT_VERSION, "source": parquet.name, "sources": sources,
                "rows": n, "groups": groups}
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)})
        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
        return n

    def _base(self, parquet: Path, source: pa.Table) -> dict:
        n = source.num_rows
        try:
            records = uids_to_records(source.column("uid"))
        except ValueError as exc:
            raise PoolFormatError(f"{parquet}: column 'uid': {exc}") from exc
        cols: dict[str, pa.Array] = {
            "uid_hi": pa.array(records["f0"]), "uid_lo": pa.array(records["f1"]),
            "file": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([parquet.name])),
            "row": pa.array(np.arange(n, dtype=np.int32)),
        }
        for name in SCORE_COLUMNS.values():
            if name in source.column_names:
                col = source.column(name)
                dtype = pa.float64() if pa.types.is_float64(col.type) else pa.float32()
                cols[name] = pc.fill_null(col.cast(dtype), math.nan).combine_chunks()
        names = source.column_names
        width = source.column("original_width") if "original_width" in names else pa.nulls(n, pa.int64())
        height = source.column("original_height") if "original_height" in names else pa.nulls(n, pa.int64())
        cols["min_side"] = pa.array(min_side(width, height))
        cols["aspect_ratio"] = pa.array(aspect_ratio(width, height))
        return cols

    def _caption(self, texts: pa.Array, status: np.ndarray) -> dict:
        lid_input = language_id_input(texts)
        return {
            "text_status": pa.array(status),
            "fasttext_lang": _map_unique(lid_input, self.lid.top1).dictionary_encode(),
            "caption_words": pa.array(_per_unique(texts, whitespace_word_count)),
            "caption_chars": pa.array(_per_unique(texts, char_count)),
            "fasttext_tokens": pa.array(_per_unique(texts, fasttext_token_count)),
        }

    def _entity_hits(self, unique_texts: pa.Array) -> np.ndarray:
        from filters.entity import entity_hit_mask

        return entity_hit_mask(unique_texts, self.entity)

    def _cld3_labels(self, texts: pa.Array, b32: np.ndarray) -> pa.Array:
        gate = cld3_needed(b32, self.spec.laion) & texts.is_valid().to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(gate)
        if len(rows) == 0:
            return pa.nulls(len(texts), pa.string()).dictionary_encode()
        labels = _map_unique(language_id_input(texts.take(pa.array(rows))), self.cld3.top1)
        index = np.full(len(texts), -1, dtype=np.int64)
        index[rows] = np.arange(len(rows))
        return labels.take(pa.array(index, mask=index < 0)).dictionary_encode()

    def _nearest(self, parquet: Path, n: int, columns: dict) -> pa.Array:
        gate = (
            (_np(columns["text_status"]) == TextStatus.OK)
            & language_mask(_combined(columns["fasttext_lang"]))
            & caption_prefilter_mask(_np(columns["fasttext_tokens"]), _np(columns["caption_chars"]),
                                     self.spec.caption_prefilter)
        )
        embeddings = load_npz(parquet, ("l14_img",), n)["l14_img"]
        nearest = np.full(n, -1, dtype=np.int32)
        rows = np.flatnonzero(gate)
        if len(rows):
            nearest[rows] = nearest_centroid(embeddings[rows], self.centroids, device=self.spec.device)
        return pa.array(nearest)


def _combined(col) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks()
    return col


def _np(col) -> np.ndarray:
    col = _combined(col)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    return col.to_numpy(zero_copy_only=False)


# --- running the pass -------------------------------------------------------------------------
@dataclass(frozen=True)
class Executor:
    """Where the signals pass runs."""

    kind: str = "ray"  # "ray" (a Ray Data job) or "local" (this process, one file at a time)
    ray_address: str | None = None
    num_workers: int = max(1, os.cpu_count() or 1)
    use_gpu: bool = False


def _find_cause(exc: BaseException, types: tuple[type, ...]) -> BaseException | None:
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
                     executor: Executor = Executor(), *, progress: bool = True) -> list[dict]:
    """Bring the signals of every file up to `spec`; returns one summary per file."""
    signals_dir = Path(signals_dir)
    signals_dir.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict] = {}
    todo = []
    checker = SignalsWorker(spec)
    for parquet in files:
        out = signals_path(signals_dir, parquet)
        groups, header = groups_to_compute(parquet, out, spec)
        if groups:
            todo.append((parquet, out))
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
        run = _run_ray if executor.kind == "ray" else _run_local
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


def _run_local(todo, spec, executor, progress):
    worker = SignalsWorker(spec)
    for i, (parquet, out) in enumerate(todo, 1):
        yield worker.process(parquet, out)
        if progress and (i == len(todo) or i % max(1, len(todo) // 10) == 0):
            print(f"signals: {i}/{len(todo)} files", file=sys.stderr)


def _run_ray(todo, spec, executor, progress):
    import ray

    started_here = False
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if executor.ray_address:
            ray.init(address=executor.ray_address, **kwargs)
        else:
            ray.init(num_cpus=executor.num_workers, **kwargs)
        started_here = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        gpus = float(ray.cluster_resources().get("GPU", 0)) if executor.use_gpu else 0.0
        workers = max(1, min(executor.num_workers, len(todo)))
        per_call = max(1, min(64, len(todo) // (workers * 4)))
        blocks = math.ceil(len(todo) / per_call)
        ds = ray.data.from_items([{"parquet": str(p), "signals": str(o)} for p, o in todo],
                                 override_num_blocks=blocks)
        ds = ds.map_batches(SignalsWorker, fn_constructor_kwargs={"spec": spec}, batch_size=per_call,
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
                            num_gpus=min(1.0, gpus / workers) if gpus else None)
        done = 0
        for row in ds.iter_rows():
            done += 1
            if progress and (done == len(todo) or done % max(1, len(todo) // 10) == 0):
                print(f"signals: {done}/{len(todo)} files", file=sys.stderr)
            yield json.loads(row["summary"])
    finally:
        if started_here:
            ray.shutdown()


def iter_signal_tables(files: Sequence[Path], signals_dir: Path, columns: Sequence[str]):
    """(metadata file, table of `columns`) for each file, from its signals parquet."""
    for parquet in files:
        path = signals_path(signals_dir, parquet)
        try:
            table = pq.ParquetFile(path).read(columns=list(columns))
        except Exception as exc:
            raise SignalsError(f"{path}: cannot read signal columns {list(columns)} ({exc})") from exc
        yield parquet, table
