"""Rewinds: re-do the end of a finished (or running) run from one of its checkpoints.

The ConvNeXt-XXLarge card's recipe: train to the budget, then take the checkpoint at about 90%
of it and train the last ~10% again with a larger global batch, a higher LR and stronger
augmentation; the two finishes are averaged into a soup (`trainer.soup`).

    python -m trainer.train --rewind-from runs/a --rewind-at 0.9 --out runs/a-rewind \\
        --allow-nonstandard --global-batch-size 512 --lr 3e-3 --aug-cfg scale='(0.33, 1.0)'

`find_rewind_point` picks the parent's checkpoint whose samples seen lie nearest to the
fraction asked for (reading only its counters: checkpoints are memory-mapped, not loaded);
the training loop (`trainer.train`) loads its weights and optimiser state and trains the
rest of the parent's budget, so the finished run has seen exactly the parent's samples.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trainer.config import TrainConfig
from trainer.models import CHECKPOINTS_DIR


@dataclass(frozen=True)
class RewindPoint:
    """Where a rewind starts: a checkpoint of the parent run and what it had seen."""

    parent_run: str
    checkpoint: str
    interval: int  # the parent's checkpoint interval ("epoch", 1-based) the checkpoint closes
    samples_seen: int  # by the parent, at the checkpoint
    budget_samples: int  # the parent's whole budget, which the rewind finishes

    def to_json(self) -> dict:
        return {**asdict(self), "fraction": round(self.samples_seen / self.budget_samples, 6)}


def parent_config(rewind_from: str | Path) -> tuple[Path, TrainConfig]:
    """(run folder, its TrainConfig) for a run folder or one of its checkpoint files."""
    path = Path(rewind_from)
    if not path.exists():
        raise FileNotFoundError(f"--rewind-from {path}: no such run folder or checkpoint")
    run = path if path.is_dir() else path.parent.parent  # <run>/checkpoints/epoch_<n>.pt
    config = run / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--rewind-from {path}: no config.json in its run folder {run}; "
                                "it takes a trainer.train run folder or one of its checkpoints")
    return run, TrainConfig.from_json(json.loads(config.read_text()))


def checkpoint_position(checkpoint: Path) -> tuple[int, int]:
    """(interval, samples seen) recorded in a checkpoint, without reading its tensors."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    try:
        return int(ck["epoch"]), int(ck["samples_seen"])
    except (KeyError, TypeError):
        raise ValueError(f"{checkpoint}: records no epoch/samples_seen; was it written by "
                         "trainer.train?") from None


def find_rewind_point(rewind_from: str | Path, rewind_at: float | None) -> RewindPoint:
    """The parent checkpoint nearest to `rewind_at` of its budget (or the checkpoint given)."""
    path = Path(rewind_from)
    run, parent = parent_config(path)
    budget = parent.budget.samples_seen
    if path.is_file():
        candidates = [path]
    else:
        candidates = sorted((run / CHECKPOINTS_DIR).glob("epoch_*.pt"))
        if rewind_at is None:
            raise ValueError(f"--rewind-from {path} is a run folder: give --rewind-at (e.g. 0.9)")
    positions = {}
    for c in candidates:
        interval, seen = checkpoint_position(c)
        if seen < budget:
            positions.setdefault(seen, (interval, c))  # epoch_<n>.pt sorts before epoch_latest.pt
    if not positions:
        raise ValueError(f"--rewind-from {path}: no checkpoint before the end of the parent's "
                         f"budget ({budget:,} samples) to rewind to; a run keeps them unless it "
                         "ran with --delete-previous-checkpoint")
    target = (rewind_at if rewind_at is not None else 0) * budget
    seen = min(positions, key=lambda s: (abs(s - target), s))
    interval, checkpoint = positions[seen]
    return RewindPoint(parent_run=str(run), checkpoint=str(checkpoint), interval=interval,
                       samples_seen=seen, budget_samples=budget)
