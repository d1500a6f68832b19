"""trainer.compare: rows per strategy, seeds averaged, sorted, CSV = markdown, clear errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.compare import (DATACOMP_TASKS, CompareError, collect_runs, compare_runs, load_comparison,
                             main)

REPO = Path(__file__).resolve().parents[2]


def make_data(root: Path, strategy: str, *, unique: int, with_image: int) -> Path:
    """A resharded folder as pipeline.reshard leaves it (only meta.json matters here)."""
    folder = root / "shards" / strategy
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps({
        "subset_file": str(root / "subsets" / f"{strategy}.npy"), "subset_size": unique,
        "subset_unique_uids": unique, "selected_count": with_image, "output_count": with_image,
        "output_shard_count": 1}))
    return folder


def make_run(root: Path, name: str, data: Path, results: dict[str, dict], *, seed: int = 0,
             samples_seen: int = 1000, standard: bool = True) -> Path:
    """A run folder with the files trainer.train and trainer.evaluate write that compare reads."""
    run = root / "runs" / name
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({
        "scale": "tiny", "standard": standard, "samples_seen": samples_seen, "data": str(data),
        "model_name": "tiny", "budget": {"model": "tiny", "samples_seen": samples_seen}}))
    (run / "config.json").write_text(json.dumps({"seed": seed, "data": str(data)}))
    lines = [json.dumps({"key": k, "dataset": k, "metrics": {**m, "main_metric": m.get("acc1", m.get("main_metric"))}})
             for k, m in results.items()]
    (run / "eval_results.jsonl").write_text("\n".join(lines) + "\n")
    return run


def synth(acc1: float, acc5: float = 0.5) -> dict:
    return {"synth": {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": acc1, "num_samples": 108}}


@pytest.fixture
def three_strategies(tmp_path):
    """clip with three seeds, basic and no_filter with one each."""
    clip = make_data(tmp_path, "clip", unique=250, with_image=230)
    basic = make_data(tmp_path, "basic", unique=400, with_image=380)
    none = make_data(tmp_path, "no_filter", unique=1000, with_image=930)
    runs = [make_run(tmp_path, f"clip-seed{s}", clip, synth(a, a + 0.3), seed=s)
            for s, a in zip((0, 1, 2), (0.10, 0.14, 0.12))]
    runs.append(make_run(tmp_path, "basic-seed0", basic, synth(0.20)))
    runs.append(make_run(tmp_path, "no_filter-seed0", none, synth(0.05)))
    return runs


def parse_markdown(text: str) -> tuple[list[str], list[list[str]]]:
    rows = [[c.strip() for c in line.strip().strip("|").split(" | ")]
            for line in text.splitlines() if line.startswith("|")]
    return rows[0], rows[2:]


def test_rows_are_strategies_sorted_with_mean_std_over_seeds(three_strategies, tmp_path):
    c = compare_runs(three_strategies, tmp_path / "out")
    assert [r.label for r in c.rows] == ["basic", "clip", "no_filter"]  # best top-1 first
    clip = c.rows[1]
    assert clip.n == 3 and clip.seeds == (0, 1, 2)
    assert clip.main.mean == pytest.approx(0.12) and clip.main.std == pytest.approx(0.02)  # sample std
    assert clip.metrics["synth acc5"].mean == pytest.approx(0.42)
    assert c.rows[0].main.std is None and c.rows[0].n == 1
    # repeats per sample = samples seen / unique uids of the subset
    assert clip.subset_size == 250 and clip.with_image == 230 and clip.repeats == pytest.approx(1000 / 250)
    assert c.rows[2].repeats == pytest.approx(1.0)
    assert c.main.task == "synth" and c.main.metric == "acc1"

    headers, rows = parse_markdown((tmp_path / "out" / "comparison.md").read_text())
    assert headers[:7] == ["strategy", "n", "seeds", "subset size", "with image", "samples seen",
                           "repeats per sample"]
    assert headers[7] == "synth top-1 (main: no ImageNet, so the first task) ¹"
    assert [r[0] for r in rows] == ["basic", "clip", "no_filter"]
    assert rows[1][1:8] == ["3", "0, 1, 2", "250", "230", "1,000", "4.00", "0.1200 ± 0.0200"]
    assert rows[0][7] == "0.2000" and rows[0][-1] == ""  # one run: no ±; no DataComp average


def test_csv_matches_markdown(three_strategies, tmp_path):
    c = compare_runs(three_strategies, tmp_path / "out")
    md_headers, md_rows = parse_markdown((tmp_path / "out" / "comparison.md").read_text())
    with open(tmp_path / "out" / "comparison.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["strategy"] for r in csv_rows] == [r[0] for r in md_rows]
    col = {h: i for i, h in enumerate(md_headers)}
    for md, row in zip(md_rows, csv_rows):
        assert md[col["n"]] == row["n"]
        assert md[col["subset size"]].replace(",", "") == row["subset_size"]
        assert md[col["samples seen"]].replace(",", "") == row["samples_seen"]
        assert md[col["repeats per sample"]] == f"{float(row['repeats_per_sample']):.2f}"
        for md_header, key in ((md_headers[7], "main"), ("synth acc5", "synth acc5"),
                               ("synth mean_per_class_recall", "synth mean_per_class_recall")):
            mean_key = "main_mean" if key == "main" else f"{key} mean"
            std_key = "main_std" if key == "main" else f"{key} std"
            expected = f"{float(row[mean_key]):.4f}"
            if row[std_key]:
                expected += f" ± {float(row[std_key]):.4f}"
            assert md[col[md_header]] == expected
    with open(tmp_path / "out" / "comparison_runs.csv", newline="") as f:
        per_run = list(csv.DictReader(f))
    assert len(per_run) == 5
    assert sorted(float(r["synth acc1"]) for r in per_run if r["strategy"] == "clip") == [0.10, 0.12, 0.14]
    # the JSON the report reads back is the same comparison
    assert load_comparison(tmp_path / "out").rows == c.rows


def test_outputs_and_chart(three_strategies, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    c = compare_runs(three_strategies, out)
    assert {Path(p).name for p in c.files.values()} == {p.name for p in out.iterdir()}  # no temp files left
    with Image.open(out / "comparison.png") as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200


def test_imagenet_is_the_main_metric_when_every_run_has_it(tmp_path):
    data = make_data(tmp_path, "clip", unique=100, with_image=100)
    other = make_data(tmp_path, "basic", unique=200, with_image=190)
    both = {**synth(0.9), "imagenet1k": {"acc1": 0.03, "acc5": 0.1}}
    a = make_run(tmp_path, "a", data, both)
    b = make_run(tmp_path, "b", other, {**synth(0.1), "imagenet1k": {"acc1": 0.05, "acc5": 0.2}})
    c = collect_runs([a, b])
    assert (c.main.task, c.main.header) == ("imagenet1k", "ImageNet top-1 (main)")
    assert [r.strategy for r in c.rows] == ["basic", "clip"]  # by ImageNet, not by synth
    assert "synth acc1" in [col.header for col in c.columns]
    # one run without ImageNet: the first shared task decides
    d = make_run(tmp_path, "d", other, synth(0.2))
    assert collect_runs([a, d]).main.task == "synth"


def test_datacomp_average_only_with_all_38_tasks(tmp_path):
    rng = np.random.default_rng(0)
    full = {task: {metric: float(v), "main_metric": float(v)}
            for (task, metric), v in zip(DATACOMP_TASKS.items(), rng.uniform(0, 1, 38))}
    partial = dict(list(full.items())[:37])
    a = make_run(tmp_path, "full", make_data(tmp_path, "clip", unique=10, with_image=10), full)
    b = make_run(tmp_path, "partial", make_data(tmp_path, "basic", unique=10, with_image=10), partial)
    c = collect_runs([a, b])
    by = {r.strategy: r for r in c.rows}
    assert by["clip"].average.mean == pytest.approx(np.mean([m["main_metric"] for m in full.values()]))
    assert by["basic"].average is None
    assert "1 of the 2 run(s) were not" in c.footnotes[0]
    assert c.main.task == "imagenet1k"


def test_missing_or_malformed_files_name_the_run_and_file(three_strategies, tmp_path):
    run = three_strategies[0]
    (run / "eval_results.jsonl").unlink()
    with pytest.raises(CompareError, match=rf"run {run}: .*eval_results.jsonl is missing.*trainer.evaluate"):
        collect_runs(three_strategies)
    (run / "eval_results.jsonl").write_text('{"key": "synth", "metrics": {"acc1": 0.1}}\nnot json\n')
    with pytest.raises(CompareError, match=r"eval_results.jsonl line 2 is not JSON"):
        collect_runs(three_strategies)
    (run / "eval_results.jsonl").write_text('{"dataset": "synth"}\n')
    with pytest.raises(CompareError, match=r"line 1 is not a result line"):
        collect_runs(three_strategies)
    (three_strategies[1] / "manifest.json").write_text("{}")
    with pytest.raises(CompareError, match=rf"run {three_strategies[1]}: .*manifest.json lacks"):
        collect_runs(three_strategies[1:])
    # the command line says it in one line and exits 2
    proc = subprocess.run([sys.executable, "-m", "trainer.compare", str(run), "--out", str(tmp_path / "x")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: run {run}:") and "line 1" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_real_tiny_runs(small_pool, tmp_path, capsys):
    """Filter, reshard, train (128 samples), evaluate, compare: values from the real files."""
    from pipeline.filter import main as filter_main
    from pipeline.reshard import main as reshard_main
    from pools.uids import read_subset
    from trainer.evaluate import evaluate
    from trainer.train import main as train_main

    subsets = tmp_path / "subsets"
    filter_main(["--pool", str(small_pool), "--strategy", "basic", "text", "--out", str(subsets),
                 "--executor", "local", "--signals-dir", str(tmp_path / "signals"), "--quiet"])
    runs = []
    for strategy, seed in (("basic", 0), ("basic", 1), ("text", 0)):
        data = tmp_path / "shards" / strategy
        if not data.exists():
            reshard_main(["--pool", str(small_pool), "--subset", str(subsets / f"{strategy}.npy"), "--out",
                          str(data), "--executor", "local"])
        run = tmp_path / "runs" / f"{strategy}-seed{seed}"
        train_main(["--scale", "tiny", "--data", str(data), "--out", str(run), "--seed", str(seed),
                    "--allow-nonstandard", "--samples-seen", "128", "--global-batch-size", "64",
                    "--num-checkpoints", "1", "--workers", "0", "--no-tensorboard", "--no-progress",
                    "--shuffle-buffer", "50"])
        evaluate(run, tasks=[f"synth={small_pool / 'eval'}"])
        runs.append(run)
    capsys.readouterr()
    c = main([*map(str, runs), "--out", str(tmp_path / "comparison")])
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "comparison" / "comparison.md").read_text()
    assert sorted(r.strategy for r in c.rows) == ["basic", "text"]
    for row in c.rows:
        subset = read_subset(subsets / f"{row.strategy}.npy")
        meta = json.loads((tmp_path / "shards" / row.strategy / "meta.json").read_text())
        assert row.subset_size == len(np.unique(subset)) and row.with_image == meta["selected_count"]
        assert row.samples_seen == 128 and row.repeats == pytest.approx(128 / len(subset))
        acc1 = [json.loads((Path(run) / "eval_results.jsonl").read_text())["metrics"]["acc1"] for run in row.runs]
        assert row.main.mean == pytest.approx(np.mean(acc1))
        if row.strategy == "basic":
            assert row.seeds == (0, 1) and row.main.std == pytest.approx(np.std(acc1, ddof=1))
        else:
            assert row.n == 1 and row.main.std is None
    assert c.rows[0].main.mean >= c.rows[1].main.mean
    assert "non-standard budget" in printed
    stats = json.loads((subsets / "stats.json").read_text())["strategies"]
    for row in c.rows:  # the spec pipeline.filter recorded, not re-derived
        assert row.spec.spec_hash == stats[row.strategy]["spec_hash"]
        assert row.spec.description == stats[row.strategy]["description"]
        assert f"{row.label}: {row.spec.description} (spec {row.spec.spec_hash[:12]})" in printed


def test_two_specs_under_one_name_are_two_rows(tmp_path):
    """Two subsets named mine.npy from different specs: the stats.json beside each tells them apart."""
    runs = []
    for i, (description, acc) in enumerate((("top 30%", 0.2), ("top 10%", 0.3))):
        root = tmp_path / f"filtering{i}"
        data = make_data(root, "mine", unique=100, with_image=90)
        (root / "subsets").mkdir()
        (root / "subsets" / "stats.json").write_text(json.dumps(
            {"strategies": {"mine": {"description": description, "spec_hash": f"{i}" * 64}}}))
        runs.append(make_run(root, "mine-seed0", data, synth(acc)))
    c = compare_runs(runs, tmp_path / "out")
    assert [r.label for r in c.rows] == ["mine (spec 11111111)", "mine (spec 00000000)"]
    assert [r.spec.description for r in c.rows] == ["top 10%", "top 30%"]
    table = list(csv.reader((tmp_path / "out" / "comparison.csv").open()))
    assert [(r[table[0].index("description")], r[table[0].index("spec_hash")]) for r in table[1:]] == \
        [("top 10%", "1" * 64), ("top 30%", "0" * 64)]
    assert load_comparison(tmp_path / "out").rows == c.rows


def test_group_averages_of_aggregate_scores(tmp_path):
    from trainer.datacomp_tasks import GROUP_TASKS
    rng = np.random.default_rng(1)
    full = {task: {metric: float(v), "main_metric": float(v)}
            for (task, metric), v in zip(DATACOMP_TASKS.items(), rng.uniform(0, 1, 38))}
    vtab_only = {k: full[k] for k in ("imagenet1k", *GROUP_TASKS["VTAB"])}
    no_svhn = {k: v for k, v in vtab_only.items() if k != "vtab/svhn"}
    a = make_run(tmp_path, "full", make_data(tmp_path, "clip", unique=10, with_image=10), full)
    b = make_run(tmp_path, "vtab", make_data(tmp_path, "basic", unique=10, with_image=10), vtab_only)
    c_ = make_run(tmp_path, "part", make_data(tmp_path, "text", unique=10, with_image=10), no_svhn)
    c = compare_runs([a, b, c_], tmp_path / "out")
    by = {r.strategy: r for r in c.rows}
    vtab = np.mean([full[k]["main_metric"] for k in GROUP_TASKS["VTAB"]])
    assert by["clip"].groups["VTAB"].mean == pytest.approx(vtab) == by["basic"].groups["VTAB"].mean
    assert by["text"].groups["VTAB"] is None  # SVHN missing: not VTAB's number
    shifts = np.mean([full[k]["main_metric"] for k in GROUP_TASKS["ImageNet dist. shifts"]])
    assert by["clip"].groups["ImageNet dist. shifts"].mean == pytest.approx(shifts)
    assert by["basic"].groups["Retrieval"] is None and by["basic"].average is None
    headers, rows = parse_markdown((tmp_path / "out" / "comparison.md").read_text())
    assert headers[-4:] == ["ImageNet dist. shifts (6 tasks)", "VTAB (13 tasks)", "Retrieval (3 tasks)",
                            "DataComp average (38 tasks) ²"]
    row = {r[0]: r for r in rows}
    assert row["basic"][-3] == f"{vtab:.4f}" and row["text"][-3] == "" and row["basic"][-1] == ""
    assert row["clip"][-1] == f"{np.mean([m['main_metric'] for m in full.values()]):.4f}"
    assert any("aggregate_scores.py" in f for f in c.footnotes)
    assert load_comparison(tmp_path / "out").rows[0].groups == c.rows[0].groups
