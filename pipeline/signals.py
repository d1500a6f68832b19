"""The signal registry, and the signals of one metadata file: every per-row quantity a rule reads.

Each signal group is declared once, as a `SignalGroup`: its columns (name, type, meaning),
what it reads (metadata columns, npz keys, models from `pipeline.models.MODELS`, columns of
earlier groups), its version, and the pure function in ``filters/`` that computes it. Every
thing else derives from the declarations: which groups a strategy needs (the columns its
rules name), the order they are computed in (registry order), the reuse keys, the metadata
columns a run must read, ``pipeline.filter --list-signals``. Adding a signal is one
`register_signal` call plus one function.

A *gated* group (a model label: WordNet, fastText, CLD3, nearest centroid) is computed only
on the rows that pass every cheaper rule of some strategy that reads it (its gates, derived
by `pipeline.strategies.signals_needed`); other rows hold null. The groups:

{table}

One signals file per metadata file, ``<signals>/<stem>.parquet``, one row per pool row in the
same order. Its schema metadata records the source files' fingerprints and, per group, a key
made of the group's version and the identity of the models it uses; per gated group, the
gates it covers. A rerun reuses every group whose key still matches, fills in a gated group
where a new gate needs rows it lacks, and recomputes the rest; files are written under a
temporary name and renamed, so a killed run leaves either the old file or the new one.

The unit of work is one metadata file, done by a `SignalsWorker` (which loads each model once);
`pipeline.execution` runs the workers, `pipeline.signals_pass` drives the pass.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.arrays import from_numpy, to_numpy
from filters.contamination import contamination_signals
from filters.entity import entity_signals
from filters.expressions import rule_columns, rule_outcomes, signal_frame
from filters.image_based import centroid_signals, embedding_signals, target_centroid_signals
from filters.faces import face_signals
from filters.image_size import size_signals
from filters.language import cld3_signals, fasttext_signals
from filters.negclip import normsim_signals
from filters.rows import precomputed_columns, row_signals
from filters.text import caption_signals
from pipeline.models import MODELS, ModelSettings
from pools import storage
from pools.files import atomic_path, file_fingerprint
from pools.format import ARCHS, SCORE_COLUMNS, Pool, PoolFormatError, load_npz, validate_metadata_schema

if TYPE_CHECKING:
    import polars as pl

SIGNALS_FORMAT_VERSION = 2
METADATA_KEY = b"datacomp_signals"

# Column types as the rules see them (names of Polars types, looked up when a rule is checked:
# Polars is imported on first use); "label" is a dictionary-encoded string.
COLUMN_TYPES = {"uint8": "UInt8", "int32": "Int32", "uint64": "UInt64", "float32": "Float32",
                "float64": "Float64", "bool": "Boolean", "label": "Categorical"}
NUMERIC_TYPES = ("uint8", "int32", "uint64", "float32", "float64")  # what a selection can rank


class SignalsError(RuntimeError):
    """The signals pass failed; the message names the file."""


@dataclass(frozen=True)
class SignalColumn:
    name: str
    type: str  # a key of COLUMN_TYPES
    meaning: str
    reads: tuple[str, ...] = ()  # metadata columns a strategy naming this column needs in the pool

    def __post_init__(self) -> None:
        if self.type not in COLUMN_TYPES:
            raise ValueError(f"signal column {self.name}: type must be one of {', '.join(COLUMN_TYPES)}")


@dataclass(frozen=True)
class SignalGroup:
    """One signal group: columns computed together by one function from declared inputs.

    `compute` is called with keyword arguments named after its inputs: each metadata column
    of `reads` (an Arrow column; `optional_reads` are None when the file lacks them), each npz
    key, each model (as `pipeline.models.MODELS` builds it), each signal column of `signals`,
    and ``file_name`` when `wants_file_name`. It returns {column: values} for every declared
    column, one value per input row, and raises ValueError (with the column) on bad input.
    A gated group's function is called on the gated rows only.
    """

    name: str
    version: int
    columns: tuple[SignalColumn, ...]
    compute: Callable[..., Mapping[str, object]]
    reads: tuple[str, ...] = ()
    optional_reads: tuple[str, ...] = ()
    npz_keys: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    signals: tuple[str, ...] = ()
    cost: int = 0  # cheaper groups' rules gate the costlier ones
    gated: bool = False
    wants_file_name: bool = False

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


SIGNAL_GROUPS: dict[str, SignalGroup] = {}


def register_signal(group: SignalGroup) -> SignalGroup:
    """Add `group` to the registry (after the groups it reads); returns it."""
    known = {c: g.name for g in SIGNAL_GROUPS.values() for c in g.column_names}
    if group.name in SIGNAL_GROUPS:
        raise ValueError(f"signal group {group.name!r} is already registered")
    clash = [c for c in group.column_names if c in known]
    if clash:
        raise ValueError(f"signal group {group.name!r}: column(s) {', '.join(clash)} already belong to "
                         f"{', '.join(sorted({known[c] for c in clash}))}")
    unknown = [c for c in group.signals if c not in known]
    if unknown:
        raise ValueError(f"signal group {group.name!r} reads {', '.join(unknown)}, which no earlier group computes")
    costlier = [c for c in group.signals if SIGNAL_GROUPS[known[c]].cost > group.cost]
    if costlier:
        raise ValueError(f"signal group {group.name!r} (cost {group.cost}) reads {', '.join(costlier)} of a "
                         "costlier group: give it at least that group's cost")
    bad_models = [m for m in group.models if m not in MODELS]
    if bad_models:
        raise ValueError(f"signal group {group.name!r}: unknown model(s) {', '.join(bad_models)}; "
                         f"known: {', '.join(MODELS)}")
    SIGNAL_GROUPS[group.name] = group
    return group


def unregister_signal(name: str) -> None:
    """Remove a group (tests that register a toy signal clean up with this)."""
    dependants = [g.name for g in SIGNAL_GROUPS.values() if name in group_dependencies(g)]
    if dependants:
        raise ValueError(f"signal group {name!r} is read by {', '.join(dependants)}")
    SIGNAL_GROUPS.pop(name)


_S = SignalColumn
register_signal(SignalGroup(
    name="base", version=2, compute=row_signals, reads=("uid",), optional_reads=tuple(SCORE_COLUMNS.values()),
    wants_file_name=True, columns=(
        _S("uid_hi", "uint64", "upper 64 bits of the uid (DataComp's u8,u8 record)"),
        _S("uid_lo", "uint64", "lower 64 bits of the uid"),
        _S("file", "label", "the metadata file the row is in"),
        _S("row", "int32", "the row's position in its metadata file"),
        _S("clip_b32_similarity_score", "float32", "OpenAI CLIP B/32 image-text cosine similarity (from the pool)",
           reads=("clip_b32_similarity_score",)),
        _S("clip_l14_similarity_score", "float32", "OpenAI CLIP L/14 image-text cosine similarity (from the pool)",
           reads=("clip_l14_similarity_score",)))))
register_signal(SignalGroup(
    name="size", version=1, compute=size_signals, reads=("original_width", "original_height"), columns=(
        _S("min_side", "float64", "shorter side of the original image in pixels (null if a side is missing)"),
        _S("aspect_ratio", "float64", "longer side / shorter side of the original image (x/0 is inf)"))))
register_signal(SignalGroup(
    name="text", version=1, compute=caption_signals, reads=("text",), columns=(
        _S("text_status", "uint8", "0: caption readable, 1: null, 2: not valid UTF-8"),
        _S("caption_words", "int32", "len(text.split()): words between Unicode whitespace"),
        _S("caption_chars", "int32", "len(text): Unicode code points"),
        _S("fasttext_tokens", "int32", "len(fasttext.tokenize(text)): ASCII-whitespace tokens, plus one per newline"))))
register_signal(SignalGroup(
    name="image_embedding", version=1, compute=embedding_signals, npz_keys=("l14_img",), cost=4, columns=(
        _S("image_embedding_missing", "bool",
           "l14_img is all zeros, NaN or infinite: no image embedding (pipeline.score found no image)"),)))
register_signal(SignalGroup(
    name="entity", version=1, compute=entity_signals, reads=("text",), signals=("text_status",),
    models=("wordnet",), cost=1, gated=True,
    columns=(_S("imagenet21k_entity", "bool",
                "some caption word's first WordNet synset is an ImageNet-21k class (DataComp's text filter)"),)))
register_signal(SignalGroup(
    name="fasttext", version=1, compute=fasttext_signals, reads=("text",), signals=("text_status",),
    models=("fasttext",), cost=2, gated=True,
    columns=(_S("fasttext_lang", "label", "fastText lid.176 top-1 language of the caption, newlines as spaces"),)))
register_signal(SignalGroup(
    name="cld3", version=1, compute=cld3_signals, reads=("text",), signals=("text_status",),
    models=("cld3",), cost=3, gated=True,
    columns=(_S("cld3_lang", "label", "CLD3 language of the caption (DataComp's LAION-2B filter)"),)))
register_signal(SignalGroup(
    name="centroid", version=1, compute=centroid_signals, npz_keys=("l14_img",), signals=("image_embedding_missing",),
    models=("centroids",), cost=4,
    gated=True, columns=(_S("nearest_centroid", "int32",
                            "pool centroid with the largest inner product with l14_img (-1: no embedding)"),)))
register_signal(SignalGroup(
    name="target_centroid", version=1, compute=target_centroid_signals, signals=("nearest_centroid",),
    models=("target_centroids",), cost=5, columns=(
        _S("nearest_centroid_in_targets", "bool",
           "the row's nearest centroid is nearest to some target embedding (DataComp's image-based rule)"),)))
register_signal(SignalGroup(
    name="faces", version=1, compute=face_signals, reads=("face_bboxes",), columns=(
        _S("face_count", "int32", "faces CommonPool's pipeline detected (boxes in face_bboxes; null: not run)"),
        _S("face_area_fraction", "float32", "fraction of the image the face boxes cover (their union)"))))
register_signal(SignalGroup(
    name="contamination", version=1, compute=contamination_signals, npz_keys=("l14_img",), models=("eval_sets",),
    cost=4, columns=(
        _S("eval_max_similarity", "float32",
           "largest cosine similarity of l14_img to an --eval-sets image (NaN: no embedding)"),
        _S("eval_task", "label", "the task (--eval-sets name) of that most similar evaluation image"),
        _S("eval_nearest", "int32", "that image's index within its task (its order in the task's files)"))))
register_signal(SignalGroup(
    name="semdedup", version=1, compute=precomputed_columns, reads=("uid",), models=("semdedup",), cost=4,
    wants_file_name=True, columns=(
        _S("semdedup_cluster", "int32", "SemDeDup's k-means cluster of the row's image embedding (-1: no embedding)"),
        _S("semdedup_max_similarity", "float32",
           "largest cosine similarity of the row's image to another row of its cluster (-1: none)"),
        _S("semdedup_preferred_similarity", "float32",
           "largest cosine similarity to a row before it in its cluster's keep order (-1: none); SemDeDup "
           "drops the row when this is above its threshold"))))
for _arch in ARCHS:
    register_signal(SignalGroup(
        name=f"negclip_{_arch}", version=1, compute=precomputed_columns, reads=("uid",), models=(f"negclip_{_arch}",),
        cost=4, wants_file_name=True, columns=(
            _S(f"negclip_loss_{_arch}", "float32",
               f"negCLIPLoss from the {_arch} embeddings: the CLIP score minus the contrastive loss terms of "
               "random batches (NaN: no embedding)"),)))
    register_signal(SignalGroup(
        name=f"normsim_{_arch}", version=1, compute=partial(normsim_signals, _arch), npz_keys=(f"{_arch}_img",),
        models=(f"normsim_targets_{_arch}",), cost=4, columns=(
            _S(f"normsim2_{_arch}", "float32",
               f"NormSim-2: root of the summed squared cosines of {_arch}_img to the --targets (NaN: no embedding)"),
            _S(f"normsim_inf_{_arch}", "float32",
               f"NormSim-inf: largest cosine of {_arch}_img to a --targets embedding (NaN: no embedding)"))))
del _S


def register_named_scorer(name: str) -> str:
    """The signal group ``score_<name>`` of a named scorer (`pipeline.score --as NAME`), registered
    when a pool has one (`pipeline.filter` and every worker do this); returns the column."""
    from pipeline.models import register_scorer_model

    column = f"score_{name}"
    if column not in SIGNAL_GROUPS:
        register_signal(SignalGroup(
            name=column, version=1, compute=precomputed_columns, reads=("uid",), models=(register_scorer_model(name),),
            cost=4, wants_file_name=True, columns=(SignalColumn(
                column, "float32", f"image-text cosine of the named scorer {name} (pipeline.score --as {name}; "
                                   "NaN: no image)"),)))
    return column


# --- what derives from the declarations --------------------------------------------------------
def column_groups() -> dict[str, str]:
    """Signal column -> the group that computes it, in registry order."""
    return {c: g.name for g in SIGNAL_GROUPS.values() for c in g.column_names}


def column_types() -> dict[str, str]:
    """Every signal column's declared type (a key of `COLUMN_TYPES`)."""
    return {c.name: c.type for g in SIGNAL_GROUPS.values() for c in g.columns}


def signal_schema() -> dict[str, pl.DataType]:
    """Every signal column's type as the rules see it."""
    import polars as pl

    return {name: getattr(pl, COLUMN_TYPES[t]) for name, t in column_types().items()}


def group_dependencies(group: SignalGroup) -> tuple[str, ...]:
    owners = column_groups()
    return tuple(dict.fromkeys(owners[c] for c in group.signals))


def expand_groups(groups: Iterable[str]) -> tuple[str, ...]:
    """`groups`, base and the groups they read, in computation order: cheaper groups first (their
    rules gate the costlier ones), registry order among equals."""
    wanted: set[str] = set()
    stack = ["base", *groups]
    while stack:
        g = stack.pop()
        if g not in SIGNAL_GROUPS:
            raise ValueError(f"unknown signal group {g!r}; known: {', '.join(SIGNAL_GROUPS)}")
        if g not in wanted:
            wanted.add(g)
            stack.extend(group_dependencies(SIGNAL_GROUPS[g]))
    order = list(SIGNAL_GROUPS)
    return tuple(sorted(wanted, key=lambda g: (SIGNAL_GROUPS[g].cost, order.index(g))))


def group_keys(groups: Sequence[str], models: ModelSettings) -> dict[str, str]:
    """The reuse key of each group: its version plus the identity of every model it uses."""
    return {g: "/".join([f"{g}/v{SIGNAL_GROUPS[g].version}",
                         *(f"{m}={MODELS[m].fingerprint(models)}" for m in SIGNAL_GROUPS[g].models)])
            for g in groups}


def list_signals() -> str:
    """Every signal column with its group and meaning, as ``--list-signals`` prints it."""
    width = max(len(c.name) for g in SIGNAL_GROUPS.values() for c in g.columns)
    lines = []
    for g in SIGNAL_GROUPS.values():
        inputs = [*g.reads, *(f"npz:{k}" for k in g.npz_keys), *(f"model:{m}" for m in g.models), *g.signals]
        lines.append(f"[{g.name}] v{g.version}{' (gated: computed where cheaper rules pass)' if g.gated else ''}"
                     f" reads {', '.join(inputs) or 'nothing'}")
        for c in g.columns:
            lines.append(f"  {c.name:<{width}}  {c.type:<7}  {c.meaning}")
    return "\n".join(lines)


def _group_table() -> str:
    rows = [(g.name, ", ".join(g.column_names), ", ".join([*g.reads, *g.npz_keys, *g.models, *g.signals]))
            for g in SIGNAL_GROUPS.values()]
    return "\n".join(f"- {name}: {cols} (reads {reads or '-'})" for name, cols, reads in rows)


__doc__ = __doc__.replace("{table}", _group_table())


# --- what the workers are sent ------------------------------------------------------------------
@dataclass(frozen=True)
class Gate:
    """Rows that pass every one of `rules` (SQL expressions over cheaper signal columns).
    `token` identifies the gate in a signals header: the rules plus the keys of the groups
    they read, so a gate over recomputed signals is not taken as covered."""

    token: str
    rules: tuple[str, ...]


EVERY_ROW = Gate(token="*", rules=())


@dataclass(frozen=True)
class SignalsSpec:
    """What the workers compute: picklable, sent once to every worker."""

    groups: tuple[str, ...]
    keys: dict[str, str]  # group -> key that a stored group must match to be reused
    required_columns: tuple[str, ...]  # metadata columns the strategies need, checked per file
    models: ModelSettings = field(default_factory=ModelSettings)
    gates: dict[str, tuple[Gate, ...]] = field(default_factory=dict)  # gated group -> rows it needs
    skip_bad_files: bool = False
    named_scorers: tuple[str, ...] = ()  # registered in each worker (pipeline.score --as NAME)

    def gates_of(self, group: str) -> tuple[Gate, ...]:
        return self.gates.get(group) or (EVERY_ROW,)


def signals_path(signals_dir: Path, parquet: Path) -> Path:
    return storage.path(signals_dir) / (storage.path(parquet).stem + ".parquet")


def read_signals_header(path: Path) -> dict | None:
    """The stored header of a signals file (source fingerprints, rows, group keys, gates), or None."""
    try:
        meta = pq.read_schema(storage.readable(path)).metadata or {}
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


def _uses_npz(groups: Iterable[str]) -> bool:
    return any(SIGNAL_GROUPS[g].npz_keys for g in groups)


def source_fingerprints(parquet: Path, groups: Sequence[str]) -> dict[str, str]:
    """Fingerprints of the inputs a file's signals are computed from (parquet, and npz if used)."""
    out = {"parquet": file_fingerprint(parquet)}
    if _uses_npz(groups):
        npz = Pool.npz_for(parquet)
        out["npz"] = file_fingerprint(npz) if npz.is_file() else "missing"
    return out


def _covered(gates: Sequence[Gate], stored: Sequence[str]) -> bool:
    return EVERY_ROW.token in stored or all(g.token in stored for g in gates)


def groups_to_compute(parquet: Path, signals_file: Path, spec: SignalsSpec) -> tuple[dict[str, str], dict | None]:
    """What to do for each group of `spec` that is not reusable as stored: "new" (compute every
    needed row) or "fill" (a gated group whose stored rows lack some of a new gate's rows);
    and the header of the stored file, if it can be built on."""
    header = read_signals_header(signals_file) if signals_file.is_file() else None
    if header is None:
        return {g: "new" for g in spec.groups}, None
    sources = source_fingerprints(parquet, spec.groups)
    if header.get("sources", {}).get("parquet") != sources["parquet"]:
        return {g: "new" for g in spec.groups}, None
    stored = dict(header.get("groups", {}))
    if "npz" in sources and header.get("sources", {}).get("npz") != sources["npz"]:
        stored = {g: k for g, k in stored.items() if not SIGNAL_GROUPS.get(g) or not SIGNAL_GROUPS[g].npz_keys}
    todo: dict[str, str] = {}
    for g in spec.groups:  # computation order: a group's inputs are decided before it
        group = SIGNAL_GROUPS[g]
        if stored.get(g) != spec.keys[g] or any(d in todo for d in group_dependencies(group)):
            todo[g] = "new"
        elif group.gated and not _covered(spec.gates_of(g), header.get("gates", {}).get(g, [])):
            todo[g] = "fill"
    return todo, header


# --- computing one file -------------------------------------------------------------------------
def _combined(col) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col, np.ndarray):
        col = from_numpy(col) if col.dtype.kind in "iuf" else pa.array(col)
    return col


def _take(value, rows: np.ndarray):
    """The `rows` of one compute input (Arrow column, NumPy array, or a model: unchanged)."""
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        return value.take(from_numpy(rows))
    if isinstance(value, np.ndarray) and value.ndim >= 1:
        return value[rows]
    return value


def _scatter(values, rows: np.ndarray, n: int, previous) -> pa.Array:
    """A full column: `values` at `rows`, the previous value (or null) elsewhere."""
    values = _combined(values)
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    index = np.full(n, -1, dtype=np.int64)
    index[rows] = np.arange(len(rows))
    placed = values.take(pa.array(index, mask=index < 0))
    if previous is None:
        return placed
    previous = _combined(previous)
    if pa.types.is_dictionary(previous.type):
        previous = previous.dictionary_decode()
    return pc.if_else(from_numpy(index >= 0), placed, previous.cast(placed.type))


class SignalsWorker:
    """Computes and stores the signals of metadata files; each model loads on first use."""

    def __init__(self, spec: SignalsSpec):
        self.spec = spec
        self._models: dict[str, object] = {}
        for name in spec.named_scorers:  # (a Ray worker imports the registry without them)
            register_named_scorer(name)

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = MODELS[name].load(self.spec.models)
        return self._models[name]

    def warm_up(self) -> None:
        """Load every model the spec's groups use."""
        for g in self.spec.groups:
            for m in SIGNAL_GROUPS[g].models:
                self.model(m)

    def __call__(self, unit: tuple[str, str]) -> dict:
        """The execution layer's unit: (metadata file, its signals file)."""
        parquet, out = unit
        return self.process(storage.path(parquet), storage.path(out))

    def process(self, parquet: Path, out: Path) -> dict:
        """Bring one file's signals up to the spec; a summary of what was done."""
        parquet, out = storage.path(parquet), storage.path(out)
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
        return {"file": parquet.name, "status": "computed", "rows": rows, "computed": list(todo),
                "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
                "pid": os.getpid()}

    def _check_schema(self, parquet: Path) -> pa.Schema:
        try:
            schema = pq.read_schema(storage.readable(parquet))
        except Exception as exc:
            raise PoolFormatError(f"{parquet}: not a readable parquet file ({exc})") from exc
        validate_metadata_schema(schema, parquet, ("uid", *self.spec.required_columns))
        return schema

    def _gate(self, group: str, columns: Mapping[str, object], final: set[str], passes: dict[str, np.ndarray],
              n: int) -> np.ndarray:
        """Rows that need `group`: those passing every rule of one of its gates. Every gate rule
        (of any group) whose columns are final is evaluated now, in one query, and kept in
        `passes`: a query costs more than its rules on one file, and later gates share rules."""
        pending = dict.fromkeys(r for gates in self.spec.gates.values() for gate in gates for r in gate.rules
                                if r not in passes)
        ready = [r for r in pending if all(c in final for c in rule_columns(r))]
        if ready:
            needed = sorted({c for r in ready for c in rule_columns(r)}) or ["row"]
            frame = signal_frame({c: _combined(columns[c]) for c in needed})
            passes.update((r, p) for r, (p, _) in zip(ready, rule_outcomes(frame, ready)))
        gate = np.zeros(n, dtype=bool)
        for clause in self.spec.gates_of(group):
            keep = np.ones(n, dtype=bool)
            for rule in clause.rules:
                keep &= passes[rule]
            gate |= keep
        return gate

    def _compute(self, parquet: Path, out: Path, todo: dict[str, str], header: dict | None) -> int:
        schema = self._check_schema(parquet)
        groups = [SIGNAL_GROUPS[g] for g in todo]
        wanted = {c for g in groups for c in (*g.reads, *g.optional_reads)}
        try:
            source = pq.ParquetFile(storage.readable(parquet)).read(columns=[c for c in schema.names if c in wanted])
        except Exception as exc:
            raise PoolFormatError(f"{parquet}: failed to read columns {sorted(wanted)} ({exc})") from exc
        n = source.num_rows
        columns: dict[str, object] = {}
        if header is not None:
            if header["rows"] != n:
                raise PoolFormatError(f"{out}: holds {header['rows']} rows but {parquet} has {n}")
            keep = [c for g, key in header["groups"].items() if g in SIGNAL_GROUPS and todo.get(g) != "new"
                    for c in SIGNAL_GROUPS[g].column_names]
            existing = pq.ParquetFile(storage.readable(out)).schema_arrow.names
            stored = pq.read_table(storage.readable(out), columns=[c for c in keep if c in existing])
            columns = {c: stored.column(c) for c in stored.column_names}
        npz: dict[str, np.ndarray] = {}
        gates = dict(header.get("gates", {})) if header is not None else {}
        final = {c for g, key in (header["groups"].items() if header is not None else ())  # not to be changed
                 if g in SIGNAL_GROUPS and g not in todo for c in SIGNAL_GROUPS[g].column_names}
        rule_passes: dict[str, np.ndarray] = {}  # the file's gate rules evaluated so far
        for g in groups:
            missing_keys = [k for k in g.npz_keys if k not in npz]
            if missing_keys:
                npz.update(load_npz(parquet, tuple(missing_keys), n))
            inputs = {**{c: source.column(c) for c in g.reads},
                      **{c: source.column(c) if c in source.column_names else None for c in g.optional_reads},
                      **{k: npz[k] for k in g.npz_keys}, **{m: self.model(m) for m in g.models},
                      **{c: columns[c] for c in g.signals}}
            if g.wants_file_name:
                inputs["file_name"] = parquet.name
            rows = None
            if g.gated:
                gate = self._gate(g.name, columns, final, rule_passes, n)
                previous = {c: columns.get(c) if todo[g.name] == "fill" else None for c in g.column_names}
                if todo[g.name] == "fill":
                    for c in g.column_names:
                        if previous[c] is not None:
                            gate &= to_numpy(_combined(previous[c]).is_null())
                rows = np.flatnonzero(gate)
                inputs = {k: _take(v, rows) for k, v in inputs.items()}
            try:
                result = g.compute(**inputs)
            except ValueError as exc:
                raise PoolFormatError(f"{parquet}: {exc}") from None
            produced = set(result)
            expected = set(g.column_names) - ({"clip_b32_similarity_score", "clip_l14_similarity_score"}
                                              if g.name == "base" else set())
            if not expected <= produced <= set(g.column_names):
                raise SignalsError(f"signal group {g.name}: its function returned {sorted(produced)}, "
                                   f"declared {list(g.column_names)}")
            for c, values in result.items():
                columns[c] = _scatter(values, rows, n, previous[c]) if rows is not None else values
            final.update(g.column_names)
            if g.gated:
                tokens = [t.token for t in self.spec.gates_of(g.name)]
                before = gates.get(g.name, []) if todo[g.name] == "fill" else []
                gates[g.name] = sorted(set(before) | set(tokens))
        stored_groups = {g: k for g, k in (header["groups"].items() if header is not None else ())
                         if g in SIGNAL_GROUPS and g not in todo}
        stored_groups.update({g: self.spec.keys[g] for g in todo})
        stored_groups = {g: stored_groups[g] for g in SIGNAL_GROUPS if g in stored_groups}
        gates = {g: t for g, t in gates.items() if g in stored_groups and SIGNAL_GROUPS[g].gated}
        types = {c.name: c.type for g in SIGNAL_GROUPS.values() for c in g.columns}
        order = [c for g in stored_groups for c in SIGNAL_GROUPS[g].column_names if c in columns]
        table = pa.table({c: _stored(columns[c], types[c]) for c in order})
        meta = {"format": SIGNALS_FORMAT_VERSION, "source": parquet.name,
                "sources": source_fingerprints(parquet, list(stored_groups)), "rows": n, "groups": stored_groups,
                "gates": gates}
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)})
        with atomic_path(out) as tmp:
            # Dictionary pages only for labels (uids, scores and counts hardly repeat) and no
            # column statistics (nothing prunes by them): a third of the write time, and smaller.
            pq.write_table(table, tmp, use_dictionary=[c for c in order if types[c] == "label"],
                           write_statistics=False)
        return n


def _stored(values, type_name: str) -> pa.Array:
    """A column as stored: labels dictionary-encoded, NumPy arrays as Arrow."""
    col = _combined(values)
    if type_name == "label" and not pa.types.is_dictionary(col.type):
        col = col.cast(pa.string()).dictionary_encode()
    return col


def iter_signal_tables(files: Sequence[Path], signals_dir: Path, columns: Sequence[str]):
    """(metadata file, table of `columns`) for each file, from its signals parquet."""
    for parquet in files:
        path = signals_path(signals_dir, parquet)
        try:
            table = pq.ParquetFile(storage.readable(path)).read(columns=list(columns))
        except Exception as exc:
            raise SignalsError(f"{path}: cannot read signal columns {list(columns)} ({exc})") from exc
        yield parquet, table
