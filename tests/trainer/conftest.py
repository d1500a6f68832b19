"""Small pools and shard folders for the trainer tests, built once per session."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def train_pool(tmp_path_factory):
    """A 1,200-row synthetic pool with images (6 shards) and its eval set (5 images a class)."""
    from pools.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("trainer") / "pool"
    generate(out, SynthConfig(samples=1200, seed=3, rows_per_file=600, shard_size=200,
                              eval_per_class=5))
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_resharded(src_shards: list[Path], out: Path, *, keep: int, repeats: int = 1,
                    shard_size: int = 50) -> int:
    """Write the first `keep` samples of `src_shards`, each `repeats` times with keys
    `<uid>-<j>`, in pipeline.reshard's layout (DataComp's resharder); returns samples written."""
    from trainer.data import iter_tar_samples

    out.mkdir(parents=True)
    samples = []
    for shard in src_shards:
        for key, sample in iter_tar_samples(str(shard)):
            if len(samples) < keep:
                samples.append(sample)
    rows = [(json.loads(s["json"])["uid"], j, s) for s in samples for j in range(repeats)]
    n_shards = 0
    for start in range(0, len(rows), shard_size):
        chunk = rows[start:start + shard_size]
        with tarfile.open(out / f"{n_shards:08d}.tar", "w") as tar:
            for uid, j, s in chunk:
                for ext, data in s.items():
                    _add(tar, f"{uid}-{j}.{ext}", data)
        (out / f"{n_shards:08d}_stats.json").write_text(json.dumps({"successes": len(chunk)}))
        n_shards += 1
    (out / "meta.json").write_text(json.dumps({"output_shard_count": n_shards,
                                               "output_shard_format": "{:08d}.tar",
                                               "output_count": len(rows)}))
    return len(rows)
