"""Eval-set contamination: how close each pool image is to any evaluation image.

The evaluation images are embedded by the pool's teacher (`pipeline.filter --eval-sets`); every
pool row gets its largest cosine similarity to one of them (exact, blockwise:
`filters.negclip.max_similarity`), the task that image belongs to, and its index in the task,
so ``eval_max_similarity < 0.95`` drops near-copies. A row without an image embedding gets
NaN and null: it is a copy of nothing.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from filters.image_based import missing_embedding_mask
from filters.negclip import max_similarity


def contamination_signals(l14_img: np.ndarray, eval_sets) -> dict:
    """`eval_sets`: anything with ``embeddings`` (m, d), ``task`` (m,) task indices, ``names``
    (task names) and ``first`` (each task's first row in ``embeddings``)."""
    best, where = max_similarity(l14_img, eval_sets.embeddings)
    missing = missing_embedding_mask(l14_img)
    best[missing] = np.nan
    task = eval_sets.task[where]
    return {"eval_max_similarity": best,
            "eval_task": pa.DictionaryArray.from_arrays(pa.array(task.astype(np.int32), mask=missing),
                                                        pa.array(list(eval_sets.names), pa.string())),
            "eval_nearest": pa.array((where - eval_sets.first[task]).astype(np.int32), mask=missing)}
