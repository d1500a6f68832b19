"""Fixtures the pipeline tests share."""

import pytest


def _small_cfg(dim):
    """A small random open_clip model with CommonPool's embedding width."""
    return {"embed_dim": dim,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Checkpoint files (the trainer's self-describing format) of random 512-d and 768-d models,
    for scoring a pool."""
    import torch

    from trainer.models import create_model, model_config_record

    folder = tmp_path_factory.mktemp("models")
    out = {}
    for arch, dim in (("b32", 512), ("l14", 768)):
        torch.manual_seed(dim)
        cfg = _small_cfg(dim)
        model, *_ = create_model(cfg)
        out[arch] = folder / f"{arch}.pt"
        torch.save({"epoch": 1, "state_dict": model.state_dict(), **model_config_record(cfg)}, out[arch])
    return out


def run_here_and_on(executor, run, files, settings, tmp_path, monkeypatch):
    """A global step's `run` over `files` in one process and on `executor` ("processes": worker
    processes started at once; "ray": Ray tasks), each into its own folder; returns both counts
    and, per metadata file, both folders' columns, to compare."""
    import numpy as np

    import pipeline.execution as execution
    from pipeline.execution import Execution

    (tmp_path / "here").mkdir()
    here = run(files, settings, tmp_path / "here", Execution("local", num_workers=1))
    monkeypatch.setattr(execution, "PROCESS_START_S", 0.0)
    (tmp_path / executor).mkdir()
    there = run(files, settings, tmp_path / executor,
                Execution("local" if executor == "processes" else "ray", num_workers=2))
    columns = []
    for parquet in files:
        with np.load(tmp_path / "here" / f"{parquet.stem}.npz") as a, \
                np.load(tmp_path / executor / f"{parquet.stem}.npz") as b:
            columns.append(({k: a[k] for k in a.files}, {k: b[k] for k in b.files}))
    return here, there, columns
