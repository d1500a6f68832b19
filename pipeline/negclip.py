"""negCLIPLoss over a whole pool: the global step behind the ``negclip_<arch>`` signal groups.

Its random batches are drawn from the whole pool (`filters.negclip.random_batches`, seeded:
reruns are identical), so it cannot run file by file: the pool's teacher embeddings of one arch
(``<arch>_img`` and ``<arch>_txt`` from the npz) are copied into the step's folder (3 KB a row
for l14 in float16, deleted when done) and each batch is a unit of a stage (`run_negclip`).
Rows whose image or text embedding is missing (all zeros, NaN or infinite) are in no batch
and get NaN (missing: no rule passes on it). Settings:
``--negclip-batch-size`` (default 32,768), ``--negclip-batches`` (K, default 10),
``--negclip-tau`` (default 0.01), ``--negclip-seed``.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from filters.image_based import missing_embedding_mask
from filters.negclip import (MIN_TAU, OPENAI_CLIP_TAU, PAPER_BATCH_SIZE, PAPER_BATCHES, batch_penalty,
                             negclip_from_penalty, pair_scores, random_batches)
from pipeline.execution import Execution, Stage, run_stage
from pipeline.global_steps import GlobalStep, GlobalStepError, pool_rows, register_global_step, write_file_columns
from pools.format import ARCHS, load_npz
from pools.files import atomic_path


@dataclass(frozen=True)
class NegClipSettings:
    arch: str = "l14"
    batch_size: int = PAPER_BATCH_SIZE
    batches: int = PAPER_BATCHES  # K: rounds of random batches each row is scored in
    tau: float = OPENAI_CLIP_TAU
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise GlobalStepError(f"--negclip-batch-size must be at least 2, got {self.batch_size}")
        if self.batches < 1:
            raise GlobalStepError(f"--negclip-batches must be at least 1, got {self.batches}")
        if not self.tau >= MIN_TAU:
            raise GlobalStepError(f"--negclip-tau must be at least {MIN_TAU} (CLIP's learned temperature is clamped "
                                  f"at 0.01), got {self.tau}")


class _BatchPenalty:
    """Stage ``negclip_batches``: a unit is one random batch, (its number, its pool rows sorted);
    reads their embeddings from the step's row-aligned copy (`run_negclip`) and writes their
    penalties to ``<work>/penalty_<number>.npy`` (results travel as JSON: files carry arrays)."""

    def __init__(self, work: str, keys: tuple[str, str], tau: float):
        self.work = Path(work)
        self.image, self.text = (np.load(self.work / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in keys)
        self.tau = tau

    def __call__(self, unit: tuple[int, np.ndarray]) -> dict:
        number, rows = unit
        with atomic_path(self.work / f"penalty_{number}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, batch_penalty(self.image[rows], self.text[rows], tau=self.tau))
        return {"rows": len(rows)}


def run_negclip(files: Sequence[Path], s: NegClipSettings, folder: Path, execution: Execution) -> dict:
    """Every batch draws its rows from the whole pool, so the npz files (compressed: no reading
    of single rows) are first copied, one file at a time, into two row-aligned uncompressed
    arrays in the step's folder (3 KB a row for l14 in float16); the batches are then units of
    a stage that read their rows from those, so memory is one batch per worker, and the
    batches run wherever `execution` says (other nodes need the signals folder shared, as for
    SemDeDup's partitions)."""
    files = list(files)
    rows = pool_rows(files)
    total = sum(rows)
    keys = (f"{s.arch}_img", f"{s.arch}_txt")
    work = Path(folder) / "embeddings"
    work.mkdir(parents=True, exist_ok=True)
    copies, score, valid, offset = {}, np.full(total, np.nan), [], 0
    for parquet, n in zip(files, rows):
        part = load_npz(parquet, keys, n)
        for key, arr in part.items():
            if key not in copies:
                copies[key] = np.lib.format.open_memmap(work / f"{key}.npy", mode="w+", dtype=arr.dtype,
                                                        shape=(total, arr.shape[1]))
            copies[key][offset:offset + n] = arr
        ok = ~missing_embedding_mask(part[keys[0]]) & ~missing_embedding_mask(part[keys[1]])
        score[offset:offset + n][ok] = pair_scores(part[keys[0]][ok], part[keys[1]][ok])
        valid.append(offset + np.flatnonzero(ok))
        offset += n
    for arr in copies.values():
        arr.flush()
    del copies
    valid = np.concatenate(valid) if valid else np.empty(0, dtype=np.int64)
    units = list(enumerate(np.sort(valid[b]) for round_ in random_batches(len(valid), s.batch_size, s.batches,
                                                                             s.seed) for b in round_))
    penalty = np.zeros(total, dtype=np.float64)
    stage = Stage("negclip_batches", _BatchPenalty, (str(work), keys, s.tau))
    for i, _ in tqdm(run_stage(stage, units, execution), total=len(units), desc=f"negCLIPLoss {s.arch} batches",
                     unit="batch", file=sys.stderr, disable=len(units) < 2):
        penalty[units[i][1]] += np.load(work / f"penalty_{i}.npy", allow_pickle=False)
        (work / f"penalty_{i}.npy").unlink()
    shutil.rmtree(work)  # (a working copy, not part of the step's result)
    values = negclip_from_penalty(score, penalty, s.batches, s.tau)
    offset = 0
    for parquet, n in zip(files, rows):
        write_file_columns(folder, parquet, {f"negclip_loss_{s.arch}": values[offset:offset + n]})
        offset += n
    per_round = -(-len(valid) // s.batch_size)
    return {"rows": total, "rows_without_embedding": total - len(valid),
            "batch_size": -(-len(valid) // max(1, per_round)), "batches_per_round": per_round}


for _arch in ARCHS:
    register_global_step(GlobalStep(
        meaning=f"negCLIPLoss of the pool's {_arch} embeddings over seeded random batches (--negclip-*)",
        model=f"negclip_{_arch}",
        settings=lambda cfg, arch=_arch: NegClipSettings(arch=arch, batch_size=cfg.negclip_batch_size,
                                                         batches=cfg.negclip_batches, tau=cfg.negclip_tau,
                                                         seed=cfg.negclip_seed),
        run=run_negclip))
