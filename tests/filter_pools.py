"""Small pools with every quirk the DataComp rules have to get right, for the filter tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

QUIRK_CAPTIONS = [
    "", None, " ", "\n", "a\n", "ab\ncdefgh", "one two\nthree four", "red\u00a0star\u00a0shirt on a wall",
    "a red star printed on a shirt", "Tench in a pond, a photo", "my dogss in the park today",
    "my new red star shirt.", "hello\x00world from the shirt", "file\x1csep shirt photo here",
    "A Photo Of A Balloon", "x\u3000y z balloon", "un cœur rouge sur fond blanc", "送料無料でお届けします。",
    "😍😍😍", "a balloon " * 120, "shirt", "shirt shirt", "tab\tsep balloon photo", "  padded shirt caption  ",
    "a photo of a dog on the beach", "Buy now\n\nFree shipping!", "wolves and mice on a plate",
]
SIZE_EDGES = [(200, 600), (600, 200), (199, 600), (0, 0), (None, 300), (200, 200), (601, 200), (300, None)]


def make_quirky_pool(out: Path, *, samples: int = 1200, seed: int = 11, rows_per_file: int = 300,
                     fraction: float = 0.3) -> Path:
    """A synthetic pool (random scores and npz) edited to hold DataComp's edge cases: odd
    captions, null/NaN scores, ties at the `fraction` threshold and at LAION's 0.28, and
    image sizes on the rule boundaries."""
    from pools.synth import SynthConfig, generate

    generate(out, SynthConfig(samples=samples, seed=seed, rows_per_file=rows_per_file, images=False,
                              random_scores=True))
    rng = np.random.default_rng(seed)
    files = sorted((out / "metadata").glob("*.parquet"))
    tables = [pq.read_table(f) for f in files]
    edited = []
    for t in tables:
        n = t.num_rows
        text = t.column("text").to_pylist()
        width = t.column("original_width").to_pylist()
        height = t.column("original_height").to_pylist()
        rows = rng.choice(n, len(QUIRK_CAPTIONS) + len(SIZE_EDGES), replace=False)
        for r, caption in zip(rows, QUIRK_CAPTIONS):
            text[r] = caption
        for r, (w, h) in zip(rows[len(QUIRK_CAPTIONS):], SIZE_EDGES):
            width[r], height[r] = w, h
        scores = {}
        for col in ("clip_b32_similarity_score", "clip_l14_similarity_score"):
            s = t.column(col).to_numpy(zero_copy_only=False).astype(np.float32)
            s[rng.choice(n, n // 25, replace=False)] = np.nan  # stored as NaN
            null = np.zeros(n, bool)
            null[rng.choice(n, n // 30, replace=False)] = True  # stored as null
            scores[col] = (s, null)
        b32, _ = scores["clip_b32_similarity_score"]
        edge = rng.choice(n, 6, replace=False)
        b32[edge[:3]] = np.float32(0.28)
        b32[edge[3:]] = np.nextafter(np.float32(0.28), np.float32(0))
        cols = {name: t.column(name) for name in t.column_names}
        cols["text"] = pa.array(text, pa.string())
        cols["original_width"] = pa.array(width, pa.int64())
        cols["original_height"] = pa.array(height, pa.int64())
        edited.append((cols, scores))
    # ties at the fraction threshold of the whole pool: copy the (n+1)-th largest l14 score
    l14 = np.concatenate([np.where(null, np.nan, s) for _, sc in edited
                          for s, null in [sc["clip_l14_similarity_score"]]])
    v = -np.sort(-l14)[int(len(l14) * fraction)]
    below = np.flatnonzero(l14 < v)
    tie_rows = set(rng.choice(below, 12, replace=False).tolist())
    offset = 0
    for (cols, sc), f, t in zip(edited, files, tables):
        n = t.num_rows
        s, null = sc["clip_l14_similarity_score"]
        for r in range(n):
            if offset + r in tie_rows:
                s[r], null[r] = v, False
        offset += n
        for col, (values, null_mask) in sc.items():
            cols[col] = pa.array(values, pa.float32(), mask=null_mask)
        pq.write_table(pa.table(cols, schema=t.schema), f)
    return out


def make_centroids_and_targets(pool: Path, out: Path, *, k: int = 12, seed: int = 5) -> tuple[Path, Path]:
    """Centroids drawn from the pool's own l14_img rows (one duplicated: exact ties) and targets
    close to a few of them."""
    rng = np.random.default_rng(seed)
    emb = np.concatenate([np.load(p)["l14_img"] for p in sorted((pool / "metadata").glob("*.npz"))])
    c = emb[rng.choice(len(emb), k, replace=False)].astype(np.float32)
    c = np.concatenate([c, c[3:4]])  # centroid k duplicates centroid 3
    targets = np.concatenate([c[[0, 3, k - 2]] * 2 + rng.standard_normal((3, c.shape[1])).astype(np.float32) * 1e-3,
                              c[[k]]])  # equal to the duplicate: goes to centroid 3
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "centroids.npy", c)
    np.save(out / "targets.npy", targets.astype(np.float32))
    return out / "centroids.npy", out / "targets.npy"
