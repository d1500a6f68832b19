"""The signals pass: every per-row quantity a DataComp rule looks at, computed once per pool.

One signals file per metadata file, ``<signals>/<stem>.parquet``, one row per pool row in the
same order, holding the columns of the signal groups computed so far:

=========  ===========================================================================  =========
group      columns                                                                      needs
=========  ===========================================================================  =========
base       uid_hi, uid_lo (DataComp's u8,u8), file, row, clip_b32_similarity_score,     parquet
           clip_l14_similarity_score (copied), min_side, aspect_ratio
text       text_status (0 ok, 1 null, 2 not UTF-8), caption_words                      parquet
           (``len(text.split())``), caption_chars (``len(text)``), fasttext_tokens
           (``len(fasttext.tokenize(text))``)
entity     imagenet21k_entity (some word's first WordNet synset is an IN-21k class)     WordNet
cld3       cld3_lang (CLD3 label; computed only where the B/32 score >= 0.28, the      CLD3
           only rows LAION-2B can keep; null elsewhere)
fasttext   fasttext_lang (fastText's top-1 label), computed on the rows that pass the   fastText
           other rules of a requested strategy (its "gate"), null elsewhere
centroid   nearest_centroid (pool centroid with the largest inner product with          npz,
           ``l14_img``; computed where the caption pre-filter passes and the row has    centroids
           an image embedding, -1 elsewhere), image_embedding_missing (``l14_img``
           is all zeros: the sample had no image, see `pipeline.score`)
=========  ===========================================================================  =========

The parquet's schema metadata records the source file's fingerprint and, per group, a key
made of the group's version and the fingerprints of what it depends on (models, WordNet,
centroids, npz). A rerun reuses every group whose key still matches and computes only the
rest; files are written under a temporary name and renamed, so a killed run leaves either
the old file or the new one. Models run once per distinct caption in a file, not per row.

The unit of work is one metadata file, done by a `SignalsWorker` (which loads fastText, CLD3
and WordNet once); `pipeline.execution` runs the workers, on Ray or in this process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.arrays import to_numpy
from filters.image_based import NO_CENTROID, missing_embedding_mask, nearest_centroid
from filters.image_size import ImageSize, aspect_ratio, image_size_mask, min_side
from filters.language import language_id_input, language_mask
from filters.laion import Laion2B, cld3_needed
from filters.text import (CaptionLength, CaptionPrefilter, TextStatus, caption_array, caption_length_mask,
                          caption_prefilter_mask, char_count, fasttext_token_count, readable_captions,
                          text_status, whitespace_word_count)
from pools.files import atomic_path, file_fingerprint
from pools.format import SCORE_COLUMNS, Pool, PoolFormatError, load_npz, validate_metadata_schema
from pools.uids import uids_to_records

if TYPE_CHECKING:
    from pipeline.execution import Executor

SIGNALS_FORMAT_VERSION = 1
METADATA_KEY = b"datacomp_signals"

# Bump a group's version whenever what it computes changes: stored signals are then recomputed.
GROUP_VERSIONS = {"base": 1, "text": 1, "entity": 1, "cld3": 1, "fasttext": 2, "centroid": 2}
GROUP_COLUMNS: dict[str, tuple[str, ...]] = {
    "base": ("uid_hi", "uid_lo", "file", "row", *SCORE_COLUMNS.values(), "min_side", "aspect_ratio"),
    "text": ("text_status", "caption_words", "caption_chars", "fasttext_tokens"),
    "entity": ("imagenet21k_entity",),
    "cld3": ("cld3_lang",),
    "fasttext": ("fasttext_lang",),
    "centroid": ("nearest_centroid", "image_embedding_missing"),
}
GROUP_ORDER = tuple(GROUP_COLUMNS)  # also the order they are computed in
# Signal groups that other groups are computed from. fastText labels are a function of the
# caption alone; which rows get one (the gates) is tracked separately, see `lid_gate_tokens`.
GROUP_DEPENDS = {"base": (), "text": ("base",), "entity": ("text",), "cld3": ("base",),
                 "fasttext": ("base", "text"), "centroid": ("text", "fasttext")}
# fastText gates: the rows of a strategy that pass every one of its rules except English.
LID_GATES = {"basic": ("base", "text"), "text": ("text", "entity"), "prefilter": ("text",)}
# Metadata columns each group reads (beyond what earlier groups stored).
GROUP_SOURCE_COLUMNS = {"base": ("uid",), "text": ("text",), "fasttext": ("text",), "entity": ("text",),
                        "cld3": ("text",), "centroid": ()}
OPTIONAL_BASE_COLUMNS = ("original_width", "original_height", *SCORE_COLUMNS.values())


class SignalsError(RuntimeError):
    """The signals pass failed; the message names the file."""


@dataclass(frozen=True)
class SignalsSpec:
    """What the workers compute: picklable, sent once to every worker."""

    groups: tuple[str, ...]
    keys: dict[str, str]  # group -> key that a stored group must match to be reused
    required_columns: tuple[str, ...]  # metadata columns the strategies need, checked per file
    lid_model: str | None = None
    morphy_repeat_rules: bool = True
    centroids: str | None = None
    device: str | None = None
    skip_bad_files: bool = False
    lid_gates: tuple[str, ...] = ()  # which rows get a fastText label (names in LID_GATES)
    laion: Laion2B = field(default_factory=Laion2B)
    caption_length: CaptionLength = field(default_factory=CaptionLength)
    image_size: ImageSize = field(default_factory=ImageSize)
    caption_prefilter: CaptionPrefilter = field(default_factory=CaptionPrefilter)


def lid_gate_tokens(spec: SignalsSpec) -> list[str]:
    """The gates as stored in a header: name plus the keys of the groups the gate reads, so a
    gate computed from other signals (e.g. another WordNet) does not count as covered."""
    return sorted(f"{g}|" + "|".join(spec.keys.get(d, "?") for d in LID_GATES[g]) for g in spec.lid_gates)


def expand_groups(groups: Iterable[str], lid_gates: Iterable[str] = ()) -> tuple[str, ...]:
    """`groups` plus the groups they (and the fastText gates) are computed from, in order."""
    wanted = set()
    stack = list(groups) + [d for g in lid_gates for d in LID_GATES[g]]
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
        if g in ("fasttext", "centroid"):
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
    # A group computed from a recomputed group must be recomputed too (fastText labels only
    # depend on the caption: new gates are filled in below, not recomputed).
    changed = set(todo)
    for g in spec.groups:
        if g not in changed and g != "fasttext" and any(d in changed for d in GROUP_DEPENDS[g]):
            changed.add(g)
    if "fasttext" in spec.groups and not set(lid_gate_tokens(spec)) <= set(header.get("fasttext_gates", [])):
        changed.add("fasttext")
    return [g for g in spec.groups if g in changed], header


def _map_unique(texts: pa.Array, fn) -> pa.Array:
    """`fn` (list of str -> list of str) applied to each distinct non-null text once, mapped back."""
    encoded = pc.dictionary_encode(texts)
    labels = pa.array(fn(encoded.dictionary.to_pylist()), type=pa.string())
    return labels.take(encoded.indices)


class MemoLabeler:
    """A text -> label model call remembered across files (captions repeat within and across
    the files of a pool). Bounded: the memo is dropped when it holds `max_entries` texts."""

    def __init__(self, top1, max_entries: int = 500_000):
        self._top1 = top1
        self._memo: dict[str, str] = {}
        self._max = max_entries

    def __call__(self, texts: list[str]) -> list[str]:
        memo = self._memo
        todo = [t for t in texts if t not in memo]
        if todo:
            if len(memo) + len(todo) > self._max:
                memo.clear()
            memo.update(zip(todo, self._top1(todo)))
        return [memo[t] for t in texts]


def _per_unique(texts: pa.Array, fn) -> np.ndarray:
    """`fn` (Arrow strings -> NumPy values) on each distinct text once, mapped back (nulls -> 0)."""
    encoded = pc.dictionary_encode(texts)
    values = np.asarray(fn(encoded.dictionary))
    idx = encoded.indices.to_numpy(zero_copy_only=False)
    if encoded.indices.null_count:
        valid = ~to_numpy(encoded.indices.is_null())
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

    # --- models ---
    @property
    def lid(self) -> MemoLabeler:
        if self._lid is None:
            from pipeline.models import FastTextLanguageID, resolve_lid_model

            self._lid = MemoLabeler(FastTextLanguageID(resolve_lid_model(self.spec.lid_model)).top1)
        return self._lid

    @property
    def cld3(self) -> MemoLabeler:
        if self._cld3 is None:
            from pipeline.models import Cld3LanguageID

            s = self.spec.laion.cld3
            self._cld3 = MemoLabeler(Cld3LanguageID(s.min_num_bytes, s.max_num_bytes).top1)
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

    def warm_up(self) -> None:
        """Load every model the spec's groups use."""
        groups = set(self.spec.groups)
        if "fasttext" in groups:
            self.lid
        if "cld3" in groups:
            self.cld3
        if "entity" in groups:
            self.entity
        if "centroid" in groups:
            self.centroids

    # --- one file ---
    def process(self, parquet: Path, out: Path) -> dict:
        started = time.perf_counter()
        cpu_started = time.process_time()
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
                "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
                "pid": os.getpid()}

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
        labels_reusable = (header is not None and "fasttext" in todo
                           and header["groups"].get("fasttext") == self.spec.keys.get("fasttext"))
        if header is not None:
            if header["rows"] != n:
                raise PoolFormatError(f"{out}: holds {header['rows']} rows but {parquet} has {n}")
            keep = [c for g, cols in GROUP_COLUMNS.items()
                    if (g not in todo or (g == "fasttext" and labels_reusable)) and g in header["groups"]
                    for c in cols]
            existing = pq.ParquetFile(out).schema_arrow.names
            stored_table = pq.read_table(out, columns=[c for c in keep if c in existing])
            stored = {c: stored_table.column(c) for c in stored_table.column_names}
        columns: dict[str, pa.Array | pa.ChunkedArray] = dict(stored)
        if "base" in todo:
            columns.update(self._base(parquet, source))
        texts = status = None
        if any(g in todo for g in ("text", "fasttext", "entity", "cld3")):
            raw = caption_array(source.column("text"))
            status = text_status(raw)
            texts = readable_captions(raw, status)
        if "text" in todo:
            columns.update(self._text(texts, status))
        if "entity" in todo:
            columns["imagenet21k_entity"] = pa.array(
                _per_unique(texts, lambda u: self._entity_hits(u)).astype(bool))
        if "cld3" in todo:
            columns["cld3_lang"] = self._cld3_labels(texts, _np(columns["clip_b32_similarity_score"]))
        gates_covered = list(header.get("fasttext_gates", [])) if labels_reusable else []
        if "fasttext" in todo:
            columns["fasttext_lang"] = self._fasttext_labels(texts, columns, columns.get("fasttext_lang"))
            gates_covered = sorted(set(gates_covered) | set(lid_gate_tokens(self.spec)))
        elif header is not None and "fasttext" in header["groups"]:
            gates_covered = list(header.get("fasttext_gates", []))
        if "centroid" in todo:
            columns["nearest_centroid"], columns["image_embedding_missing"] = self._nearest(parquet, n, columns)
        groups = dict(header["groups"]) if header is not None else {}
        for g in todo:
            groups[g] = self.spec.keys[g]
        groups = {g: groups[g] for g in GROUP_ORDER if g in groups}
        order = [c for g in GROUP_ORDER if g in groups for c in GROUP_COLUMNS[g] if c in columns]
        table = pa.table({c: columns[c] for c in order})
        sources = source_fingerprints(parquet, list(groups))
        meta = {"format": SIGNALS_FORMAT_VERSION, "source": parquet.name, "sources": sources,
                "rows": n, "groups": groups}
        if "fasttext" in groups:
            meta["fasttext_gates"] = gates_covered
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
                cols[name] = pa.array(nan_for_null(source.column(name)))
        names = source.column_names
        width = source.column("original_width") if "original_width" in names else pa.nulls(n, pa.int64())
        height = source.column("original_height") if "original_height" in names else pa.nulls(n, pa.int64())
        cols["min_side"] = pa.array(min_side(width, height))
        cols["aspect_ratio"] = pa.array(aspect_ratio(width, height))
        return cols

    def _text(self, texts: pa.Array, status: np.ndarray) -> dict:
        encoded = pc.dictionary_encode(texts)
        unique = encoded.dictionary
        index = encoded.indices.to_numpy(zero_copy_only=False)
        valid = ~to_numpy(encoded.indices.is_null()) if encoded.indices.null_count else None

        def per_row(values: np.ndarray) -> pa.Array:
            if valid is None:
                return pa.array(values[index.astype(np.int64)])
            out = np.zeros(len(texts), dtype=values.dtype)
            out[valid] = values[index[valid].astype(np.int64)]
            return pa.array(out)

        return {
            "text_status": pa.array(status),
            "caption_words": per_row(whitespace_word_count(unique)),
            "caption_chars": per_row(char_count(unique)),
            "fasttext_tokens": per_row(fasttext_token_count(unique)),
        }

    def lid_gate(self, columns: dict) -> np.ndarray:
        """Rows that need a fastText label: readable, and passing every other rule of some
        requested strategy (so the English rule, checked last, sees a label on every row)."""
        n = len(columns["text_status"])
        readable = _np(columns["text_status"]) == TextStatus.OK
        gate = np.zeros(n, dtype=bool)
        words, chars, tokens = (_np(columns[c]) for c in ("caption_words", "caption_chars", "fasttext_tokens"))
        if "basic" in self.spec.lid_gates:
            gate |= (caption_length_mask(words, chars, self.spec.caption_length)
                     & image_size_mask(_np(columns["min_side"]), _np(columns["aspect_ratio"]), self.spec.image_size))
        if "text" in self.spec.lid_gates:
            gate |= _np(columns["imagenet21k_entity"]).astype(bool)
        if "prefilter" in self.spec.lid_gates:
            gate |= caption_prefilter_mask(tokens, chars, self.spec.caption_prefilter)
        return gate & readable

    def _fasttext_labels(self, texts: pa.Array, columns: dict, previous) -> pa.Array:
        """Labels for the gated rows; labels stored by an earlier run (same model) are kept."""
        n = len(texts)
        labels = (_combined(previous).dictionary_decode() if previous is not None
                  and pa.types.is_dictionary(_combined(previous).type)
                  else (_combined(previous) if previous is not None else pa.nulls(n, pa.string())))
        missing = np.flatnonzero(self.lid_gate(columns) & ~to_numpy(labels.is_valid()))
        if len(missing) == 0:
            return labels.dictionary_encode()
        new = _map_unique(language_id_input(texts.take(pa.array(missing))), self.lid)
        index = np.full(n, -1, dtype=np.int64)
        index[missing] = np.arange(len(missing))
        filled = pc.if_else(pa.array(index >= 0), new.take(pa.array(index, mask=index < 0)), labels)
        return filled.dictionary_encode()

    def _entity_hits(self, unique_texts: pa.Array) -> np.ndarray:
        from filters.entity import entity_hit_mask

        return entity_hit_mask(unique_texts, self.entity)

    def _cld3_labels(self, texts: pa.Array, b32: np.ndarray) -> pa.Array:
        gate = cld3_needed(b32, self.spec.laion) & to_numpy(texts.is_valid())
        rows = np.flatnonzero(gate)
        if len(rows) == 0:
            return pa.nulls(len(texts), pa.string()).dictionary_encode()
        labels = _map_unique(language_id_input(texts.take(pa.array(rows))), self.cld3)
        index = np.full(len(texts), -1, dtype=np.int64)
        index[rows] = np.arange(len(rows))
        return labels.take(pa.array(index, mask=index < 0)).dictionary_encode()

    def _nearest(self, parquet: Path, n: int, columns: dict) -> tuple[pa.Array, pa.Array]:
        """(nearest centroid, image embedding missing) of every row."""
        gate = (
            (_np(columns["text_status"]) == TextStatus.OK)
            & language_mask(_combined(columns["fasttext_lang"]))
            & caption_prefilter_mask(_np(columns["fasttext_tokens"]), _np(columns["caption_chars"]),
                                     self.spec.caption_prefilter)
        )
        embeddings = load_npz(parquet, ("l14_img",), n)["l14_img"]
        missing = missing_embedding_mask(embeddings)
        nearest = np.full(n, NO_CENTROID, dtype=np.int32)
        rows = np.flatnonzero(gate & ~missing)
        if len(rows):
            nearest[rows] = nearest_centroid(embeddings[rows], self.centroids, device=self.spec.device)
        return pa.array(nearest), pa.array(missing)


def nan_for_null(scores: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A score column as NumPy, nulls as NaN (as pandas reads them), float32 unless it was float64.

    (Not ``pc.fill_null(col, nan)``: making a NaN scalar makes pyarrow import pandas.)
    """
    dtype = np.float64 if pa.types.is_float64(scores.type) else np.float32
    if pa.types.is_null(scores.type):
        return np.full(len(scores), np.nan, dtype=dtype)
    return np.asarray(to_numpy(scores), dtype=dtype)


def _combined(col) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks()
    return col


def _np(col) -> np.ndarray:
    col = _combined(col)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    return to_numpy(col) if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)) \
        else col.to_numpy(zero_copy_only=False)


# --- running the pass (the machinery is in pipeline.execution) ------------------------------
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
                     executor: "Executor | None" = None, *, progress: bool = True) -> list[dict]:
    """Bring the signals of every file up to `spec`; returns one summary per file.

    Files whose stored signals already match are checked and reused here; the rest go to
    `pipeline.execution` (a Ray Data job, or this process with ``Executor(kind="local")``).
    """
    from pipeline.execution import Executor

    executor = executor if executor is not None else Executor()
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
        from pipeline.execution import run_local, run_ray

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


def iter_signal_tables(files: Sequence[Path], signals_dir: Path, columns: Sequence[str]):
    """(metadata file, table of `columns`) for each file, from its signals parquet."""
    for parquet in files:
        path = signals_path(signals_dir, parquet)
        try:
            table = pq.ParquetFile(path).read(columns=list(columns))
        except Exception as exc:
            raise SignalsError(f"{path}: cannot read signal columns {list(columns)} ({exc})") from exc
        yield parquet, table
