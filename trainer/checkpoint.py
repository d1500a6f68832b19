"""Checkpoints in open_clip_train's layout, open_clip's local-dir layout, and loading either.

    <run>/checkpoints/epoch_<n>.pt     after checkpoint interval n (1-based, as open_clip)
    <run>/checkpoints/epoch_latest.pt  the newest of them
    <run>/open_clip_config.json        {"model_cfg", "preprocess_cfg"}: open_clip's local folder,
    <run>/open_clip_model.safetensors  so `open_clip.create_model_and_transforms('local-dir:<run>')`
                                       loads the newest weights (rewritten after each interval)

Each `.pt` holds {"epoch", "name", "state_dict", "optimizer", "scaler"?, "step", "samples_seen",
"model_name", "model_cfg", "counters"}; `state_dict` is the bare model's (no DDP `module.`
prefix), which `open_clip.load_checkpoint` and `create_model_and_transforms(pretrained=)` read.

`load_eval_model` loads any model a researcher hands the evaluation or the scorer: our run
folders and checkpoints, `open_clip_train` log folders (`<logs>/<name>/`, whose `params.txt`
names the model) and checkpoints with `--model NAME`, and `local-dir:` folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pools.files import atomic_path, file_fingerprint
from trainer.models import (CHECKPOINTS_DIR, LATEST_CHECKPOINT, MODEL_CONFIG_FILE, create_model,
                            latest_checkpoint, load_model)

LOCAL_DIR_PREFIX = "local-dir:"  # open_clip's schema for a local model folder
OPEN_CLIP_TRAIN_PARAMS = "params.txt"  # open_clip_train writes `name: value` per flag here


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


# --- open_clip's local-dir layout -------------------------------------------------------------
def write_open_clip_dir(folder: Path, model: torch.nn.Module, model_cfg: dict[str, Any]) -> Path:
    """Write `open_clip_config.json` and `open_clip_model.safetensors` into `folder` (atomically,
    weights first), so `create_model_and_transforms('local-dir:<folder>')` loads `model`.

    The config is open_clip's own (`save_config_for_hf`: model_cfg plus the model's mean, std,
    interpolation and resize mode), the weights safetensors (no pickle to trust)."""
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / HF_SAFE_WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp))
    with atomic_path(folder / HF_CONFIG_NAME) as tmp:
        save_config_for_hf(model, tmp, model_config=model_cfg)
    return folder / HF_CONFIG_NAME


def export_open_clip_dir(run: Path, checkpoint: Path | None = None) -> Path:
    """Give a finished run (e.g. one trained before runs wrote it) open_clip's local-dir files,
    from `checkpoint` (default: the run's latest)."""
    run = Path(run)
    checkpoint = checkpoint or latest_checkpoint(run)
    record = json.loads((run / MODEL_CONFIG_FILE).read_text())
    model, _, _ = load_model(checkpoint)
    return write_open_clip_dir(run, model, record["model_cfg"])


# --- loading whatever a researcher hands us ---------------------------------------------------
@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    preprocess: Any  # the eval transform
    tokenizer: Any
    weights: Path | None  # the file the weights came from (None: random init)
    description: str  # what was loaded, for logs and manifests

    def fingerprint(self) -> str:
        return file_fingerprint(self.weights) if self.weights is not None else "random-init"


def open_clip_train_model_name(log_dir: Path) -> str | None:
    """The `--model` an open_clip_train run was started with, from its `params.txt`."""
    params = Path(log_dir) / OPEN_CLIP_TRAIN_PARAMS
    if not params.is_file():
        return None
    for line in params.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("model: "):
            return line.split(": ", 1)[1].strip()
    return None


def _local_dir_weights(folder: Path) -> Path | None:
    from open_clip.factory import _find_checkpoint_in_dir  # the file open_clip itself picks

    found = _find_checkpoint_in_dir(folder)
    return Path(found) if found else None


def _load_local_dir(spec: str, device: str) -> LoadedModel:
    import open_clip

    folder = Path(spec[len(LOCAL_DIR_PREFIX):])
    if not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no open_clip_config.json, so it is not an open_clip "
                                "local folder (trainer.train writes one into each run)")
    model, _, preprocess = open_clip.create_model_and_transforms(spec, device=device)
    model.eval()
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(spec), _local_dir_weights(folder),
                       spec)


def _load_named(name: str, checkpoint: Path, device: str) -> LoadedModel:
    """Architecture `name` (ours, open_clip's, or `local-dir:` for its config) + `checkpoint`."""
    import open_clip

    if name.startswith(LOCAL_DIR_PREFIX):  # open_clip ignores `pretrained` for local-dir names
        loaded = _load_local_dir(name, device)
        open_clip.load_checkpoint(loaded.model, str(checkpoint), device=device)
        loaded.model.eval()
        return LoadedModel(loaded.model, loaded.preprocess, loaded.tokenizer, checkpoint,
                           f"{checkpoint} as {name}")
    model, _, preprocess, tokenizer = create_model(name, pretrained=str(checkpoint), device=device)
    model.eval()
    return LoadedModel(model, preprocess, tokenizer, checkpoint, f"{checkpoint} as {name}")


def _has_own_config(checkpoint: Path) -> bool:
    ckpt = load_checkpoint(checkpoint)
    return isinstance(ckpt, dict) and "model_name" in ckpt and "model_cfg" in ckpt


def load_eval_model(source: str | Path, *, model_name: str | None = None,
                    device: str = "cpu") -> LoadedModel:
    """The model in `source`, in eval mode:

    - ``local-dir:DIR``: open_clip's local folder (a run of ours has one);
    - a `trainer.train` run folder or checkpoint (they name their own architecture);
    - an `open_clip_train` log folder (``<logs>/<name>``: its latest checkpoint, the model
      named in its params.txt) or checkpoint (params.txt two folders up, else `model_name`);
    - a folder holding only open_clip's local-dir files.

    `model_name` (ours, open_clip's, or ``local-dir:DIR`` for its architecture) overrides what
    the files say; a checkpoint that names no architecture needs it.
    """
    spec = str(source)
    if spec.startswith(LOCAL_DIR_PREFIX):
        return _load_local_dir(spec, device)
    path = Path(spec)
    if path.is_dir():
        has_checkpoints = (path / CHECKPOINTS_DIR).is_dir() and \
            any((path / CHECKPOINTS_DIR).glob("epoch_*.pt"))
        if not has_checkpoints and (path / "open_clip_config.json").is_file():
            return _load_local_dir(LOCAL_DIR_PREFIX + spec, device)
        checkpoint = latest_checkpoint(path)
        log_dir = path
    elif path.is_file():
        checkpoint = path
        log_dir = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent
    else:
        raise FileNotFoundError(f"{spec}: no such run folder, checkpoint or local-dir: folder")
    name = model_name or open_clip_train_model_name(log_dir)
    if name is None:
        if (log_dir / MODEL_CONFIG_FILE).is_file() or _has_own_config(checkpoint):
            model, preprocess, tokenizer = load_model(checkpoint if path.is_file() else path,
                                                      device=device)
            return LoadedModel(model, preprocess, tokenizer, checkpoint, str(checkpoint))
        raise FileNotFoundError(
            f"{checkpoint}: names no model architecture (no model_cfg inside, no {MODEL_CONFIG_FILE} "
            f"or open_clip_train {OPEN_CLIP_TRAIN_PARAMS} beside it); give the architecture it was "
            "trained as with --model NAME (an open_clip name such as ViT-B-32, ours such as tiny, "
            "or local-dir:DIR)")
    return _load_named(name, checkpoint, device)

