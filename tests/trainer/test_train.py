"""End-to-end training runs on a small synthetic pool (tiny model, shortened budgets)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer.conftest import write_resharded
from trainer.evaluate import evaluate
from trainer.train import main

REPO = Path(__file__).resolve().parents[2]


def run_args(data, out, samples, *extra, batch=64, intervals=2):
    return ["--scale", "tiny", "--data", str(data), "--out", str(out), "--allow-nonstandard",
            "--samples-seen", str(samples), "--global-batch-size", str(batch),
            "--num-checkpoints", str(intervals), "--no-progress", "--shuffle-buffer", "200",
            *extra]


def weights(run):
    return torch.load(run / "checkpoints" / "epoch_latest.pt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_samples_seen_is_exact_for_small_and_large_subsets(train_pool, tmp_path, monkeypatch):
    # smaller than the budget: 100 uids, each twice (as pipeline.reshard writes duplicates)
    small = tmp_path / "resharded"
    n = write_resharded(sorted((train_pool / "shards").glob("*.tar")), small, keep=100, repeats=2)
    assert n == 200
    m = main(run_args(small, tmp_path / "r_small", 650, "--workers", "0", "--no-tensorboard",
                      "--delete-previous-checkpoint"))
    assert m["samples_seen"] == m["counters"]["samples"] == 650  # 3.25 passes over the subset
    assert m["samples_per_interval"] == [320, 330] and m["steps"] == 11  # last step holds 10
    assert m["standard"] is False and set(m["overrides"]) == {"samples_seen", "batch_size"}
    assert len(np.load(tmp_path / "r_small" / "train_loss.npy")) == 11
    assert [p.name for p in (tmp_path / "r_small" / "checkpoints").iterdir()] == ["epoch_latest.pt"]
    # larger than the budget: ~1,100 downloaded samples, 320 seen
    m = main(run_args(train_pool / "shards", tmp_path / "r_large", 320, "--workers", "1"))
    assert m["samples_seen"] == m["counters"]["samples"] == 320 and m["steps"] == 5
    run = tmp_path / "r_large"
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"epoch_1.pt", "epoch_2.pt",
                                                                 "epoch_latest.pt"}
    assert json.loads((run / "manifest.json").read_text())["samples_seen"] == 320
    assert list((run / "tensorboard").glob("events.*"))
    assert (run / "info.pkl").is_file() and (run / "model_configs" / "tiny.json").is_file()
    with pytest.raises(FileExistsError, match="--resume latest"):
        main(run_args(train_pool / "shards", run, 320))
    # a run of another `tiny` config (an older version's) is not resumed into today's model
    import trainer.models
    monkeypatch.setitem(trainer.models.MODEL_CONFIGS, "tiny",
                        {**trainer.models.TINY_MODEL_CFG, "embed_dim": 32})
    with pytest.raises(ValueError, match="epoch_latest.pt: its model .* resuming keeps the run's model"):
        main(run_args(train_pool / "shards", run, 320, "--resume", "latest"))


@pytest.mark.slow
def test_tiny_learns_the_synthetic_concepts(train_pool, tmp_path):
    """Shortened budget (12,800 samples); chance is 1/36 = 2.8%."""
    run = tmp_path / "learn"
    m = main(run_args(train_pool / "shards", run, 12_800, batch=128, intervals=1))
    losses = np.load(run / "train_loss.npy")
    assert losses[-10:].mean() < losses[:10].mean() - 0.3
    [line] = evaluate(run, tasks=[f"synth={train_pool / 'eval'}"])
    acc = line["metrics"]["acc1"]
    print(f"tiny zero-shot acc1 on the synthetic eval set: {acc:.3f} (chance 0.028)")
    assert acc > 0.10, acc  # measured 0.167 here


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_same_weights(train_pool, tmp_path):
    args = run_args(train_pool / "shards", None, 2048, "--workers", "1", "--no-tensorboard",
                    intervals=8)
    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd = [sys.executable, "-m", "trainer.train", *args]
    cmd[cmd.index("None")] = str(killed)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (killed / "checkpoints" / "epoch_1.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "training ended before a checkpoint"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (killed / "checkpoints" / "epoch_8.pt").exists(), "killed too late to test resume"
    assert not (killed / "manifest.json").exists()
    resumed = main([a if a != "None" else str(killed) for a in args] + ["--resume", "latest"])
    assert Path(resumed["resumed_from"]).parent == killed / "checkpoints"
    main([a if a != "None" else str(full) for a in args])
    a, b = weights(full), weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    np.testing.assert_array_equal(np.load(full / "train_loss.npy"), np.load(killed / "train_loss.npy"))
    assert resumed["samples_seen"] == 2048 and resumed["counters"]["samples"] == 2048


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_loss(train_pool, tmp_path):
    args = run_args(train_pool / "shards", None, 3840, "--workers", "0", "--no-tensorboard",
                    batch=64, intervals=2)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "trainer.train",
           *[a if a != "None" else str(ddp) for a in args], "--local-loss", "--gather-with-grad"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m_ddp = json.loads((ddp / "manifest.json").read_text())
    assert m_ddp["world_size"] == 2 and m_ddp["samples_seen"] == 3840
    assert m_ddp["counters"]["samples"] == 3840  # both ranks' samples, summed
    main([a if a != "None" else str(single) for a in args])
    l_ddp, l_single = np.load(ddp / "train_loss.npy"), np.load(single / "train_loss.npy")
    assert len(l_ddp) == len(l_single) == 60
    # same start (same initial weights, loss ~ log(64)) and the same curve within tolerance;
    # the batches differ (each rank reads its own streams), so only noise separates them
    assert abs(l_ddp[0] - l_single[0]) < 0.15
    assert abs(l_ddp[-20:].mean() - l_single[-20:].mean()) < 0.1 * l_single[-20:].mean()
    assert l_ddp[-20:].mean() < l_ddp[:5].mean() - 0.2


def test_empty_or_missing_data_is_one_line(small_pool, tmp_path):
    """An empty reshard (its subset matched no image) and a folder without shards: exit 2, one line."""
    from pipeline.reshard import main as reshard_main
    from pools.uids import uids_to_records, write_subset

    subset = tmp_path / "nothing.npy"
    write_subset(subset, uids_to_records(["ab" * 16]))  # a uid the pool does not have
    empty = tmp_path / "empty"
    assert reshard_main(["--pool", str(small_pool), "--subset", str(subset), "--out", str(empty),
                         "--executor", "local"])["output_count"] == 0
    (tmp_path / "bare").mkdir()
    for data, says in ((empty, "pipeline.reshard wrote none"), (tmp_path / "bare", "--data takes")):
        proc = subprocess.run([sys.executable, "-m", "trainer.train", "--scale", "tiny", "--data", str(data),
                               "--out", str(tmp_path / f"run_{data.name}"), "--no-progress"],
                              cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {data}: no training shards there") and says in last, last


def test_a_full_disk_names_the_checkpoint(tmp_path, monkeypatch):
    """torch.save into a full disk (/dev/full: every write fails with ENOSPC) is an OSError naming
    the checkpoint and saying how to go on, not torch's `basic_ios::clear` with no path."""
    import errno

    import torch

    import trainer.checkpoint as ckpt

    real_save = torch.save

    def save_to_full_disk(state, f):
        with open("/dev/full", "wb") as full:
            real_save(state, full)

    monkeypatch.setattr(ckpt.torch, "save", save_to_full_disk)
    with pytest.raises(OSError) as info:
        ckpt.save_checkpoint(tmp_path, {"epoch": 1, "state_dict": {"w": torch.zeros(1000)}})
    assert info.value.errno == errno.ENOSPC
    assert str(info.value).startswith(f"[Errno 28] {tmp_path}/checkpoints/epoch_1.pt: cannot write the checkpoint")
    assert "--resume latest" in str(info.value)
    assert not list((tmp_path / "checkpoints").iterdir())  # nothing half-written left
