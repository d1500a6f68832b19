"""A named scorer (`pipeline.score --as NAME`) is a signal column a strategy spec can use."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.filter import main as filter_main
from pipeline.score import main as score_main
from pools.format import Pool, read_metadata
from pools.uids import uids_to_records
from trainer.models import create_model, model_config_record


@pytest.fixture(scope="module")
def scored(small_pool, tmp_path_factory):
    """A copy of the session's image pool scored by a 256-d model (a width CommonPool has not) as mydfn."""
    root = tmp_path_factory.mktemp("named")
    pool = root / "pool"
    shutil.copytree(small_pool, pool)
    torch.manual_seed(0)
    cfg = {"embed_dim": 256,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    model, *_ = create_model(cfg)
    checkpoint = root / "dfn.pt"
    torch.save({"epoch": 1, "state_dict": model.state_dict(), **model_config_record(cfg)}, checkpoint)
    before = {p.name: p.read_bytes() for p in (pool / "metadata").iterdir()}
    summary = score_main(["--pool", str(pool), "--model", str(checkpoint), "--as", "mydfn", "--executor", "local",
                          "--batch-size", "64", "--cpus-per-actor", "1"])
    return pool, summary, before


def test_named_scores_are_stored_beside_the_pool_not_in_its_columns(scored):
    pool, summary, before = scored
    assert summary["score_column"] == "score_mydfn" and summary["width"] == 256
    assert {p.name: p.read_bytes() for p in (pool / "metadata").iterdir()} == before  # CommonPool's columns untouched
    folder = pool / "scores" / "mydfn"
    assert json.loads((folder / "result.json").read_text())["rows"] == 600
    for parquet in Pool(pool).metadata_files():
        with np.load(folder / f"{parquet.stem}.npz") as z:
            score, img, txt = z["score_mydfn"], z["mydfn_img"].astype(np.float32), z["mydfn_txt"].astype(np.float32)
        assert img.shape == (pq.ParquetFile(parquet).metadata.num_rows, 256)
        has = ~np.isnan(score)
        np.testing.assert_allclose(score[has], (img * txt).sum(1)[has], rtol=1e-5, atol=1e-6)
        assert not img[~has].any()


def test_a_spec_over_the_named_score_runs_end_to_end(scored, tmp_path):
    pool, _, _ = scored
    spec = tmp_path / "mine.toml"
    spec.write_text('name = "mine"\n[select]\nscore = "score_mydfn"\nfraction = 0.5\nover = "pool"\n')
    rule = tmp_path / "rule.toml"
    rule.write_text('name = "rule"\nrules = ["score_mydfn >= 0.0", "face_count = 0"]\n')
    stats = filter_main(["--pool", str(pool), "--strategy", str(spec), str(rule), "--out", str(tmp_path / "out"),
                         "--signals-dir", str(tmp_path / "signals"), "--executor", "local", "--quiet"])
    files = Pool(pool).metadata_files()
    score = np.concatenate([np.load(pool / "scores" / "mydfn" / f"{p.stem}.npz")["score_mydfn"] for p in files])
    uids = np.concatenate([uids_to_records(read_metadata(p, ["uid"]).column("uid")) for p in files])
    threshold = np.sort(np.where(np.isnan(score), -np.inf, score))[::-1][int(len(score) * 0.5)]
    assert set(np.load(tmp_path / "out" / "mine.npy").tolist()) == set(uids[score >= threshold].tolist())
    faces = np.concatenate([[len(b or []) for b in read_metadata(p, ["face_bboxes"]).column(0).to_pylist()]
                            for p in files])
    expected = (score >= 0) & (faces == 0)
    assert stats["strategies"]["rule"]["kept"] == int(expected.sum())


def test_a_bad_scorer_name_is_refused(scored, tmp_path):
    pool, _, _ = scored
    proc = subprocess.run([sys.executable, "-m", "pipeline.score", "--pool", str(pool), "--model", "x", "--as",
                           "My-DFN"], capture_output=True, text=True)
    assert proc.returncode == 2 and "scorer name of lowercase letters" in proc.stderr
