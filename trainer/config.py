"""The fixed training budget of each scale, as data (reference section 5), and a run's config.

DataComp fixes everything about training per scale (model, batch size, optimiser, schedule,
samples seen); only the data may change. `TRAIN_SCALES` is that table; samples seen come
from `pools.scales` so the pool and the trainer agree. A run that changes any budget field
must say so (`--allow-nonstandard`) and is recorded as non-standard in its manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from pools.scales import get_scale

PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_bfloat16")


@dataclass(frozen=True, kw_only=True)
class TrainScale:
    """The fixed budget of one scale: what a DataComp participant may not change."""

    name: str
    model: str  # a name known to `trainer.models` (ours or open_clip's)
    batch_size: int  # global batch, all processes together
    lr: float
    warmup: int  # linear warmup steps, then cosine decay to 0
    samples_seen: int
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    wd: float = 0.2
    image_size: int = 224  # documentation only: the model config decides

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.samples_seen <= 0 or self.lr <= 0 or self.warmup < 0:
            raise ValueError(f"train scale {self.name}: batch_size, samples_seen, lr must be "
                             "positive and warmup non-negative")
        if self.samples_seen < self.batch_size:
            raise ValueError(f"train scale {self.name}: samples_seen {self.samples_seen} is "
                             f"below one batch ({self.batch_size})")


# Fields of TrainScale that make up the budget (every one but the name and image_size).
BUDGET_FIELDS = ("model", "batch_size", "lr", "warmup", "samples_seen", "beta1", "beta2", "eps",
                 "wd")

TRAIN_SCALES: dict[str, TrainScale] = {
    s.name: s
    for s in (
        # ours: ~3.9M-parameter ViT at 32 px; about a minute on 2 CPU cores.
        TrainScale(name="tiny", model="tiny", batch_size=256, lr=2e-3, warmup=20,
                   samples_seen=get_scale("tiny").samples_seen, image_size=32),
        TrainScale(name="small", model="ViT-B-32", batch_size=4096, lr=5e-4, warmup=500,
                   samples_seen=get_scale("small").samples_seen),
        TrainScale(name="medium", model="ViT-B-32", batch_size=4096, lr=5e-4, warmup=500,
                   samples_seen=get_scale("medium").samples_seen),
        TrainScale(name="large", model="ViT-B-16", batch_size=8192, lr=5e-4, warmup=500,
                   samples_seen=get_scale("large").samples_seen),
        TrainScale(name="xlarge", model="ViT-L-14", batch_size=90112, lr=1e-3, warmup=10_000,
                   beta2=0.95, samples_seen=get_scale("xlarge").samples_seen),
    )
}


def get_train_scale(name: str) -> TrainScale:
    try:
        return TRAIN_SCALES[name]
    except KeyError:
        raise ValueError(f"unknown scale {name!r}; known: {', '.join(TRAIN_SCALES)}") from None


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one run needs; written to `<out>/config.json`."""

    scale: str
    data: str  # shards: folder, brace pattern, resharded folder, or several joined by '::'
    out: str
    budget: TrainScale  # the budget actually used (the scale's, unless overridden)
    num_checkpoints: int = 5  # DataComp's "epochs": checkpoint intervals over the budget
    delete_previous_checkpoint: bool = False  # keep only epoch_latest.pt (what evaluation reads)
    precision: str = "fp32"
    workers: int = 2  # data loader processes per training process
    seed: int = 0
    local_loss: bool = False
    gather_with_grad: bool = False
    grad_checkpointing: bool = False
    grad_clip_norm: float | None = None
    shuffle_buffer: int = 1000  # samples per data stream held for shuffling
    log_every: int = 10  # steps between TensorBoard points
    resume: str | None = None  # None, "latest" or a checkpoint path
    device: str = "auto"
    tensorboard: bool = True
    progress: bool = True
    # open_clip's AugmentationCfg as a dict (`--aug-cfg`); None: open_clip's default transform.
    # DataComp fixes no augmentation beyond the default, so a run with one is non-standard.
    aug_cfg: dict | None = None
    # the open_clip config dict of `budget.model` when it is not a known name (`--model-config`,
    # `--image-drop-path`); recorded so that config.json alone rebuilds the model
    model_cfg: dict | None = None
    rewind_from: str | None = None  # the run or checkpoint a rewind continues (`--rewind-from`)
    rewind_at: float | None = None  # fraction of the parent's budget to rewind to
    threads: int | None = None  # torch compute threads per process; None: `compute_threads`
    torch_compile: bool = False  # torch.compile the model (GPU runs; no gain measured on CPU)

    def __post_init__(self) -> None:
        if self.aug_cfg is not None:
            check_aug_cfg(self.aug_cfg)
        if self.rewind_at is not None and not 0 < self.rewind_at < 1:
            raise ValueError(f"rewind_at {self.rewind_at} must lie strictly between 0 and 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} not one of {PRECISIONS}")
        if self.num_checkpoints <= 0:
            raise ValueError("num_checkpoints must be positive")
        if self.budget.samples_seen < self.num_checkpoints * self.budget.batch_size:
            raise ValueError(f"samples_seen {self.budget.samples_seen} gives less than one batch "
                             f"of {self.budget.batch_size} per checkpoint interval "
                             f"({self.num_checkpoints}); lower --num-checkpoints")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["budget"] = TrainScale(**d["budget"])
        return cls(**d)


def check_aug_cfg(aug_cfg: dict) -> None:
    """Refuse keys open_clip's `AugmentationCfg` does not have (they would be ignored silently)."""
    from open_clip.transform import AugmentationCfg

    known = {f.name for f in fields(AugmentationCfg)}
    unknown = sorted(set(aug_cfg) - known)
    if unknown:
        raise ValueError(f"--aug-cfg: unknown key(s) {', '.join(unknown)}; open_clip's "
                         f"AugmentationCfg has {', '.join(sorted(known))}")


def aug_cfg_for_open_clip(aug_cfg: dict | None) -> dict | None:
    """The recorded aug_cfg as open_clip takes it: JSON lists back to tuples."""
    if aug_cfg is None:
        return None
    return {k: tuple(v) if isinstance(v, list) else v for k, v in aug_cfg.items()}


def budget_overrides(scale: TrainScale, used: TrainScale) -> dict[str, dict]:
    """Budget fields where `used` differs from the scale's: {field: {"standard", "used"}}."""
    return {f: {"standard": getattr(scale, f), "used": getattr(used, f)}
            for f in BUDGET_FIELDS if getattr(scale, f) != getattr(used, f)}


def apply_overrides(scale: TrainScale, **changes) -> TrainScale:
    """The scale's budget with the non-None `changes` applied."""
    known = {f.name for f in fields(TrainScale)}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f"unknown budget fields: {sorted(unknown)}")
    return replace(scale, **{k: v for k, v in changes.items() if v is not None})
