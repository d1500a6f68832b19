"""Our runs and open_clip's tools read each other: open_clip_train trains on pipeline.reshard's
shards, open_clip loads our runs (`local-dir:`, `pretrained=`), and our evaluation, scorer and
targets loader read open_clip_train's log folders and checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from trainer.checkpoint import export_open_clip_dir, load_eval_model
from trainer.evaluate import evaluate
from trainer.models import load_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def resharded(train_pool, tmp_path_factory):
    """300 of the pool's uids through pipeline.reshard: 3 shards of 100."""
    from pipeline.reshard import main as reshard_main
    from pools.uids import uids_to_records, write_subset

    uids = [u for f in sorted((train_pool / "metadata").glob("*.parquet"))
            for u in pq.read_table(f, columns=["uid"])["uid"].to_pylist()][:330]
    root = tmp_path_factory.mktemp("interop")
    write_subset(root / "subset.npy", np.sort(uids_to_records(uids)))
    out = root / "resharded"
    meta = reshard_main(["--pool", str(train_pool), "--subset", str(root / "subset.npy"), "--out", str(out),
                         "--shard-size", "100", "--executor", "local"])
    assert meta["output_shard_count"] >= 3
    return out, meta["output_shard_count"], meta["output_count"]


@pytest.fixture(scope="module")
def run(resharded, tmp_path_factory):
    """Our tiny model, trained briefly on the resharded subset."""
    from trainer.train import main as train_main

    out = tmp_path_factory.mktemp("interop_run") / "run"
    train_main(["--scale", "tiny", "--data", str(resharded[0]), "--out", str(out), "--allow-nonstandard",
                "--samples-seen", "256", "--global-batch-size", "64", "--num-checkpoints", "2",
                "--no-progress", "--workers", "0", "--no-tensorboard"])
    return out


def _features(model, preprocess, tokenizer):
    images = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (30, 60), (20, 40, 220))]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in images]))
        txt = model.encode_text(tokenizer(["a red star", "a navy heart icon"]))
    return img, txt


def test_run_loads_in_open_clip_as_local_dir_and_pretrained(run):
    ours = _features(*load_model(run))
    config = json.loads((run / "open_clip_config.json").read_text())
    assert set(config) == {"model_cfg", "preprocess_cfg"} and config["model_cfg"]["embed_dim"] == 64
    assert (run / "open_clip_model.safetensors").is_file()

    local_model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run}")
    local = _features(local_model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{run}"))
    open_clip.add_model_config(run / "model_configs")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "tiny", pretrained=str(run / "checkpoints" / "epoch_latest.pt"))
    registered = _features(model.eval(), preprocess, open_clip.get_tokenizer("tiny"))
    # DataComp's evaluate.py --use_model "local-dir:RUN PATH": open_clip reads the folder, ignores PATH
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run}", pretrained="ignored.pt")
    datacomp = _features(model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{run}"))
    for a, b, c, d in zip(ours, local, registered, datacomp):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    # the local folder holds the last interval's weights, not the first's
    first, _, _ = load_model(run / "checkpoints" / "epoch_1.pt")
    assert not torch.equal(first.visual.conv1.weight, local_model.visual.conv1.weight)

    # a run written before runs carried the files gets them from its checkpoint
    (run / "open_clip_model.safetensors").rename(run / "saved.safetensors.bak")
    export_open_clip_dir(run)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run}")
    assert torch.equal(_features(model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{run}"))[0],
                       ours[0])
    (run / "saved.safetensors.bak").unlink()


@pytest.mark.slow
def test_open_clip_train_trains_on_our_shards_and_we_evaluate_its_run(run, resharded, train_pool, tmp_path):
    shards, n_shards, _ = resharded
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "webdataset",
           "--train-data", str(shards / f"{{00000000..{n_shards - 1:08d}}}.tar"),
           "--train-num-samples", "96", "--batch-size", "16", "--epochs", "1",
           "--model", f"local-dir:{run}", "--workers", "1", "--logs", str(logs), "--name", "oc",
           "--device", "cpu", "--precision", "fp32", "--lr", "1e-3", "--warmup", "1",
           "--save-frequency", "1", "--report-to", "", "--log-every-n-steps", "1", "--seed", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = logs / "oc" / "checkpoints" / "epoch_1.pt"
    assert checkpoint.is_file()
    assert "Train Epoch: 0 [96/96 (100%)]" in (logs / "oc" / "out.log").read_text()

    # the log folder names its model in params.txt; the lone checkpoint needs --model
    from_logs = load_eval_model(logs / "oc")
    from_file = load_eval_model(checkpoint, model_name="tiny")
    trained = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(from_file.model.state_dict()["visual.conv1.weight"], trained["visual.conv1.weight"])
    ours_before = load_model(run)[0]
    assert not torch.equal(ours_before.visual.conv1.weight, trained["visual.conv1.weight"])
    for a, b in zip(_features(from_logs.model, from_logs.preprocess, from_logs.tokenizer),
                    _features(from_file.model, from_file.preprocess, from_file.tokenizer)):
        assert torch.equal(a, b)

    lone = tmp_path / "lone.pt"
    lone.write_bytes(checkpoint.read_bytes())
    with pytest.raises(FileNotFoundError, match="--model NAME"):
        load_eval_model(lone)
    [line] = evaluate(logs / "oc", tasks=[f"synth={train_pool / 'eval'}"])
    [again] = evaluate(lone, model_name="tiny", tasks=[f"synth={train_pool / 'eval'}"], out=tmp_path / "e2")
    assert line["metrics"]["acc1"] == again["metrics"]["acc1"]
    assert (logs / "oc" / "eval_results.jsonl").is_file()

    # the CLI: a lone open_clip_train checkpoint without --model is one line, exit 2
    proc = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--run", str(lone), "--tasks",
                           f"synth={train_pool / 'eval'}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--model NAME" in proc.stderr


def test_scorer_and_targets_read_open_clip_train_checkpoints_and_local_dir(run, tmp_path):
    """pipeline.score's model loader: local-dir:, a run, and a name + --pretrained checkpoint."""
    from pipeline.score import load_scoring_model

    ref = _features(*load_model(run))
    for model, pretrained in ((f"local-dir:{run}", None), (str(run), None),
                              ("tiny", str(run / "checkpoints" / "epoch_latest.pt")),
                              ("tiny", str(run))):
        net, preprocess, tokenizer, desc = load_scoring_model(model, pretrained)
        got = _features(net, preprocess, tokenizer)
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), (model, pretrained)
        assert desc["fingerprint"] != "random-init"


def test_targets_embed_a_folder_with_local_dir_like_the_run(run, train_pool, tmp_path):
    """pipeline.filter --targets-model local-dir:RUN embeds target images as the run folder does,
    and caches them under a key of the folder's weights."""
    from pipeline.targets import resolve_targets

    folder = tmp_path / "targets"
    folder.mkdir()
    (folder / "0.tar").write_bytes(next((train_pool / "eval" / "test").glob("*.tar")).read_bytes())
    by_run, _ = resolve_targets([folder], model=str(run), dim=64, cache_dir=tmp_path / "cache")
    by_local_dir, described = resolve_targets([folder], model=f"local-dir:{run}", dim=64,
                                              cache_dir=tmp_path / "cache")
    assert by_run.shape[1] == 64 and len(by_run) > 10
    assert np.array_equal(by_run, by_local_dir)
    assert described[0]["cache"] and Path(described[0]["cache"]).is_file()
