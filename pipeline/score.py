"""CLIP scores and embeddings for a pool that came without them: a Ray Data job over its shards.

    python -m pipeline.score --pool data/pool --model runs/teacher_b32 --as b32
    python -m pipeline.score --pool data/pool --model ViT-B-32 --pretrained ViT-B-32-openai.pt

For each image-text sample in ``<pool>/shards/*.tar`` it computes the image embedding (from the
``.jpg``) and the text embedding (from the ``.txt``) with an open_clip model, L2-normalises them,
stores them as float16, and takes their dot product as the score, which is what CommonPool's
``clip_{b32,l14}_similarity_score`` columns hold. The results are joined to the metadata by uid
and written in CommonPool's format, so every filter works on the pool afterwards:

- ``metadata/<stem>.parquet``: ``clip_<arch>_similarity_score`` (float32) rewritten in place;
- ``metadata/<stem>.npz``: ``<arch>_img`` and ``<arch>_txt`` (rows, 512 for b32 / 768 for l14),
  row-aligned with the parquet; other keys already in the npz are kept;
- ``score_<arch>.json`` in the pool: the model, counts per reason, timings.

Rows with no image (their download failed, or the image does not decode) get a NaN score and
all-zero embeddings: NaN never passes a score threshold, as such rows could never be trained on
anyway; the image-based filter and `pipeline.centroids` treat an all-zero row as missing
(nearest to no centroid, never kept, not clustered). They are counted
(``missing_from_shards``, ``image_decode_failed``) so every row is accounted for.

``--as b32|l14`` says which columns the model stands in for; the model's embedding width must
be 512 (b32) or 768 (l14), as in CommonPool; a model of another width is refused (projecting
it would make embeddings that no longer come from the model). Without ``--as`` the width picks.

``--as NAME`` with any other name (a researcher's own filtering network, DFN-style) leaves
CommonPool's columns alone and writes a *named scorer*: ``<pool>/scores/<NAME>/<stem>.npz``
with ``score_<NAME>`` (float32, row-aligned with the parquet) and ``<NAME>_img`` /
``<NAME>_txt`` (float16, the model's own width), and ``result.json`` (the summary). The
filter then offers ``score_<NAME>`` as a signal column like any other (``score_mydfn >= 0.3``
or a top fraction in a strategy spec).

Embedding runs as a Ray Data ``map_batches`` over shards with an actor pool: each actor loads
the model once, decodes images in a thread pool while the model runs, batches them
(``--batch-size``) and, on a GPU (``--num-gpus`` per actor), uses bf16 autocast. Each shard's
result is saved under ``<pool>/.scoring/<arch>/`` as soon as it is done, so a killed job
resumes at the next shard; the metadata is rewritten only when every shard is done.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.cluster import current_node
from pipeline.execution import Execution, Stage, add_execution_flags, execution_from_args, run_stage
from pools.cli import one_line_errors
from pools import storage
from pools.files import atomic_path, remove_stale_temporaries, write_json_atomic
from pools.format import NPZ_DTYPE, NPZ_KEYS, SCORE_COLUMNS, Pool, PoolFormatError, read_metadata
from pools.uids import UID_DTYPE, uids_to_records

ARCH_WIDTH = {"b32": NPZ_KEYS["b32_img"], "l14": NPZ_KEYS["l14_img"]}
STAGING_DIR = ".scoring"
SCORERS_DIR = "scores"  # <pool>/scores/<NAME>/: the named scorers (--as NAME)
SCORER_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def named_scorers(pool: Path) -> dict[str, Path]:
    """The finished named scorers of a pool: name -> folder (those with a result.json)."""
    root = storage.path(pool) / SCORERS_DIR
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if SCORER_NAME.fullmatch(p.name) and (p / "result.json").is_file()}


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    pool: Path
    model: str  # our name, an open_clip name, a run folder or a checkpoint file
    pretrained: str | None = None  # open_clip checkpoint for a built-in name
    arch: str | None = None  # "b32" or "l14"; None: from the model's width
    batch_size: int = 256
    execution: Execution = Execution(num_workers=1)  # model replicas: processes or Ray actors
    num_gpus: float = 0.0  # per model replica
    cpus_per_actor: int = 1
    decode_threads: int = 2
    overwrite: bool = False
    skip_bad_shards: bool = False  # a shard that is not a readable tar is left out and listed, not fatal

    def __post_init__(self) -> None:
        if self.arch is not None and self.arch not in ARCH_WIDTH and not SCORER_NAME.fullmatch(self.arch):
            raise ValueError(f"--as must be b32, l14 (CommonPool's columns) or a scorer name of lowercase letters, "
                             f"digits and _ (score_<NAME>), got {self.arch!r}")
        for name in ("batch_size", "cpus_per_actor", "decode_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


# --- the model --------------------------------------------------------------------------------
def load_scoring_model(model: str, pretrained: str | None = None, device: str = "cpu"):
    """(model, preprocess, tokenizer, description) for a run folder, checkpoint or model name.

    A run folder, an open_clip_train log folder or checkpoint, or `local-dir:DIR` goes through
    `trainer.checkpoint.load_eval_model`; a name (ours, open_clip's, or `local-dir:DIR` for the
    architecture) takes its weights from `pretrained` (a checkpoint, a run or log folder):
    nothing is downloaded.
    """
    from trainer.checkpoint import LOCAL_DIR_PREFIX, load_eval_model
    from trainer.models import create_model

    if model.startswith(LOCAL_DIR_PREFIX) and pretrained is None or Path(model).exists():
        loaded = load_eval_model(model, device=device)
    elif pretrained is not None:
        loaded = load_eval_model(pretrained, model_name=model, device=device)
    else:
        net, _, preprocess, tokenizer = create_model(model, device=device)
        print(f"warning: {model} has random weights (no --pretrained checkpoint given); its scores "
              "say nothing about image-text agreement", file=sys.stderr)
        return net.eval(), preprocess, tokenizer, {"model": model, "pretrained": None,
                                                   "fingerprint": "random-init"}
    desc = {"model": model, "pretrained": pretrained, "weights": str(loaded.weights),
            "fingerprint": loaded.fingerprint()}
    return loaded.model, loaded.preprocess, loaded.tokenizer, desc


def embed_width(model) -> int:
    """The width of the model's joint embedding space."""
    proj = getattr(model, "text_projection", None)
    if proj is not None:
        return int(proj.shape[1]) if proj.ndim == 2 else int(proj.out_features)
    return int(model.visual.output_dim)


class ScoreError(ValueError):
    """A model or flag the scorer cannot use; the message says what to do."""


def resolve_arch(width: int, arch: str | None, model: str) -> str:
    """Which CommonPool columns this model fills; refuses a width CommonPool does not have."""
    if arch is not None and arch not in ARCH_WIDTH:
        return arch  # a named scorer keeps the model's own width
    if arch is None:
        matches = [a for a, w in ARCH_WIDTH.items() if w == width]
        if not matches:
            raise ScoreError(f"{model} makes {width}-d embeddings; CommonPool's columns are b32 (512-d) "
                             "and l14 (768-d). Score with a model of one of those widths (e.g. train "
                             "the teacher with embed_dim 512 or 768)")
        return matches[0]
    if ARCH_WIDTH[arch] != width:
        raise ScoreError(f"--as {arch} needs {ARCH_WIDTH[arch]}-d embeddings but {model} makes "
                         f"{width}-d ones; embeddings are not projected to another width. Use a model "
                         f"with embed_dim {ARCH_WIDTH[arch]}"
                         + (f" or --as {[a for a, w in ARCH_WIDTH.items() if w == width][0]}"
                            if width in ARCH_WIDTH.values() else ""))
    return arch


# --- per shard ------------------------------------------------------------------------------
def _decode(preprocess, jpg: bytes):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(jpg)) as im:
            return preprocess(im.convert("RGB"))
    except Exception:  # PIL raises many types for corrupt data
        return None


def read_shard_samples(path: str) -> list[tuple[str, bytes | None, str]]:
    """(uid, image bytes or None, caption) per sample of one webdataset shard."""
    from pools.tars import iter_samples

    out = []
    for key, files in iter_samples(path):
        d = dict(files)
        try:
            uid = json.loads(d["json"])["uid"]
        except (KeyError, ValueError, TypeError):
            raise PoolFormatError(f"{path}: sample {key} has no .json with a uid; shards must be "
                                  "written with img2dataset's save_additional_columns=['uid']") from None
        jpg = d.get("jpg", d.get("jpeg", d.get("png", d.get("webp"))))
        text = d.get("txt", b"").decode("utf-8", errors="replace")
        out.append((uid, jpg, text))
    return out


# embed_shard's result for a shard that could not be read (same columns and types)
NO_SHARD_RESULT = {"samples": 0, "decode_failed": 0, "read_s": 0.0, "decode_s": 0.0, "decode_wait_s": 0.0,
                   "model_s": 0.0, "total_s": 0.0}


class ShardEmbedder:
    """One model per instance (a Ray actor); embeds whole shards and saves each result."""

    def __init__(self, cfg: ScoreConfig, arch: str, out_dir: str):
        import torch

        torch.set_num_threads(cfg.cpus_per_actor)
        self.torch = torch
        self.device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.model, self.preprocess, self.tokenizer, _ = load_scoring_model(cfg.model, cfg.pretrained,
                                                                            self.device)
        self.cfg, self.arch, self.out_dir = cfg, arch, storage.path(out_dir)
        self.prefetch = ThreadPoolExecutor(1)
        self.decoders = ThreadPoolExecutor(cfg.decode_threads)

    def __call__(self, shard: str) -> dict:
        """The execution layer's unit: one shard."""
        try:
            return {**self.embed_shard(shard), "error": ""}
        except PoolFormatError as exc:
            # Returned, not raised: with --on-bad-shard skip the other shards go on.
            return {**NO_SHARD_RESULT, "shard": shard, "node": current_node(), "error": str(exc)}

    def _encode(self, images, texts):
        torch = self.torch
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device == "cuda" \
            else torch.autocast("cpu", enabled=False)
        with torch.no_grad(), autocast:
            img = self.model.encode_image(images.to(self.device)) if images is not None else None
            txt = self.model.encode_text(self.tokenizer(texts).to(self.device))
        img = None if img is None else torch.nn.functional.normalize(img.float(), dim=-1).cpu().numpy()
        txt = torch.nn.functional.normalize(txt.float(), dim=-1).cpu().numpy()
        return img, txt

    def embed_shard(self, shard: str) -> dict:
        """Embed one shard and save `<out_dir>/<shard stem>.npz`; returns counts and timings."""
        torch = self.torch
        t0 = time.perf_counter()
        samples = read_shard_samples(shard)
        read_s = time.perf_counter() - t0
        n, width = len(samples), embed_width(self.model)
        img_emb = np.zeros((n, width), dtype=NPZ_DTYPE)
        txt_emb = np.zeros((n, width), dtype=NPZ_DTYPE)
        decoded_ok = np.zeros(n, dtype=bool)
        decode_s = decode_cpu_s = model_s = 0.0
        bs = self.cfg.batch_size
        # Decode batch b+1 in threads while the model runs on batch b (one batch ahead only,
        # so memory stays at two batches of decoded images).
        starts = list(range(0, n, bs))
        pending = self.prefetch.submit(self._decode_batch, samples[0:bs]) if n else None
        for b, i in enumerate(starts):
            t = time.perf_counter()
            tensors, cpu_s = pending.result()
            decode_s += time.perf_counter() - t
            decode_cpu_s += cpu_s
            if b + 1 < len(starts):
                pending = self.prefetch.submit(self._decode_batch, samples[starts[b + 1]:starts[b + 1] + bs])
            ok = np.array([x is not None for x in tensors], dtype=bool)
            t = time.perf_counter()
            images = torch.stack([x for x in tensors if x is not None]) if ok.any() else None
            img, txt = self._encode(images, [s[2] for s in samples[i:i + bs]])
            model_s += time.perf_counter() - t
            txt_emb[i:i + len(ok)] = txt.astype(NPZ_DTYPE)
            if img is not None:
                img_emb[i:i + len(ok)][ok] = img.astype(NPZ_DTYPE)
            decoded_ok[i:i + len(ok)] = ok
        uids = uids_to_records([s[0] for s in samples])
        out = self.out_dir / (storage.path(shard).stem + ".npz")
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, uid=uids, img=img_emb, txt=txt_emb, decoded=decoded_ok)
        return {"shard": shard, "node": current_node(), "samples": n, "decode_failed": int(n - decoded_ok.sum()),
                "read_s": read_s, "decode_s": decode_cpu_s, "decode_wait_s": decode_s, "model_s": model_s,
                "total_s": time.perf_counter() - t0}

    def _decode_batch(self, samples):
        """(preprocessed image tensors or None per sample, seconds spent)."""
        t = time.perf_counter()
        out = list(self.decoders.map(lambda s: None if s[1] is None else _decode(self.preprocess, s[1]),
                                     samples))
        return out, time.perf_counter() - t


def _failed_marker(out_dir: Path, shard: Path) -> Path:
    return out_dir / (shard.stem + ".failed.json")


def _shard_failed(cfg: ScoreConfig, out_dir: Path, shard: str, error: str) -> None:
    """A shard that could not be read: the error, or with --on-bad-shard skip a marker that
    leaves it out (its rows count as missing_from_shards) and lists it in the summary."""
    if not cfg.skip_bad_shards:
        raise PoolFormatError(error)
    print(f"warning: skipping {error}", file=sys.stderr)
    shard = storage.path(shard)
    write_json_atomic(_failed_marker(out_dir, shard), {"shard": shard.name, "reason": error})


def embed_shards(cfg: ScoreConfig, arch: str, shards: list[Path], out_dir: Path) -> tuple[list[dict], dict | None]:
    """Embed every shard whose result is not saved yet (pipeline.execution's stage ``score``);
    returns the results and how they were run."""
    todo = [s for s in shards if not (out_dir / (s.stem + ".npz")).is_file()
            and not _failed_marker(out_dir, s).is_file()]
    results: list[dict] = []
    if not todo:
        return results, None
    stage = Stage("score", ShardEmbedder, (cfg, arch, str(out_dir)), cpus=cfg.cpus_per_actor, gpus=cfg.num_gpus,
                  models=True)
    run = run_stage(stage, [str(s) for s in todo], cfg.execution)
    # (closed before an error propagates: its last refresh must not follow the error line)
    with tqdm(total=len(shards), initial=len(shards) - len(todo), desc=f"embedding ({arch})", unit="shard",
              file=sys.stderr) as bar:
        for _, row in run:
            error = row.pop("error")
            if error:
                _shard_failed(cfg, out_dir, row["shard"], error)
            else:
                results.append(row)
            bar.update(1)
    return results, run.decision.as_json() if run.decision else None


# --- joining results to the metadata ----------------------------------------------------------
def load_staged(out_dir: Path, shards: list[Path]) -> dict[str, np.ndarray]:
    """All shards' results, sorted by uid (the join index)."""
    parts = []
    for shard in shards:
        if _failed_marker(out_dir, shard).is_file():
            continue
        with np.load(storage.whole(out_dir / (shard.stem + ".npz"))) as z:
            parts.append({k: z[k] for k in ("uid", "img", "txt", "decoded")})
    merged = {k: np.concatenate([p[k] for p in parts]) if parts else None for k in ("uid", "img", "txt", "decoded")}
    if not parts:
        return {"uid": np.empty(0, UID_DTYPE)}
    order = np.argsort(merged["uid"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


def _joined(uid: pa.ChunkedArray, staged: dict[str, np.ndarray], width: int):
    """The staged results in the order of a metadata file's `uid` column: (image and text
    embeddings, score, found in the shards, has an image); NaN and zeros where there is none."""
    n = len(uid)
    records = uids_to_records(uid)
    index = np.searchsorted(staged["uid"], records) if len(staged["uid"]) else np.zeros(n, dtype=np.int64)
    found = np.zeros(n, dtype=bool)
    if len(staged["uid"]):
        clipped = np.minimum(index, len(staged["uid"]) - 1)
        found = staged["uid"][clipped] == records
        index = clipped
    img = np.zeros((n, width), dtype=NPZ_DTYPE)
    txt = np.zeros((n, width), dtype=NPZ_DTYPE)
    has_image = np.zeros(n, dtype=bool)
    if found.any():
        rows = index[found]
        img[found], txt[found] = staged["img"][rows], staged["txt"][rows]
        has_image[found] = staged["decoded"][rows]
    scores = (img.astype(np.float32) * txt.astype(np.float32)).sum(axis=1)
    scores[~has_image] = np.nan
    img[~has_image] = 0
    txt[~has_image] = 0
    return img, txt, scores, found, has_image


def _counts(found: np.ndarray, has_image: np.ndarray) -> dict[str, int]:
    return {"rows": len(found), "scored": int(has_image.sum()), "missing_from_shards": int((~found).sum()),
            "image_decode_failed": int((found & ~has_image).sum())}


def write_named_scores(parquet: Path, name: str, staged: dict[str, np.ndarray], folder: Path, width: int
                       ) -> dict[str, int]:
    """A named scorer's columns for one metadata file: ``<folder>/<stem>.npz``; returns counts."""
    uid = read_metadata(parquet, ["uid"]).column("uid")
    img, txt, scores, found, has_image = _joined(uid, staged, width)
    with atomic_path(storage.path(folder) / f"{parquet.stem}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{f"score_{name}": scores, f"{name}_img": img, f"{name}_txt": txt})
    return _counts(found, has_image)


def write_scores(parquet: Path, arch: str, staged: dict[str, np.ndarray]) -> dict[str, int]:
    """Fill one metadata file's score column and npz keys from the staged results; returns counts."""
    table = pq.read_table(storage.readable(parquet))
    read_metadata(parquet, ["uid", SCORE_COLUMNS[arch]])  # schema check with a clear error
    n = table.num_rows
    img, txt, scores, found, has_image = _joined(table.column("uid"), staged, ARCH_WIDTH[arch])
    column = SCORE_COLUMNS[arch]
    table = table.set_column(table.schema.get_field_index(column), pa.field(column, pa.float32()),
                             pa.array(scores, type=pa.float32()))
    npz_path = Pool.npz_for(parquet)
    arrays = {}
    if npz_path.is_file():
        with np.load(storage.whole(npz_path)) as z:
            arrays = {k: z[k] for k in z.files if k not in (f"{arch}_img", f"{arch}_txt")}
        for k, v in arrays.items():
            if len(v) != n:
                raise PoolFormatError(f"{npz_path}: key {k!r} has {len(v)} rows but {parquet.name} has {n}")
    arrays[f"{arch}_img"], arrays[f"{arch}_txt"] = img, txt
    with atomic_path(npz_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    with atomic_path(parquet) as tmp:
        pq.write_table(table, tmp)
    return _counts(found, has_image)


# --- the job ----------------------------------------------------------------------------------
def score_pool(cfg: ScoreConfig) -> dict:
    """Embed the pool's shards and write scores + embeddings into its metadata; returns the summary."""
    start = time.perf_counter()
    pool = Pool(cfg.pool)
    metadata_files = pool.metadata_files()
    shards = pool.shard_files()
    if not shards:
        raise PoolFormatError(f"{pool.shards_dir} holds no shards: scoring needs the images "
                              "(download them with python -m pools.download)")
    probe, _, _, desc = load_scoring_model(cfg.model, cfg.pretrained)
    width = embed_width(probe)
    arch = resolve_arch(width, cfg.arch, cfg.model)
    named = arch not in ARCH_WIDTH
    scorer_dir = pool.root / SCORERS_DIR / arch
    del probe
    summary_path = pool.root / f"score_{arch}.json"
    for folder in (pool.root, pool.metadata_dir, pool.root / STAGING_DIR / arch):  # what a killed run was writing
        remove_stale_temporaries(folder)
    signature = {**desc, "arch": arch, "shards": [[s.name, s.stat().st_size] for s in shards]}
    if summary_path.is_file() and not cfg.overwrite:
        previous = json.loads(summary_path.read_text())
        if previous.get("signature") == signature:
            print(f"{pool.root} is already scored with this model ({summary_path}); nothing to do",
                  file=sys.stderr)
            return previous
    out_dir = pool.root / STAGING_DIR / arch
    sig_path = out_dir / "signature.json"
    if out_dir.exists() and (cfg.overwrite or not sig_path.is_file()
                             or json.loads(sig_path.read_text()) != signature):
        storage.rmtree(out_dir)  # results of another model or other shards: not reusable
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sig_path, signature)

    t_embed = time.perf_counter()
    results, execution = embed_shards(cfg, arch, shards, out_dir)
    embed_s = time.perf_counter() - t_embed
    staged = load_staged(out_dir, shards)
    failed = []
    for shard in shards:
        if _failed_marker(out_dir, shard).is_file():
            try:
                expected = int(pool.shard_stats(shard)["successes"])
            except (PoolFormatError, ValueError, KeyError, TypeError):
                expected = None  # no readable _stats.json either
            failed.append({**json.loads(_failed_marker(out_dir, shard).read_text()), "expected_samples": expected})
    counts = {"rows": 0, "scored": 0, "missing_from_shards": 0, "image_decode_failed": 0}
    if named:
        scorer_dir.mkdir(parents=True, exist_ok=True)
        (scorer_dir / "result.json").unlink(missing_ok=True)  # finished again only when every file is
    for parquet in tqdm(metadata_files, desc="writing scores", unit="file", file=sys.stderr):
        written = (write_named_scores(parquet, arch, staged, scorer_dir, width) if named
                   else write_scores(parquet, arch, staged))
        for k, v in written.items():
            counts[k] += v
    in_metadata = np.zeros(len(staged["uid"]), dtype=bool)
    for parquet in metadata_files:
        recs = np.sort(uids_to_records(read_metadata(parquet, ["uid"]).column("uid")))
        pos = np.minimum(np.searchsorted(recs, staged["uid"]), max(len(recs) - 1, 0))
        in_metadata |= (recs[pos] == staged["uid"]) if len(recs) else False
    summary = {
        "arch": arch, "score_column": f"score_{arch}" if named else SCORE_COLUMNS[arch],
        "npz_keys": [f"{arch}_img", f"{arch}_txt"], **({"folder": str(scorer_dir), "width": width} if named else {}),
        **counts, "shard_samples": int(len(staged["uid"])),
        "shard_samples_not_in_metadata": int((~in_metadata).sum()),
        "shards": len(shards), "shards_embedded_this_run": len(results),
        "nodes": sorted({r["node"] for r in results}), "execution": execution,
        # left out with --on-bad-shard skip; their rows are among missing_from_shards
        "input_shards_failed": failed,
        "embed_s": round(embed_s, 3), "total_s": round(time.perf_counter() - start, 3),
        "timing_per_shard": {k: round(sum(r[k] for r in results), 3)
                             for k in ("read_s", "decode_s", "decode_wait_s", "model_s", "total_s")} if results else {},
        "config": {k: str(v) if isinstance(v, (Path, storage.ObjectPath)) else v for k, v in asdict(cfg).items()},
        "signature": signature,
    }
    write_json_atomic(summary_path, summary)
    if named:
        write_json_atomic(scorer_dir / "result.json", {"step": "score", **summary})
    storage.rmtree(pool.root / STAGING_DIR / arch)
    if not any((pool.root / STAGING_DIR).iterdir()):
        (pool.root / STAGING_DIR).rmdir()
    return summary


def describe(summary: dict) -> str:
    text = (f"{summary['score_column']}: {summary['scored']} of {summary['rows']} rows scored; "
            f"{summary['missing_from_shards']} rows have no image in the shards and "
            f"{summary['image_decode_failed']} images did not decode (score NaN, embeddings zero); "
            f"{summary['shard_samples_not_in_metadata']} shard samples are not in the metadata")
    for f in summary.get("input_shards_failed", []):
        text += f"\nskipped shard {f['shard']} ({f['expected_samples']} samples): {f['reason']}"
    return text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.score", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m pipeline.score --pool data/pool --model runs/teacher_b32 --as b32\n"
               "  python -m pipeline.score --pool data/pool --model ViT-L-14 --pretrained l14.pt --as l14 "
               "--num-gpus 1 --num-actors 8\n\n"
               "writes clip_<arch>_similarity_score into metadata/*.parquet, <arch>_img/_txt into the npz "
               "beside each, and score_<arch>.json with counts")
    parser.add_argument("--pool", type=storage.path, required=True,
                        help="pool folder with metadata/ and shards/ (or s3://bucket/pool, gs://bucket/pool)")
    parser.add_argument("--model", required=True,
                        help="a training run folder, a checkpoint file, or a model name (ours, e.g. tiny, or "
                             "open_clip's, e.g. ViT-B-32)")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip checkpoint file for a model name (nothing is downloaded; without it "
                             "a named model has random weights)")
    parser.add_argument("--as", dest="arch", default=None, metavar="b32|l14|NAME",
                        help="which CommonPool columns to fill: b32 (512-d) or l14 (768-d); default: from "
                             "the model's embedding width. Any other NAME (lowercase letters, digits, _) "
                             "writes a named scorer instead: signal score_<NAME> for strategy specs, "
                             "embeddings <NAME>_img/_txt, in <pool>/scores/<NAME>/")
    parser.add_argument("--batch-size", type=int, default=ScoreConfig.batch_size,
                        help="images per model call (default %(default)s)")
    parser.add_argument("--num-gpus", type=float, default=0.0,
                        help="GPUs per actor; > 0 runs the model on CUDA with bf16 autocast (default 0)")
    parser.add_argument("--cpus-per-actor", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                        help="torch threads per actor (default %(default)s)")
    parser.add_argument("--decode-threads", type=int, default=2,
                        help="image decode threads per actor (default %(default)s)")
    parser.add_argument("--on-bad-shard", choices=["fail", "skip"], default="fail",
                        help="a shard that is not a readable tar stops the job naming it (fail, default), or is "
                             "left out (its rows get no score, as images that failed to download) and listed in "
                             "score_<arch>.json's input_shards_failed (skip)")
    add_execution_flags(parser, workers_help="model replicas (processes or Ray actors)", default_workers_=1,
                        worker_flags=("--num-workers", "--num-actors"))
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute even if the pool is already scored with this model")
    args = parser.parse_args(argv)
    try:
        cfg = ScoreConfig(pool=args.pool, model=args.model, pretrained=args.pretrained, arch=args.arch,
                          batch_size=args.batch_size, execution=execution_from_args(args), num_gpus=args.num_gpus,
                          cpus_per_actor=args.cpus_per_actor, decode_threads=args.decode_threads,
                          overwrite=args.overwrite,
                          skip_bad_shards=args.on_bad_shard == "skip")
    except ValueError as exc:
        parser.error(str(exc))
    from pipeline.cluster import RayStartError

    with one_line_errors(argv, PoolFormatError, ScoreError, RayStartError, OSError):  # inputs and outputs; anything else is a bug
        summary = score_pool(cfg)
    print(describe(summary))
    return summary


if __name__ == "__main__":
    main()
