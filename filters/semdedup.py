"""Semantic deduplication within one cluster (SemDeDup, Abbas et al. 2023, arXiv 2303.09540).

SemDeDup clusters the image embeddings (`pipeline.semdedup` runs faiss's spherical k-means over
the whole pool), then inside each cluster orders the rows by a keep preference and drops every
row whose cosine similarity to a row *earlier in that order* is above ``1 - eps``. Its code
takes, per row, the largest similarity to the rows before it (the column maxima of the upper
triangle of the cluster's similarity matrix) and compares that with the threshold; so does
this module, which is what makes the threshold a parameter of the strategy and not of the
computation: `preferred_similarity` is computed once, and ``semdedup_preferred_similarity <=
0.95`` (pipeline/specs/semdedup.toml) keeps what SemDeDup keeps at 0.95, any other threshold
what it keeps there.

Of a group of near-copies (every pair above the threshold) exactly the first in the keep order
remains. A chain A~B~C with A, C apart drops B and C, as SemDeDup does.

The similarity matrix is computed in blocks of `block_rows` rows by `block_rows` columns, so
memory is bounded whatever the cluster size.
"""

from __future__ import annotations

import numpy as np

NO_OTHER_ROW = -1.0  # the similarity of a row with no other (earlier) row: never above a threshold
KEEP_RULES = {
    "clip": "the highest CLIP score of the embedding's arch (missing scores last); ours",
    "hard": "the row farthest from its cluster centroid (SemDeDup's choice, NeMo Curator's 'hard')",
    "easy": "the row nearest to its cluster centroid (NeMo Curator's 'easy')",
    "random": "a seeded random row (NeMo Curator's 'random')",
}


def keep_order(rule: str, *, centroid_similarity: np.ndarray, clip_score: np.ndarray | None,
               position: np.ndarray, seed: int) -> np.ndarray:
    """The indices of one cluster's rows, most preferred first under `rule` (a key of
    `KEEP_RULES`); ties go to the earlier pool position, so the order does not depend on how
    the rows were gathered."""
    if rule == "clip":
        if clip_score is None:
            raise ValueError("keep rule 'clip' needs the rows' CLIP scores")
        score = np.where(np.isnan(clip_score), -np.inf, clip_score.astype(np.float64))
        return np.lexsort((position, -score))
    if rule == "hard":  # farthest from the centroid: the smallest cosine to it
        return np.lexsort((position, centroid_similarity))
    if rule == "easy":
        return np.lexsort((position, -centroid_similarity))
    if rule == "random":
        # keyed by the pool positions, not the gathering order: the same rows get the same order
        keys = np.random.default_rng([seed, int(position.min()) if len(position) else 0]).random(len(position))
        return np.lexsort((position, keys[np.argsort(np.argsort(position))]))
    raise ValueError(f"unknown keep rule {rule!r}; choose from {', '.join(KEEP_RULES)}")


def normalised(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float32 (CommonPool's are unit length before the float16
    rounding; cosines need it exactly)."""
    emb = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norms == 0, 1, norms)


def cluster_similarities(embeddings: np.ndarray, *, block_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(largest, preferred) per row of one cluster whose rows are in keep order: the largest
    cosine similarity to any other row of the cluster, and to any row before it in the order
    (`NO_OTHER_ROW` where there is none). float32, computed `block_rows` x `block_rows` at a time.
    """
    emb = normalised(embeddings)
    m = len(emb)
    largest = np.full(m, NO_OTHER_ROW, dtype=np.float32)
    preferred = np.full(m, NO_OTHER_ROW, dtype=np.float32)
    if m < 2:
        return largest, preferred
    step = max(1, int(block_rows))
    for i0 in range(0, m, step):
        i1 = min(m, i0 + step)
        for j0 in range(0, m, step):
            j1 = min(m, j0 + step)
            sims = emb[i0:i1] @ emb[j0:j1].T  # rows i, columns j
            if j0 <= i1 - 1 and i0 <= j1 - 1:  # the block meets the diagonal: a row is not its own copy
                rows = np.arange(i0, i1)[:, None]
                cols = np.arange(j0, j1)[None, :]
                np.copyto(sims, np.float32(-np.inf), where=rows == cols)
                before = np.where(cols < rows, sims, np.float32(-np.inf))
            elif j1 <= i0:  # every column is before every row
                before = sims
            else:
                before = None
            np.maximum(largest[i0:i1], sims.max(axis=1), out=largest[i0:i1])
            if before is not None:
                np.maximum(preferred[i0:i1], before.max(axis=1), out=preferred[i0:i1])
    return largest, preferred
