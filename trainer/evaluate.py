"""Zero-shot evaluation of a trained run, appended to DataComp's `eval_results.jsonl`.

    python -m trainer.evaluate --run runs/tiny --tasks synth=data/pool/eval
    python -m trainer.evaluate --run runs/small --imagenet /data/imagenet/val --retrieval flickr=DIR

Tasks:
- classification (`--tasks [NAME=]DIR`): DIR holds `classnames.txt`,
  `zeroshot_classification_templates.txt` (templates with `{c}`) and either `test/*.tar`
  (DataComp's webdataset layout: `<key>.jpg|png|webp` + `<key>.cls`) or one subfolder of images
  per class (sorted names = class order). The `pools.synth` eval set is such a folder.
- ImageNet (`--imagenet DIR`, key `imagenet1k`): the same layouts, or a val folder of 1000
  wnid subfolders; class names and the 80 templates are open_clip's (OpenAI's).
- retrieval (`--retrieval [NAME=]DIR`): a webdataset of image + caption pairs (`.txt`, one
  caption per line).

The text classifier averages the normalised text embeddings over the templates (as
clip_benchmark does). Classification metrics: acc1, acc5 (>= 5 classes), mean_per_class_recall;
retrieval: image/text retrieval recall@1/5/10 and mean_recall@1. Each finished task is
appended as `{"key", "dataset", "metrics": {..., "main_metric"}}`; tasks already in the file
are skipped. Text classifiers are cached per checkpoint under `<out>/eval_cache/`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pools.files import atomic_path, file_fingerprint
from trainer.data import IMAGE_EXTS, first_member, iter_tar_samples
from trainer.models import latest_checkpoint, load_model

RESULTS_FILE = "eval_results.jsonl"
IMAGE_FILE_EXTS = tuple(f".{e}" for e in IMAGE_EXTS)


# --- metrics (pure) ---------------------------------------------------------------------------
def classification_metrics(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """acc1, acc5 (when there are >= 5 classes) and mean per-class recall (sklearn's
    balanced accuracy: the mean over the classes present in `targets` of their recall)."""
    logits, targets = np.asarray(logits), np.asarray(targets)
    if len(targets) == 0:
        raise ValueError("no samples to score")
    pred = logits.argmax(1)
    out = {"acc1": float((pred == targets).mean())}
    if logits.shape[1] >= 5:
        top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
        out["acc5"] = float((top5 == targets[:, None]).any(1).mean())
    classes = np.unique(targets)
    out["mean_per_class_recall"] = float(np.mean([(pred[targets == c] == c).mean() for c in classes]))
    return out


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """clip_benchmark's recall@k: `image_retrieval` = for each caption, is its image in the top
    k images; `text_retrieval` = for each image, is any of its captions in the top k captions."""
    scores = text_emb @ image_emb.T  # captions x images
    n_img = image_emb.shape[0]
    positive = np.zeros_like(scores, dtype=bool)
    positive[np.arange(len(text_image)), text_image] = True
    out = {}
    for k in ks:
        kk = min(k, n_img)
        top_img = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
        out[f"image_retrieval_recall@{k}"] = float(np.take_along_axis(positive, top_img, 1).any(1).mean())
        kt = min(k, scores.shape[0])
        top_txt = np.argsort(-scores.T, axis=1, kind="stable")[:, :kt]
        out[f"text_retrieval_recall@{k}"] = float(np.take_along_axis(positive.T, top_txt, 1).any(1).mean())
    out["mean_recall@1"] = 0.5 * (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"])
    return out


# --- tasks ------------------------------------------------------------------------------------
@dataclass
class ClassificationTask:
    key: str
    classnames: list[str]
    templates: list  # format strings with {c}, or callables (open_clip's OpenAI templates)
    samples: Callable[[], "Iterator"] = field(repr=False)  # yields (image bytes or path, label)
    main_metric: str = "acc1"


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a classification task needs it)")
    lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines()]
    return [l for l in lines if l]


def _wds_class_samples(tars: list[Path]):
    def gen():
        for tar in tars:
            for key, sample in iter_tar_samples(str(tar)):
                img = first_member(sample, IMAGE_EXTS)
                if img is None or "cls" not in sample:
                    raise ValueError(f"{tar}: sample {key} lacks an image or a .cls label")
                yield img, int(sample["cls"].decode().strip())
    return gen


def _folder_class_samples(root: Path, class_dirs: list[Path]):
    def gen():
        for label, d in enumerate(class_dirs):
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_FILE_EXTS or f.suffix.upper() == ".JPEG":
                    yield f, label
    return gen


def image_source(root: Path, num_classes: int):
    """The (image, label) source of a task folder: webdataset `test/*.tar` or class subfolders."""
    tars = sorted((root / "test").glob("*.tar"), key=lambda p: (len(p.name), p.name)) \
        if (root / "test").is_dir() else []
    if tars:
        return _wds_class_samples(tars)
    for base in (root, root / "val", root / "test"):
        dirs = sorted(d for d in base.iterdir() if d.is_dir()) if base.is_dir() else []
        dirs = [d for d in dirs if d.name not in ("test", "val", "train")]
        if len(dirs) == num_classes:
            return _folder_class_samples(base, dirs)
    raise FileNotFoundError(f"{root}: no test/*.tar shards and no folder with {num_classes} class "
                            "subfolders")


def classification_task(key: str, root: Path) -> ClassificationTask:
    classnames = _read_lines(root / "classnames.txt")
    templates = _read_lines(root / "zeroshot_classification_templates.txt")
    return ClassificationTask(key, classnames, templates, image_source(root, len(classnames)))


def imagenet_task(root: Path) -> ClassificationTask:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    classnames = list(IMAGENET_CLASSNAMES)
    return ClassificationTask("imagenet1k", classnames, list(OPENAI_IMAGENET_TEMPLATES),
                              image_source(root, len(classnames)))


def parse_named(spec: str) -> tuple[str, Path]:
    """'NAME=DIR' or 'DIR' (the key is then the folder's name)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, Path(path)
    return Path(spec).name, Path(spec)


# --- model side -------------------------------------------------------------------------------
def _fill(template, classname: str) -> str:
    return template(classname) if callable(template) else template.format(c=classname)


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence,
                         device: str = "cpu") -> torch.Tensor:
    """(embed_dim, classes): per class, the normalised mean of normalised template embeddings."""
    weights = []
    for c in classnames:
        tokens = tokenizer([_fill(t, c) for t in templates]).to(device)
        emb = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        weights.append(emb / emb.norm())
    return torch.stack(weights, dim=1)


def _open_image(src) -> Image.Image:
    im = Image.open(io.BytesIO(src)) if isinstance(src, (bytes, bytearray)) else Image.open(src)
    return im.convert("RGB")


@torch.no_grad()
def encode_images(model, preprocess, images, batch_size: int, device: str, desc: str):
    """Normalised image embeddings of an iterable of image bytes/paths, batch by batch."""
    feats, batch = [], []
    for src in tqdm(images, desc=desc, unit="img", leave=False):
        batch.append(preprocess(_open_image(src)))
        if len(batch) == batch_size:
            feats.append(torch.nn.functional.normalize(model.encode_image(torch.stack(batch).to(device)).float(), dim=-1))
            batch = []
    if batch:
        feats.append(torch.nn.functional.normalize(model.encode_image(torch.stack(batch).to(device)).float(), dim=-1))
    return torch.cat(feats).cpu()


def evaluate_classification(model, preprocess, tokenizer, task: ClassificationTask, *,
                            batch_size: int = 64, device: str = "cpu",
                            cache_dir: Path | None = None, cache_key: str = "") -> dict:
    classifier = _cached_classifier(model, tokenizer, task, device, cache_dir, cache_key)
    samples = list(task.samples())
    labels = np.array([l for _, l in samples])
    if labels.min() < 0 or labels.max() >= len(task.classnames):
        raise ValueError(f"task {task.key}: labels outside 0..{len(task.classnames) - 1}")
    feats = encode_images(model, preprocess, (s for s, _ in samples), batch_size, device, task.key)
    logits = (feats @ classifier.cpu()).numpy()
    metrics = classification_metrics(logits, labels)
    metrics["main_metric"] = metrics[task.main_metric]
    metrics["num_samples"] = int(len(labels))
    return metrics


def _cached_classifier(model, tokenizer, task, device, cache_dir, cache_key):
    if cache_dir is None:
        return zero_shot_classifier(model, tokenizer, task.classnames, task.templates, device)
    ident = json.dumps([cache_key, task.classnames,
                        [_fill(t, "{c}") for t in task.templates]]).encode()
    path = Path(cache_dir) / f"{task.key}_{hashlib.sha256(ident).hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True).to(device)
    classifier = zero_shot_classifier(model, tokenizer, task.classnames, task.templates, device)
    with atomic_path(path) as tmp:
        torch.save(classifier.cpu(), tmp)
    return classifier


def load_pairs(root: Path) -> tuple[list[bytes], list[str], np.ndarray]:
    """Images, captions and each caption's image index from a webdataset of pairs."""
    tars = sorted(root.glob("*.tar")) or sorted((root / "test").glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"{root}: no .tar shards of image-caption pairs")
    images, captions, owner = [], [], []
    for tar in tars:
        for key, sample in iter_tar_samples(str(tar)):
            img, txt = first_member(sample, IMAGE_EXTS), sample.get("txt")
            if img is None or txt is None:
                raise ValueError(f"{tar}: sample {key} lacks an image or a .txt caption")
            lines = [l for l in txt.decode("utf-8").splitlines() if l.strip()] or [""]
            captions.extend(lines)
            owner.extend([len(images)] * len(lines))
            images.append(img)
    return images, captions, np.asarray(owner)


@torch.no_grad()
def evaluate_retrieval(model, preprocess, tokenizer, root: Path, *, batch_size: int = 64,
                       device: str = "cpu") -> dict:
    images, captions, owner = load_pairs(root)
    img = encode_images(model, preprocess, images, batch_size, device, root.name)
    txt = torch.cat([torch.nn.functional.normalize(
        model.encode_text(tokenizer(captions[i:i + batch_size]).to(device)).float(), dim=-1).cpu()
        for i in range(0, len(captions), batch_size)])
    metrics = retrieval_metrics(img.numpy(), txt.numpy(), owner)
    metrics["main_metric"] = metrics["mean_recall@1"]
    metrics["num_images"], metrics["num_captions"] = len(images), len(captions)
    return metrics


# --- results file -----------------------------------------------------------------------------
def done_keys(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    keys = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                keys.add(json.loads(line)["key"])
            except (json.JSONDecodeError, KeyError):
                raise ValueError(f"{path} line {n}: not a result line with a 'key'") from None
    return keys


def append_result(path: Path, key: str, dataset: str, metrics: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"key": key, "dataset": dataset, "metrics": metrics}) + "\n")


def evaluate(run: Path, *, tasks: Sequence[str] = (), imagenet: Path | None = None,
             retrieval: Sequence[str] = (), out: Path | None = None, batch_size: int = 64,
             device: str = "cpu") -> list[dict]:
    """Evaluate every task not yet in `<out>/eval_results.jsonl`; returns the new lines."""
    run = Path(run)
    out = Path(out) if out else (run if run.is_dir() else run.parent.parent)
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS_FILE
    done = done_keys(results)
    todo: list[tuple[str, str, Path]] = []
    if imagenet is not None:
        todo.append(("imagenet1k", "classification", Path(imagenet)))
    todo += [(k, "classification", p) for k, p in map(parse_named, tasks)]
    todo += [(k, "retrieval", p) for k, p in map(parse_named, retrieval)]
    seen_keys = [k for k, _, _ in todo]
    dupes = {k for k in seen_keys if seen_keys.count(k) > 1}
    if dupes:
        raise ValueError(f"task keys given twice: {sorted(dupes)}; name them with NAME=DIR")
    todo = [t for t in todo if t[0] not in done]
    if not todo:
        return []
    checkpoint = latest_checkpoint(run) if run.is_dir() else run
    torch.manual_seed(0)
    model, preprocess, tokenizer = load_model(checkpoint, device=device)
    cache_key = file_fingerprint(checkpoint)
    new = []
    for key, kind, path in todo:
        if kind == "retrieval":
            metrics = evaluate_retrieval(model, preprocess, tokenizer, path, batch_size=batch_size,
                                         device=device)
        else:
            task = imagenet_task(path) if key == "imagenet1k" and imagenet is not None \
                else classification_task(key, path)
            metrics = evaluate_classification(model, preprocess, tokenizer, task,
                                              batch_size=batch_size, device=device,
                                              cache_dir=out / "eval_cache", cache_key=cache_key)
        append_result(results, key, key, metrics)
        new.append({"key": key, "dataset": key, "metrics": metrics})
    return new


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Zero-shot classification and retrieval of a trained run; results go to "
                    "eval_results.jsonl (DataComp's format), skipping tasks already there.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m trainer.evaluate --run runs/tiny --tasks synth=data/pool/eval")
    p.add_argument("--run", required=True, help="run folder from trainer.train, or a checkpoint file")
    p.add_argument("--tasks", nargs="*", default=[], metavar="[NAME=]DIR",
                   help="classification task folders (classnames.txt, templates, test/*.tar)")
    p.add_argument("--imagenet", type=Path, default=None,
                   help="ImageNet val: a folder of 1000 wnid subfolders or a webdataset task folder")
    p.add_argument("--retrieval", nargs="*", default=[], metavar="[NAME=]DIR",
                   help="webdatasets of image + caption (.txt) pairs")
    p.add_argument("--out", type=Path, default=None, help="where eval_results.jsonl goes (default: the run)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if not (args.tasks or args.imagenet or args.retrieval):
        build_parser().error("give at least one of --tasks, --imagenet, --retrieval")
    new = evaluate(Path(args.run), tasks=args.tasks, imagenet=args.imagenet,
                   retrieval=args.retrieval, out=args.out, batch_size=args.batch_size,
                   device=args.device)
    for line in new:
        print(json.dumps(line))
    if not new:
        print("all tasks already in eval_results.jsonl", file=sys.stderr)
    return new


if __name__ == "__main__":
    main()
