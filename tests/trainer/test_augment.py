"""--aug-cfg: open_clip's AugmentationCfg names and meaning, recorded, and non-standard."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.models import create_model
from trainer.train import build_parser, config_from_args, main

REPO = Path(__file__).resolve().parents[2]
# the ViT-B-32-256 card's augmentation (open_clip's pretrained model card), as typed there
CARD_AUG = ["use_timm=True", "scale=(0.4, 1.0)", "color_jitter=(0.32, 0.32, 0.32, 0.08)",
            "color_jitter_prob=0.8", "gray_scale_prob=0.2"]


def config(*extra):
    return config_from_args(build_parser().parse_args(
        ["--scale", "tiny", "--data", "d", "--out", "o", *extra]))


def test_aug_cfg_is_parsed_as_open_clip_train_does():
    cfg = config("--allow-nonstandard", "--aug-cfg", *CARD_AUG, "re_prob=0.35")
    assert cfg.aug_cfg == {"use_timm": True, "scale": [0.4, 1.0],
                           "color_jitter": [0.32, 0.32, 0.32, 0.08], "color_jitter_prob": 0.8,
                           "gray_scale_prob": 0.2, "re_prob": 0.35}
    with pytest.raises(SystemExit, match="aug_cfg; add --allow-nonstandard"):
        config("--aug-cfg", "re_prob=0.35")
    with pytest.raises(ValueError, match="unknown key.*scal.*AugmentationCfg has"):
        config("--allow-nonstandard", "--aug-cfg", "scal=(0.4, 1.0)")


def test_bad_aug_cfg_is_one_line(tmp_path):
    for bad, says in ((["re_prob"], "'re_prob' is not KEY=VALUE"),
                      (["colour_jitter=0.4"], "unknown key(s) colour_jitter")):
        proc = subprocess.run([sys.executable, "-m", "trainer.train", "--scale", "tiny", "--data",
                               str(tmp_path), "--out", str(tmp_path / "o"), "--allow-nonstandard",
                               "--aug-cfg", *bad], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert says in proc.stderr.strip().splitlines()[-1]


def test_the_cards_augmentations_build_the_transforms_open_clip_builds():
    # ConvNeXt-XXLarge card: timm's RandomResizedCrop with scale (0.33, 1) and random erasing
    _, train_tf, val_tf, _ = create_model("tiny", aug_cfg={"use_timm": True, "scale": (0.33, 1.0),
                                                           "re_prob": 0.35})
    text = repr(train_tf)
    assert "scale=(0.33, 1.0)" in text and "RandomErasing(p=0.35" in text
    assert "RandomErasing" not in repr(val_tf)
    # without use_timm, open_clip's own SimCLR-style jitter and grayscale with their probabilities
    _, train_tf, _, _ = create_model("tiny", aug_cfg={"scale": (0.4, 1.0), "color_jitter_prob": 0.8,
                                                      "gray_scale_prob": 0.2,
                                                      "color_jitter": (0.32, 0.32, 0.32, 0.08)})
    names = [type(t).__name__ for t in train_tf.transforms]
    assert "color_jitter" in names and "gray_scale" in names
    assert [t.p for t in train_tf.transforms if type(t).__name__ == "gray_scale"] == [0.2]


@pytest.mark.slow
def test_a_tiny_run_with_the_vit_b_32_256_card_augmentation(train_pool, tmp_path):
    run = tmp_path / "aug"
    m = main(["--scale", "tiny", "--data", str(train_pool / "shards"), "--out", str(run),
              "--allow-nonstandard", "--samples-seen", "192", "--global-batch-size", "64",
              "--num-checkpoints", "1", "--workers", "1", "--no-progress", "--no-tensorboard",
              "--aug-cfg", *CARD_AUG])
    assert m["samples_seen"] == m["counters"]["samples"] == 192
    assert m["standard"] is False and m["aug_cfg"]["scale"] == [0.4, 1.0]
    assert "scale=(0.4, 1.0)" in m["train_transform"] and "ColorJitter" in m["train_transform"]
    recorded = json.loads((run / "config.json").read_text())["aug_cfg"]
    assert recorded == {"use_timm": True, "scale": [0.4, 1.0], "color_jitter": [0.32, 0.32, 0.32, 0.08],
                        "color_jitter_prob": 0.8, "gray_scale_prob": 0.2}
    assert json.loads((run / "manifest.json").read_text())["standard"] is False
    assert 0 <= m["data_wait_fraction"] <= 1
