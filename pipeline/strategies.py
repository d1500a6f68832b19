"""DataComp's named subsets as queries over the signals table.

Each strategy is an ordered list of rules; a row is kept when it passes all of them. The
order only shapes the funnel in ``stats.json``: every dropped row is counted against the first
rule it fails (datatrove style), and every rule also reports how many of all rows pass it.
The rules (and their DataComp source, reference section 2):

==========  ===========================  =========================================================
strategy    DataComp ``--name``          rules, in funnel order
==========  ===========================  =========================================================
no_filter   no_filter                    (none)
basic       basic_filter                 caption readable, > 2 words, > 5 chars, shorter side
                                         >= 200, aspect <= 3, fastText en
text        text_based                   caption readable, an ImageNet-21k word, fastText en
clip        clip_score                   score present, score >= threshold (or top fraction)
laion       laion2b                      B/32 present, B/32 >= 0.28, caption readable, CLD3 en
image       image_based                  caption readable, > 1 fastText token, > 5 chars,
                                         fastText en, image embedding present, nearest
                                         centroid is a target centroid
image_clip  image_based_intersect_       score present, score >= threshold, then as image
            clip_score
==========  ===========================  =========================================================

"Caption readable" fails null captions and bytes that are not UTF-8 (DataComp would crash);
"score present" fails NaN/null scores (DataComp's comparisons are False for them too).
"Image embedding present" fails rows whose ``l14_img`` is all zeros, which `pipeline.score`
writes for samples without an image (CommonPool has none such; DataComp would put them on
centroid 0); on rows with an embedding the rule is DataComp's. The
funnel is sequential: each rule reports the rows that reach it, pass it and are dropped by it.
The model rules come last, so fastText and CLD3 run only on rows the other rules keep (the
signals pass computes their labels there and nowhere else: the strategy's "gate").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from filters.arrays import to_numpy
from filters.clip_score import ClipScore, score_mask
from filters.image_based import image_based_mask
from filters.image_size import ImageSize
from filters.language import Language, language_mask
from filters.laion import Laion2B
from filters.text import CaptionLength, CaptionPrefilter, TextStatus
from pools.format import SCORE_COLUMNS


@dataclass(frozen=True, kw_only=True)
class Strategy:
    name: str
    datacomp_name: str
    description: str
    groups: tuple[str, ...] = ()  # signal groups the query reads (beyond base)
    metadata_columns: tuple[str, ...] = ()  # metadata columns it needs besides uid
    uses_clip_score: bool = False  # takes --arch and --fraction/--threshold
    needs_npz: bool = False
    needs_centroids: bool = False
    lid_gate: str | None = None  # rows that need a fastText label (pipeline.signals.LID_GATES)


_STRATEGY_LIST = (
    Strategy(name="no_filter", datacomp_name="no_filter", description="every uid of the pool"),
    Strategy(name="basic", datacomp_name="basic_filter", groups=("text", "fasttext"),
             metadata_columns=("text", "original_width", "original_height"), lid_gate="basic",
             description="fastText English, > 2 words, > 5 chars, shorter side >= 200, aspect <= 3"),
    Strategy(name="text", datacomp_name="text_based", groups=("text", "fasttext", "entity"),
             metadata_columns=("text",), lid_gate="text",
             description="fastText English and a caption word naming an ImageNet-21k class"),
    Strategy(name="image", datacomp_name="image_based", groups=("text", "fasttext", "centroid"),
             metadata_columns=("text",), needs_npz=True, needs_centroids=True, lid_gate="prefilter",
             description="caption pre-filter and nearest pool centroid near ImageNet"),
    Strategy(name="laion", datacomp_name="laion2b", groups=("text", "cld3"),
             metadata_columns=("text", SCORE_COLUMNS["b32"]),
             description="CLIP B/32 score >= 0.28 and CLD3 English"),
    Strategy(name="clip", datacomp_name="clip_score", uses_clip_score=True,
             description="CLIP score >= threshold, or the top fraction of the pool"),
    Strategy(name="image_clip", datacomp_name="image_based_intersect_clip_score",
             groups=("text", "fasttext", "centroid"), metadata_columns=("text",), uses_clip_score=True,
             needs_npz=True, needs_centroids=True, lid_gate="prefilter",
             description="CLIP score first (fraction over the whole pool), then image-based"),
)
STRATEGIES: dict[str, Strategy] = {s.name: s for s in _STRATEGY_LIST}
ALIASES = {s.datacomp_name: s.name for s in _STRATEGY_LIST} | {"text_based": "text", "laion2b": "laion"}


def resolve_strategy_names(names: Sequence[str]) -> list[str]:
    """Our names for `names` (ours, DataComp's, or "all"), without repeats, in registry order."""
    chosen = set()
    for name in names:
        if name == "all":
            chosen.update(STRATEGIES)
        elif name in STRATEGIES:
            chosen.add(name)
        elif name in ALIASES:
            chosen.add(ALIASES[name])
        else:
            raise ValueError(f"unknown strategy {name!r}; choose from {', '.join([*STRATEGIES, 'all'])} "
                             f"(DataComp's names work too: {', '.join(ALIASES)})")
    return [s for s in STRATEGIES if s in chosen]


@dataclass(frozen=True, kw_only=True)
class QueryParams:
    """Every parameter the rules read, with DataComp's values as defaults."""

    language: Language = field(default_factory=Language)
    caption_length: CaptionLength = field(default_factory=CaptionLength)
    image_size: ImageSize = field(default_factory=ImageSize)
    caption_prefilter: CaptionPrefilter = field(default_factory=CaptionPrefilter)
    laion: Laion2B = field(default_factory=Laion2B)
    clip: ClipScore = field(default_factory=ClipScore)
    clip_threshold: float | None = None  # the resolved threshold (from clip.fraction if given)
    target_ids: np.ndarray | None = None  # target centroids of the image-based rule


class Columns:
    """Read-once NumPy views of a table's columns, as the rules ask for them."""

    def __init__(self, table: pa.Table):
        self.table = table
        self._cache: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if name not in self.table.column_names:
                raise KeyError(name)
            col = self.table.column(name).combine_chunks()
            if pa.types.is_dictionary(col.type):
                col = col.dictionary_decode()
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                self._cache[name] = col  # labels stay Arrow for vectorised comparisons
            else:
                self._cache[name] = to_numpy(col)  # float nulls (scores) become NaN
        return self._cache[name]


@dataclass(frozen=True)
class Rule:
    name: str  # the counter in stats.json
    columns: tuple[str, ...]
    test: Callable[[Columns], np.ndarray]
    needs_label: str | None = None  # a model label column that must be present where the rule runs


def _readable(c: Columns) -> np.ndarray:
    return c["text_status"] == TextStatus.OK


def rules_for(name: str, p: QueryParams) -> tuple[Rule, ...]:
    """The rules of strategy `name` with parameters `p` (thresholds already resolved)."""
    readable = Rule("caption_readable", ("text_status",), _readable)
    english = Rule(f"fasttext_{p.language.label}", ("fasttext_lang", "text_status"),
                   lambda c: language_mask(c["fasttext_lang"], p.language), needs_label="fasttext_lang")
    if name == "no_filter":
        return ()
    if name == "basic":
        cl, im = p.caption_length, p.image_size
        return (readable,
                Rule(f"caption_words_gt_{cl.min_words}", ("caption_words",), lambda c: c["caption_words"] > cl.min_words),
                Rule(f"caption_chars_gt_{cl.min_chars}", ("caption_chars",), lambda c: c["caption_chars"] > cl.min_chars),
                Rule(f"min_side_ge_{im.min_side}", ("min_side",), lambda c: c["min_side"] >= im.min_side),
                Rule(f"aspect_le_{im.max_aspect:g}", ("aspect_ratio",), lambda c: c["aspect_ratio"] <= im.max_aspect),
                english)
    if name == "text":
        return (readable,
                Rule("imagenet21k_entity", ("imagenet21k_entity",), lambda c: c["imagenet21k_entity"]),
                english)
    if name == "laion":
        lp = p.laion
        col = SCORE_COLUMNS["b32"]
        return (Rule(f"{col}_present", (col,), lambda c: ~np.isnan(c[col])),
                Rule(f"{col}_ge_{lp.min_b32_score:g}", (col,), lambda c: score_mask(c[col], lp.min_b32_score)),
                readable,
                Rule(f"cld3_{lp.language.label}", ("cld3_lang",), lambda c: language_mask(c["cld3_lang"], lp.language)))
    clip_rules = ()
    if name in ("clip", "image_clip"):
        if p.clip_threshold is None:
            raise ValueError("the CLIP threshold must be resolved before building the clip rules")
        col, t = p.clip.column, p.clip_threshold
        clip_rules = (Rule(f"{col}_present", (col,), lambda c: ~np.isnan(c[col])),
                      Rule(f"{col}_ge_threshold", (col,), lambda c: score_mask(c[col], t)))
        if name == "clip":
            return clip_rules
    if name in ("image", "image_clip"):
        cp = p.caption_prefilter
        if p.target_ids is None:
            raise ValueError("the image-based rule needs its target centroids")
        targets = p.target_ids
        return clip_rules + (
            readable,
            Rule(f"fasttext_tokens_gt_{cp.min_tokens}", ("fasttext_tokens",), lambda c: c["fasttext_tokens"] > cp.min_tokens),
            Rule(f"caption_chars_gt_{cp.min_chars}", ("caption_chars",), lambda c: c["caption_chars"] > cp.min_chars),
            english,
            Rule("image_embedding_present", ("image_embedding_missing",), lambda c: ~c["image_embedding_missing"]),
            Rule("nearest_centroid_in_targets", ("nearest_centroid",),
                 lambda c: image_based_mask(c["nearest_centroid"], targets)))
    raise ValueError(f"unknown strategy {name!r}")


@dataclass
class Funnel:
    """Sequential counts of one strategy: rows in, then per rule the rows it drops, kept."""

    rules: tuple[str, ...]
    rows: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dropped = {r: 0 for r in self.rules}

    def as_dict(self) -> dict:
        steps, remaining = [], self.rows
        for r in self.rules:
            steps.append({"rule": r, "in": remaining, "passed": remaining - self.dropped[r],
                          "dropped": self.dropped[r]})
            remaining -= self.dropped[r]
        return {"rows": self.rows, "kept": self.kept, "funnel": steps,
                "dropped": {r: self.dropped[r] for r in self.rules if self.dropped[r]}}


def apply_rules(rules: Sequence[Rule], columns: Columns, funnel: Funnel) -> np.ndarray:
    """The keep mask of one file, adding its counts to `funnel`."""
    n = len(columns)
    keep = np.ones(n, dtype=bool)
    for rule in rules:
        ok = np.asarray(rule.test(columns), dtype=bool)
        if rule.needs_label is not None:
            _check_labels(columns, rule, keep)
        funnel.dropped[rule.name] += int((keep & ~ok).sum())
        keep &= ok
    funnel.rows += n
    funnel.kept += int(keep.sum())
    return keep


def _check_labels(columns: Columns, rule: Rule, reaching: np.ndarray) -> None:
    """Every readable row that reaches a model rule must have the model's label."""
    labels = columns[rule.needs_label]
    unlabeled = reaching & (columns["text_status"] == TextStatus.OK) & ~to_numpy(labels.is_valid())
    if unlabeled.any():
        raise RuntimeError(f"{int(unlabeled.sum())} rows reach rule {rule.name} without a {rule.needs_label}: "
                           "the signals were computed for other strategies; delete the signals folder")


def rule_columns(rules: Sequence[Rule]) -> set[str]:
    return {c for r in rules for c in r.columns}
