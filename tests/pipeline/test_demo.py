"""pipeline.demo: the stage markers, and a CI-sized demo run end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import demo
from pipeline.demo import Stages
from pipeline.strategies import STRATEGIES
from pools.uids import read_subset
from trainer.compare import load_comparison


def test_a_stage_runs_once_per_settings_and_outputs_of_old_settings_are_removed(tmp_path):
    calls = []
    output = tmp_path / "made"

    def work():
        calls.append(1)
        output.mkdir(exist_ok=True)
        (output / "part").write_text(str(len(calls)))
        return {"n": len(calls)}

    stages = Stages(tmp_path)
    assert stages.run("s", {"seed": 0}, work, outputs=[output]) == {"n": 1}
    assert stages.run("s", {"seed": 0}, work, outputs=[output]) == {"n": 1}  # reused
    assert len(calls) == 1 and stages.timings["s"] == 0.0
    (output / "stale").write_text("from seed 0")
    assert Stages(tmp_path).run("s", {"seed": 1}, work, outputs=[output]) == {"n": 2}
    assert not (output / "stale").exists()  # made with other settings: removed before rerunning
    assert json.loads((tmp_path / ".stages" / "s.json").read_text())["settings"] == {"seed": 1}


def test_a_failed_stage_leaves_no_marker_and_runs_again(tmp_path):
    stages = Stages(tmp_path)

    def fail():
        raise RuntimeError("killed")

    try:
        stages.run("s", {}, fail)
    except RuntimeError:
        pass
    assert not (tmp_path / ".stages" / "s.json").exists()
    assert stages.run("s", {}, lambda: 7) == 7


@pytest.mark.slow
def test_a_small_demo_runs_end_to_end_and_a_rerun_reuses_it(tmp_path):
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--pool-samples", "1200", "--teacher-pool-samples", "1200",
            "--teacher-samples-seen", "2560", "--samples-seen", "1024", "--eval-per-class", "2"]
    summary = demo.main(argv)

    stats = json.loads((out / "subsets" / "stats.json").read_text())
    compared = [*STRATEGIES, *demo.RESEARCH_STRATEGIES]
    assert set(stats["strategies"]) == set(compared)  # every strategy filtered
    trained = [s for s in compared if s not in summary["not_trained_empty_subset"]]
    assert stats["global_steps"]["semdedup"]["rows"] == 1200  # SemDeDup ran over the whole pool
    assert set(stats["eval_near_copies"]["strategies"]) == set(compared)  # the contamination counts
    assert {"no_filter", "clip"} <= set(trained)
    for name in summary["not_trained_empty_subset"]:
        assert json.loads((out / "shards" / name / "meta.json").read_text())["output_count"] == 0

    comparison = load_comparison(out / "comparison")
    assert sorted(r.strategy for r in comparison.rows) == sorted(trained)  # a row per strategy
    for row in comparison.rows:
        subset = read_subset(out / "subsets" / f"{row.strategy}.npy")
        assert row.subset_size == len(np.unique(subset)) == stats["strategies"][row.strategy]["kept"]
        assert row.samples_seen == 1024  # the same budget for every strategy
        assert row.main is not None and 0.0 <= row.main.mean <= 1.0
    mains = [r.main.mean for r in comparison.rows]
    assert mains == sorted(mains, reverse=True)
    with open(out / "comparison" / "comparison.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(trained)
    for run in summary["runs"]:
        manifest = json.loads((Path(run) / "manifest.json").read_text())
        assert manifest["samples_seen"] == manifest["counters"]["samples"] == 1024
        # --precision auto: amp_bf16 where the CPU has AMX, fp32 elsewhere
        assert manifest["precision"] == demo.DemoConfig().train_precision() != "auto"
        assert (Path(run) / "eval_results.jsonl").is_file()
    html = (out / "report.html").read_text()
    assert all(name in html for name in trained)
    assert summary["stage_seconds"]["filter"] > 0

    again = demo.main(argv)  # everything is done: every stage is reused
    assert all(seconds == 0.0 for seconds in again["stage_seconds"].values())
    assert load_comparison(out / "comparison").rows == comparison.rows

    # A researcher's own spec trains and compares beside a built-in; nothing upstream reruns.
    mine = tmp_path / "mine.toml"
    mine.write_text('name = "mine"\ndescription = "the top half by CLIP L/14 of captions of 2+ words"\n'
                    'rules = ["caption_words >= 2"]\n'
                    '[select]\nscore = "clip_l14_similarity_score"\nfraction = 0.5\nover = "kept"\n')
    third = demo.main([*argv, "--strategy", "clip", str(mine)])
    seconds = third["stage_seconds"]
    assert seconds["filter"] > 0 and seconds["reshard_mine"] > 0 and seconds["train_mine_seed0"] > 0
    assert all(seconds[s] == 0.0 for s in ("pool", "teacher_l14", "score_l14", "centroids", "reshard_clip",
                                           "train_clip_seed0"))
    rows = {r.strategy: r for r in load_comparison(out / "comparison").rows}
    assert set(rows) == {"clip", "mine"}
    stats = json.loads((out / "subsets" / "stats.json").read_text())["strategies"]
    assert rows["mine"].subset_size == stats["mine"]["kept"] > 0
    assert rows["mine"].spec.spec_hash == stats["mine"]["spec_hash"]
    assert rows["clip"].main == comparison_row(comparison, "clip").main  # the same run, reused


def comparison_row(comparison, strategy):
    return next(r for r in comparison.rows if r.strategy == strategy)
