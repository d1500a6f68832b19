"""pipeline.report: the funnel, histograms, overlaps, examples and comparison, checked on a real
filtered pool; the page itself checked in a headless browser."""

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared pool builders

from filter_pools import make_centroids_and_targets  # noqa: E402
from pipeline.report import (KEPT, ReportConfig, ReportError, Overlaps, all_outcomes, build_report,  # noqa: E402
                             caption_html, first_failed_rule, load_kept, main, pool_rows, read_filter_outputs,
                             score_thresholds, subset_files, subset_overlaps)
from pools.uids import UID_DTYPE, read_subset, records_to_uids  # noqa: E402
from tests.trainer.test_compare import make_data, make_run, synth  # noqa: E402

# What a web caption can hold; appended to a third of the pool's captions.
JUNK = ' <script>alert("x")</script><img src=x onerror=alert(1)> & <b>bold</b> https://a.example/?q=1&r=2 😍\nnext'


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    """A 600-row pool with images, random scores and junk captions, filtered with every strategy."""
    from pipeline.filter import main as filter_main
    from pools.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("report")
    pool = root / "pool"
    generate(pool, SynthConfig(samples=600, seed=7, rows_per_file=250, shard_size=200, eval_per_class=1,
                               random_scores=True))
    for path in sorted((pool / "metadata").glob("*.parquet")):
        table = pq.read_table(path)
        text = table.column("text").to_pylist()
        text = [t + JUNK if t is not None and i % 3 == 0 else t for i, t in enumerate(text)]
        pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", pa.array(text, pa.string())),
                       path)
    centroids, targets = make_centroids_and_targets(pool, root / "image")
    subsets = root / "subsets"
    filter_main(["--pool", str(pool), "--strategy", "all", "--centroids", str(centroids), "--targets", str(targets),
                 "--out", str(subsets), "--executor", "local", "--quiet"])
    return pool, subsets


@pytest.fixture(scope="module")
def report(filtered, tmp_path_factory):
    pool, subsets = filtered
    root = tmp_path_factory.mktemp("runs")
    runs = [make_run(root, f"{s}-seed{seed}", make_data(root, s, unique=100, with_image=90), synth(a), seed=seed)
            for s, seed, a in (("clip", 0, 0.3), ("clip", 1, 0.2), ("basic", 0, 0.1))]
    out = build_report(ReportConfig(pool=pool, subsets=subsets, out=root / "report.html", runs=tuple(runs)))
    return out, out.read_text(encoding="utf-8")


def test_outcomes_recount_the_funnel(filtered):
    """Per-row outcomes over every row of the pool give back stats.json's funnel exactly."""
    pool, subsets = filtered
    stats, manifest = read_filter_outputs(subsets)
    kept = load_kept(subset_files(subsets, stats))
    assert set(kept) == set(stats["strategies"]) == {"no_filter", "basic", "text", "image", "laion", "clip",
                                                      "image_clip"}
    table = pool_rows(pool, Path(manifest["signals"]["dir"]), None)
    assert table.num_rows == stats["rows_read"] == 600
    outcomes = all_outcomes(table, stats, kept)
    for name, entry in stats["strategies"].items():
        oc = outcomes[name]
        assert oc.mismatches == 0 and oc.note is None, name
        counts = {label: int((oc.outcome == i).sum()) for i, label in enumerate(oc.labels)}
        assert counts.pop(KEPT) == entry["kept"], name
        assert counts == {step["rule"]: step["dropped"] for step in entry["funnel"]}, name
    # without the signals table, rules on metadata columns still recount; the others say why not
    bare = all_outcomes(pool_rows(pool, pool / "no-signals-here", None), stats, kept)
    assert bare["clip"].mismatches == 0 and int((bare["clip"].outcome == 2).sum()) == stats["strategies"]["clip"]["kept"]
    assert bare["basic"].labels == ("dropped", KEPT) and "signal column 'text_status'" in bare["basic"].note
    assert int(bare["basic"].outcome.sum()) == stats["strategies"]["basic"]["kept"]


def test_sections_hold_the_numbers(filtered, report):
    pool, subsets = filtered
    path, page = report
    stats = json.loads((subsets / "stats.json").read_text())
    for anchor in ("funnel", "scores", "overlaps", "examples", "comparison"):
        assert f'<section id="{anchor}">' in page
    # a. every strategy's kept count, in the funnel table
    for name, entry in stats["strategies"].items():
        assert re.search(rf"<td>{name}</td><td>rows in</td>.*?<td>kept</td><td class=num>{entry['kept']:,}</td>",
                         page), name
    # b. the thresholds that were applied
    clip_t = stats["strategies"]["clip"]["selections"]["clip"]["threshold"]
    assert f"clip (top 30%), image_clip (top 30%) keep score ≥ {clip_t:.6g}" in page
    assert "clip_b32_similarity_score: laion keep score ≥ 0.28" in page
    # c. overlaps equal set intersections of the uid files
    uids = {n: set(records_to_uids(read_subset(subsets / f"{n}.npy"))) for n in ("basic", "clip", "image_clip")}
    both = len(uids["basic"] & uids["clip"])
    jaccard = both / len(uids["basic"] | uids["clip"])
    row = re.search(r"<tr><td>basic</td>(.*?)</tr>", page.split('id="overlaps"')[1]).group(1)
    cells = re.findall(r"<td class=num>(.*?)</td>", row)
    assert cells[5] == f"{both:,} ({jaccard:.2f})"  # columns: no_filter basic text image laion clip image_clip
    assert len(uids["image_clip"] - uids["clip"]) == 0  # image_clip is clip, then image
    # d. examples: captions escaped; the only <img> tags are ours
    assert "<script" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    charts = page.count('src="data:image/png;base64,')
    thumbs = page.count('src="data:image/jpeg;base64,')
    assert charts == 1 + 2 + 1 + 1  # funnel, two histograms, overlaps, comparison
    assert page.count("<img ") == charts + thumbs and thumbs > 30
    assert "dropped by caption_words_gt_2" in page and "dropped by nearest_centroid_in_targets" in page
    # e. the comparison: clip's two seeds as mean ± std, first
    comparison = page.split('id="comparison"')[1]
    assert re.search(r"<td>clip</td><td class=num>2</td><td>0, 1</td>.*?<td class=num>0\.2500 ± 0\.0707</td>",
                     comparison)
    assert comparison.index("<td>clip</td>") < comparison.index("<td>basic</td>")
    # nothing from outside the file
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)


def test_comparison_folder_and_command_line(filtered, report, tmp_path, capsys):
    from trainer.compare import compare_runs

    pool, subsets = filtered
    runs = [make_run(tmp_path, "a", make_data(tmp_path, "clip", unique=10, with_image=10), synth(0.4))]
    compare_runs(runs, tmp_path / "comparison")
    out = main(["--pool", str(pool), "--subsets", str(subsets), "--comparison", str(tmp_path / "comparison"),
                "--examples", "1", "--out", str(tmp_path / "r.html")])
    page = out.read_text()
    assert "<td>clip</td><td class=num>1</td>" in page and "0.4000" in page
    assert page.count('src="data:image/jpeg;base64,') <= sum(1 for _ in re.finditer("dropped by|kept \\(", page))
    assert f"report: {out}" in capsys.readouterr().out


def test_clear_errors(filtered, tmp_path):
    pool, subsets = filtered
    with pytest.raises(ReportError, match=r"stats.json is missing: make the subsets with `python -m pipeline.filter"):
        build_report(ReportConfig(pool=pool, subsets=tmp_path, out=tmp_path / "r.html"))
    broken = tmp_path / "broken"
    shutil.copytree(subsets, broken)
    (broken / "stats.json").write_text("{}")
    with pytest.raises(ReportError, match=r"broken/stats.json is not pipeline.filter's stats.json"):
        build_report(ReportConfig(pool=pool, subsets=broken, out=tmp_path / "r.html"))
    with pytest.raises(ValueError, match="not both"):
        ReportConfig(pool=pool, subsets=subsets, out=tmp_path / "r.html", runs=(tmp_path,), comparison=tmp_path)
    assert not (tmp_path / "r.html").exists()


def test_caption_html_shows_junk_as_text():
    shown = caption_html('<script>alert(1)</script>\nline & "q" 😍 https://x.example/?a=1&b=2\x00'.encode())
    assert shown == ('<span class="cap">&lt;script&gt;alert(1)&lt;/script&gt;\nline &amp; &quot;q&quot; 😍 '
                     'https://x.example/?a=1&amp;b=2\ufffd</span>')
    assert caption_html(None) == '<span class="none">(no caption)</span>'
    assert caption_html(b"\xff\xfeok") == '<span class="cap">\ufffd\ufffdok</span>'  # not UTF-8
    assert caption_html(" \n") == "<span class=\"none\">(blank caption: &#x27; \\n&#x27;)</span>"
    assert caption_html("a" * 500, limit=10) == '<span class="cap">aaaaaaaaaa…</span>'


def test_first_failed_rule_is_the_funnel_order():
    passes = [np.array([1, 1, 0, 1, 0], bool), np.array([1, 0, 0, 1, 1], bool), np.array([0, 1, 1, 1, 1], bool)]
    assert first_failed_rule(passes, 5).tolist() == [2, 1, 0, 3, 0]


def test_overlaps_and_thresholds():
    def records(*values):
        r = np.zeros(len(values), dtype=UID_DTYPE)
        r["f1"] = values
        return r

    ov = subset_overlaps({"a": records(1, 2, 3, 4), "b": records(3, 4, 5), "c": records()})
    assert isinstance(ov, Overlaps) and ov.names == ("a", "b", "c")
    assert ov.intersections.tolist() == [[4, 2, 0], [2, 3, 0], [0, 0, 0]]
    assert ov.jaccard[0, 1] == pytest.approx(2 / 5) and ov.jaccard[0, 2] == 0
    assert np.isnan(ov.jaccard[2, 2])  # two empty subsets: nothing to compare
    top = {"column": "clip_l14_similarity_score", "threshold": 0.3, "fraction": 0.3}
    stats = {"strategies": {
        "clip": {"selections": {"clip": top}},
        "image_clip": {"selections": {"clip": top}},
        "laion": {"spec": {"name": "laion", "rules": [{"name": "b", "rule": "clip_b32_similarity_score >= 0.28"},
                                                      {"name": "c", "rule": "cld3_lang = 'en'"}]}},
        "basic": {}}}
    assert score_thresholds(stats) == {
        "clip_l14_similarity_score": [("clip (top 30%), image_clip (top 30%)", 0.3)],
        "clip_b32_similarity_score": [("laion", 0.28)]}


# --- the page in a real browser ---------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def open_page(url: str) -> tuple[int, int, list[dict], list[str]]:
    """(img elements, those that decoded, console messages, section ids) of a page in headless Chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        images, decoded = driver.execute_script(
            "const imgs = Array.from(document.images);"
            "return [imgs.length, imgs.filter(i => i.complete && i.naturalWidth > 0).length];")
        sections = driver.execute_script("return Array.from(document.querySelectorAll('section')).map(s => s.id);")
        return images, decoded, driver.get_log("browser"), sections
    finally:
        driver.quit()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="needs Debian's chromium and chromium-driver (make setup installs them)")
def test_report_in_a_headless_browser(report):
    path, page = report
    images, decoded, console, sections = open_page(path.resolve().as_uri())
    assert sections == ["funnel", "scores", "overlaps", "examples", "comparison"]
    assert images == page.count("<img ") > 30
    assert decoded == images  # every chart and example image decodes
    assert [m for m in console if m["level"] in ("SEVERE", "WARNING")] == []
