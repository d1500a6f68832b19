"""The page a researcher opens first: what each strategy kept, why, and what it bought.

    python -m pipeline.report --pool POOL --subsets DIR [--runs RUN ... | --comparison DIR] --out report.html

One static HTML file, with every image inside it (base64 data URIs) and no scripts or
external resources, so it opens anywhere, offline, and can be mailed around. Sections:

a. **Funnel** of each strategy, from ``<subsets>/stats.json`` (`pipeline.filter`): rows in,
   rows passing each rule in funnel order, kept.
b. **CLIP scores**: histograms of the pool's ``clip_b32/l14_similarity_score`` (metadata), with
   the thresholds the strategies used (the clip fraction's resolved threshold, LAION's 0.28).
c. **Overlaps** between the subsets (``<subsets>/<strategy>.npy``): pairwise intersections and
   Jaccard indices of their unique uids, as a heatmap and a table.
d. **Examples**: images and captions of samples each strategy kept, and of samples dropped by
   each of its rules (the first rule a sample fails, as the funnel counts it). The outcomes are
   recomputed from the pool's signals table with `pipeline.strategies`' own rules and
   checked against the subset files, which decide the last rule (the image-based rule's target
   centroids are not recorded). Examples come from the first ``--scan-samples`` samples of
   ``<pool>/shards``; captions are the metadata's, which the rules read.
e. **Comparison** of training runs (`trainer.compare`), when ``--runs`` or ``--comparison``
   is given: its table, notes and chart.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pools.files import atomic_path
from pools.format import SCORE_COLUMNS, Pool, read_metadata
from pools.uids import UID_DTYPE, read_subset, records_to_uids, subset_counts, uids_to_records

from pipeline.strategies import StrategySpec, first_failed, spec_from_dict, spec_outcomes

STATS_FILE = "stats.json"
MANIFEST_FILE = "manifest.json"
# A rule "<score column> >= <number>" draws a line on that score's histogram (a reading of the
# rule's text for the plot only; the outcomes are computed by the rules themselves).
_SCORE_RULE = re.compile(r"\s*(clip_\w+_similarity_score)\s*>=\s*([-+0-9.eE]+)\s*")
SCORE_BIN_EDGES = np.linspace(-1.0, 1.0, 401)  # cosine similarities; 0.005 wide, fixed so files add up
KEPT = "kept"
DROPPED = "dropped"  # the outcome when the rules cannot be recomputed: dropped, by some rule
UID_PATTERN = re.compile(r"[0-9a-f]{1,32}")


class ReportError(RuntimeError):
    """The report cannot be built; the message names the input and how to make it."""


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    pool: Path
    subsets: Path  # pipeline.filter's --out: <strategy>.npy, stats.json, manifest.json
    out: Path
    runs: tuple[Path, ...] = ()
    comparison: Path | None = None  # a trainer.compare --out folder (instead of runs)
    signals_dir: Path | None = None  # default: what the filter's manifest.json records
    examples: int = 4  # images per strategy and outcome
    scan_samples: int = 5_000  # shard samples the examples are drawn from (the first ones)
    thumb_px: int = 96  # longer side of an example image
    seed: int = 0  # picks the examples

    def __post_init__(self) -> None:
        if self.examples < 0 or self.scan_samples < 0 or self.thumb_px <= 0:
            raise ValueError("--examples and --scan-samples must be >= 0 and --thumb-px > 0")
        if self.runs and self.comparison is not None:
            raise ValueError("give --runs or --comparison, not both")


# --- inputs -----------------------------------------------------------------------------------
def read_filter_outputs(subsets: Path) -> tuple[dict, dict]:
    """stats.json (required) and manifest.json (optional) of a pipeline.filter output folder."""
    path = Path(subsets) / STATS_FILE
    if not path.is_file():
        raise ReportError(f"{path} is missing: make the subsets with `python -m pipeline.filter --pool POOL "
                          f"--strategy all --out {subsets}`")
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
        strategies = stats["strategies"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"{path} is not pipeline.filter's stats.json ({exc!r})") from None
    if not isinstance(strategies, dict):
        raise ReportError(f"{path}: 'strategies' is not an object")
    manifest_path = Path(subsets) / MANIFEST_FILE
    manifest = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError:
            manifest = {}
    return stats, manifest


def subset_files(subsets: Path, stats: dict) -> dict[str, Path]:
    """Each strategy's uid file, in stats.json's order; stats' recorded path if it moved."""
    out = {}
    for name, entry in stats["strategies"].items():
        for candidate in (Path(subsets) / f"{name}.npy", Path(entry.get("output", ""))):
            if candidate.suffix == ".npy" and candidate.is_file():
                out[name] = candidate
                break
    return out


def unique_records(records: np.ndarray) -> np.ndarray:
    """Distinct uids of a sorted subset (a repeated uid means upsampling, not another sample)."""
    records = np.asarray(records)
    if len(records) < 2:
        return records.copy()
    keep = np.ones(len(records), dtype=bool)
    keep[1:] = records[1:] != records[:-1]
    return records[keep]


def load_kept(paths: dict[str, Path]) -> dict[str, np.ndarray]:
    return {name: unique_records(read_subset(p)) for name, p in paths.items()}


# --- a. funnel --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FunnelStep:
    label: str  # "rows in", a rule's name, or "kept"
    rows: int  # rows left after this step
    dropped: int  # rows this step dropped


def funnel_steps(entry: dict) -> list[FunnelStep]:
    """A strategy's funnel from its stats.json entry."""
    steps = [FunnelStep("rows in", int(entry["rows"]), 0)]
    steps += [FunnelStep(s["rule"], int(s["passed"]), int(s["dropped"])) for s in entry.get("funnel", [])]
    steps.append(FunnelStep(KEPT, int(entry["kept"]), 0))
    return steps


def funnel_png(stats: dict) -> bytes:
    """Small multiples, two a row: per strategy, the rows left after each rule."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    entries = list(stats["strategies"].items())

    ncols = 2 if len(entries) > 1 else 1
    nrows = max(1, -(-len(entries) // ncols))
    steps_per_row = [max(len(funnel_steps(e)) for _, e in entries[r * ncols:(r + 1) * ncols]) for r in range(nrows)]
    fig = Figure(figsize=(5.2 * ncols, sum(0.22 * n + 0.7 for n in steps_per_row)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw={"height_ratios": steps_per_row})
    for ax in axes.flat[len(entries):]:
        ax.set_visible(False)
    for ax, (name, entry) in zip(axes.flat, entries):
        steps = funnel_steps(entry)
        total = max(steps[0].rows, 1)
        ys = list(range(len(steps)))[::-1]
        colors = ["#9aa7b4"] + ["#4C78A8"] * (len(steps) - 2) + ["#54A24B"]
        ax.barh(ys, [s.rows for s in steps], color=colors)
        ax.set_yticks(ys, [s.label if s.label in ("rows in", KEPT) else f"after {s.label}" for s in steps],
                      fontsize=7)
        for y, s in zip(ys, steps):
            ax.text(s.rows, y, f" {s.rows:,} ({100 * s.rows / total:.1f}%)", va="center", fontsize=6.5)
        ax.set_xlim(0, total * 1.45)
        ax.set_title(f"{name}: kept {entry['kept']:,} of {entry['rows']:,}", fontsize=8, loc="left")
        ax.tick_params(axis="x", labelsize=6.5)
    return _png(fig)


# --- b. CLIP score histograms -----------------------------------------------------------------
@dataclass
class ScoreHistogram:
    column: str
    counts: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_BIN_EDGES) - 1, np.int64))
    missing: int = 0  # null or NaN scores
    below_range: int = 0  # outside [-1, 1]: not a cosine similarity, counted rather than hidden
    above_range: int = 0

    def add(self, scores: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        finite = scores[~np.isnan(scores)]
        self.missing += len(scores) - len(finite)
        self.below_range += int((finite < SCORE_BIN_EDGES[0]).sum())
        self.above_range += int((finite > SCORE_BIN_EDGES[-1]).sum())
        self.counts += np.histogram(finite, bins=SCORE_BIN_EDGES)[0]

    @property
    def present(self) -> int:
        return int(self.counts.sum())


def _entry_specs(entry: dict) -> dict[str, dict]:
    """A stats.json entry's spec and the specs it intersects, as recorded."""
    spec = entry.get("spec") or {}
    return {**entry.get("members", {}), **({spec["name"]: spec} if spec else {})}


def score_thresholds(stats: dict) -> dict[str, list[tuple[str, float]]]:
    """Score column -> [(strategies, threshold)] from the specs and resolved selections in
    stats.json; strategies sharing one are merged."""
    found: dict[str, dict[float, list[str]]] = {}
    for name, entry in stats["strategies"].items():
        for spec in _entry_specs(entry).values():
            for rule in spec.get("rules", []):
                m = _SCORE_RULE.fullmatch(rule["rule"])
                if m:
                    found.setdefault(m.group(1), {}).setdefault(float(m.group(2)), []).append(name)
        for sel in entry.get("selections", {}).values():
            if sel.get("column") in SCORE_COLUMNS.values() and sel.get("threshold") is not None \
                    and np.isfinite(sel["threshold"]):
                label = name + (f" (top {sel['fraction']:.0%})" if sel.get("fraction") is not None else "")
                found.setdefault(sel["column"], {}).setdefault(float(sel["threshold"]), []).append(label)
    return {col: [(", ".join(dict.fromkeys(names)), t) for t, names in sorted(by_value.items())]
            for col, by_value in found.items()}


def histogram_png(hist: ScoreHistogram, thresholds: Sequence[tuple[str, float]]) -> bytes:
    fig, ax = _figure()
    nonzero = np.flatnonzero(hist.counts)
    lo = SCORE_BIN_EDGES[max(nonzero[0] - 2, 0)] if len(nonzero) else -0.1
    hi = SCORE_BIN_EDGES[min(nonzero[-1] + 3, len(SCORE_BIN_EDGES) - 1)] if len(nonzero) else 0.6
    for t in (t for _, t in thresholds):
        lo, hi = min(lo, t - 0.02), max(hi, t + 0.02)
    widths = np.diff(SCORE_BIN_EDGES)
    ax.bar(SCORE_BIN_EDGES[:-1], hist.counts, width=widths, align="edge", color="#4C78A8")
    palette = ["#E45756", "#F58518", "#54A24B", "#B279A2"]
    for i, (label, t) in enumerate(thresholds):
        ax.axvline(t, color=palette[i % len(palette)], lw=1.5, ls="--", label=f"{label}: ≥ {t:.4g}")
    if thresholds:
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xlim(lo, hi)
    ax.set_xlabel(hist.column, fontsize=8)
    ax.set_ylabel("rows", fontsize=8)
    ax.set_title(f"{hist.column}: {hist.present:,} scored rows, {hist.missing:,} missing", fontsize=8)
    ax.tick_params(labelsize=7)
    return _png(fig)


# --- c. overlaps ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Overlaps:
    names: tuple[str, ...]
    intersections: np.ndarray  # (k, k) unique uids in both; the diagonal is each subset's size

    @property
    def sizes(self) -> np.ndarray:
        return np.diag(self.intersections)

    @property
    def jaccard(self) -> np.ndarray:
        """|A ∩ B| / |A ∪ B|; NaN where both subsets are empty (no samples to compare)."""
        union = self.sizes[:, None] + self.sizes[None, :] - self.intersections
        return np.where(union > 0, self.intersections / np.maximum(union, 1), np.nan)


def subset_overlaps(kept: dict[str, np.ndarray]) -> Overlaps:
    """Pairwise intersections of sorted unique uid arrays, by binary search (no Python sets)."""
    names = tuple(kept)
    k = len(names)
    inter = np.zeros((k, k), dtype=np.int64)
    for i, a in enumerate(names):
        inter[i, i] = len(kept[a])
        for j in range(i + 1, k):
            small, large = sorted((kept[a], kept[names[j]]), key=len)
            inter[i, j] = inter[j, i] = int((subset_counts(large, small) > 0).sum())
    return Overlaps(names, inter)


def _jaccard_text(value: float) -> str:
    return "–" if np.isnan(value) else f"{value:.2f}"


def overlap_png(ov: Overlaps) -> bytes:
    import matplotlib

    k = len(ov.names)
    fig, ax = _figure(width=0.8 * k + 3.2, height=0.55 * k + 1.4)
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(ov.jaccard), vmin=0, vmax=1, cmap=cmap)
    ax.set_xticks(range(k), ov.names, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(k), ov.names, fontsize=7)
    for i in range(k):
        for j in range(k):
            dark = ov.jaccard[i, j] > 0.6
            ax.text(j, i, f"{_jaccard_text(ov.jaccard[i, j])}\n{ov.intersections[i, j]:,}", ha="center", va="center",
                    fontsize=6, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label("Jaccard index", fontsize=7)
    ax.set_title("subset overlaps: Jaccard index and shared uids", fontsize=8)
    return _png(fig)


# --- d. examples: per-row outcomes ------------------------------------------------------------
def first_failed_rule(passes: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Per row, the index of the first rule it fails (as the funnel counts drops);
    len(passes) for a row that passes them all."""
    return first_failed([(np.asarray(p, bool), ~np.asarray(p, bool)) for p in passes], n)


@dataclass(frozen=True)
class Outcomes:
    """Each row's outcome under one strategy: an index into `labels` (rule names, then kept)."""

    labels: tuple[str, ...]
    outcome: np.ndarray
    mismatches: int = 0  # rows where the recomputed rules disagree with the subset file
    note: str | None = None


def strategy_outcomes(spec: StrategySpec, members: dict[str, StrategySpec], table: pa.Table, thresholds: dict,
                      kept: np.ndarray) -> Outcomes:
    """Which step drops each row, recomputed from the recorded spec on the signals in `table`;
    `kept` (the subset file) counts the rows where the recomputation disagrees."""
    n = table.num_rows
    kept = np.asarray(kept, dtype=bool)
    try:
        masks: dict[str, np.ndarray] = {}
        for name, member in members.items():
            outcomes = spec_outcomes(member, table, thresholds, masks)
            masks[name] = first_failed(outcomes, n) == len(outcomes)
        outcome = first_failed(spec_outcomes(spec, table, thresholds, masks), n)
    except Exception as exc:  # a column the signals of this pool do not hold (or no signals at all)
        missing = re.search(r'column "?\'?(\w+)', str(exc))
        what = f"signal column {missing.group(1)!r}" if missing else f"its signal columns ({exc})"
        return Outcomes((DROPPED, KEPT), np.where(kept, 1, 0),
                        note=f"per-step outcomes need {what}; run pipeline.filter on this pool to store its signals")
    steps = spec.steps
    mismatches = int((kept != (outcome == len(steps))).sum())
    return Outcomes((*steps, KEPT), outcome, mismatches)


def _signals_dir(cfg: ReportConfig, manifest: dict) -> Path:
    if cfg.signals_dir is not None:
        return cfg.signals_dir
    recorded = manifest.get("signals", {}).get("dir")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return Path(cfg.pool) / "signals"


def pool_rows(pool: Path, signals_dir: Path, wanted: np.ndarray | None,
              histograms: dict[str, ScoreHistogram] | None = None) -> pa.Table:
    """The metadata rows whose uid is in `wanted` (sorted records; None: every row), with
    their caption (as binary: it may not be UTF-8), scores and stored signal columns. Adds every
    row's scores to `histograms` on the way, so the pool is read once."""
    from pipeline.signals import signals_path

    parts = []
    score_cols = list(SCORE_COLUMNS.values())
    size_cols = ["original_width", "original_height"]
    for path in Pool(pool).metadata_files():
        meta = read_metadata(path, ["uid", "text", *score_cols, *size_cols])
        for col, hist in (histograms or {}).items():
            hist.add(_float_column(meta.column(col)))
        records = uids_to_records(meta.column("uid"))
        rows = np.arange(meta.num_rows) if wanted is None else np.flatnonzero(subset_counts(wanted, records) > 0)
        if len(rows) == 0:
            continue
        take = pa.array(rows)
        cols = {"uid": meta.column("uid").take(take),
                "caption": pc.cast(meta.column("text").take(take), pa.binary()),
                **{c: meta.column(c).take(take) for c in [*score_cols, *size_cols]}}
        cols["uid_hi"] = pa.array(records["f0"][rows])
        cols["uid_lo"] = pa.array(records["f1"][rows])
        sig_path = signals_path(signals_dir, path)
        if sig_path.is_file():
            sig = pq.read_table(sig_path)
            if sig.num_rows == meta.num_rows:  # signals of another version of the file are ignored
                for name in sig.column_names:
                    if name not in cols:
                        cols[name] = sig.column(name).take(take)
        parts.append(pa.table(cols))
    if not parts:
        return pa.table({"uid": pa.array([], pa.string())})
    return pa.concat_tables(parts, promote_options="default")


def _float_column(col) -> np.ndarray:
    from filters.arrays import to_numpy

    return to_numpy(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col).astype(np.float64)


def _row_records(table: pa.Table) -> np.ndarray:
    records = np.empty(table.num_rows, dtype=UID_DTYPE)
    if table.num_rows:
        records["f0"] = table.column("uid_hi").to_numpy()
        records["f1"] = table.column("uid_lo").to_numpy()
    return records


def all_outcomes(table: pa.Table, stats: dict, kept: dict[str, np.ndarray]) -> dict[str, Outcomes]:
    """Every strategy's outcomes for the rows of `table`, from the specs stats.json records."""
    if table.num_rows == 0:
        return {}
    records = _row_records(table)
    out = {}
    for name, entry in stats["strategies"].items():
        if name not in kept or "spec" not in entry:
            continue
        specs = {n: spec_from_dict(d, "stats.json", check=False) for n, d in _entry_specs(entry).items()}
        thresholds = {n: float(sel["threshold"]) for n, sel in entry.get("selections", {}).items()}
        members = {n: s for n, s in specs.items() if n != name}
        out[name] = strategy_outcomes(specs[name], members, table, thresholds,
                                      subset_counts(kept[name], records) > 0)
    return out


# --- d. examples: images ----------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSample:
    uid: str
    shard: str
    key: str


def scan_shards(pool: Path, limit: int) -> list[ShardSample]:
    """The first `limit` samples of the pool's shards that carry a uid, in shard order."""
    from pools.tars import iter_samples

    found: list[ShardSample] = []
    for shard in Pool(pool).shard_files():
        if len(found) >= limit:
            break
        for key, files in iter_samples(str(shard)):
            raw = next((data for ext, data in files if ext == "json"), None)
            try:
                uid = json.loads(raw).get("uid") if raw is not None else None
            except (ValueError, AttributeError):
                uid = None
            if isinstance(uid, str) and UID_PATTERN.fullmatch(uid.lower()):
                found.append(ShardSample(uid.lower().zfill(32), str(shard), key))
                if len(found) >= limit:
                    break
    return found


def read_images(samples: Sequence[ShardSample]) -> dict[str, bytes]:
    """uid -> image bytes of `samples`, reading each shard only as far as its last wanted sample."""
    from pools.tars import iter_samples

    wanted: dict[str, dict[str, str]] = {}
    for s in samples:
        wanted.setdefault(s.shard, {})[s.key] = s.uid
    images = {}
    for shard in sorted(wanted):
        keys, seen = wanted[shard], 0
        for key, files in iter_samples(shard):
            if key not in keys:
                continue
            image = next((data for ext, data in files if ext in ("jpg", "jpeg", "png", "webp")), None)
            if image is not None:
                images[keys[key]] = image
            seen += 1
            if seen == len(keys):
                break
    return images


def thumbnail(image: bytes, px: int) -> tuple[bytes, int, int] | None:
    """A JPEG no larger than px × px, or None if the bytes are not an image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as im:
            im = im.convert("RGB")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
            return buf.getvalue(), im.width, im.height
    except Exception:  # PIL raises many types for bad bytes; a broken image is only left out
        return None


def pick_examples(outcome: np.ndarray, n_labels: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to k row indices per outcome, drawn at random, in row order."""
    picks = []
    for label in range(n_labels):
        rows = np.flatnonzero(outcome == label)
        picks.append(np.sort(rng.choice(rows, min(k, len(rows)), replace=False)) if len(rows) else rows)
    return picks


# --- html -------------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def esc(text) -> str:
    """HTML-escaped text; control characters (invalid in HTML) shown as U+FFFD."""
    return html.escape(_CONTROL.sub("\ufffd", str(text)), quote=True)


def caption_html(raw: bytes | str | None, limit: int = 280) -> str:
    """A caption as it is: HTML-like text shown as text, newlines kept, long ones cut."""
    if raw is None:
        return '<span class="none">(no caption)</span>'
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    if not text.strip():
        return f'<span class="none">(blank caption: {esc(repr(text))})</span>'
    shown = text if len(text) <= limit else text[:limit] + "…"
    return f'<span class="cap">{esc(shown)}</span>'


def img_tag(data: bytes, mime: str, alt: str, width: int | None = None, height: int | None = None,
            cls: str = "") -> str:
    size = f' width="{width}" height="{height}"' if width and height else ""
    klass = f' class="{cls}"' if cls else ""
    return (f'<img src="data:{mime};base64,{base64.b64encode(data).decode("ascii")}" alt="{esc(alt)}"'
            f'{size}{klass}>')


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(headers)
    head = "".join(f'<th{" class=num" if num else ""}>{esc(h)}</th>' for h, num in zip(headers, numeric))
    body = "".join("<tr>" + "".join(f'<td{" class=num" if num else ""}>{esc(c)}</td>'
                                    for c, num in zip(r, numeric)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1200px;
 color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.5em}h2{margin-top:2em;border-bottom:1px solid #ccc}h3{margin-bottom:.3em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4e5;border-left:4px solid #f58518;padding:.5em 1em}
.note{color:#555;font-size:.9em}
.grid{display:flex;flex-wrap:wrap;gap:8px;margin:.3em 0 1em}
figure.sample{margin:0;width:150px;border:1px solid #ddd;padding:4px;font-size:.75em;background:#fafafa}
figure.sample img{display:block;margin:0 auto 3px}
.cap{white-space:pre-wrap;overflow-wrap:anywhere}.none{color:#999;font-style:italic}
.meta{color:#777;font-family:ui-monospace,monospace;font-size:.9em}
.outcome{font-weight:600;margin-top:.6em}
.chart{max-width:100%;height:auto}
nav a{margin-right:1em}
"""


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def funnel_section(stats: dict) -> str:
    rows = []
    for name, entry in stats["strategies"].items():
        total = max(int(entry["rows"]), 1)
        for i, step in enumerate(funnel_steps(entry)):
            rows.append([name if i == 0 else "", step.label, f"{step.rows:,}",
                         f"{step.dropped:,}" if step.dropped else "", f"{100 * step.rows / total:.1f}%"])
    skipped = stats.get("strategies_skipped") or {}
    warn = "".join(f'<p class="warn">{esc(n)} was not run: {esc(why)}</p>' for n, why in skipped.items())
    return _section("funnel", "a. Funnel: rows passing each rule", warn +
                    '<p class="note">Each rule counts the rows it drops among those that passed the rules '
                    'before it (pipeline.filter\'s stats.json).</p>' +
                    img_tag(funnel_png(stats), "image/png", "funnel of each strategy", cls="chart") +
                    html_table(["strategy", "step", "rows left", "dropped here", "% of pool"], rows,
                               [False, False, True, True, True]))


def scores_section(histograms: dict[str, ScoreHistogram], stats: dict) -> str:
    thresholds = score_thresholds(stats)
    parts = []
    for col, hist in histograms.items():
        if hist.present == 0:
            parts.append(f'<p class="warn">{esc(col)} is empty in every row: the pool is not scored '
                         '(python -m pipeline.score).</p>')
            continue
        parts.append(img_tag(histogram_png(hist, thresholds.get(col, [])), "image/png",
                             f"histogram of {col}", cls="chart"))
        out_of_range = hist.below_range + hist.above_range
        if out_of_range:
            parts.append(f'<p class="warn">{out_of_range:,} {esc(col)} values lie outside [-1, 1] and are not '
                         'drawn.</p>')
    lines = [f"{col}: {label} keep score ≥ {t:.6g}" for col, items in thresholds.items() for label, t in items]
    note = ('<p class="note">Thresholds: ' + "; ".join(esc(l) for l in lines) + ".</p>") if lines else ""
    return _section("scores", "b. CLIP scores", note + "".join(parts))


def overlap_section(ov: Overlaps) -> str:
    if not ov.names:
        return _section("overlaps", "c. Subset overlaps", '<p class="warn">no subset files found.</p>')
    rows = [[a, *[f"{ov.intersections[i, j]:,} ({_jaccard_text(ov.jaccard[i, j])})" for j in range(len(ov.names))]]
            for i, a in enumerate(ov.names)]
    return _section("overlaps", "c. Subset overlaps",
                    '<p class="note">Unique uids in both subsets (Jaccard index); the diagonal is each subset\'s '
                    'size.</p>' + img_tag(overlap_png(ov), "image/png", "subset overlap heatmap", cls="chart") +
                    html_table(["", *ov.names], rows, [False] + [True] * len(ov.names)))


def _row_facts(table: pa.Table, row: int) -> str:
    """The numbers the rules read: CLIP scores and the original image size."""
    parts = []
    for arch, col in SCORE_COLUMNS.items():
        v = table.column(col)[row].as_py()
        parts.append(f"{arch} {v:.3f}" if v is not None and v == v else f"{arch} –")
    w, h = (table.column(c)[row].as_py() for c in ("original_width", "original_height"))
    parts.append(f"{w if w is not None else '?'}×{h if h is not None else '?'} px")
    return " · ".join(parts)


def examples_section(cfg: ReportConfig, stats: dict, ex: "Examples") -> str:
    n = len(ex.uids)
    parts = [f'<p class="note">From the first {ex.scanned:,} samples of the pool\'s shards '
             f'({n:,} of them found in the metadata); up to {cfg.examples} random examples per '
             'outcome. A dropped sample is shown under the first rule it fails, as the funnel counts it.</p>']
    for name, oc in ex.outcomes.items():
        if oc.labels == (KEPT,):
            continue  # no rules: every row is kept
        parts.append(f"<h3>{esc(name)}</h3>")
        description = stats["strategies"][name].get("description")
        if description:
            parts.append(f'<p class="note">{esc(description)}</p>')
        if oc.note:
            parts.append(f'<p class="warn">{esc(oc.note)}</p>')
        if oc.mismatches:
            parts.append(f'<p class="warn">{oc.mismatches:,} rows: the recomputed rules disagree with {esc(name)}.npy '
                         '(signals or pool changed since filtering?); rerun pipeline.filter.</p>')
        order = [len(oc.labels) - 1, *range(len(oc.labels) - 1)]  # kept first, then each rule's drops
        for i in order:
            label, count = oc.labels[i], int((oc.outcome == i).sum())
            title = (f"kept ({count:,} of these {n:,})" if label == KEPT else f"dropped ({count:,})"
                     if label == DROPPED else f"dropped by {label} ({count:,})")
            cards = [_sample_card(ex, int(row)) for row in ex.picks[name][i]]
            parts.append(f'<div class="outcome">{esc(title)}</div>'
                         + (f'<div class="grid">{"".join(cards)}</div>' if cards else '<p class="none">none</p>'))
    return _section("examples", "d. Examples: kept and dropped", "".join(parts))


def _sample_card(ex: "Examples", row: int) -> str:
    uid = ex.uids[row]
    thumb = ex.thumbs.get(uid)
    if thumb:
        # Small stored images are drawn larger than they are rather than stored larger.
        scale = ex.display_px / max(thumb[1], thumb[2])
        image = img_tag(thumb[0], "image/jpeg", f"sample {uid[:8]}", round(thumb[1] * scale),
                        round(thumb[2] * scale))
    else:
        image = '<span class="none">(image unreadable)</span>'
    return (f'<figure class="sample">{image}<figcaption>{caption_html(ex.captions[row])}'
            f'<div class="meta">{esc(uid[:12])}… · {esc(_row_facts(ex.table, row))}</div></figcaption></figure>')


def comparison_section(c) -> str:
    from trainer.compare import chart_png, footnote_lines, table_cells

    headers, rows = table_cells(c)
    numeric = [h not in ("strategy", "seeds") for h in headers]
    notes = "".join(f'<p class="note">{esc(line)}</p>' for line in footnote_lines(c))
    return _section("comparison", "e. Comparison of training runs",
                    img_tag(chart_png(c), "image/png", "main metric by strategy", cls="chart")
                    + html_table(headers, rows, numeric) + notes)


# --- the report -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Examples:
    """The scanned rows, their outcomes under each strategy, and the examples drawn from them."""

    table: pa.Table  # scanned rows: uid, caption, scores, signals
    uids: list[str]  # canonical (lowercase, 32 hex) uids of the table's rows
    captions: list[bytes | None]
    outcomes: dict[str, Outcomes]
    picks: dict[str, list[np.ndarray]]  # strategy -> per outcome label, the rows shown
    scanned: int  # shard samples scanned
    thumbs: dict[str, tuple[bytes, int, int]]  # uid -> (jpeg, width, height)
    display_px: int  # longer side the examples are drawn at


def gather_examples(cfg: ReportConfig, stats: dict, manifest: dict, kept: dict[str, np.ndarray],
                    histograms: dict[str, ScoreHistogram]) -> Examples:
    """Scan the shards, read the scanned rows (and every row's scores), decide the outcomes,
    draw the examples and fetch their images."""
    scanned = scan_shards(cfg.pool, cfg.scan_samples) if cfg.examples else []
    wanted = np.sort(uids_to_records([s.uid for s in scanned])) if scanned else np.empty(0, UID_DTYPE)
    table = pool_rows(cfg.pool, _signals_dir(cfg, manifest), wanted, histograms)
    outcomes = all_outcomes(table, stats, kept)
    rng = np.random.default_rng(cfg.seed)
    picks = {name: pick_examples(oc.outcome, len(oc.labels), cfg.examples, rng) for name, oc in outcomes.items()
             if oc.labels != (KEPT,)}
    uids = records_to_uids(_row_records(table))
    chosen = {uids[int(r)] for rows in picks.values() for part in rows for r in part}
    images = read_images([s for s in scanned if s.uid in chosen])
    thumbs = {uid: t for uid, img in images.items() if (t := thumbnail(img, cfg.thumb_px)) is not None}
    captions = table.column("caption").to_pylist() if table.num_rows else []
    return Examples(table=table, uids=uids, captions=captions, outcomes=outcomes, picks=picks,
                    scanned=len(scanned), thumbs=thumbs, display_px=cfg.thumb_px)


def build_report(cfg: ReportConfig) -> Path:
    """Write the report to `cfg.out`; returns its path."""
    from trainer.compare import collect_runs, load_comparison

    stats, manifest = read_filter_outputs(cfg.subsets)
    Pool(cfg.pool).metadata_files()  # fails early, naming the folder, if there is no pool
    kept = load_kept(subset_files(cfg.subsets, stats))
    histograms = {col: ScoreHistogram(col) for col in SCORE_COLUMNS.values()}
    examples = gather_examples(cfg, stats, manifest, kept, histograms)
    comparison = load_comparison(cfg.comparison) if cfg.comparison else \
        collect_runs(cfg.runs) if cfg.runs else None

    sections = [funnel_section(stats), scores_section(histograms, stats), overlap_section(subset_overlaps(kept)),
                examples_section(cfg, stats, examples)]
    nav = ['<a href="#funnel">funnel</a>', '<a href="#scores">CLIP scores</a>', '<a href="#overlaps">overlaps</a>',
           '<a href="#examples">examples</a>']
    if comparison is not None:
        sections.append(comparison_section(comparison))
        nav.append('<a href="#comparison">comparison</a>')
    inputs = [f"pool {cfg.pool} ({stats.get('rows_read', 0):,} rows)", f"subsets {cfg.subsets}"]
    if cfg.runs:
        inputs.append(f"{len(cfg.runs)} run(s)")
    if cfg.comparison:
        inputs.append(f"comparison {cfg.comparison}")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>Curation report: {esc(Path(cfg.pool).name)}</title><style>{CSS}</style></head><body>"
            f"<h1>Curation report</h1><p class=\"note\">{esc(' · '.join(inputs))}</p>"
            f"<nav>{''.join(nav)}</nav>{''.join(sections)}</body></html>\n")
    out = Path(cfg.out)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


# --- plotting helpers -------------------------------------------------------------------------
def _figure(width: float = 7.0, height: float = 2.6):
    """A Figure with one axes on an Agg canvas: no global pyplot state, any thread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.report",
        description="One self-contained HTML page: each strategy's funnel, CLIP score histograms with "
                    "thresholds, subset overlaps, kept/dropped examples, and the runs' comparison.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m pipeline.report --pool demo_out/pool --subsets demo_out/subsets "
               "--runs demo_out/runs/* --out demo_out/report.html")
    p.add_argument("--pool", type=Path, required=True, help="the pool folder (metadata/, shards/, signals/)")
    p.add_argument("--subsets", type=Path, required=True,
                   help="pipeline.filter's --out folder (<strategy>.npy, stats.json, manifest.json)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--runs", type=Path, nargs="+", default=[], metavar="RUN",
                     help="trained and evaluated run folders to compare (as trainer.compare)")
    src.add_argument("--comparison", type=Path, help="a trainer.compare --out folder (its comparison.json)")
    p.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    p.add_argument("--signals-dir", type=Path, default=None,
                   help="the pool's signals (default: the folder pipeline.filter's manifest.json records)")
    p.add_argument("--examples", type=int, default=ReportConfig.examples,
                   help="example images per strategy and outcome (default %(default)s; 0: none)")
    p.add_argument("--scan-samples", type=int, default=ReportConfig.scan_samples,
                   help="draw examples from the first N shard samples (default %(default)s)")
    p.add_argument("--thumb-px", type=int, default=ReportConfig.thumb_px,
                   help="longer side of example images in pixels (default %(default)s)")
    p.add_argument("--seed", type=int, default=ReportConfig.seed, help="picks the examples (default 0)")
    return p


def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = ReportConfig(pool=args.pool, subsets=args.subsets, out=args.out, runs=tuple(args.runs),
                           comparison=args.comparison, signals_dir=args.signals_dir, examples=args.examples,
                           scan_samples=args.scan_samples, thumb_px=args.thumb_px, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    from pools.format import PoolFormatError
    from trainer.compare import CompareError

    from pools.cli import one_line_errors

    with one_line_errors(argv, ReportError, CompareError, PoolFormatError):
        out = build_report(cfg)
    print(f"report: {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return out


if __name__ == "__main__":
    main()
