"""Model configs as data and one factory: names or dicts in, open_clip models out.

    model, preprocess_train, preprocess_val, tokenizer = create_model("tiny")
    model, preprocess_val, tokenizer = load_model("runs/tiny_scale")          # a run folder
    model, preprocess_val, tokenizer = load_model("runs/x/checkpoints/epoch_2.pt")

Built-in open_clip names (`ViT-B-32`, ...) go straight to open_clip. Our own configs (`tiny`)
are plain open_clip config dicts (`embed_dim`, `vision_cfg`, `text_cfg`) registered with
open_clip through its public `add_model_config`, so open_clip's tokenizer and transforms see
them exactly as they see a shipped config.

A run folder written by `trainer.train` holds (the on-disk contract other tools rely on)::

    <run>/config.json                     the training config (scale, data, flags)
    <run>/manifest.json                   what ran: budget, overrides, counts, versions
    <run>/model_config.json               {"model_name": NAME, "model_cfg": {...open_clip dict}}
    <run>/model_configs/<NAME>.json       the bare dict, for `open_clip.add_model_config(dir)`
    <run>/checkpoints/epoch_<n>.pt        open_clip_train's layout: {"epoch", "name",
    <run>/checkpoints/epoch_latest.pt      "state_dict", "optimizer", ...} plus "model_name"
                                           and "model_cfg" so a lone file is self-describing
    <run>/open_clip_config.json           open_clip's local folder (`local-dir:<run>`): model_cfg
    <run>/open_clip_model.safetensors      and preprocess_cfg, and the latest weights

so that `open_clip.add_model_config(run / "model_configs")` followed by
`open_clip.create_model_and_transforms(NAME, pretrained=str(checkpoint))` loads it, as
DataComp's evaluation does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

# The `tiny` scale's model: a ViT at 32 px with 8-px patches (16 tokens) and a narrow text
# tower with a short context. ~3.9M parameters, of which 3.2M are the text token embedding
# (49408 x 64: open_clip's tokenizer, kept whole so the model stays an ordinary open_clip one).
# Its text context is 16 tokens: the synthetic pool's English captions are at most 11 tokens
# and the eval prompts shorter still, so only non-English and junk captions are cut (they were
# already cut at 32), and the text tower stops spending half its work on padding.
# (open_clip's `block_type: custom` attention block saved another ~7-10% of a CPU step, but it
# starts from another init, after which a 2-process DDP run's first loss fell outside
# tests/trainer/test_train.py's tolerance for reasons not understood yet, and open_clip 2.16,
# DataComp's pin, refuses the key.)
TINY_MODEL_NAME = "tiny"
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 32,
        "layers": 3,
        "width": 128,
        "head_width": 32,
        "patch_size": 8,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 3,
    },
}

# The synthetic pool's stand-ins for OpenAI's ViT-B/32 and ViT-L/14, which CommonPool's scores
# and embeddings come from: the tiny towers with CommonPool's embedding widths (512 and 768), so
# `pipeline.score` fills the b32/l14 columns in their real shapes. As with the real models, the
# l14 teacher is the larger one: a deeper, wider image tower.
TEACHER_MODEL_CFGS: dict[str, dict[str, Any]] = {
    "teacher-b32": {**TINY_MODEL_CFG, "embed_dim": 512},
    "teacher-l14": {**TINY_MODEL_CFG, "embed_dim": 768,
                    "vision_cfg": {**TINY_MODEL_CFG["vision_cfg"], "layers": 4, "width": 192}},
}

# Our configs by name; open_clip's own names need no entry here.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {TINY_MODEL_NAME: TINY_MODEL_CFG, **TEACHER_MODEL_CFGS}

MODEL_CONFIG_FILE = "model_config.json"
MODEL_CONFIGS_DIR = "model_configs"
CHECKPOINTS_DIR = "checkpoints"
LATEST_CHECKPOINT = "epoch_latest.pt"

_registered: dict[str, dict[str, Any]] = {}
_register_dir: Path | None = None


def is_model_cfg(cfg: Any) -> bool:
    """Whether `cfg` looks like an open_clip model config dict."""
    return isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg"))


def config_name(cfg: dict[str, Any]) -> str:
    """A stable name for an unnamed config dict: `custom-<hash of its JSON>`."""
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    return f"custom-{digest}"


def register_model_config(name: str, cfg: dict[str, Any]) -> str:
    """Make open_clip know `name` as `cfg` (via `open_clip.add_model_config`); returns `name`."""
    import open_clip

    global _register_dir
    if not is_model_cfg(cfg):
        raise ValueError(f"model config {name!r} lacks one of embed_dim, vision_cfg, text_cfg")
    if not re.fullmatch(r"[A-Za-z0-9_.@+-]+", name):
        raise ValueError(f"model name {name!r} must be letters, digits and _.@+- only")
    if _registered.get(name) == cfg and name in open_clip.list_models():
        return name
    if name in open_clip.list_models() and name not in _registered:
        if open_clip.get_model_config(name) != cfg:
            raise ValueError(f"model name {name!r} is an open_clip built-in with another config")
        return name
    if _register_dir is None:
        _register_dir = Path(tempfile.mkdtemp(prefix="trainer_model_configs_"))
    path = _register_dir / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=2))
    open_clip.add_model_config(path)
    _registered[name] = copy.deepcopy(cfg)
    return name


def resolve_model(name_or_cfg: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, config dict) for a name (ours or open_clip's) or a config dict, registered."""
    import open_clip

    if isinstance(name_or_cfg, dict):
        if "model_cfg" in name_or_cfg and "model_name" in name_or_cfg:  # a model_config.json
            name, cfg = name_or_cfg["model_name"], name_or_cfg["model_cfg"]
        else:
            name, cfg = config_name(name_or_cfg), name_or_cfg
        return register_model_config(name, cfg), copy.deepcopy(cfg)
    if name_or_cfg in MODEL_CONFIGS:
        return register_model_config(name_or_cfg, MODEL_CONFIGS[name_or_cfg]), \
            copy.deepcopy(MODEL_CONFIGS[name_or_cfg])
    cfg = open_clip.get_model_config(name_or_cfg)
    if cfg is None:
        raise ValueError(f"unknown model {name_or_cfg!r}: not one of ours ({', '.join(MODEL_CONFIGS)})"
                         " nor an open_clip config (see open_clip.list_models())")
    return name_or_cfg, cfg


def create_model(name_or_cfg: str | dict[str, Any], *, pretrained: str | None = None,
                 precision: str = "fp32", device: str | torch.device = "cpu",
                 aug_cfg: dict[str, Any] | None = None):
    """(model, preprocess_train, preprocess_val, tokenizer) for a model name or config dict.

    `pretrained` may be a checkpoint file (ours or open_clip's); none is downloaded here. A
    Hugging Face text tower (`text_cfg.hf_model_name`) named by a local folder starts from the
    weights in that folder when it holds some, as in open_clip. `aug_cfg` is open_clip's
    `AugmentationCfg` as a dict (training transform only).
    """
    import open_clip

    name, _ = resolve_model(name_or_cfg)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, precision=precision, device=device, aug_cfg=aug_cfg)
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess_train, preprocess_val, tokenizer


def read_model_config_file(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(name, config) of an open_clip model config file; the name is the file's stem, as for
    `open_clip.add_model_config`. Our own `model_config.json` form is accepted too."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON model config ({exc})") from None
    if isinstance(cfg, dict) and "model_cfg" in cfg and "model_name" in cfg:
        return str(cfg["model_name"]), cfg["model_cfg"]
    if not is_model_cfg(cfg):
        raise ValueError(f"{path}: an open_clip model config needs embed_dim, vision_cfg and "
                         "text_cfg (see open_clip/model_configs/*.json)")
    return path.stem, cfg


def with_image_drop_path(name: str, cfg: dict[str, Any], rate: float) -> tuple[str, dict[str, Any]]:
    """The config with stochastic depth `rate` on its image tower, under a name saying so.

    open_clip passes `vision_cfg.timm_drop_path` to timm towers (the ConvNeXt configs set 0.1);
    its own VisionTransformer has no stochastic depth, so other towers are refused.
    """
    if not 0 <= rate < 1:
        raise ValueError(f"--image-drop-path {rate}: a rate in [0, 1)")
    if not cfg["vision_cfg"].get("timm_model_name"):
        raise ValueError(f"--image-drop-path: model {name!r} has open_clip's own image tower, which "
                         "has no stochastic depth; use a timm tower (vision_cfg.timm_model_name)")
    cfg = copy.deepcopy(cfg)
    cfg["vision_cfg"]["timm_drop_path"] = rate
    return f"{name}-drop-path-{rate:g}", cfg


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_config_record(name_or_cfg: str | dict[str, Any]) -> dict[str, Any]:
    """The content of a run's `model_config.json`."""
    name, cfg = resolve_model(name_or_cfg)
    return {"model_name": name, "model_cfg": cfg}


def latest_checkpoint(run: Path) -> Path:
    """`epoch_latest.pt` of a run, else its highest `epoch_<n>.pt`."""
    ckpt_dir = Path(run) / CHECKPOINTS_DIR
    latest = ckpt_dir / LATEST_CHECKPOINT
    if latest.is_file():
        return latest
    numbered = sorted(ckpt_dir.glob("epoch_*.pt"),
                      key=lambda p: int(m.group(1)) if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))
                      else -1)
    numbered = [p for p in numbered if re.fullmatch(r"epoch_\d+\.pt", p.name)]
    if not numbered:
        raise FileNotFoundError(f"{ckpt_dir}: no epoch_latest.pt or epoch_<n>.pt checkpoint")
    return numbered[-1]


def checkpoint_and_record(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint file, {"model_name", "model_cfg"}) for a run folder or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        checkpoint = latest_checkpoint(path)
        record_path = path / MODEL_CONFIG_FILE
        record = json.loads(record_path.read_text()) if record_path.is_file() \
            else _model_record_for(checkpoint)
        return checkpoint, record
    if path.is_file():
        return path, _model_record_for(path)
    raise FileNotFoundError(f"{path}: no such run folder or checkpoint file")


def _model_record_for(checkpoint: Path) -> dict[str, Any]:
    """The model name and config for a checkpoint: from the file itself or its run folder."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "model_name" in ckpt and "model_cfg" in ckpt:
        return {"model_name": ckpt["model_name"], "model_cfg": ckpt["model_cfg"]}
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        path = folder / MODEL_CONFIG_FILE
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"{checkpoint}: holds no model_name/model_cfg and no {MODEL_CONFIG_FILE}"
                            " lies beside it or in its run folder")


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model, preprocess_val, tokenizer) from a run folder or a checkpoint file, in eval mode."""
    checkpoint, record = checkpoint_and_record(path)
    model, _, preprocess_val, tokenizer = create_model(record, pretrained=str(checkpoint),
                                                       device=device)
    model.eval()
    return model, preprocess_val, tokenizer
