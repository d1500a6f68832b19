"""Checkpoints in open_clip_train's layout, written atomically, found again for `--resume`.

    <run>/checkpoints/epoch_<n>.pt     after checkpoint interval n (1-based, as open_clip)
    <run>/checkpoints/epoch_latest.pt  the newest of them

Each holds {"epoch", "name", "state_dict", "optimizer", "scaler"?, "step", "samples_seen",
"model_name", "model_cfg", "counters"}; `state_dict` is the bare model's (no DDP `module.`
prefix), which `open_clip.load_checkpoint` and `create_model_and_transforms(pretrained=)` read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pools.files import atomic_path
from trainer.models import CHECKPOINTS_DIR, LATEST_CHECKPOINT, latest_checkpoint


def checkpoint_path(run: Path, epoch: int) -> Path:
    return Path(run) / CHECKPOINTS_DIR / f"epoch_{epoch}.pt"


def save_checkpoint(run: Path, state: dict[str, Any], *, keep_numbered: bool = True) -> Path:
    """Write epoch_<n>.pt (unless not kept) and epoch_latest.pt, each atomically."""
    ckpt_dir = Path(run) / CHECKPOINTS_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    targets = [ckpt_dir / LATEST_CHECKPOINT]
    if keep_numbered:
        targets.insert(0, checkpoint_path(run, state["epoch"]))
    for target in targets:
        try:
            with atomic_path(target) as tmp, open(tmp, "wb") as f:
                torch.save(state, f)  # through a Python file: a full disk is an OSError, not a C++ one
        except OSError as exc:
            raise OSError(exc.errno, f"{target}: cannot write the checkpoint ({exc.strerror or exc}); free "
                                     "space on that disk, then continue with --resume latest") from None
    return targets[0]


def find_resume(run: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None, 'latest' (None when the run has none) or a path."""
    if resume is None:
        return None
    if resume == "latest":
        try:
            return latest_checkpoint(Path(run))
        except FileNotFoundError:
            return None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
