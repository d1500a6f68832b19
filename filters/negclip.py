"""negCLIPLoss and NormSim (Wang et al. 2024, arXiv 2405.19547), from teacher embeddings alone.

Our reading (/work/shared/reference/METHODS.md): with unit teacher embeddings v_i (image), t_i
(text), s_ij = v_i . t_j and the teacher's temperature tau (OpenAI CLIP's learned 1/100),

    negCLIPLoss(i) = -tau * mean_k L_Bk(i)
                   = s_ii - tau / (2K) * sum_k [logsumexp_{j in Bk}(s_ij / tau) + logsumexp_{j in Bk}(s_ji / tau)]

over K random batches B_k of the pool containing i (`random_batches`: each of the K rounds
splits a seeded permutation of the rows into near-equal batches), i.e. the CLIP score minus how
well the pair's image and text match the other pairs of random batches.

    NormSim_p(i) = (sum_t (v_i . u_t)^p)^(1/p),   NormSim_inf(i) = max_t v_i . u_t

over target image embeddings u_t (unit length; e.g. ImageNet-1k's train set, embedded by the
same teacher). For p = 2 the sum is a quadratic form, v_i^T (U^T U) v_i, so it costs d^2 per row
whatever the number of targets.
"""

from __future__ import annotations

import numpy as np

from filters.semdedup import normalised

OPENAI_CLIP_TAU = 0.01  # OpenAI CLIP's learned temperature: logit_scale = 100
PAPER_BATCH_SIZE = 32_768  # our reading of the paper's batch size and number of batches
PAPER_BATCHES = 10


def random_batches(n: int, batch_size: int, rounds: int, seed: int) -> list[list[np.ndarray]]:
    """`rounds` partitions of range(n) into ceil(n / batch_size) near-equal random batches
    (np.array_split of a seeded permutation), so every row is in exactly one batch per round."""
    if n <= 0:
        return [[] for _ in range(rounds)]
    count = -(-n // max(1, batch_size))
    rng = np.random.default_rng([seed, n])
    return [np.array_split(rng.permutation(n), count) for _ in range(rounds)]


MIN_TAU = 0.005  # below it exp((s - 1) / tau) underflows float64 for s = -1 (CLIP's tau is >= 0.01)


def _logsumexp_rows_and_columns(img: np.ndarray, txt: np.ndarray, tau: float,
                                block_elements: int) -> tuple[np.ndarray, np.ndarray]:
    """logsumexp_j(s_ij / tau) per row i and logsumexp_i(s_ij / tau) per column j of one batch
    of unit vectors. Every s_ij is at most 1, so exp((s_ij - 1) / tau) needs no running maximum
    (it is at least exp(-2 / tau), above float64's smallest number for tau >= MIN_TAU): one
    exponential per pair serves both sums, `block_elements` pairs at a time."""
    b = len(img)
    rows = np.empty(b, dtype=np.float64)
    col_sum = np.zeros(b, dtype=np.float64)
    step = max(1, block_elements // max(1, b))
    for i0 in range(0, b, step):
        shifted = np.exp((img[i0:i0 + step] @ txt.T - np.float32(1.0)).astype(np.float64) / tau)
        rows[i0:i0 + step] = np.log(shifted.sum(axis=1))
        col_sum += shifted.sum(axis=0)
    return rows + 1.0 / tau, np.log(col_sum) + 1.0 / tau


def batch_penalty(image: np.ndarray, text: np.ndarray, *, tau: float = OPENAI_CLIP_TAU,
                  block_elements: int = 1 << 24) -> np.ndarray:
    """One random batch's share of the penalty, per pair: logsumexp_j(s_ij / tau) +
    logsumexp_j(s_ji / tau) over the batch (float64; the embeddings are normalised here)."""
    rows, cols = _logsumexp_rows_and_columns(normalised(image), normalised(text), tau, block_elements)
    return rows + cols


def negclip_from_penalty(score: np.ndarray, penalty: np.ndarray, rounds: int, tau: float) -> np.ndarray:
    """negCLIPLoss (float32) from the CLIP score s_ii and the penalties summed over `rounds` rounds."""
    return (np.asarray(score, dtype=np.float64) - tau / (2 * max(1, rounds)) * penalty).astype(np.float32)


def negclip_loss(image: np.ndarray, text: np.ndarray, batches: list[list[np.ndarray]], *,
                 tau: float = OPENAI_CLIP_TAU, block_elements: int = 1 << 24) -> np.ndarray:
    """negCLIPLoss of every row (float32) over the `batches` of each round (`random_batches`),
    all in memory (`pipeline.negclip` runs the batches as units of a stage instead)."""
    if not tau >= MIN_TAU:
        raise ValueError(f"tau must be at least {MIN_TAU} (CLIP's learned temperature is clamped at 0.01), got {tau}")
    if image.shape != text.shape:
        raise ValueError(f"image embeddings {image.shape} and text embeddings {text.shape} differ in shape")
    penalty = np.zeros(len(image), dtype=np.float64)
    for batches_of_round in batches:
        for batch in batches_of_round:
            penalty[batch] += batch_penalty(image[batch], text[batch], tau=tau, block_elements=block_elements)
    return negclip_from_penalty(pair_scores(image, text), penalty, len(batches), tau)


def pair_scores(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """s_ii: each pair's cosine similarity (float64)."""
    return np.einsum("ij,ij->i", normalised(image), normalised(text)).astype(np.float64)


def max_similarity(image: np.ndarray, targets: np.ndarray, *, block_rows: int = 1024,
                   block_targets: int = 32_768) -> tuple[np.ndarray, np.ndarray]:
    """(largest cosine, index of that target) of every row against `targets`, in blocks of
    rows and targets (ImageNet-1k's 1.28M targets would not fit in one matrix); ties go to
    the lowest index."""
    img, tgt = normalised(image), normalised(targets)
    if img.shape[1] != tgt.shape[1]:
        raise ValueError(f"targets have width {tgt.shape[1]}; the embeddings have {img.shape[1]}")
    best = np.full(len(img), -np.inf, dtype=np.float32)
    where = np.zeros(len(img), dtype=np.int64)
    for t0 in range(0, len(tgt), block_targets):
        block = tgt[t0:t0 + block_targets].T
        for i0 in range(0, len(img), block_rows):
            sims = img[i0:i0 + block_rows] @ block
            top = sims.argmax(axis=1)
            value = sims[np.arange(len(sims)), top]
            better = value > best[i0:i0 + block_rows]
            best[i0:i0 + block_rows][better] = value[better]
            where[i0:i0 + block_rows][better] = t0 + top[better]
    return best, where


def normsim(image: np.ndarray, targets: np.ndarray, *, block_rows: int = 1024,
            block_targets: int = 32_768) -> tuple[np.ndarray, np.ndarray]:
    """(NormSim_2, NormSim_inf) of every row (float32) against unit-length `targets`."""
    img = normalised(image)
    tgt = normalised(targets)
    if img.shape[1] != tgt.shape[1]:
        raise ValueError(f"targets have width {tgt.shape[1]}; the embeddings have {img.shape[1]}")
    gram = (tgt.T.astype(np.float64) @ tgt.astype(np.float64))  # sum_t u_t u_t^T
    two = np.einsum("ij,ij->i", img.astype(np.float64) @ gram, img.astype(np.float64))
    inf, _ = max_similarity(img, tgt, block_rows=block_rows, block_targets=block_targets)
    return np.sqrt(np.maximum(two, 0)).astype(np.float32), inf


def normsim_signals(arch: str, **inputs) -> dict:
    """The NormSim columns of one file: ``<arch>_img`` against ``normsim_targets_<arch>``; NaN
    (missing) for rows without an image embedding."""
    from filters.image_based import missing_embedding_mask

    embeddings, targets = inputs[f"{arch}_img"], inputs[f"normsim_targets_{arch}"]
    two, inf = normsim(embeddings, targets)
    missing = missing_embedding_mask(embeddings)
    two[missing], inf[missing] = np.nan, np.nan
    return {f"normsim2_{arch}": two, f"normsim_inf_{arch}": inf}
