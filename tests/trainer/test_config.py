import pytest

from trainer.config import (BUDGET_FIELDS, TRAIN_SCALES, TrainConfig, apply_overrides,
                            budget_overrides, get_train_scale)
from trainer.train import build_parser, config_from_args, cosine_lr


def test_datacomp_budgets_match_the_reference_table():
    table = {s: (v.model, v.batch_size, v.lr, v.warmup, v.beta2, v.samples_seen)
             for s, v in TRAIN_SCALES.items() if s != "tiny"}
    assert table == {
        "small": ("ViT-B-32", 4096, 5e-4, 500, 0.98, 12_800_000),
        "medium": ("ViT-B-32", 4096, 5e-4, 500, 0.98, 128_000_000),
        "large": ("ViT-B-16", 8192, 5e-4, 500, 0.98, 1_280_000_000),
        "xlarge": ("ViT-L-14", 90112, 1e-3, 10_000, 0.95, 12_800_000_000),
    }
    for s in TRAIN_SCALES.values():
        assert (s.beta1, s.eps, s.wd) == (0.9, 1e-6, 0.2)


def test_overrides_are_recorded_and_need_the_flag():
    tiny = get_train_scale("tiny")
    used = apply_overrides(tiny, lr=1.0, batch_size=None)
    assert budget_overrides(tiny, used) == {"lr": {"standard": tiny.lr, "used": 1.0}}
    assert budget_overrides(tiny, tiny) == {}
    base = ["--scale", "tiny", "--data", "d", "--out", "o"]
    with pytest.raises(SystemExit, match="allow-nonstandard"):
        config_from_args(build_parser().parse_args(base + ["--samples-seen", "512"]))
    cfg = config_from_args(build_parser().parse_args(base + ["--samples-seen", "5120",
                                                            "--allow-nonstandard"]))
    assert cfg.budget.samples_seen == 5120 and cfg.budget.lr == tiny.lr
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert set(BUDGET_FIELDS) <= set(cfg.to_json()["budget"])


def test_cosine_schedule_has_linear_warmup_then_decays_to_zero():
    lrs = [cosine_lr(s, 1.0, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3
