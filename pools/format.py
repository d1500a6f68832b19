"""The CommonPool format, as code: a pool's layout, its parquet schema, its npz keys.

A pool folder looks like DataComp's (reference sections 1 and 2)::

    <pool>/metadata/<stem>.parquet   uid, url, text, sizes, CLIP scores, face boxes, sha256
    <pool>/metadata/<stem>.npz       row-aligned CLIP embeddings (optional): the img+txt pair
                                     of b32, of l14, or of both (`pipeline.score` adds one
                                     arch at a time)
    <pool>/shards/{:08d}.tar         webdataset shards: <key>.jpg, <key>.txt, <key>.json
    <pool>/shards/{:08d}.parquet     img2dataset's per-shard status table
    <pool>/shards/{:08d}_stats.json  img2dataset's per-shard counts ("successes", ...)

Metadata alone (with or without npz) is enough for every filter; shards are needed only to
reshard and train. The validator raises `PoolFormatError` naming the file and column. A pool
may also live in object storage (``s3://bucket/pool``): paths then are `pools.storage`'s.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pools import storage

SHARD_FORMAT = "{:08d}.tar"
SHARD_STATS_FORMAT = "{:08d}_stats.json"
SHARD_PARQUET_FORMAT = "{:08d}.parquet"
SAMPLES_PER_SHARD = 10_000  # img2dataset's number_sample_per_shard in DataComp

# Embedding keys of the npz beside each parquet: name -> width. float16, L2-normalised.
NPZ_KEYS: dict[str, int] = {"b32_img": 512, "b32_txt": 512, "l14_img": 768, "l14_txt": 768}
NPZ_DTYPE = np.float16
ARCHS = ("b32", "l14")  # an npz holds the img and txt keys of at least one of these

SCORE_COLUMNS = {"b32": "clip_b32_similarity_score", "l14": "clip_l14_similarity_score"}


class PoolFormatError(ValueError):
    """A pool file does not follow the CommonPool format; the message names file and column."""


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "string", "integer", "float" or "bboxes"
    hex_chars: int | None = None  # exact length of a hex string column, if it has one
    nullable: bool = True


METADATA_COLUMNS: tuple[Column, ...] = (
    Column("uid", "string", hex_chars=32, nullable=False),
    Column("url", "string"),
    Column("text", "string"),
    Column("original_width", "integer"),
    Column("original_height", "integer"),
    Column("clip_b32_similarity_score", "float"),
    Column("clip_l14_similarity_score", "float"),
    Column("face_bboxes", "bboxes"),
    Column("sha256", "string", hex_chars=64),
)
METADATA_COLUMN_NAMES = tuple(c.name for c in METADATA_COLUMNS)

# The schema we write; the validator also accepts large_string, int32 and float64 variants.
METADATA_SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("url", pa.string()),
    ("text", pa.string()),
    ("original_width", pa.int64()),
    ("original_height", pa.int64()),
    ("clip_b32_similarity_score", pa.float32()),
    ("clip_l14_similarity_score", pa.float32()),
    ("face_bboxes", pa.list_(pa.list_(pa.float64()))),
    ("sha256", pa.string()),
])


def _kind_matches(kind: str, typ: pa.DataType) -> bool:
    if kind == "string":
        return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)
    if kind == "integer":
        return pa.types.is_integer(typ)
    if kind == "float":
        return pa.types.is_floating(typ) or pa.types.is_null(typ)
    if kind == "bboxes":
        if pa.types.is_null(typ):
            return True
        if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)):
            return False
        inner = typ.value_type
        return (pa.types.is_null(inner) or (pa.types.is_list(inner) or pa.types.is_large_list(inner))
                and (pa.types.is_floating(inner.value_type) or pa.types.is_null(inner.value_type)))
    raise AssertionError(kind)


@dataclass(frozen=True)
class Pool:
    """Paths of one pool folder. Construct with `Pool(root)`; nothing is read until asked."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", storage.path(root))

    @property
    def metadata_dir(self) -> Path:
        return self.root / "metadata"

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def metadata_files(self) -> list[Path]:
        """The pool's parquet files, sorted by name (the order img2dataset reads them in)."""
        if not self.metadata_dir.is_dir():
            if isinstance(self.root, storage.ObjectPath):
                storage.check_bucket(self.root)
            raise PoolFormatError(f"{self.metadata_dir} does not exist: a pool needs a metadata/ "
                                  "folder of parquet files")
        files = sorted(p for p in self.metadata_dir.glob("*.parquet") if not p.name.startswith("."))
        if not files:
            raise PoolFormatError(f"{self.metadata_dir} holds no .parquet files")
        return files

    @staticmethod
    def npz_for(parquet: Path) -> Path:
        return parquet.with_suffix(".npz")

    def has_npz(self) -> bool:
        return all(self.npz_for(p).is_file() for p in self.metadata_files())

    def shard_files(self) -> list[Path]:
        """Webdataset shards present, sorted by id."""
        if not self.shards_dir.is_dir():
            return []
        return sorted(p for p in self.shards_dir.glob("*.tar") if re.fullmatch(r"\d+\.tar", p.name))

    def shard_stats(self, shard: Path) -> dict:
        stats = shard.with_name(shard.stem + "_stats.json")
        if not stats.is_file():
            raise PoolFormatError(f"{stats} is missing: every shard needs img2dataset's _stats.json")
        return json.loads(stats.read_text())


def validate_metadata_schema(schema: pa.Schema, path: Path | str,
                             columns: tuple[str, ...] = METADATA_COLUMN_NAMES) -> None:
    """Check that `schema` has the listed CommonPool columns with acceptable types."""
    for col in METADATA_COLUMNS:
        if col.name not in columns:
            continue
        idx = schema.get_field_index(col.name)
        if idx < 0:
            raise PoolFormatError(f"{path}: column {col.name!r} is missing (columns present: "
                                  f"{', '.join(schema.names)})")
        typ = schema.field(idx).type
        if not _kind_matches(col.kind, typ):
            raise PoolFormatError(f"{path}: column {col.name!r} has type {typ}; expected {col.kind}")


def validate_metadata_table(table: pa.Table, path: Path | str,
                            columns: tuple[str, ...] = METADATA_COLUMN_NAMES) -> None:
    """Check schema and values (uid/sha256 hex strings, non-null uids) of one metadata table."""
    validate_metadata_schema(table.schema, path, columns)
    for col in METADATA_COLUMNS:
        if col.name not in columns or col.hex_chars is None:
            continue
        values = table.column(col.name)
        if not col.nullable and values.null_count:
            row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            raise PoolFormatError(f"{path}: column {col.name!r} is null at row {row}")
        pattern = f"^[0-9a-f]{{{col.hex_chars}}}$"
        ok = pc.match_substring_regex(values, pattern)
        bad = pc.invert(pc.fill_null(ok, True))
        if pc.any(bad).as_py():
            row = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
            raise PoolFormatError(f"{path}: column {col.name!r} row {row} is "
                                  f"{values[row].as_py()!r}; expected {col.hex_chars} lowercase hex "
                                  "characters")


def read_metadata(path: Path | str, columns: tuple[str, ...] | list[str] | None = None) -> pa.Table:
    """Read (some columns of) one metadata parquet, with a clear error when it is unreadable."""
    path = storage.path(path)
    try:
        pf = pq.ParquetFile(storage.readable(path))
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise PoolFormatError(f"{path}: not a readable parquet file ({exc})") from exc
    wanted = list(columns) if columns is not None else list(METADATA_COLUMN_NAMES)
    validate_metadata_schema(pf.schema_arrow, path, tuple(wanted))
    try:
        table = pf.read(columns=wanted)
    except Exception as exc:
        raise PoolFormatError(f"{path}: failed to read columns {wanted} ({exc})") from exc
    return table


def score_fix(pool: Path | str, arch: str) -> str:
    """The command that fills a pool's `arch` scores and embeddings, for error messages."""
    return f"python -m pipeline.score --pool {pool} --model MODEL --as {arch}"


def _arch_of(key: str) -> str | None:
    arch = key.split("_", 1)[0]
    return arch if arch in ARCHS else None


def _missing_key_message(npz_path: Path, key: str, present: list[str]) -> str:
    msg = f"{npz_path}: key {key!r} is missing (keys present: {', '.join(present) or 'none'})"
    arch = _arch_of(key)
    if arch is not None:
        msg += (f"; the pool has no {arch} embeddings: add them with "
                f"`{score_fix(npz_path.parent.parent, arch)}`")
    return msg


def load_npz(parquet: Path | str, keys: tuple[str, ...], expected_rows: int) -> dict[str, np.ndarray]:
    """Load embedding `keys` from the npz beside `parquet`, checking rows and widths."""
    parquet = storage.path(parquet)
    npz_path = Pool.npz_for(parquet)
    if not npz_path.is_file():
        raise PoolFormatError(f"{npz_path} is missing: this step needs the embeddings "
                              f"{', '.join(keys)} beside {parquet.name}")
    try:
        npz = np.load(storage.whole(npz_path))
    except Exception as exc:
        raise PoolFormatError(f"{npz_path}: not a readable npz file ({exc})") from exc
    out = {}
    with npz:
        for key in keys:
            if key not in npz.files:
                raise PoolFormatError(_missing_key_message(npz_path, key, npz.files))
            arr = npz[key]
            _check_npz_array(npz_path, parquet, key, arr.shape, None, expected_rows)
            out[key] = arr
    return out


def _check_npz_array(npz_path: Path, parquet: Path, key: str, shape: tuple[int, ...],
                     dtype: np.dtype | None, expected_rows: int) -> None:
    width = NPZ_KEYS.get(key)
    if len(shape) != 2 or (width is not None and shape[1] != width):
        raise PoolFormatError(f"{npz_path}: key {key!r} has shape {shape}; expected (rows, {width})")
    if shape[0] != expected_rows:
        raise PoolFormatError(f"{npz_path} has {shape[0]} rows for {key!r} but {parquet.name} has "
                              f"{expected_rows}")
    if dtype is not None and dtype != NPZ_DTYPE:
        raise PoolFormatError(f"{npz_path}: key {key!r} is {dtype}; CommonPool's embeddings are "
                              f"{np.dtype(NPZ_DTYPE)}")


def npz_headers(npz_path: Path | str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each array of an npz, from the array headers alone: nothing else is
    read or decompressed, so checking a 3 GB npz costs a few kilobytes."""
    import zipfile

    npz_path = storage.path(npz_path)
    out = {}
    try:
        with zipfile.ZipFile(storage.readable(npz_path)) as archive:
            for name in archive.namelist():
                if not name.endswith(".npy"):
                    continue
                with archive.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                out[name[:-len(".npy")]] = (tuple(shape), np.dtype(dtype))
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise PoolFormatError(f"{npz_path}: not a readable npz file ({exc})") from exc
    return out


def npz_keys(npz_path: Path | str) -> list[str]:
    """The keys of an npz, from its zip directory only."""
    return list(npz_headers(npz_path))


def validate_npz(parquet: Path | str, expected_rows: int) -> tuple[str, ...]:
    """Check the npz beside `parquet`; returns the archs whose embeddings it holds.

    Each arch is all or nothing: both ``<arch>_img`` and ``<arch>_txt``, float16, of the
    arch's width, one row per parquet row; at least one arch must be there. Other keys (such
    as DataComp's ``dedup``) are allowed. Only the array headers are read.
    """
    parquet = storage.path(parquet)
    npz_path = Pool.npz_for(parquet)
    headers = npz_headers(npz_path)
    archs = []
    for arch in ARCHS:
        pair = (f"{arch}_img", f"{arch}_txt")
        present = [k for k in pair if k in headers]
        if len(present) == 1:
            missing = next(k for k in pair if k not in headers)
            raise PoolFormatError(f"{npz_path}: has {present[0]!r} but not {missing!r}; an arch's image "
                                  f"and text embeddings come together (`{score_fix(parquet.parent.parent, arch)}` "
                                  "writes both)")
        for key in present:
            shape, dtype = headers[key]
            _check_npz_array(npz_path, parquet, key, shape, dtype, expected_rows)
        if present:
            archs.append(arch)
    if not archs:
        raise PoolFormatError(f"{npz_path}: holds no CLIP embeddings (keys present: "
                              f"{', '.join(headers) or 'none'}); it needs b32_img + b32_txt, "
                              "l14_img + l14_txt, or both")
    return tuple(archs)


def empty_columns(parquet: Path | str, columns: tuple[str, ...] | list[str]) -> list[str]:
    """Those of `columns` that the parquet holds but that are null in every row (a score
    column never filled), from the footer's statistics alone. A column the file lacks, or
    whose statistics were not written, is not reported."""
    md = pq.ParquetFile(storage.readable(parquet)).metadata
    schema = md.schema.to_arrow_schema()
    out = []
    for name in columns:
        idx = schema.get_field_index(name)
        if idx < 0:
            continue
        if pa.types.is_null(schema.field(idx).type):
            out.append(name)
            continue
        leaf = [i for i in range(md.num_columns) if md.schema.column(i).path == name]
        if len(leaf) != 1:
            continue
        nulls = 0
        for g in range(md.num_row_groups):
            stats = md.row_group(g).column(leaf[0]).statistics
            if stats is None or not stats.has_null_count:
                nulls = -1
                break
            nulls += stats.null_count
        if nulls == md.num_rows:
            out.append(name)
    return out


def validate_pool(root: str | os.PathLike, *, check_shards: bool = True) -> dict:
    """Validate a whole pool; returns counts. Raises PoolFormatError on the first problem.

    An npz needs the embeddings of one arch at least (see `validate_npz`): a pool scored with
    b32 only is valid, and a step that needs l14 says so when it starts.
    """
    pool = Pool(root)
    rows = 0
    files = pool.metadata_files()
    npz_files = 0
    npz_archs = {arch: 0 for arch in ARCHS}  # npz files holding each arch's embeddings
    for path in files:
        table = read_metadata(path)
        validate_metadata_table(table, path)
        rows += table.num_rows
        if pool.npz_for(path).is_file():
            for arch in validate_npz(path, table.num_rows):
                npz_archs[arch] += 1
            npz_files += 1
    summary = {"metadata_files": len(files), "rows": rows, "npz_files": npz_files,
               "npz_archs": npz_archs, "shards": 0, "shard_samples": 0}
    if check_shards:
        for shard in pool.shard_files():
            stats = pool.shard_stats(shard)
            if "successes" not in stats:
                raise PoolFormatError(f"{shard.with_name(shard.stem + '_stats.json')}: no "
                                      "'successes' count")
            summary["shards"] += 1
            summary["shard_samples"] += int(stats["successes"])
    return summary
