"""Fixtures shared by the whole suite: small synthetic pools, generated once per session."""

from __future__ import annotations

import os

import pytest

# Keep thread pools small: CI has 2 cores and several tests start worker processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def small_pool(tmp_path_factory):
    """A 600-row synthetic pool with images (3 shards, 3 metadata files) and an eval set."""
    from pools.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("pools") / "small"
    generate(out, SynthConfig(samples=600, seed=7, rows_per_file=250, shard_size=200, eval_per_class=3))
    return out


@pytest.fixture(scope="session")
def scored_pool(tmp_path_factory):
    """A 900-row metadata-only pool whose scores and npz embeddings are random placeholders."""
    from pools.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("pools") / "scored"
    generate(out, SynthConfig(samples=900, seed=3, rows_per_file=400, images=False, random_scores=True))
    return out
