"""Training data: webdataset shards in, batches of (images, tokens) out, exactly on budget.

Reads img2dataset/`pools.synth` shards and `pipeline.reshard` output alike (per-sample
`.jpg`/`.png`/`.webp` + `.txt` members; keys like `000000123` or `<uid>-<j>`), from local
files or streamed: `pipe:COMMAND` (the command writes the tar to stdout), `http(s)://`,
`gs://` (gsutil) and `s3://` (the AWS CLI) URLs, brace patterns over any of them. Streams are
opened with webdataset's `gopen`, the opener open_clip_train uses.

How a run's samples are drawn (DataComp's `--dataset-resampled`):
- The budget is split into checkpoint intervals ("epochs", as in DataComp), each into steps of
  the global batch; only the very last step may be smaller, so the samples seen equal the
  budget exactly whatever the number of shards or samples (`epoch_plan`).
- Each process's share of a step is `rank_share`; within a process, step i of an epoch is
  built by loader worker `i % workers`.
- Every (epoch, rank, worker) is its own stream: shards drawn uniformly with replacement by a
  generator seeded with (seed, epoch, rank, worker), samples shuffled through a buffer. The
  data of an epoch therefore depends only on those numbers, which is what makes
  `--resume latest` continue exactly.
- Samples that cannot be used (no image, no caption, undecodable image, unreadable shard) are
  skipped and counted; the counters ride along with each batch.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt",)


# --- shard lists ------------------------------------------------------------------------------
def expand_shards(spec: str) -> list[str]:
    """Shard paths for a folder, a resharded folder (meta.json), a brace pattern or a .tar;
    several specs may be joined with '::'."""
    out: list[str] = []
    for part in spec.split("::"):
        out.extend(_expand_one(part))
    if not out:
        meta = Path(spec) / "meta.json"
        empty = meta.is_file() and json.loads(meta.read_text() or "{}").get("output_count") == 0
        raise FileNotFoundError(
            f"{spec}: no training shards there" + (
                " (pipeline.reshard wrote none: no sample of its subset had an image; see its meta.json)"
                if empty else "; --data takes pipeline.reshard's output folder, a folder of .tar shards, "
                "a brace pattern (shards/{00000000..00000009}.tar) or several joined with '::'"))
    return out


# Schemes read as streams, and how (webdataset's gopen knows the others; S3 goes through the AWS
# CLI as in open_clip's documented `pipe:aws s3 cp URL -`).
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://")


def is_remote(shard: str) -> bool:
    return shard.startswith(REMOTE_PREFIXES)


def stream_url(shard: str) -> str:
    """The URL webdataset's gopen opens for a remote shard."""
    if shard.startswith("s3://"):
        return f"pipe:aws s3 cp {shard} -"
    return shard


def _expand_one(part: str) -> list[str]:
    if is_remote(part):  # nothing to check before reading: a failing stream is counted then
        import braceexpand

        return list(braceexpand.braceexpand(part))
    if "{" in part:
        import braceexpand

        paths = list(braceexpand.braceexpand(part))
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{part}: {len(missing)} of {len(paths)} shards missing, "
                                    f"e.g. {missing[0]}")
        return paths
    path = Path(part)
    if path.is_file():
        if not path.name.endswith(".tar"):
            raise ValueError(f"{path}: not a .tar shard")
        return [str(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such shard folder, pattern or file")
    meta = path / "meta.json"
    if meta.is_file():  # pipeline.reshard / DataComp resharder output
        m = json.loads(meta.read_text())
        try:
            count, fmt = int(m["output_shard_count"]), m.get("output_shard_format", "{:08d}.tar")
        except (KeyError, ValueError) as e:
            raise ValueError(f"{meta}: needs an integer output_shard_count ({e})") from None
        paths = [str(path / fmt.format(i)) for i in range(count)]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{meta} lists {count} shards but {len(missing)} are missing, "
                                    f"e.g. {missing[0]}")
        return paths
    tars = sorted(path.glob("*.tar"))
    if not tars and (path / "shards").is_dir():  # a pool root
        tars = sorted((path / "shards").glob("*.tar"))
    return [str(t) for t in tars]


# --- the budget as steps ----------------------------------------------------------------------
def epoch_plan(samples_seen: int, global_batch: int, num_epochs: int) -> list[list[int]]:
    """Global batch sizes of every step, per epoch; they sum to `samples_seen` exactly.

    Every step is a full global batch except the last step of the run, which holds the
    remainder: epochs hold whole batches (`samples_seen // global_batch` steps shared out as
    evenly as possible, the later epochs getting the extra ones).
    """
    full, rest = divmod(samples_seen, global_batch)
    if full < num_epochs:
        raise ValueError(f"{samples_seen} samples in batches of {global_batch} give {full} full "
                         f"steps, fewer than the {num_epochs} checkpoint intervals")
    base, extra = divmod(full, num_epochs)
    plan = [[global_batch] * (base + (1 if e >= num_epochs - extra else 0))
            for e in range(num_epochs)]
    if rest:
        plan[-1].append(rest)
    return plan


def rank_share(n: int, world_size: int, rank: int) -> int:
    """This process's part of a global batch of `n` (the first ranks take the remainder)."""
    base, extra = divmod(n, world_size)
    return base + (1 if rank < extra else 0)


# --- reading shards ---------------------------------------------------------------------------
def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a webdataset tar, members grouped by key.

    `path` is a file or a remote shard (`is_remote`); a stream whose command or download fails
    raises OSError when it ends.
    """
    if is_remote(path):
        from webdataset.gopen import gopen

        with gopen(stream_url(path), "rb") as stream:
            yield from _tar_samples(stream)
        return
    with open(path, "rb") as f:
        yield from _tar_samples(f)


def _tar_samples(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    key, sample = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            if "." not in name:
                continue
            k, ext = name.split(".", 1)
            if k != key:
                if key is not None and sample:
                    yield key, sample
                key, sample = k, {}
            sample[ext.lower()] = tar.extractfile(member).read()
    if key is not None and sample:
        yield key, sample


def first_member(sample: dict[str, bytes], exts: tuple[str, ...]) -> bytes | None:
    for ext in exts:
        if ext in sample:
            return sample[ext]
    return None


@dataclass(frozen=True)
class StreamSpec:
    """What one epoch of one process reads."""

    shards: tuple[str, ...]
    seed: int
    epoch: int
    rank: int
    local_batches: tuple[int, ...]  # this process's batch size at each step of the epoch
    shuffle_buffer: int = 1000


def stream_seed(seed: int, epoch: int, rank: int, worker: int) -> list[int]:
    return [seed, epoch, rank, worker]


class ShardStream(torch.utils.data.IterableDataset):
    """Yields (step, images, tokens, counters) for the steps this loader worker owns."""

    def __init__(self, spec: StreamSpec, preprocess: Callable, tokenizer: Callable):
        super().__init__()
        self.spec, self.preprocess, self.tokenizer = spec, preprocess, tokenizer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        spec = self.spec
        seed = stream_seed(spec.seed, spec.epoch, spec.rank, worker)
        rng = np.random.default_rng(seed)
        torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        counters: Counter = Counter()
        raw = self._shuffled(self._raw_samples(rng, counters), rng)
        for step in range(worker, len(spec.local_batches), num_workers):
            images, texts = [], []
            while len(images) < spec.local_batches[step]:
                key, sample = next(raw)
                decoded = self._decode(key, sample, counters)
                if decoded is not None:
                    images.append(decoded[0])
                    texts.append(decoded[1])
            counters["samples"] += len(images)
            yield step, torch.stack(images), self.tokenizer(texts), dict(counters)
            counters.clear()

    def _raw_samples(self, rng: np.random.Generator, counters: Counter):
        shards = self.spec.shards
        barren = 0  # shards opened in a row that gave nothing usable
        while True:
            shard = shards[int(rng.integers(len(shards)))]
            counters["shards_opened"] += 1
            got = 0
            try:
                for key, sample in iter_tar_samples(shard):
                    got += 1
                    yield key, sample
            except (tarfile.TarError, OSError, EOFError):
                counters["shard_read_errors"] += 1
            barren = 0 if got else barren + 1
            if barren >= max(20, 3 * len(shards)):
                raise RuntimeError(f"{barren} shards in a row gave no samples, last {shard}: "
                                   "are these webdataset tars of images and captions?")

    def _shuffled(self, samples, rng: np.random.Generator):
        size = self.spec.shuffle_buffer
        if size <= 1:
            yield from samples
            return
        buf = []
        for s in samples:
            if len(buf) < size:
                buf.append(s)
                continue
            i = int(rng.integers(size))
            buf[i], s = s, buf[i]
            yield s

    def _decode(self, key: str, sample: dict[str, bytes], counters: Counter):
        img_bytes = first_member(sample, IMAGE_EXTS)
        if img_bytes is None:
            counters["skipped_no_image"] += 1
            return None
        txt = first_member(sample, TEXT_EXTS)
        if txt is None:
            counters["skipped_no_caption"] += 1
            return None
        try:
            with Image.open(io.BytesIO(img_bytes)) as im:
                image = self.preprocess(im.convert("RGB"))
        except Exception:  # PIL raises many kinds on corrupt files
            counters["skipped_bad_image"] += 1
            return None
        try:
            text = txt.decode("utf-8")
        except UnicodeDecodeError:
            counters["skipped_bad_caption"] += 1
            return None
        return image, text


def epoch_loader(spec: StreamSpec, preprocess, tokenizer, workers: int):
    """An iterator over (step, images, tokens, counters) in step order for one epoch."""
    dataset = ShardStream(spec, preprocess, tokenizer)
    workers = min(workers, len(spec.local_batches))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                       persistent_workers=False, prefetch_factor=4 if workers else None)
