"""Rewinds: the end of a run re-done from its checkpoint near 90%, to exactly the same budget."""

import json

import numpy as np
import pytest
import torch

from trainer.rewind import find_rewind_point
from trainer.train import cosine_lr, main


def parent_args(data, out, *extra):
    # 1,600 samples in 5 intervals of 320 (batch 64): checkpoints at 320, 640, 960, 1280, 1600
    return ["--scale", "tiny", "--data", str(data), "--out", str(out), "--allow-nonstandard",
            "--samples-seen", "1600", "--global-batch-size", "64", "--num-checkpoints", "5",
            "--workers", "0", "--no-progress", "--no-tensorboard", "--shuffle-buffer", "100", *extra]


@pytest.fixture(scope="module")
def parent(train_pool, tmp_path_factory):
    run = tmp_path_factory.mktemp("rewind") / "parent"
    main(parent_args(train_pool / "shards", run))
    return run


def test_the_checkpoint_nearest_the_fraction_is_chosen(parent):
    point = find_rewind_point(parent, 0.9)  # 1,440 wanted: 1,280 (interval 4) is nearest
    assert (point.interval, point.samples_seen, point.budget_samples) == (4, 1280, 1600)
    assert point.checkpoint.endswith("epoch_4.pt")
    assert find_rewind_point(parent, 0.45).samples_seen == 640  # 720 wanted: 640 beats 960
    assert find_rewind_point(parent / "checkpoints" / "epoch_2.pt", None).samples_seen == 640
    with pytest.raises(ValueError, match="no checkpoint before the end"):
        find_rewind_point(parent / "checkpoints" / "epoch_latest.pt", None)
    with pytest.raises(ValueError, match="give --rewind-at"):
        find_rewind_point(parent, None)


@pytest.mark.slow
def test_rewind_from_0_9_sees_exactly_the_budget(parent, train_pool, tmp_path):
    run = tmp_path / "rewind"
    m = main(["--rewind-from", str(parent), "--rewind-at", "0.9", "--out", str(run),
              "--allow-nonstandard", "--global-batch-size", "96", "--lr", "3e-3",
              "--num-checkpoints", "2", "--workers", "1", "--no-progress", "--no-tensorboard",
              "--aug-cfg", "use_timm=True", "scale=(0.33, 1.0)", "re_prob=0.35"])
    # 320 samples left after 1,280: batches of 96 -> 96 | 96, 96, 32 (epoch_plan: later intervals
    # take the extra full step, the last step holds the remainder)
    assert m["samples_seen"] == 1600 and m["counters"]["samples"] == 1600
    assert m["samples_per_interval"] == [96, 224]
    assert m["rewound_from"]["checkpoint"].endswith("epoch_4.pt")
    assert m["rewound_from"]["samples_seen"] == 1280 and m["rewound_from"]["parent_run"] == str(parent)
    config = json.loads((run / "config.json").read_text())
    assert config["rewind_from"] == str(parent) and config["rewind_at"] == 0.9
    assert config["data"] == str(train_pool / "shards") and config["budget"]["batch_size"] == 96
    assert config["budget"]["samples_seen"] == 1600 and config["aug_cfg"]["re_prob"] == 0.35
    # its loss curve is the parent's up to the checkpoint, then its own four steps
    parent_losses, losses = np.load(parent / "train_loss.npy"), np.load(run / "train_loss.npy")
    assert len(losses) == 20 + 4
    np.testing.assert_array_equal(losses[:20], parent_losses[:20])
    ck = torch.load(run / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert ck["samples_seen"] == 1600 and ck["step"] == m["steps"] == 17  # ceil(1600 / 96)
    # the rewind's weights moved away from the checkpoint it started at
    start = torch.load(parent / "checkpoints" / "epoch_4.pt", weights_only=True)["state_dict"]
    assert not torch.equal(start["visual.conv1.weight"], ck["state_dict"]["visual.conv1.weight"])


def test_a_rewind_continues_the_cosine_schedule_to_zero():
    # 17 schedule steps at the new batch, the rewind's 4 are the last 4 of them
    lrs = [cosine_lr(s, 3e-3, 2, 17) for s in range(13, 17)]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] > 0
    assert cosine_lr(17, 3e-3, 2, 17) == pytest.approx(0) and cosine_lr(18, 3e-3, 2, 17) == pytest.approx(0)


def test_rewind_flags_that_do_not_fit(parent, tmp_path):
    from trainer.train import build_parser, config_from_args
    def cfg(*a):
        return config_from_args(build_parser().parse_args(["--out", str(tmp_path / "x"), *a]))
    with pytest.raises(ValueError, match="keeps its parent's model and budget: drop --samples-seen"):
        cfg("--rewind-from", str(parent), "--rewind-at", "0.9", "--samples-seen", "100")
    with pytest.raises(ValueError, match="--rewind-at needs --rewind-from"):
        cfg("--scale", "tiny", "--data", "d", "--rewind-at", "0.9")
    with pytest.raises(FileNotFoundError, match="no such run folder or checkpoint"):
        cfg("--rewind-from", str(tmp_path / "nope"), "--rewind-at", "0.9")
    c = cfg("--rewind-from", str(parent), "--rewind-at", "0.9", "--allow-nonstandard")
    assert c.scale == "tiny" and c.budget.samples_seen == 1600 and c.seed == 0
