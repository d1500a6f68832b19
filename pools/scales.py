"""DataComp's scales as data: pool size, samples seen and the pool-side settings of each.

DataComp ties the pool size to the training budget (pool size = samples seen, section 1 of
the reference). `tiny` is ours: a pool and a budget small enough for a CPU, so that every
stage runs end to end on a laptop and in CI. The trainer keeps its own per-scale model and
optimiser table (`trainer.config`) keyed by the same names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Scale:
    """One row of the scale table."""

    name: str
    pool_samples: int  # rows in the pool's metadata
    samples_seen: int  # training budget: images the model sees, repeats included
    kmeans_sample_ratio: float  # fraction of each file sampled for k-means; -1 = every row
    num_centroids: int  # k of the image-based filter's k-means
    on_cpu: bool = False  # whether the scale is meant to run without a GPU

    def __post_init__(self) -> None:
        if self.pool_samples <= 0 or self.samples_seen <= 0:
            raise ValueError(f"scale {self.name}: pool_samples and samples_seen must be positive")
        if not (self.kmeans_sample_ratio == -1 or 0 < self.kmeans_sample_ratio <= 1):
            raise ValueError(f"scale {self.name}: kmeans_sample_ratio must be -1 or in (0, 1]")
        if self.num_centroids <= 0:
            raise ValueError(f"scale {self.name}: num_centroids must be positive")


SCALES: dict[str, Scale] = {
    s.name: s
    for s in (
        Scale(name="tiny", pool_samples=10_000, samples_seen=40_960, kmeans_sample_ratio=-1,
              num_centroids=64, on_cpu=True),
        Scale(name="small", pool_samples=12_800_000, samples_seen=12_800_000,
              kmeans_sample_ratio=-1, num_centroids=100_000),
        Scale(name="medium", pool_samples=128_000_000, samples_seen=128_000_000,
              kmeans_sample_ratio=-1, num_centroids=100_000),
        Scale(name="large", pool_samples=1_280_000_000, samples_seen=1_280_000_000,
              kmeans_sample_ratio=0.3, num_centroids=100_000),
        Scale(name="xlarge", pool_samples=12_800_000_000, samples_seen=12_800_000_000,
              kmeans_sample_ratio=0.03, num_centroids=100_000),
    )
}

DATACOMP_SCALES = ("small", "medium", "large", "xlarge")


def get_scale(name: str) -> Scale:
    """The scale called `name`, or a ValueError listing the known ones."""
    try:
        return SCALES[name]
    except KeyError:
        raise ValueError(f"unknown scale {name!r}; known scales: {', '.join(SCALES)}") from None
