"""Strategies as data: a name, a description, ordered rules, an optional selection.

A strategy spec (TOML, read with `tomllib`; DataComp's seven baselines ship as
``pipeline/specs/*.toml``)::

    name = "clip_en_256"
    description = "CLIP L/14 top 30% of the English captions with shorter side >= 256"
    rules = ["fasttext_lang = 'en'", "min_side >= 256", "caption_words > 2"]
    [select]
    score = "clip_l14_similarity_score"
    fraction = 0.3
    over = "kept"      # "kept": among rows the rules kept; "pool": over the whole pool

- ``rules``: SQL expressions over signal columns (`filters.expressions`; ``python -m
  pipeline.filter --list-signals`` lists the columns). A rule may be a table ``{name = "...",
  rule = "..."}`` to give its counter in ``stats.json`` a name (default: the expression).
  A row is kept when it passes every rule; a missing value never passes.
- ``[select]``: keep the top ``fraction`` by ``score`` with DataComp's ``--fraction`` rule:
  over N rows (the whole pool, or the rows the rules kept), the threshold is the
  (int(N*f)+1)-th largest score (missing scores count in N and sort last), and every row at
  or above it is kept (ties kept); or ``threshold = t``: keep ``score >= t``.
- ``intersect = ["image", "clip"]``: the rows every named strategy keeps (built-in names or
  other specs of the same run); may be combined with rules and a selection.
- ``[params]``: defaults substituted into rules and the selection as ``{name}``. The built-in
  ``clip`` and ``image_clip`` declare ``arch``, which ``--arch`` sets; ``--fraction`` and
  ``--threshold`` set the selection of every spec that declares ``arch``.
- ``datacomp_name``: the name DataComp's ``baselines.py`` gives the strategy (an alias).

The funnel in ``stats.json`` follows the spec's order: each dropped row is counted against the
first rule (then the selection) that it fails. Model labels are computed only where every
cheaper rule passes (`signals_needed` derives these gates from the specs), so a row outside a
gate is counted against the cheaper rule it fails; the kept set does not depend on the order.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from filters.arrays import to_numpy
from filters.expressions import (RuleError, check_rule, presence_column, presence_outcome, rule_columns,
                                 rule_outcomes, signal_frame)

SPECS_DIR = Path(__file__).with_name("specs")
SPEC_KEYS = ("name", "description", "datacomp_name", "params", "rules", "select", "intersect")
SELECT_KEYS = ("score", "fraction", "threshold", "over")
SELECT_OVER = ("kept", "pool")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class SpecError(ValueError):
    """A strategy spec that cannot run; the message names the file and the rule."""


@dataclass(frozen=True)
class Rule:
    name: str  # the counter in stats.json
    expr: str  # a SQL expression over signal columns


@dataclass(frozen=True)
class Selection:
    score: str
    fraction: float | None = None
    threshold: float | None = None
    over: str = "kept"

    @property
    def name(self) -> str:
        return f"{self.score}_ge_threshold"

    def as_dict(self) -> dict:
        return {k: v for k, v in (("score", self.score), ("fraction", self.fraction),
                                  ("threshold", self.threshold), ("over", self.over)) if v is not None}


@dataclass(frozen=True)
class StrategySpec:
    name: str
    description: str = ""
    rules: tuple[Rule, ...] = ()
    select: Selection | None = None
    intersect: tuple[str, ...] = ()
    datacomp_name: str | None = None
    params: tuple[tuple[str, object], ...] = ()
    source: str = ""  # "builtin" or the file it was read from

    def as_dict(self) -> dict:
        """The spec as written to stats.json and manifest.json (and read back by `spec_from_dict`)."""
        out: dict = {"name": self.name, "description": self.description}
        if self.datacomp_name:
            out["datacomp_name"] = self.datacomp_name
        if self.params:
            out["params"] = dict(self.params)
        if self.intersect:
            out["intersect"] = list(self.intersect)
        out["rules"] = [{"name": r.name, "rule": r.expr} for r in self.rules]
        if self.select is not None:
            out["select"] = self.select.as_dict()
        return out

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def steps(self) -> tuple[str, ...]:
        """The funnel's counters, in order: intersected strategies, rules, the selection."""
        return (*(f"in_{m}" for m in self.intersect), *(r.name for r in self.rules),
                *((self.select.name,) if self.select else ()))

    def columns(self) -> list[str]:
        """The signal columns its own rules and selection read."""
        cols = [c for r in self.rules for c in rule_columns(r.expr)]
        if self.select is not None:
            cols.append(self.select.score)
        return list(dict.fromkeys(cols))


# --- reading specs ------------------------------------------------------------------------------
def _substitute(text: str, params: Mapping[str, object], where: str) -> str:
    try:
        return text.format_map(dict(params))
    except KeyError as exc:
        raise SpecError(f"{where}: {{{exc.args[0]}}} is not a parameter (declare it under [params])") from None
    except (ValueError, IndexError) as exc:
        raise SpecError(f"{where}: bad {{parameter}} ({exc})") from None


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SpecError(f"{where} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise SpecError(f"{where} must be a number, got {value!r}") from None


def spec_from_dict(data: Mapping, source: str = "builtin", overrides: Mapping[str, object] | None = None,
                   *, check: bool = True) -> StrategySpec:
    """A spec from its TOML/JSON form; `overrides` set declared parameters (``--arch``) and
    ``fraction``/``threshold`` of the selection of specs that declare ``arch``."""
    where = source if source != "builtin" else f"built-in strategy {data.get('name', '?')}"
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(unknown)}; a spec has {', '.join(SPEC_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SpecError(f"{where}: 'name' must be a word of letters, digits, _ . - (it names <out>/<name>.npy), "
                        f"got {name!r}")
    params = dict(data.get("params", {}))
    if not isinstance(data.get("params", {}), dict):
        raise SpecError(f"{where}: [params] must be a table of name = value")
    overrides = dict(overrides or {})
    for key in [k for k in overrides if k in params]:
        params[key] = overrides[key]
    rules = []
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise SpecError(f"{where}: 'rules' must be a list of strings or {{name, rule}} tables")
    for i, raw in enumerate(raw_rules):
        at = f"{where}: rule {i + 1}"
        if isinstance(raw, str):
            expr, rule_name = raw, None
        elif isinstance(raw, dict) and set(raw) <= {"name", "rule"} and isinstance(raw.get("rule"), str):
            expr, rule_name = raw["rule"], raw.get("name")
        else:
            raise SpecError(f"{at}: must be a string or a {{name = ..., rule = ...}} table, got {raw!r}")
        expr = _substitute(expr, params, at)
        rule_name = _substitute(rule_name, params, at) if rule_name else expr
        rules.append(Rule(name=rule_name, expr=expr))
    select = None
    if "select" in data:
        raw = data["select"]
        at = f"{where}: [select]"
        if not isinstance(raw, dict):
            raise SpecError(f"{at} must be a table")
        bad = [k for k in raw if k not in SELECT_KEYS]
        if bad:
            raise SpecError(f"{at}: unknown key(s) {', '.join(bad)}; it has {', '.join(SELECT_KEYS)}")
        raw = dict(raw)
        if "arch" in params and ("fraction" in overrides or "threshold" in overrides):
            raw.pop("fraction", None)
            raw.pop("threshold", None)
            raw.update({k: overrides[k] for k in ("fraction", "threshold") if overrides.get(k) is not None})
        if not isinstance(raw.get("score"), str):
            raise SpecError(f"{at}: 'score' must name a signal column")
        if ("fraction" in raw) == ("threshold" in raw):
            raise SpecError(f"{at}: give exactly one of 'fraction' and 'threshold'")
        fraction = threshold = None
        if "fraction" in raw:
            fraction = _number(_substitute(str(raw["fraction"]), params, at), f"{at} fraction")
            if not 0.0 <= fraction <= 1.0:
                raise SpecError(f"{at}: fraction must be in [0, 1] (the top fraction kept), got {fraction:g}")
        else:
            threshold = _number(_substitute(str(raw["threshold"]), params, at), f"{at} threshold")
            if threshold != threshold:
                raise SpecError(f"{at}: threshold must be a number, not NaN")
        over = raw.get("over", "kept")
        if over not in SELECT_OVER:
            raise SpecError(f"{at}: over must be one of {', '.join(SELECT_OVER)}, got {over!r}")
        select = Selection(score=_substitute(raw["score"], params, at), fraction=fraction, threshold=threshold,
                           over=over)
    intersect = data.get("intersect", [])
    if not isinstance(intersect, list) or not all(isinstance(m, str) for m in intersect):
        raise SpecError(f"{where}: 'intersect' must be a list of strategy names")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpecError(f"{where}: 'description' must be a string")
    spec = StrategySpec(name=name, description=description, rules=tuple(rules), select=select,
                        intersect=tuple(intersect), datacomp_name=data.get("datacomp_name"),
                        params=tuple(sorted(params.items())), source=source)
    if check:
        check_spec(spec, where)
    return spec


def check_spec(spec: StrategySpec, where: str) -> None:
    """Every rule parses, names known columns and is a true/false test; the score is numeric."""
    from pipeline.signals import COLUMN_TYPES, NUMERIC_TYPES, column_types, signal_schema

    known = column_types()
    queried = [(i, r) for i, r in enumerate(spec.rules) if presence_column(r.expr) not in known]
    if queried:  # (presence tests of known columns, and specs with no rules, need no Polars)
        schema = signal_schema()
        for i, rule in queried:
            try:
                check_rule(rule.expr, schema)
            except RuleError as exc:
                raise SpecError(f"{where}: rule {i + 1} ({rule.expr!r}): {exc}") from None
    if spec.select is not None:
        score, types = spec.select.score, column_types()
        if score not in types:
            raise SpecError(f"{where}: [select] score {score!r} is not a signal column; known columns: "
                            f"{', '.join(sorted(types))}")
        if types[score] not in NUMERIC_TYPES:
            raise SpecError(f"{where}: [select] score {score!r} is {COLUMN_TYPES[types[score]]}, not a number")
    if not (spec.rules or spec.select or spec.intersect) and spec.source != "builtin":
        raise SpecError(f"{where}: no rules, selection or intersect: it would keep every row (use no_filter)")


def read_spec_file(path: Path, overrides: Mapping[str, object] | None = None) -> StrategySpec:
    """A user's strategy file (TOML)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: no such strategy file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not valid TOML ({exc})") from None
    return spec_from_dict(data, str(path), overrides)


def _builtin_data() -> dict[str, dict]:
    out = {}
    for path in sorted(SPECS_DIR.glob("*.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        out[data["name"]] = data
    order = ("no_filter", "basic", "text", "image", "laion", "clip", "image_clip")  # DataComp's table order
    return {n: out[n] for n in sorted(out, key=lambda n: (order.index(n) if n in order else len(order), n))}


BUILTIN_SPECS: dict[str, dict] = _builtin_data()
# What --strategy all runs: DataComp's baselines (the built-ins with a datacomp_name); the other
# built-ins (semdedup, negclip_normsim, ...) need global steps or targets and are asked for by name.
STRATEGIES: tuple[str, ...] = tuple(n for n, d in BUILTIN_SPECS.items() if d.get("datacomp_name"))
ALIASES = {d["datacomp_name"]: n for n, d in BUILTIN_SPECS.items() if d.get("datacomp_name")}


def builtin_spec(name: str, overrides: Mapping[str, object] | None = None) -> StrategySpec:
    return spec_from_dict(BUILTIN_SPECS[name], "builtin", overrides)


def is_spec_path(name: str) -> bool:
    return name.endswith(".toml") or "/" in name


def resolve_strategies(names: Sequence[str], overrides: Mapping[str, object] | None = None,
                       ) -> list[StrategySpec]:
    """The specs of `names` (built-in names, DataComp's names, "all", or .toml files), without
    repeats, built-ins in registry order then files in the order given."""
    chosen: set[str] = set()
    files: list[StrategySpec] = []
    for name in names:
        if name == "all":
            chosen.update(STRATEGIES)
        elif name in BUILTIN_SPECS:
            chosen.add(name)
        elif name in ALIASES:
            chosen.add(ALIASES[name])
        elif is_spec_path(name):
            spec = read_spec_file(Path(name), overrides)
            if spec.name in BUILTIN_SPECS or any(s.name == spec.name for s in files):
                raise SpecError(f"{name}: strategy name {spec.name!r} is already taken (built-in or another "
                                "file); rename it")
            files.append(spec)
        else:
            raise SpecError(f"unknown strategy {name!r}; choose from {', '.join([*BUILTIN_SPECS, 'all'])}, "
                            f"DataComp's names ({', '.join(ALIASES)}), or a strategy file (.toml)")
    return [builtin_spec(n, overrides) for n in BUILTIN_SPECS if n in chosen] + files


def with_members(specs: Sequence[StrategySpec], overrides: Mapping[str, object] | None = None,
                 ) -> dict[str, StrategySpec]:
    """`specs` and every strategy they intersect (built-ins by name), by name; a cycle or an
    unknown member is an error."""
    known = {s.name: s for s in specs}
    stack = list(specs)
    while stack:
        spec = stack.pop()
        for member in spec.intersect:
            if member in known:
                continue
            if member in BUILTIN_SPECS or member in ALIASES:
                known[member] = builtin_spec(ALIASES.get(member, member), overrides)
                stack.append(known[member])
            else:
                raise SpecError(f"{spec.source or spec.name}: intersect names {member!r}, which is neither a "
                                "built-in strategy nor another strategy of this run")
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise SpecError(f"strategy {name}: intersect forms a cycle ({' -> '.join([*path, name])})")
        if name in order:
            return
        for member in known[name].intersect:
            visit(ALIASES.get(member, member), (*path, name))
        order.append(name)

    for name in list(known):
        visit(name, ())
    return {n: known[n] for n in order}


# --- what a set of strategies needs from the signals pass ---------------------------------------
def _groups_of(columns: Iterable[str]) -> set[str]:
    from pipeline.signals import column_groups

    owners = column_groups()
    return {owners[c] for c in columns}


def groups_needed(specs: Iterable[StrategySpec]) -> tuple[str, ...]:
    """The signal groups the specs' rules and selections read, with what they are computed from."""
    from pipeline.signals import expand_groups

    return expand_groups(_groups_of(c for s in specs for c in s.columns()))


def required_metadata(specs: Iterable[StrategySpec], groups: Iterable[str]) -> tuple[str, ...]:
    """Metadata columns a run must find in every file: what the groups read, and the pool
    columns the named signal columns come from (e.g. a CLIP score column)."""
    from pipeline.signals import SIGNAL_GROUPS

    cols = {c for g in groups for c in SIGNAL_GROUPS[g].reads}
    declared = {c.name: c for g in SIGNAL_GROUPS.values() for c in g.columns}
    cols |= {r for s in specs for c in s.columns() for r in declared[c].reads}
    return tuple(sorted(cols))


def signals_needed(specs: Iterable[StrategySpec], keys: Mapping[str, str]) -> dict:
    """Per gated group, the gates (`pipeline.signals.Gate`) of the rows that need it: for each
    strategy reading the group, the strategy's rules over strictly cheaper groups."""
    from pipeline.signals import SIGNAL_GROUPS, Gate, column_groups

    owners = column_groups()
    gates: dict[str, dict[str, Gate]] = {}
    for spec in specs:
        groups_read = _groups_of(spec.columns())
        for g in (g for g in groups_read if SIGNAL_GROUPS[g].gated):
            cost = SIGNAL_GROUPS[g].cost
            cheaper = sorted({r.expr for r in spec.rules
                              if all(SIGNAL_GROUPS[owners[c]].cost < cost for c in rule_columns(r.expr))})
            read = sorted({owners[c] for e in cheaper for c in rule_columns(e)})
            token = (" AND ".join(cheaper) + " @ " + ",".join(keys[x] for x in read)) if cheaper else "*"
            gates.setdefault(g, {})[token] = Gate(token=token, rules=tuple(cheaper))
    # A group needed only as an input of another (no strategy reads it) is computed on every row.
    return {g: tuple(v.values()) for g, v in gates.items()}


# --- evaluating a spec on one file's signals ----------------------------------------------------
@dataclass
class Funnel:
    """Sequential counts of one strategy: rows in, then per step the rows it drops, kept."""

    steps: tuple[str, ...]
    rows: int = 0  # rows the rules saw
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    duplicate_uid: int = 0  # rows left out before the rules: a later copy of a uid (--on-duplicate-uid keep-first)

    def __post_init__(self) -> None:
        self.dropped = {s: 0 for s in self.steps}

    def as_dict(self) -> dict:
        rows = self.rows + self.duplicate_uid
        steps, remaining = [], self.rows
        if self.duplicate_uid:
            steps.append({"rule": DUPLICATE_UID, "in": rows, "passed": self.rows, "dropped": self.duplicate_uid})
        for s in self.steps:
            steps.append({"rule": s, "in": remaining, "passed": remaining - self.dropped[s],
                          "dropped": self.dropped[s]})
            remaining -= self.dropped[s]
        dropped = {DUPLICATE_UID: self.duplicate_uid} if self.duplicate_uid else {}
        dropped.update({s: self.dropped[s] for s in self.steps if self.dropped[s]})
        return {"rows": rows, "kept": self.kept, "funnel": steps, "dropped": dropped}


DUPLICATE_UID = "duplicate_uid"  # the funnel's name for rows that repeat an earlier row's uid


def first_failed(outcomes: Sequence[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Per row, the index of the step that drops it (len(outcomes) if kept): the first step it
    fails, or, when it fails none but some outcome is unknown (null), the first unknown one."""
    k = len(outcomes)
    first = np.full(n, k, dtype=np.int64)
    for i in range(k - 1, -1, -1):  # backwards, so the earliest failing step is written last
        first[outcomes[i][1]] = i
    undecided = first == k
    for i in range(k - 1, -1, -1):
        passes, fails = outcomes[i]
        first[undecided & ~passes & ~fails] = i
    return first


def evaluate_steps(table: pa.Table, specs: Iterable[StrategySpec],
                   thresholds: Mapping[str, float]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(passes, fails) of every distinct rule of `specs` on the signal columns in `table` (one
    Polars query, NaN read as null), and of each selection whose threshold is known (keyed
    ``"<score> >= <threshold>"``)."""
    specs = list(specs)
    rules = list(dict.fromkeys(r.expr for spec in specs for r in spec.rules))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    queried = []
    for r in rules:
        column = presence_column(r)
        if column is not None and column in table.column_names:
            out[r] = presence_outcome(table.column(column))
        else:
            queried.append(r)
    if queried:
        columns = {c for r in queried for c in rule_columns(r)}
        frame = signal_frame(table, [c for c in table.column_names if c in columns])
        out.update(zip(queried, rule_outcomes(frame, queried)))
    for spec in specs:
        if spec.select is not None and spec.name in thresholds:
            key = _selection_key(spec, thresholds)
            if key not in out:
                scores = score_values(table, spec.select.score)
                passes = scores >= scores.dtype.type(thresholds[spec.name])  # NaN (missing) never passes
                out[key] = (passes, ~passes & ~np.isnan(scores))
    return out


def _selection_key(spec: StrategySpec, thresholds: Mapping[str, float]) -> str:
    return f"{spec.select.score} >= {thresholds[spec.name]!r}"


def score_values(table: pa.Table, column: str) -> np.ndarray:
    """A selection's score column as DataComp ranks and compares it: float32 (the pool's scores),
    or float64 for a float64 column and for integer signals (exact there); missing as NaN.
    A float32 score is compared with a threshold rounded to float32, as NumPy 2 compares it."""
    values = to_numpy(table.column(column))
    return values.astype(values.dtype if values.dtype in (np.float32, np.float64) else np.float64)


def spec_outcomes(spec: StrategySpec, table: pa.Table, thresholds: Mapping[str, float],
                  members: Mapping[str, np.ndarray],
                  evaluated: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(passes, fails) of each funnel step of `spec` on the rows of `table`; `thresholds` holds
    the resolved threshold of each strategy's selection, `members` the keep masks of the
    strategies it intersects, `evaluated` (optional) what `evaluate_steps` gave for `table`."""
    if evaluated is None:
        evaluated = evaluate_steps(table, [spec], thresholds)
    out = [(members[m], ~members[m]) for m in spec.intersect]
    out += [evaluated[r.expr] for r in spec.rules]
    if spec.select is not None:
        out.append(evaluated[_selection_key(spec, thresholds)])
    return out


def apply_spec(spec: StrategySpec, table: pa.Table, thresholds: Mapping[str, float],
               members: Mapping[str, np.ndarray], funnel: Funnel,
               evaluated: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """The keep mask of `spec` on the rows of `table`, adding their counts to `funnel`."""
    n = table.num_rows
    outcomes = spec_outcomes(spec, table, thresholds, members, evaluated)
    step = first_failed(outcomes, n)
    counts = np.bincount(step, minlength=len(outcomes) + 1)
    for name, c in zip(spec.steps, counts[:-1]):
        funnel.dropped[name] += int(c)
    keep = step == len(outcomes)
    funnel.rows += n
    funnel.kept += int(keep.sum())
    return keep


def selection_values(spec: StrategySpec, table: pa.Table, members: Mapping[str, np.ndarray],
                     evaluated: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """The scores DataComp's fraction rule ranks for `spec`'s selection in `table`: every row's
    (over the pool) or the rows passing its rules and members' (over kept); missing as NaN."""
    values = score_values(table, spec.select.score)
    if spec.select.over == "pool":
        return values
    if evaluated is None:
        evaluated = evaluate_steps(table, [spec], {})
    keep = np.ones(table.num_rows, dtype=bool)
    for m in spec.intersect:
        keep &= members[m]
    for rule in spec.rules:
        keep &= evaluated[rule.expr][0]
    return values[keep]
