"""negCLIPLoss over a whole pool: the global step behind the ``negclip_<arch>`` signal groups.

Its random batches are drawn from the whole pool (`filters.negclip.random_batches`, seeded:
reruns are identical), so it cannot run file by file. The pool's teacher embeddings of one arch
(``<arch>_img`` and ``<arch>_txt`` from the npz, float16) are held in memory: 3 KB a row for
l14 (6 GB for 2M rows). Rows whose image or text embedding is missing (all zeros, NaN or
infinite) are in no batch and get NaN (missing: no rule passes on it). Settings:
``--negclip-batch-size`` (default 32,768), ``--negclip-batches`` (K, default 10),
``--negclip-tau`` (default 0.01), ``--negclip-seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from filters.image_based import missing_embedding_mask
from filters.negclip import MIN_TAU, OPENAI_CLIP_TAU, PAPER_BATCH_SIZE, PAPER_BATCHES, negclip_loss, random_batches
from pipeline.execution import Execution
from pipeline.global_steps import GlobalStep, GlobalStepError, pool_rows, register_global_step, write_file_columns
from pools.format import ARCHS, load_npz


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


def run_negclip(files: Sequence[Path], s: NegClipSettings, folder: Path, execution: Execution) -> dict:
    # (`execution` unused: every batch draws rows from the whole pool, so the batches run here,
    # on torch's threads, rather than as units of a stage)
    files = list(files)
    rows = pool_rows(files)
    keys = (f"{s.arch}_img", f"{s.arch}_txt")
    parts = [load_npz(p, keys, n) for p, n in zip(files, rows)]
    image = np.concatenate([p[keys[0]] for p in parts])
    text = np.concatenate([p[keys[1]] for p in parts])
    del parts
    valid = np.flatnonzero(~missing_embedding_mask(image) & ~missing_embedding_mask(text))
    values = np.full(len(image), np.nan, dtype=np.float32)
    if len(valid):
        batches = random_batches(len(valid), s.batch_size, s.batches, s.seed)
        values[valid] = negclip_loss(image[valid], text[valid], batches, tau=s.tau)
    offset = 0
    for parquet, n in zip(files, rows):
        write_file_columns(folder, parquet, {f"negclip_loss_{s.arch}": values[offset:offset + n]})
        offset += n
    per_round = -(-len(valid) // s.batch_size)
    return {"rows": len(image), "rows_without_embedding": len(image) - len(valid),
            "batch_size": -(-len(valid) // max(1, per_round)), "batches_per_round": per_round}


for _arch in ARCHS:
    register_global_step(GlobalStep(
        meaning=f"negCLIPLoss of the pool's {_arch} embeddings over seeded random batches (--negclip-*)",
        model=f"negclip_{_arch}",
        settings=lambda cfg, arch=_arch: NegClipSettings(arch=arch, batch_size=cfg.negclip_batch_size,
                                                         batches=cfg.negclip_batches, tau=cfg.negclip_tau,
                                                         seed=cfg.negclip_seed),
        run=run_negclip))
