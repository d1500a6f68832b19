"""Soups: the mean of the ingredients' weights, greedy by a held-out task, one architecture."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.compare import compare_runs
from trainer.evaluate import evaluate
from trainer.models import TINY_MODEL_CFG
from trainer.soup import SoupError, average_states, greedy_soup, main
from trainer.train import main as train_main

REPO = Path(__file__).resolve().parents[2]


def test_average_states_is_the_mean_and_keeps_integer_buffers():
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 4, generator=g), "h": torch.randn(2, generator=g).half(),
               "n": torch.tensor(7)} for _ in range(3)]
    soup = average_states(states)
    torch.testing.assert_close(soup["w"], (states[0]["w"] + states[1]["w"] + states[2]["w"]) / 3)
    assert soup["h"].dtype == torch.float16 and soup["n"].item() == 7
    states[1]["n"] = torch.tensor(8)
    with pytest.raises(SoupError, match="non-float tensor n differs"):
        average_states(states)


def test_greedy_soup_adds_an_ingredient_only_when_the_held_out_score_holds():
    # a model's held-out score is its one weight, so a soup's is the mean of its ingredients'
    states = [{"w": torch.tensor([v])} for v in (2.0, 4.0, 1.0, 4.0)]
    kept, log = greedy_soup(states, ["a", "b", "c", "d"], lambda s: float(s["w"][0]))
    assert kept == [1, 3]  # b alone 4; + d keeps 4; + a (3.33) and + c (3.0) would drop it
    assert [(d["ingredient"], d["kept"]) for d in log] == [("b", True), ("d", True), ("a", False),
                                                            ("c", False)]


def tiny_run(data, out, seed, *extra):
    return train_main(["--scale", "tiny", "--data", str(data), "--out", str(out), "--allow-nonstandard",
                       "--samples-seen", "128", "--global-batch-size", "64", "--num-checkpoints", "1",
                       "--workers", "0", "--no-progress", "--no-tensorboard", "--seed", str(seed), *extra])


@pytest.mark.slow
def test_a_soup_of_two_runs_is_their_mean_and_evaluates(train_pool, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_run(train_pool / "shards", a, 0)
    tiny_run(train_pool / "shards", b, 1)
    soup_dir = tmp_path / "soup"
    m = main([str(a), str(b / "checkpoints" / "epoch_latest.pt"), "--out", str(soup_dir)])
    assert m["soup"] == "uniform" and len(m["kept"]) == 2 and m["samples_seen"] == 128
    wa, wb, ws = (torch.load(r / "checkpoints" / "epoch_latest.pt", weights_only=True)["state_dict"]
                  for r in (a, b, soup_dir))
    for k in wa:
        torch.testing.assert_close(ws[k], (wa[k] + wb[k]) / 2, rtol=0, atol=1e-7)
    [line] = evaluate(soup_dir, tasks=[f"synth={train_pool / 'eval'}"])
    assert 0 <= line["metrics"]["acc1"] <= 1
    for run in (a, b):
        evaluate(run, tasks=[f"synth={train_pool / 'eval'}"])
    c = compare_runs([a, b, soup_dir], tmp_path / "cmp")
    assert sorted(r.run for r in c.runs) == sorted(map(str, (a, b, soup_dir)))

    greedy = main([str(a), str(b), "--out", str(tmp_path / "greedy"),
                   "--tasks", f"held={train_pool / 'eval'}"])
    decisions = greedy["held_out"]["decisions"]
    assert len(decisions) == 2 and decisions[0]["kept"] and decisions[0]["alone"] >= decisions[1]["alone"]
    assert len(greedy["kept"]) == (2 if decisions[1]["kept"] else 1)


@pytest.mark.slow
def test_ingredients_of_different_architectures_are_refused(train_pool, tmp_path):
    tiny_run(train_pool / "shards", tmp_path / "a", 0)
    other = {**TINY_MODEL_CFG, "embed_dim": 32}
    (tmp_path / "tiny32.json").write_text(json.dumps(other))
    tiny_run(train_pool / "shards", tmp_path / "b", 0, "--model-config", str(tmp_path / "tiny32.json"))
    proc = subprocess.run([sys.executable, "-m", "trainer.soup", str(tmp_path / "a"), str(tmp_path / "b"),
                           "--out", str(tmp_path / "soup")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'b'}: model tiny32 is not") and "one architecture" in last
    assert not (tmp_path / "soup").exists()
