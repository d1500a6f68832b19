"""Zero-shot evaluation of a model, appended to DataComp's `eval_results.jsonl`.

    python -m trainer.evaluate --run runs/tiny --tasks synth=data/pool/eval
    python -m trainer.evaluate --run runs/small --datacomp-dir /data/datacomp_eval
    python -m trainer.evaluate --run logs/my_open_clip_run --model ViT-B-32 --imagenet /data/imagenet/val

The model (`--run`): a `trainer.train` run folder or checkpoint, an `open_clip_train` log folder
or checkpoint (with `--model NAME` when its params.txt is not beside it), or `local-dir:DIR`
(see `trainer.checkpoint.load_eval_model`).

Tasks:
- DataComp's suite (`--datacomp-dir DIR`): every task of its task list (`trainer.datacomp_tasks`)
  found in DIR in the layout its `download_evalsets.py` writes (`wds_<task>_test/` with
  `classnames.txt`, `zeroshot_classification_templates.txt`, `test/nshards.txt`,
  `test/<n>.tar`; retrieval sets with `dataset_type.txt`), each scored by DataComp's main
  metric; a task that is absent or lacks what its metric needs is listed with the reason.
  The lines are DataComp's exactly (`key` = tasklist key, `dataset` = its name); the group
  averages of its `aggregate_scores.py` are printed and saved to `datacomp_scores.json`.
- classification (`--tasks [NAME=]DIR`): DIR holds `classnames.txt`,
  `zeroshot_classification_templates.txt` (templates with `{c}`) and either `test/*.tar`
  (DataComp's webdataset layout: `<key>.jpg|png|webp` + `<key>.cls`) or one subfolder of images
  per class (sorted names = class order). The `pools.synth` eval set is such a folder.
- ImageNet (`--imagenet DIR`, key `imagenet1k`): the same layouts, or a val folder of 1000
  wnid subfolders; class names and the 80 templates are open_clip's (OpenAI's).
- retrieval (`--retrieval [NAME=]DIR`): a webdataset of image + caption pairs (`.txt`, one
  caption per line).

The text classifier is open_clip's `build_zero_shot_classifier` (the normalised mean of the
normalised template embeddings, as clip_benchmark's, which DataComp uses). Classification
metrics: acc1, acc5 (>= 5 classes), mean_per_class_recall; retrieval: clip_benchmark's image
and text retrieval recall@1/5/10 and mean_recall@1; grouped tasks add DataComp's WILDS-style
group metrics (worst region, worst group, F1-macro). Each finished task is appended as
`{"key", "dataset", "metrics": {..., "main_metric"}}`; tasks already in the file are skipped.
Text classifiers are cached per checkpoint under `<out>/eval_cache/`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pools.files import atomic_path, write_json_atomic
from trainer.checkpoint import LOCAL_DIR_PREFIX, LoadedModel, load_eval_model
from trainer.data import IMAGE_EXTS, first_member, iter_tar_samples
from trainer.datacomp_tasks import (AVERAGE, NUM_SCORED, TASKS, DataCompTask, aggregate_scores,
                                    find_task_folder, main_metric_values)

RESULTS_FILE = "eval_results.jsonl"
SCORES_FILE = "datacomp_scores.json"  # the suite's table and aggregate_scores.py's groups
IMAGE_FILE_EXTS = tuple(f".{e}" for e in IMAGE_EXTS)


class EvalInputError(ValueError):
    """A task folder or results file we cannot use; the message names it and what to do."""


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
        out["acc5"] = float(topk_hits(logits, targets, 5).mean())
    classes = np.unique(targets)
    out["mean_per_class_recall"] = float(np.mean([(pred[targets == c] == c).mean() for c in classes]))
    return out


def topk_hits(logits: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Per sample: is the target among the k highest logits."""
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (top == np.asarray(targets)[:, None]).any(1)


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


def group_accuracy(correct: np.ndarray, groups: np.ndarray, field: str, name: str = "acc") -> dict[str, float]:
    """WILDS' `standard_group_eval` of an accuracy, as DataComp's evaluators call it: the mean
    (`<name>_avg`), each group's value and count (`<name>_<field>:<g>`, `count_<field>:<g>`) and
    the worst group (`<name>_wg`). Groups are the metadata values; WILDS also lists the empty
    ones below the largest value (NaN); they never count towards the worst, and are left out."""
    correct, groups = np.asarray(correct, dtype=np.float64), np.asarray(groups).astype(np.int64)
    out = {f"{name}_avg": float(correct.mean())}
    worst = None
    for g in np.unique(groups):
        value = float(correct[groups == g].mean())
        out[f"{name}_{field}:{g}"] = value
        out[f"count_{field}:{g}"] = float((groups == g).sum())
        worst = value if worst is None else min(worst, value)
    out[f"{name}_wg"] = worst
    return out


def macro_scores(pred: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """WILDS' `Recall` and `F1` with average='macro' over the classes present in `targets`
    (sklearn's `labels=unique(y_true)`, zero where a class has no prediction)."""
    recalls, f1s = [], []
    for c in np.unique(targets):
        tp = float(((pred == c) & (targets == c)).sum())
        predicted, actual = float((pred == c).sum()), float((targets == c).sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {"recall-macro_all": float(np.mean(recalls)), "F1-macro_all": float(np.mean(f1s))}


def _field(task: DataCompTask, metadata: np.ndarray, name: str) -> np.ndarray:
    return metadata[:, task.metadata_fields.index(name)]


def grouped_metrics(task: DataCompTask, logits: np.ndarray, targets: np.ndarray,
                    metadata: np.ndarray | None) -> dict[str, float]:
    """The metrics DataComp's WILDS and fairness evaluators add for `task`."""
    pred = logits.argmax(1)
    correct = pred == targets
    if task.key == "wilds/iwildcam":  # needs no metadata: accuracy, macro recall and F1
        return {"acc_avg": float(correct.mean()), **macro_scores(pred, targets)}
    if metadata is None:
        raise EvalInputError(f"{task.name}: its samples carry no .npy metadata "
                             f"({', '.join(task.metadata_fields)}), which {task.main_metric or 'its metric'} needs")
    if task.key == "wilds/camelyon17":
        return group_accuracy(correct, _field(task, metadata, "slide"), "slide")
    if task.key == "wilds/fmow":
        out = group_accuracy(correct, _field(task, metadata, "year"), "year")
        out["acc_worst_year"] = out.pop("acc_wg")
        # DataComp drops a region whose name holds "Other"; its evaluator has no metadata map, so
        # regions are bare numbers and none is dropped: every region present counts, as there.
        by_region = group_accuracy(correct, _field(task, metadata, "region"), "region")
        by_region.pop("acc_avg")
        out.update(by_region)
        out["acc_worst_region"] = out.pop("acc_wg")
        return out
    if task.key == "fairness/dollar_street":
        return group_accuracy(topk_hits(logits, targets, 5), _field(task, metadata, "income_ds"),
                              "income_ds", name="acc_top5")
    if task.key == "fairness/geode":
        return group_accuracy(correct, _field(task, metadata, "region"), "region")
    raise EvalInputError(f"{task.name}: no grouped metric is defined for it")


def winogavil_prompt(cue: str) -> str:
    """DataComp's text for a WinoGAViL cue: "An <cue>" before a vowel, else "A <cue>", lower-cased."""
    cue = cue.lower()
    return f"An {cue}" if cue[:1] in ("a", "e", "i", "o", "u") else f"A {cue}"


def winogavil_scores(similarities: Sequence[np.ndarray], associated: Sequence[np.ndarray]) -> dict:
    """DataComp's WinoGAViL metrics: per instance the k candidates most similar to the cue
    (k = its number of associations) are the answer, scored by the Jaccard index with the
    associations (sklearn's binary `jaccard_score`), then averaged over all instances and over
    those with 5, 6, 10, 12, <= 6 and >= 10 candidates (None where there are none)."""
    scores, sizes = [], []
    for sim, truth in zip(similarities, associated):
        truth = np.asarray(truth, dtype=bool)
        top = np.argsort(np.asarray(sim))[-int(truth.sum()):]
        pred = np.isin(np.arange(len(truth)), top)
        union = (truth | pred).sum()
        scores.append((truth & pred).sum() / union if union else 0.0)
        sizes.append(len(truth))
    scores, sizes = np.asarray(scores, dtype=np.float64), np.asarray(sizes)

    def mean(mask):
        return float(scores[mask].mean()) if mask.any() else None

    return {"avg_jaccard_score": mean(sizes > 0), "jaccard_score_5": mean(sizes == 5),
            "jaccard_score_6": mean(sizes == 6), "jaccard_score_10": mean(sizes == 10),
            "jaccard_score_12": mean(sizes == 12), "jaccard_score_5-6": mean(sizes <= 6),
            "jaccard_score_10-12": mean(sizes >= 10)}


# --- tasks ------------------------------------------------------------------------------------
@dataclass
class ClassificationTask:
    key: str
    classnames: list[str]
    templates: list  # format strings with {c}, or callables (open_clip's OpenAI templates)
    samples: Callable[[], Iterator] = field(repr=False)  # yields (image bytes or path, label, npy)
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
                    raise EvalInputError(f"{tar}: sample {key} lacks an image or a .cls label")
                yield img, int(sample["cls"].decode().strip()), sample.get("npy")
    return gen


def _folder_class_samples(root: Path, class_dirs: list[Path]):
    def gen():
        for label, d in enumerate(class_dirs):
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_FILE_EXTS or f.suffix.upper() == ".JPEG":
                    yield f, label, None
    return gen


def datacomp_shards(root: Path) -> list[Path]:
    """`test/0.tar` .. `test/<n-1>.tar` as `test/nshards.txt` says (DataComp's loader)."""
    nshards = root / "test" / "nshards.txt"
    if not nshards.is_file():
        raise EvalInputError(f"{nshards}: missing; DataComp's webdataset layout needs it (the "
                             "number of shards test/0.tar .. test/<n-1>.tar)")
    try:
        n = int(nshards.read_text().strip())
    except ValueError:
        raise EvalInputError(f"{nshards}: does not hold a number of shards") from None
    tars = [root / "test" / f"{i}.tar" for i in range(n)]
    missing = [t.name for t in tars if not t.is_file()]
    if n <= 0 or missing:
        raise EvalInputError(f"{nshards} says {n} shards but {', '.join(missing) or 'none'} "
                             "are missing; download the task again")
    return tars


def image_source(root: Path, num_classes: int):
    """The (image, label, npy) source of a task folder: webdataset `test/*.tar` (as
    `test/nshards.txt` lists them, when there) or class subfolders."""
    if (root / "test" / "nshards.txt").is_file():
        return _wds_class_samples(datacomp_shards(root))
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
    """(embed_dim, classes): per class, the normalised mean of normalised template embeddings
    (open_clip's `build_zero_shot_classifier`; DataComp's templates name the class `{c}`, so
    each becomes a callable for it)."""
    from open_clip import build_zero_shot_classifier

    fills = [(lambda c, t=t: _fill(t, c)) for t in templates]
    return build_zero_shot_classifier(model, tokenizer, list(classnames), fills,
                                      num_classes_per_batch=10, device=device).float()


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


def classify(model, preprocess, tokenizer, task: ClassificationTask, *, batch_size: int = 64,
             device: str = "cpu", cache_dir: Path | None = None, cache_key: str = ""):
    """(logits, labels, metadata rows or None) of a classification task, streamed: images are
    decoded batch by batch, never all held at once."""
    classifier = _cached_classifier(model, tokenizer, task, device, cache_dir, cache_key)
    labels, metadata = [], []

    def images():
        for src, label, npy in task.samples():
            labels.append(label)
            metadata.append(npy)
            yield src

    feats = encode_images(model, preprocess, images(), batch_size, device, task.key)
    labels = np.asarray(labels)
    if labels.min() < 0 or labels.max() >= len(task.classnames):
        raise EvalInputError(f"task {task.key}: labels outside 0..{len(task.classnames) - 1}")
    logits = (feats @ classifier.cpu()).numpy()
    if any(m is None for m in metadata):
        return logits, labels, None
    rows = np.stack([np.load(io.BytesIO(m), allow_pickle=False).reshape(-1) for m in metadata])
    return logits, labels, rows


def evaluate_classification(model, preprocess, tokenizer, task: ClassificationTask, *,
                            batch_size: int = 64, device: str = "cpu",
                            cache_dir: Path | None = None, cache_key: str = "") -> dict:
    logits, labels, _ = classify(model, preprocess, tokenizer, task, batch_size=batch_size,
                                 device=device, cache_dir=cache_dir, cache_key=cache_key)
    metrics = classification_metrics(logits, labels)
    metrics["main_metric"] = metrics[task.main_metric]
    metrics["num_samples"] = int(len(labels))
    return metrics


def _cached_classifier(model, tokenizer, task, device, cache_dir, cache_key):
    if cache_dir is None:
        return zero_shot_classifier(model, tokenizer, task.classnames, task.templates, device)
    ident = json.dumps([cache_key, task.classnames,
                        [_fill(t, "{c}") for t in task.templates]]).encode()
    path = Path(cache_dir) / f"{task.key.replace('/', '-')}_{hashlib.sha256(ident).hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True).to(device)
    classifier = zero_shot_classifier(model, tokenizer, task.classnames, task.templates, device)
    with atomic_path(path) as tmp:
        torch.save(classifier.cpu(), tmp)
    return classifier


def load_pairs(root: Path, tars: list[Path] | None = None) -> tuple[list[bytes], list[str], np.ndarray]:
    """Images, captions and each caption's image index from a webdataset of pairs."""
    tars = tars or sorted(root.glob("*.tar")) or sorted((root / "test").glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"{root}: no .tar shards of image-caption pairs")
    images, captions, owner = [], [], []
    for tar in tars:
        for key, sample in iter_tar_samples(str(tar)):
            img, txt = first_member(sample, IMAGE_EXTS), sample.get("txt")
            if img is None or txt is None:
                raise EvalInputError(f"{tar}: sample {key} lacks an image or a .txt caption")
            lines = [l for l in txt.decode("utf-8").splitlines() if l.strip()] or [""]
            captions.extend(lines)
            owner.extend([len(images)] * len(lines))
            images.append(img)
    return images, captions, np.asarray(owner)


@torch.no_grad()
def evaluate_retrieval(model, preprocess, tokenizer, root: Path, *, batch_size: int = 64,
                       device: str = "cpu", tars: list[Path] | None = None) -> dict:
    images, captions, owner = load_pairs(root, tars)
    img = encode_images(model, preprocess, images, batch_size, device, root.name)
    txt = torch.cat([torch.nn.functional.normalize(
        model.encode_text(tokenizer(captions[i:i + batch_size]).to(device)).float(), dim=-1).cpu()
        for i in range(0, len(captions), batch_size)])
    metrics = retrieval_metrics(img.numpy(), txt.numpy(), owner)
    metrics["main_metric"] = metrics["mean_recall@1"]
    metrics["num_images"], metrics["num_captions"] = len(images), len(captions)
    return metrics


WINOGAVIL_LAYOUT = ("one sample per instance: <key>.json holding {\"cue\", \"candidates\": [names], "
                    "\"associations\": [names]} and candidate i's image as <key>.c<i>.jpg")


@torch.no_grad()
def evaluate_winogavil(model, preprocess, tokenizer, tars: list[Path], *, device: str = "cpu") -> dict:
    """WinoGAViL from our local layout (WINOGAVIL_LAYOUT), as DataComp's `wino_eval` scores it."""
    similarities, associated = [], []
    for tar in tars:
        for key, sample in tqdm(iter_tar_samples(str(tar)), desc="WinoGAViL", unit="instance", leave=False):
            try:
                instance = json.loads(sample["json"])
                candidates = list(instance["candidates"])
                images = [first_member(sample, tuple(f"c{i}.{e}" for e in IMAGE_EXTS))
                          for i in range(len(candidates))]
                cue, wanted = str(instance["cue"]), set(instance["associations"])
            except (KeyError, TypeError, ValueError):
                raise EvalInputError(f"{tar}: sample {key} is not a WinoGAViL instance ({WINOGAVIL_LAYOUT})") from None
            if any(img is None for img in images) or not wanted:
                raise EvalInputError(f"{tar}: sample {key} lacks a candidate image or associations "
                                     f"({WINOGAVIL_LAYOUT})")
            image_emb = model.encode_image(torch.stack([preprocess(_open_image(i)) for i in images]).to(device),
                                           normalize=True)
            text_emb = model.encode_text(tokenizer([winogavil_prompt(cue)]).to(device), normalize=True)
            similarities.append((text_emb @ image_emb.T).squeeze(0).float().cpu().numpy())
            associated.append(np.isin(candidates, list(wanted)))
    if not similarities:
        raise EvalInputError(f"{tars[0].parent}: no WinoGAViL instances")
    return winogavil_scores(similarities, associated)


# --- DataComp's suite -------------------------------------------------------------------------
@dataclass(frozen=True)
class SuiteEntry:
    """One task of the suite: what happened to it and its main metric."""

    key: str
    name: str
    main_metric: str | None
    value: float | None
    status: str  # "evaluated", "earlier" (already in the results file), "missing", "unusable", "not scored"
    reason: str = ""


def _check_task_files(task: DataCompTask, folder: Path) -> None:
    """Raise EvalInputError naming what the task's folder lacks for its metric."""
    dataset_type = folder / "dataset_type.txt"
    declared = dataset_type.read_text().strip().lower() if dataset_type.is_file() else "classification"
    if task.kind == "retrieval" and declared != "retrieval":
        raise EvalInputError(f"{folder}: a retrieval set needs dataset_type.txt saying 'retrieval' "
                             "(clip_benchmark's webdataset layout: image + .txt captions)")
    if task.kind in ("classification", "grouped"):
        for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
            if not (folder / name).is_file():
                raise EvalInputError(f"{folder / name}: missing; zero-shot classification needs it")


def evaluate_datacomp_task(loaded: LoadedModel, task: DataCompTask, folder: Path, *, batch_size: int,
                           device: str, cache_dir: Path, cache_key: str) -> dict:
    """The metrics dict DataComp's evaluate.py writes for `task`, main_metric included."""
    _check_task_files(task, folder)
    tars = datacomp_shards(folder)
    if task.kind == "retrieval":
        metrics = evaluate_retrieval(loaded.model, loaded.preprocess, loaded.tokenizer, folder,
                                     batch_size=batch_size, device=device, tars=tars)
        metrics = {k: v for k, v in metrics.items() if not k.startswith("num_")}
    elif task.kind == "winogavil":
        metrics = evaluate_winogavil(loaded.model, loaded.preprocess, loaded.tokenizer, tars, device=device)
        if metrics[task.main_metric] is None:
            raise EvalInputError(f"{folder}: no instance has 10 or 12 candidates, which "
                                 f"{task.main_metric} averages over")
    else:
        ctask = ClassificationTask(task.key, _read_lines(folder / "classnames.txt"),
                                   _read_lines(folder / "zeroshot_classification_templates.txt"),
                                   _wds_class_samples(tars))
        logits, labels, metadata = classify(loaded.model, loaded.preprocess, loaded.tokenizer, ctask,
                                            batch_size=batch_size, device=device, cache_dir=cache_dir,
                                            cache_key=cache_key)
        base = classification_metrics(logits, labels)
        # DataComp writes acc5 as null below 5 classes
        metrics = {"acc1": base["acc1"], "acc5": base.get("acc5"),
                   "mean_per_class_recall": base["mean_per_class_recall"]}
        if task.kind == "grouped":
            if metadata is not None and metadata.shape[1] != len(task.metadata_fields):
                raise EvalInputError(f"{folder}: .npy metadata has {metadata.shape[1]} columns, "
                                     f"{task.name} has {len(task.metadata_fields)} "
                                     f"({', '.join(task.metadata_fields)})")
            metrics.update(grouped_metrics(task, logits, labels, metadata))
    metrics["main_metric"] = metrics.get(task.main_metric)
    return metrics


def evaluate_datacomp_suite(loaded: LoadedModel, data_dir: Path, out: Path, *, batch_size: int = 64,
                            device: str = "cpu", log=print) -> list[SuiteEntry]:
    """Every task of DataComp's list found in `data_dir`, appended to `out`/eval_results.jsonl
    as DataComp writes it; returns one entry per task of the list (40), with its status."""
    results_path = out / RESULTS_FILE
    earlier = read_results(results_path)
    entries = []
    for i, task in enumerate(TASKS, 1):
        def entry(value, status, reason=""):
            return SuiteEntry(task.key, task.name, task.main_metric, value, status, reason)

        prefix = f"[{i}/{len(TASKS)}] {task.name} ({task.key})"
        if not task.scored:
            entries.append(entry(None, "not scored", "DataComp gives it no main metric (not among the 38)"))
            log(f"{prefix}: not scored by DataComp, skipped")
            continue
        if task.key in earlier:
            value = earlier[task.key].get("main_metric")
            entries.append(entry(value, "earlier"))
            log(f"{prefix}: already in {results_path.name}: {_fmt(value)}")
            continue
        folder = find_task_folder(data_dir, task)
        if folder is None:
            hub = (f"; DataComp reads it from the Hugging Face hub ({task.hub_dataset}): convert that to this "
                   "folder" + (f" ({WINOGAVIL_LAYOUT})" if task.kind == "winogavil" else
                               " in clip_benchmark's retrieval layout") if task.hub_dataset else "")
            entries.append(entry(None, "missing", f"no {' or '.join(task.folders)} in {data_dir}{hub}"))
            log(f"{prefix}: not found ({entries[-1].reason})")
            continue
        log(f"{prefix}: evaluating {folder}")
        try:
            metrics = evaluate_datacomp_task(loaded, task, folder, batch_size=batch_size, device=device,
                                             cache_dir=out / "eval_cache", cache_key=loaded.fingerprint())
        except (EvalInputError, FileNotFoundError) as exc:
            entries.append(entry(None, "unusable", str(exc)))
            log(f"{prefix}: cannot be scored: {exc}")
            continue
        append_result(results_path, task.key, task.name, metrics)
        entries.append(entry(metrics["main_metric"], "evaluated"))
        log(f"{prefix}: {task.main_metric} = {_fmt(metrics['main_metric'])}")
    return entries


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}"


def suite_summary(entries: Sequence[SuiteEntry], results_path: Path) -> dict:
    """The per-task table and aggregate_scores.py's groups over every DataComp line in the
    results file (this call's and earlier ones)."""
    groups = aggregate_scores(main_metric_values(read_results(results_path)))
    present = groups[AVERAGE].present
    return {"tasks": [e.__dict__ for e in entries],
            "groups": {g: {"value": s.value, "tasks_present": s.present, "tasks_total": s.total,
                           "complete": s.complete} for g, s in groups.items()},
            "scored_tasks_present": present, "all_38": present == NUM_SCORED,
            "results_file": str(results_path)}


def render_summary(summary: dict) -> str:
    """The per-task table and the group averages, as the command prints them."""
    lines = ["| task | key | main metric | value | status |", "|---|---|---|---:|---|"]
    for e in summary["tasks"]:
        status = e["status"] + (f": {e['reason']}" if e["reason"] else "")
        lines.append(f"| {e['name']} | {e['key']} | {e['main_metric'] or '-'} | {_fmt(e['value'])} | {status} |")
    lines += ["", "| aggregate (aggregate_scores.py) | value | tasks present |", "|---|---:|---:|"]
    for g, s in summary["groups"].items():
        lines.append(f"| {g} | {_fmt(s['value'])} | {s['tasks_present']}/{s['tasks_total']} |")
    verdict = ("all 38 scored tasks present: these are DataComp's numbers" if summary["all_38"] else
               f"{summary['scored_tasks_present']} of the 38 scored tasks present: the means are over "
               "those present, not DataComp's average")
    return "\n".join([*lines, "", verdict]) + "\n"


# --- results file -----------------------------------------------------------------------------
def read_results(path: Path) -> dict[str, dict]:
    """task key -> metrics of a results file (later lines of a key win)."""
    if not path.is_file():
        return {}
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                entry = json.loads(line)
                out[entry["key"]] = entry.get("metrics", {})
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EvalInputError(f"{path} line {n}: not a result line with a 'key'") from None
    return out


def done_keys(path: Path) -> set[str]:
    return set(read_results(path))


def append_result(path: Path, key: str, dataset: str, metrics: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"key": key, "dataset": dataset, "metrics": metrics}) + "\n")


def default_out(run: str | Path) -> Path:
    """Where results go by default: the run (or log, or local-dir) folder."""
    spec = str(run)
    path = Path(spec[len(LOCAL_DIR_PREFIX):] if spec.startswith(LOCAL_DIR_PREFIX) else spec)
    if path.is_file():
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path


def evaluate(run: str | Path, *, tasks: Sequence[str] = (), imagenet: Path | None = None,
             retrieval: Sequence[str] = (), datacomp_dir: Path | None = None,
             model_name: str | None = None, out: Path | None = None, batch_size: int = 64,
             device: str = "cpu", log=None) -> list[dict]:
    """Evaluate every task not yet in `<out>/eval_results.jsonl`; returns the new lines. With
    `datacomp_dir`, also DataComp's suite, whose table and group averages go to
    `<out>/datacomp_scores.json` (and, with `log`, are printed)."""
    log = log or (lambda msg: None)
    if datacomp_dir is not None and not Path(datacomp_dir).is_dir():
        raise FileNotFoundError(f"--datacomp-dir {datacomp_dir}: no such folder (DataComp's "
                                "download_evalsets.py DIR writes one)")
    out = Path(out) if out else default_out(run)
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
    if not todo and datacomp_dir is None:
        return []
    torch.manual_seed(0)  # as DataComp's evaluation, before building the model
    loaded = load_eval_model(run, model_name=model_name, device=device)
    cache_key = loaded.fingerprint()
    new = []
    for key, kind, path in todo:
        log(f"{key}: evaluating {path}")
        if kind == "retrieval":
            metrics = evaluate_retrieval(loaded.model, loaded.preprocess, loaded.tokenizer, path,
                                         batch_size=batch_size, device=device)
        else:
            task = imagenet_task(path) if key == "imagenet1k" and imagenet is not None \
                else classification_task(key, path)
            metrics = evaluate_classification(loaded.model, loaded.preprocess, loaded.tokenizer, task,
                                              batch_size=batch_size, device=device,
                                              cache_dir=out / "eval_cache", cache_key=cache_key)
        append_result(results, key, key, metrics)
        new.append({"key": key, "dataset": key, "metrics": metrics})
        log(f"{key}: main_metric = {_fmt(metrics['main_metric'])}")
    if datacomp_dir is not None:
        before = len(results.read_text().splitlines()) if results.is_file() else 0
        entries = evaluate_datacomp_suite(loaded, Path(datacomp_dir), out, batch_size=batch_size,
                                          device=device, log=log)
        new += [json.loads(l) for l in results.read_text().splitlines()[before:] if l.strip()]
        summary = suite_summary(entries, results)
        write_json_atomic(out / SCORES_FILE, summary)
        log("\n" + render_summary(summary) + f"\nsaved to {out / SCORES_FILE}")
    return new


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Zero-shot classification and retrieval of a model; results go to "
                    "eval_results.jsonl (DataComp's format), skipping tasks already there.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m trainer.evaluate --run runs/tiny --tasks synth=data/pool/eval\n"
               "  python -m trainer.evaluate --run runs/small --datacomp-dir /data/datacomp_eval\n"
               "  python -m trainer.evaluate --run logs/2024_01_01-my_run --model ViT-B-32 "
               "--datacomp-dir /data/datacomp_eval   # open_clip_train\n"
               "  python -m trainer.evaluate --run local-dir:runs/tiny --tasks synth=data/pool/eval")
    p.add_argument("--run", required=True,
                   help="the model: a trainer.train run folder or checkpoint, an open_clip_train log "
                        "folder (logs/<name>) or checkpoint, or local-dir:DIR (open_clip's local folder)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="the architecture of --run when its files do not name it (an open_clip_train "
                        "checkpoint without its params.txt): an open_clip name (ViT-B-32), ours (tiny), "
                        "or local-dir:DIR")
    p.add_argument("--datacomp-dir", type=Path, default=None, metavar="DIR",
                   help="DataComp's evaluation sets as its download_evalsets.py lays them out "
                        "(wds_<task>_test/ folders): every task found is scored by its main metric, "
                        "and the group averages are printed and saved to datacomp_scores.json")
    p.add_argument("--tasks", nargs="*", default=[], metavar="[NAME=]DIR",
                   help="classification task folders (classnames.txt, templates, test/*.tar)")
    p.add_argument("--imagenet", type=Path, default=None,
                   help="ImageNet val: a folder of 1000 wnid subfolders or a webdataset task folder")
    p.add_argument("--retrieval", nargs="*", default=[], metavar="[NAME=]DIR",
                   help="webdatasets of image + caption (.txt) pairs")
    p.add_argument("--out", type=Path, default=None,
                   help="where eval_results.jsonl goes (default: the run or log folder)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (default when there is a GPU) or cpu")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.tasks or args.imagenet or args.retrieval or args.datacomp_dir):
        parser.error("give at least one of --datacomp-dir, --tasks, --imagenet, --retrieval")
    try:
        new = evaluate(args.run, tasks=args.tasks, imagenet=args.imagenet, retrieval=args.retrieval,
                       datacomp_dir=args.datacomp_dir, model_name=args.model, out=args.out,
                       batch_size=args.batch_size, device=args.device,
                       log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (FileNotFoundError, EvalInputError, ValueError) as exc:  # bad input: one line, no traceback
        if argv is not None:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for line in new:
        print(json.dumps(line))
    if not new:
        print("no new results (every task given is already in eval_results.jsonl)", file=sys.stderr)
    return new


if __name__ == "__main__":
    main()
