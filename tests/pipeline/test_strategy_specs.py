"""A researcher's own strategies as spec files: exact uids against a plain re-statement, intersections,
selections over the pool, a toy signal added with one declaration, and clear errors for bad specs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the DataComp re-statement

import datacomp_reference as ref  # noqa: E402
from filter_pools import make_quirky_pool  # noqa: E402
from pipeline.filter import main  # noqa: E402
from pipeline.strategies import SpecError  # noqa: E402
from pools.uids import UID_DTYPE  # noqa: E402

EXAMPLE = """\
name = "clip_en_256"
description = "CLIP L/14 top 30% of the English captions with shorter side >= 256"
rules = ["fasttext_lang = 'en'", "min_side >= 256", "caption_words > 2"]
[select]
score = "clip_l14_similarity_score"
fraction = 0.3
over = "kept"      # "kept": among rows the rules kept; "pool": over the whole pool
"""
INTERSECTION = """\
name = "laion_and_big"
description = "LAION-2B's rule on images whose shorter side is at least 300"
intersect = ["laion"]
rules = ["min_side >= 300"]
"""
OVER_POOL = """\
name = "b32_top_half_english"
description = "English captions among the top half of the whole pool by B/32 score"
rules = ["fasttext_lang = 'en'"]
[select]
score = "clip_b32_similarity_score"
fraction = 0.5
over = "pool"
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_quirky_pool(tmp_path_factory.mktemp("specs") / "pool", samples=900)


@pytest.fixture(scope="module")
def frame(pool):
    """The pool as DataComp's code reads it, with fastText labels for every readable caption."""
    models = ref.Models()
    df = pd.concat([pd.read_parquet(p) for p in ref.parquet_paths(pool)], ignore_index=True)
    df["lang"] = [models.fasttext_language(t) if isinstance(t, str) else None for t in df.text]
    df["words"] = [len(t.split()) if isinstance(t, str) else 0 for t in df.text]
    df["min_side"] = np.minimum(df.original_width.astype(float), df.original_height.astype(float))
    df["laion"] = np.isin(_records(df.uid), ref.laion2b(pool, models))
    return df


def _records(uids) -> np.ndarray:
    return np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uids], dtype=UID_DTYPE)


def _sorted_records(uids) -> np.ndarray:
    return np.sort(_records(list(uids)))


def _top_fraction(scores: np.ndarray, fraction: float) -> float:
    """DataComp's fraction rule: the (int(N*f)+1)-th largest score, NaN sorting last."""
    return -np.sort(-scores.astype(np.float32))[int(len(scores) * fraction)]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _run(pool, tmp_path, *strategies, **kw) -> dict:
    return main(["--pool", str(pool), "--strategy", *map(str, strategies), "--out", str(tmp_path / "out"),
                 "--executor", "local", "--signals-dir", str(tmp_path / "signals"), "--quiet",
                 *[a for k, v in kw.items() for a in (f"--{k}", str(v))]])


def test_the_issue_example_equals_a_plain_restatement(pool, frame, tmp_path):
    spec = _write(tmp_path, "mine.toml", EXAMPLE)
    stats = _run(pool, tmp_path, spec, "clip")
    rules = (frame.lang == "en") & (frame.min_side >= 256) & (frame.words > 2)
    kept_rows = frame[rules.to_numpy()]
    t = _top_fraction(kept_rows.clip_l14_similarity_score.to_numpy(), 0.3)
    want = kept_rows[kept_rows.clip_l14_similarity_score.to_numpy(np.float32) >= t].uid
    got = np.load(tmp_path / "out" / "clip_en_256.npy")
    assert len(want) > 20 and (got == _sorted_records(want)).all()
    entry = stats["strategies"]["clip_en_256"]
    assert [s["rule"] for s in entry["funnel"]] == ["fasttext_lang = 'en'", "min_side >= 256", "caption_words > 2",
                                                     "clip_l14_similarity_score_ge_threshold"]
    assert entry["rows"] == entry["kept"] + sum(entry["dropped"].values()) == len(frame)
    assert entry["selections"]["clip_en_256"]["rows"] == int(rules.sum())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["strategies"]["clip_en_256"]["spec"]["select"] == {"score": "clip_l14_similarity_score",
                                                                         "fraction": 0.3, "over": "kept"}
    assert manifest["strategies"]["clip_en_256"]["spec_hash"] == entry["spec_hash"]
    assert manifest["strategies"]["clip_en_256"]["source"] == str(spec)
    # the built-in beside it is unchanged: DataComp's clip_score
    assert (np.load(tmp_path / "out" / "clip.npy") == ref.clip_score(pool, "l14", fraction=0.3)).all()


def test_an_intersection_and_a_selection_over_the_pool(pool, frame, tmp_path):
    both = _write(tmp_path, "both.toml", INTERSECTION)
    over_pool = _write(tmp_path, "pool.toml", OVER_POOL)
    _run(pool, tmp_path, both, over_pool)
    want = frame[(frame.laion & (frame.min_side >= 300)).to_numpy()].uid
    got = np.load(tmp_path / "out" / "laion_and_big.npy")
    assert len(want) > 5 and (got == _sorted_records(want)).all()
    b32 = frame.clip_b32_similarity_score.to_numpy(np.float32)
    t = _top_fraction(b32, 0.5)
    want = frame[((frame.lang == "en") & (b32 >= t)).to_numpy()].uid
    got = np.load(tmp_path / "out" / "b32_top_half_english.npy")
    assert len(want) > 20 and (got == _sorted_records(want)).all()
    assert not (tmp_path / "out" / "laion.npy").exists()  # a member is evaluated, not written


def test_a_new_signal_and_its_strategy_touch_only_their_declaration_function_and_spec(pool, frame, tmp_path):
    """A toy signal (does the caption mention a colour?) registered once, used by a spec file."""
    import pyarrow.compute as pc

    from pipeline.signals import SignalColumn, SignalGroup, register_signal, unregister_signal

    def colour_signals(text):
        return {"mentions_red": pc.fill_null(pc.match_substring(text, "red", ignore_case=True), False)
                .to_numpy(zero_copy_only=False)}

    register_signal(SignalGroup(name="toy_colour", version=1, compute=colour_signals, reads=("text",),
                                columns=(SignalColumn("mentions_red", "bool", "the caption says red"),)))
    try:
        spec = _write(tmp_path, "red.toml", 'name = "red_english"\nrules = ["mentions_red", "fasttext_lang = \'en\'"]\n')
        _run(pool, tmp_path, spec)
    finally:
        unregister_signal("toy_colour")
    red = frame.text.str.contains("red", case=False, na=False)
    want = frame[(red & (frame.lang == "en")).to_numpy()].uid
    got = np.load(tmp_path / "out" / "red_english.npy")
    assert len(want) > 10 and (got == _sorted_records(want)).all()


def test_fraction_one_and_thresholds_as_selections(pool, frame, tmp_path):
    spec = _write(tmp_path, "all_scored.toml", 'name = "scored"\n[select]\nscore = "clip_l14_similarity_score"\n'
                  'fraction = 1.0\n')
    threshold = _write(tmp_path, "t.toml", 'name = "t"\nrules = ["min_side >= 256"]\n[select]\n'
                       'score = "clip_l14_similarity_score"\nthreshold = 0.25\n')
    _run(pool, tmp_path, spec, threshold)
    l14 = frame.clip_l14_similarity_score.to_numpy(np.float32)
    assert (np.load(tmp_path / "out" / "scored.npy") == _sorted_records(frame[~np.isnan(l14)].uid)).all()
    want = frame[((frame.min_side >= 256) & (l14 >= np.float32(0.25))).to_numpy()].uid
    assert (np.load(tmp_path / "out" / "t.npy") == _sorted_records(want)).all()


@pytest.mark.parametrize("text,message", [
    ('name = "x"\nrules = ["no_such_column > 1"]\n', "rule 1 ('no_such_column > 1'): unknown column 'no_such_column'; known columns: aspect_ratio"),
    ('name = "x"\nrules = ["min_side >>> 2"]\n', "rule 1 ('min_side >>> 2'): does not parse"),
    ('name = "x"\nrules = ["fasttext_lang > 3"]\n', "rule 1 ('fasttext_lang > 3'): cannot be evaluated on the signal columns' types"),
    ('name = "x"\nrules = ["min_side + 1"]\n', "rule 1 ('min_side + 1'): gives Float64, not true/false"),
    ('name = "x"\n[select]\nscore = "clip_l14_similarity_score"\nfraction = 1.5\n', "fraction must be in [0, 1]"),
    ('name = "x"\n[select]\nscore = "clip_l14_similarity_score"\nfraction = -0.1\n', "fraction must be in [0, 1]"),
    ('name = "x"\n[select]\nscore = "fasttext_lang"\nfraction = 0.5\n', "score 'fasttext_lang' is Categorical, not a number"),
    ('name = "x"\nrule = ["min_side > 1"]\n', "unknown key(s) rule; a spec has name, description"),
    ('name = "x"\nrules = ["min_side > 1"]\n[select]\nscore = "min_side"\nfraction = 0.5\nover = "all"\n', "over must be one of kept, pool"),
    ('name = "x"\nintersect = ["nope"]\n', "intersect names 'nope'"),
    ('name = "x"\nrules = ["min_side > {size}"]\n', "{size} is not a parameter"),
    ('name = "basic"\nrules = ["min_side > 1"]\n', "strategy name 'basic' is already taken"),
    ('name = x\n', "not valid TOML"),
])
def test_bad_specs_give_one_line_errors_naming_file_and_rule(pool, tmp_path, text, message):
    spec = _write(tmp_path, "bad.toml", text)
    with pytest.raises(SpecError) as err:
        _run(pool, tmp_path, spec)
    assert str(spec) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_command_line_errors_and_list_signals(pool, tmp_path):
    spec = _write(tmp_path, "bad.toml", 'name = "x"\nrules = ["nope = 1"]\n')
    run = subprocess.run([sys.executable, "-m", "pipeline.filter", "--pool", str(pool), "--strategy", str(spec),
                          "--out", str(tmp_path / "out"), "--executor", "local"], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: {spec}: rule 1 ('nope = 1'): unknown column")
    listed = subprocess.run([sys.executable, "-m", "pipeline.filter", "--list-signals"], capture_output=True,
                            text=True, check=True).stdout
    for column in ("fasttext_lang", "min_side", "clip_l14_similarity_score", "nearest_centroid_in_targets"):
        assert column in listed
    assert "[fasttext]" in listed and "gated" in listed


def test_builtin_specs_are_the_shipped_files():
    from pipeline.strategies import ALIASES, SPECS_DIR, STRATEGIES, builtin_spec

    assert STRATEGIES == ("no_filter", "basic", "text", "image", "laion", "clip", "image_clip")
    assert set(STRATEGIES) < {p.stem for p in SPECS_DIR.glob("*.toml")}  # --strategy all: DataComp's baselines
    assert ALIASES["image_based_intersect_clip_score"] == "image_clip"
    clip = builtin_spec("clip", {"arch": "b32", "threshold": 0.2})
    assert clip.select.score == "clip_b32_similarity_score" and clip.select.threshold == 0.2
    assert clip.select.fraction is None and builtin_spec("clip").select.fraction == 0.3
