"""The image-based rule: keep rows whose nearest pool centroid is "near ImageNet".

DataComp (reference section 2): the pool's ``l14_img`` embeddings were clustered with k-means
(`pipeline.centroids`); every ImageNet-1k train embedding (the *targets*) is assigned to its
nearest centroid by inner product, and those centroids form the target set. A pool row is
kept when its caption passes the pre-filter (the caption rules of ``pipeline/specs/image.toml``)
and its own nearest centroid, also by inner product, is in the target set.

An all-zero embedding is a row without an image (`pipeline.score` writes zeros where a sample
has none): it is nearest to no centroid (-1), so it is never kept. DataComp never meets one
(CommonPool's rows all have images); its argmax would put every such row on centroid 0.

`nearest_centroid` is the argmax of the exact inner products: it multiplies in float32 (GPU
or CPU) and settles exactly every row whose best two scores are closer than float32's rounding
error bound, so the answer does not depend on the device or the BLAS, and exact ties go to the
lowest centroid index (as ``argmax`` does). DataComp's float32 GPU argmax agrees except on
rows whose top two centroids differ by a few ulps.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from filters.arrays import to_numpy

_F32_UNIT_ROUNDOFF = 2.0 ** -24
_SCORE_BUDGET = 1 << 25  # float32 scores held per batch (128 MiB)


def _error_bound(dim: int) -> float:
    """Bound on |float32 dot - exact dot| / (|x| |c|) for `dim`-long vectors (Higham's gamma_d)."""
    du = dim * _F32_UNIT_ROUNDOFF
    return du / (1.0 - du)


NO_CENTROID = -1  # the nearest centroid of a row without an image embedding (or not assigned)


# Per float type: the unsigned type of its bits, the bits of the magnitude, the exponent bits.
_FLOAT_BITS = {np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
               np.dtype(np.float32): (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
               np.dtype(np.float64): (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000)}


def missing_embedding_mask(embeddings: np.ndarray) -> np.ndarray:
    """True where a row is no image embedding: all zeros (`pipeline.score` writes zeros for a
    sample without an image), or holding a NaN or an infinity."""
    emb = np.ascontiguousarray(embeddings)
    if emb.dtype not in _FLOAT_BITS:
        return ~emb.any(axis=1) | ~np.isfinite(emb).all(axis=1)
    # On the bit patterns: NumPy has no fast float16 arithmetic (six times slower), and a value
    # is zero when its magnitude bits are, NaN or infinite when all its exponent bits are set.
    utype, magnitude, exponent = _FLOAT_BITS[emb.dtype]
    bits = emb.view(utype)
    return ~((bits & utype(magnitude)) != 0).any(axis=1) | ((bits & utype(exponent)) == utype(exponent)).any(axis=1)


def nearest_centroid(embeddings: np.ndarray, centroids: np.ndarray, *, device: str | None = None,
                     batch_size: int | None = None) -> np.ndarray:
    """Index (int64) of the centroid with the largest inner product, for every embedding row;
    `NO_CENTROID` for an all-zero row (no image), which is nearest to none.

    Scores are computed in float32; a row whose best two scores are within float32's error
    bound of each other is settled exactly: every product of two float32 numbers is exact in
    float64, and ``math.fsum`` of the differences has the sign of the exact difference, so the
    exact argmax is found (ties to the lowest index).

    Args:
        embeddings: (n, d) float16/float32 rows (converted to float32, which is exact for float16).
        centroids: (k, d) float32.
        device: "cuda", "cuda:1", ... to multiply with torch on a GPU; None or "cpu": NumPy.
        batch_size: rows per matmul; default keeps a batch's scores under 128 MiB.
    """
    embeddings = np.asarray(embeddings)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if embeddings.ndim != 2 or centroids.ndim != 2 or embeddings.shape[1] != centroids.shape[1]:
        raise ValueError(f"embeddings {embeddings.shape} and centroids {centroids.shape} must be "
                         "2-D with the same width")
    n, dim = embeddings.shape
    k = centroids.shape[0]
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    if batch_size is None:
        batch_size = max(1, min(n, _SCORE_BUDGET // max(k, 1)))
    centroids64 = centroids.astype(np.float64)
    slack = 2.0 * _error_bound(dim) * float(np.linalg.norm(centroids64, axis=1).max())
    on_gpu = device is not None and str(device).startswith("cuda")
    batches = _scores_torch(embeddings, centroids, device, batch_size) if on_gpu else \
        _scores_numpy(embeddings, centroids, batch_size)
    for start, x, best, top, second, fetch_scores in batches:
        missing = missing_embedding_mask(x)
        if k > 1:
            bound = slack * np.linalg.norm(x.astype(np.float64), axis=1)
            # (a zero row ties with every centroid: settling it exactly would cost k sums)
            unsure = np.flatnonzero(~(top - second > bound) & ~missing)
            if len(unsure):
                rows = fetch_scores(unsure)
                for i, scores in zip(unsure, rows):
                    candidates = np.flatnonzero(scores >= top[i] - bound[i])
                    if len(candidates) > 1:
                        best[i] = _exact_argmax(x[i], centroids64, candidates)
        best[missing] = NO_CENTROID
        out[start:start + len(x)] = best
    return out


def _exact_argmax(x: np.ndarray, centroids64: np.ndarray, candidates: np.ndarray) -> int:
    """The candidate with the largest exact inner product with `x` (lowest index on ties)."""
    x64 = x.astype(np.float64)
    best = int(candidates[0])
    best_products = x64 * centroids64[best]  # exact: 24-bit x 24-bit mantissas fit in 53 bits
    for j in candidates[1:]:
        products = x64 * centroids64[j]
        if math.fsum(np.concatenate([products, -best_products])) > 0:
            best, best_products = int(j), products
    return best


def _scores_numpy(embeddings, centroids, batch_size):
    for start in range(0, len(embeddings), batch_size):
        x = np.ascontiguousarray(embeddings[start:start + batch_size], dtype=np.float32)
        scores = x @ centroids.T
        rows = np.arange(len(x))
        best = scores.argmax(axis=1)
        top = scores[rows, best].astype(np.float64)
        if scores.shape[1] > 1:
            held = scores[rows, best].copy()
            scores[rows, best] = -np.inf
            second = scores.max(axis=1).astype(np.float64)
            scores[rows, best] = held
        else:
            second = np.full(len(x), -np.inf)
        yield start, x, best, top, second, (lambda idx, s=scores: s[idx])


def _scores_torch(embeddings, centroids, device, batch_size):
    import torch

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: the error bound assumes float32
    try:
        c32 = torch.from_numpy(centroids).to(device)
        with torch.no_grad():
            for start in range(0, len(embeddings), batch_size):
                x = np.ascontiguousarray(embeddings[start:start + batch_size], dtype=np.float32)
                scores = torch.from_numpy(x).to(device) @ c32.T
                top = torch.topk(scores, min(2, scores.shape[1]), dim=1)
                values = top.values.double().cpu().numpy()
                best = top.indices[:, 0].cpu().numpy().astype(np.int64)
                second = values[:, 1] if values.shape[1] > 1 else np.full(len(x), -np.inf)
                yield (start, x, best, values[:, 0], second,
                       lambda idx, s=scores: s[torch.from_numpy(idx).to(s.device)].cpu().numpy())
    finally:
        torch.set_float32_matmul_precision(previous)


def target_centroid_ids(targets: np.ndarray, centroids: np.ndarray, *, device: str | None = None) -> np.ndarray:
    """Sorted unique nearest centroids of the target (e.g. ImageNet) embeddings (all-zero
    targets have none)."""
    ids = np.unique(nearest_centroid(targets, centroids, device=device))
    return ids[ids != NO_CENTROID]


def image_based_mask(nearest: np.ndarray, target_ids: np.ndarray) -> np.ndarray:
    """True where the row's nearest centroid is a target centroid (-1: not assigned, or no
    image embedding; never is)."""
    nearest = np.asarray(nearest)
    return np.isin(nearest, np.asarray(target_ids)) & (nearest >= 0)


def embedding_signals(l14_img) -> dict[str, np.ndarray]:
    """Whether each row has an image embedding (an all-zero, NaN or infinite row has none)."""
    return {"image_embedding_missing": missing_embedding_mask(l14_img)}


def centroid_signals(l14_img, image_embedding_missing, centroids) -> dict[str, np.ndarray]:
    """Nearest pool centroid of each row (`centroids`: embeddings -> indices); `NO_CENTROID`
    for a row without an image embedding."""
    emb = np.asarray(l14_img)
    nearest = np.full(len(emb), NO_CENTROID, dtype=np.int32)
    if not isinstance(image_embedding_missing, np.ndarray):  # stored by an earlier run: an Arrow column
        image_embedding_missing = to_numpy(image_embedding_missing)
    present = np.flatnonzero(~image_embedding_missing)
    if len(present):
        nearest[present] = centroids(emb[present])
    return {"nearest_centroid": nearest}


def target_centroid_signals(nearest_centroid, target_centroids) -> dict[str, pa.Array]:
    """Whether each row's nearest centroid is a target centroid (null where it is unknown)."""
    col = nearest_centroid.combine_chunks() if isinstance(nearest_centroid, pa.ChunkedArray) else nearest_centroid
    col = pa.array(col) if not isinstance(col, pa.Array) else col
    hit = image_based_mask(to_numpy(col.fill_null(NO_CENTROID)), target_centroids)
    return {"nearest_centroid_in_targets": pa.array(hit, mask=to_numpy(col.is_null()) if col.null_count else None)}
