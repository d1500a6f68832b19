"""bench/filter_floor.py labels exactly the rows a strategy's rules leave to each model, and
bench/filter.py asks DataComp's baselines.py for the same subsets as our specs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]

import filter_floor  # noqa: E402


def _metadata(pool: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((pool / "metadata").glob("*.parquet"))],
                     ignore_index=True)


def test_floor_labels_the_rows_each_rule_leaves(scored_pool):
    """basic: fastText on the readable captions of > 2 words, > 5 chars, on images with shorter
    side >= 200 and aspect <= 3; laion: CLD3 on readable captions with B/32 score >= 0.28;
    text: WordNet on every readable caption, fastText on those naming an ImageNet-21k class."""
    from datacomp_reference import Models

    df = _metadata(scored_pool)
    readable = df.text.notna()
    text = df.text.fillna("")
    short = np.minimum(df.original_width, df.original_height)
    long = np.maximum(df.original_width, df.original_height)
    basic_rows = (readable & (text.str.split().str.len() > 2) & (text.str.len() > 5) & (short >= 200)
                  & (long <= 3 * short))
    laion_rows = readable & (df.clip_b32_similarity_score >= 0.28)
    models = Models()
    entity_rows = readable & text.apply(models.contains_entity)

    basic = filter_floor.measure_floor(scored_pool, ["basic"])
    assert basic["columns"] == ["uid", "original_height", "original_width", "text"]
    assert basic["rows"] == len(df) == 900
    assert basic["labeled_rows"] == {"fasttext": int(basic_rows.sum())}
    assert 0 < basic_rows.sum() < readable.sum()
    assert basic["floor_s"] == pytest.approx(basic["read_s"] + basic["label_s"]["fasttext"], abs=1e-3)

    laion = filter_floor.measure_floor(scored_pool, ["laion"])
    assert laion["columns"] == ["uid", "clip_b32_similarity_score", "text"]
    assert laion["labeled_rows"] == {"cld3": int(laion_rows.sum())}

    text_floor = filter_floor.measure_floor(scored_pool, ["text"])
    assert text_floor["labeled_rows"] == {"entity": int(readable.sum()), "fasttext": int(entity_rows.sum())}
    assert 0 < entity_rows.sum() < readable.sum()

    bare = filter_floor.measure_floor(scored_pool, ["no_filter"])
    assert bare["columns"] == ["uid"] and bare["labeled_rows"] == {} and bare["floor_s"] == bare["read_s"]


def test_floor_of_several_strategies_over_two_workers(scored_pool):
    """Strategies together label the union of their rows; two workers share the files."""
    one = filter_floor.measure_floor(scored_pool, ["basic", "text"])
    two = filter_floor.measure_floor(scored_pool, ["basic", "text"], workers=2)
    basic = filter_floor.measure_floor(scored_pool, ["basic"])["labeled_rows"]["fasttext"]
    text = filter_floor.measure_floor(scored_pool, ["text"])["labeled_rows"]["fasttext"]
    assert one["labeled_rows"] == two["labeled_rows"]
    assert max(basic, text) < one["labeled_rows"]["fasttext"] <= basic + text
    assert two["workers"] == 2 and len(two["per_worker_s"]) == 2
    assert two["floor_s"] == max(two["per_worker_s"])


def test_floor_refuses_strategies_over_embeddings():
    with pytest.raises(filter_floor.FloorError, match="embeddings"):
        filter_floor.floor_plan(["image"])


def test_datacomp_arguments_follow_our_specs():
    spec = importlib.util.spec_from_file_location("bench_filter", ROOT / "bench" / "filter.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.datacomp_args("basic") == ["--name", "basic_filter"]
    assert bench.datacomp_args("text") == ["--name", "text_based"]
    assert bench.datacomp_args("laion") == ["--name", "laion2b"]
    assert bench.datacomp_args("clip") == ["--name", "clip_score", "--arch", "l14", "--fraction", "0.3"]
    assert bench.datacomp_args("image") is None  # DataComp's needs a GPU
    assert bench.datacomp_args("semdedup") is None  # not one of DataComp's baselines
