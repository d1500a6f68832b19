"""Target embeddings for the image-based filter, from files or from an image folder.

DataComp's targets are the OpenAI CLIP ViT-L/14 image embeddings of ImageNet-1k's training
set, published as ``in1k_clip_vit_l14_{0..4}.pt``. `resolve_targets` accepts those files,
``.npy`` arrays of shape (n, 768), or a folder of images (``.jpg``/``.png``/... anywhere
below it, or webdataset ``.tar`` shards) that it embeds with a CLIP model: an open_clip name
with ``--targets-pretrained`` (a checkpoint or an open_clip_train log folder), a checkpoint
file, a run folder from `trainer.train` or `open_clip_train`, or ``local-dir:DIR``
(`pipeline.score.load_scoring_model`). Embeddings computed from a folder are cached as ``.npy`` in the cache
folder, keyed by the folder's file list and the model.

Only the direction of a target matters (its nearest centroid is an argmax of inner
products), so targets need not be normalised.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.models import CACHE_DIR, ModelInputError, load_targets
from pools.files import atomic_path, file_fingerprint

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _iter_images(folder: Path) -> Iterator[bytes]:
    files = _image_files(folder)
    if files:
        for path in files:
            yield path.read_bytes()
        return
    for shard in sorted(folder.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    yield tar.extractfile(member).read()


def folder_fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    files = _image_files(folder) or sorted(folder.rglob("*.tar"))
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def embed_image_folder(folder: Path, model: str, pretrained: str | None = None, *, device: str = "cpu",
                       batch_size: int = 256) -> np.ndarray:
    """Image embeddings (n, d) float32 of every image under `folder`, in file order."""
    import torch
    from PIL import Image

    from pipeline.score import load_scoring_model

    net, preprocess, _, _ = load_scoring_model(model, pretrained, device=device)
    net.eval()
    out, batch = [], []

    def flush():
        with torch.no_grad():
            x = torch.stack(batch).to(device)
            out.append(net.encode_image(x).float().cpu().numpy())
        batch.clear()

    count = 0
    for data in _iter_images(folder):
        with Image.open(io.BytesIO(data)) as im:
            batch.append(preprocess(im.convert("RGB")))
        count += 1
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not count:
        raise ModelInputError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) or .tar shards of them")
    return np.concatenate(out).astype(np.float32)


def resolve_targets(paths: Sequence[str | os.PathLike], *, model: str | None = None,
                    pretrained: str | None = None, device: str = "cpu", dim: int = 768,
                    cache_dir: Path = CACHE_DIR) -> tuple[np.ndarray, list[dict]]:
    """(targets, description of each source) from files and/or image folders."""
    parts, described = [], []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            if model is None:
                raise ModelInputError(f"--targets {path} is an image folder: give --targets-model (an "
                                      "open_clip name with --targets-pretrained, a checkpoint, a run or "
                                      "open_clip_train log folder, or local-dir:DIR) to embed it")
            model_key = _model_key(model, pretrained)
            key = hashlib.sha256(f"{path.resolve()}|{folder_fingerprint(path)}|{model}|{pretrained}|"
                                 f"{model_key}".encode()).hexdigest()[:16]
            cache = Path(cache_dir) / f"targets_{key}.npy" if model_key != "random-init" else None
            if cache is not None and cache.is_file():
                arr = np.load(cache)
            else:
                print(f"embedding target images in {path} with {model}", file=sys.stderr)
                arr = embed_image_folder(path, model, pretrained, device=device)
                if cache is not None:  # random weights differ every time: nothing to reuse
                    with atomic_path(cache) as tmp:
                        with open(tmp, "wb") as f:
                            np.save(f, arr)
            if arr.shape[1] != dim:
                raise ModelInputError(f"{model} embeds {path} into {arr.shape[1]}-d vectors; the pool's "
                                      f"l14_img embeddings are {dim}-d")
            parts.append(arr)
            described.append({"folder": str(path), "model": model, "pretrained": pretrained,
                              "rows": int(len(arr)), "cache": str(cache) if cache else None})
        else:
            arr = load_targets([path], dim=dim)
            parts.append(arr)
            described.append({"file": str(path), "fingerprint": file_fingerprint(path), "rows": int(len(arr))})
    if not parts:
        raise ModelInputError("no targets given")
    return np.concatenate(parts), described


def _model_key(model: str, pretrained: str | None) -> str:
    from trainer.checkpoint import LOCAL_DIR_PREFIX

    if pretrained is None and model.startswith(LOCAL_DIR_PREFIX):  # open_clip's local folder
        weights = sorted(Path(model[len(LOCAL_DIR_PREFIX):]).glob("*.safetensors"))
        return file_fingerprint(weights[0]) if weights else "random-init"
    for candidate in (pretrained, model):
        if candidate and Path(candidate).exists():
            p = Path(candidate)
            if p.is_dir():
                files = sorted(p.rglob("*.pt"))
                return file_fingerprint(files[-1]) if files else "empty"
            return file_fingerprint(p)
    return "random-init" if pretrained is None else f"named:{pretrained}"
