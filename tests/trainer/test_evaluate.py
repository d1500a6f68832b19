import json

import numpy as np
import pytest
import torch

from trainer.evaluate import (classification_metrics, done_keys, evaluate, retrieval_metrics,
                              zero_shot_classifier)
from trainer.models import create_model


def test_classification_metrics_on_known_logits():
    logits = np.array([[9, 1, 0, 0, 0, 0], [0, 9, 8, 0, 0, 0], [0, 8, 9, 0, 0, 0],
                       [0, 0, 0, 1, 9, 0]], float)
    targets = np.array([0, 2, 2, 3])
    m = classification_metrics(logits, targets)
    assert m["acc1"] == pytest.approx(2 / 4)
    assert m["acc5"] == 1.0
    # class 0: 1/1, class 2: 1/2, class 3: 0/1
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert "acc5" not in classification_metrics(logits[:, :4], targets)


def test_retrieval_metrics_on_known_embeddings():
    images = np.eye(3)
    # captions 0,1 belong to image 0; caption 2 to image 1 but is closest to image 2
    texts = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 0.4, 0.6]])
    m = retrieval_metrics(images, texts, np.array([0, 0, 1]))
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    # images 0 and 1 find one of their captions first; image 2 has none
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["image_retrieval_recall@5"] == 1.0
    assert m["text_retrieval_recall@5"] == pytest.approx(2 / 3)
    assert m["mean_recall@1"] == pytest.approx(2 / 3)


def test_classifier_averages_normalised_template_embeddings():
    model, _, _, tok = create_model("tiny")
    model.eval()
    w = zero_shot_classifier(model, tok, ["red star", "navy moon"], ["a {c}", "{c} icon"])
    assert w.shape == (64, 2)
    assert torch.allclose(w.norm(dim=0), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        e = torch.nn.functional.normalize(model.encode_text(tok(["a red star", "red star icon"])), dim=-1)
    assert torch.allclose(w[:, 0], torch.nn.functional.normalize(e.mean(0), dim=0), atol=1e-5)


def test_evaluate_writes_datacomp_lines_once(train_pool, tmp_path):
    import tarfile, io
    from pools.synth import encode_jpeg, matching_caption, render_concept
    model, _, _, _ = create_model("tiny")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 1, "name": "run", "state_dict": model.state_dict(), "model_name": "tiny",
                "model_cfg": __import__("trainer.models").models.TINY_MODEL_CFG},
               run / "checkpoints" / "epoch_1.pt")
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    with tarfile.open(pairs / "0.tar", "w") as tar:
        for i in range(6):
            rng = np.random.default_rng(i)
            for name, data in ((f"{i:03d}.jpg", encode_jpeg(render_concept(i, rng))),
                               (f"{i:03d}.txt", (matching_caption(i, rng, entity=False) + "\n"
                                                 + matching_caption(i, rng, entity=True)).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    new = evaluate(run, tasks=[f"synth={train_pool / 'eval'}"], retrieval=[f"pairs={pairs}"])
    assert [n["key"] for n in new] == ["synth", "pairs"]
    lines = [json.loads(l) for l in (run / "eval_results.jsonl").read_text().splitlines()]
    synth, pairs_line = lines
    assert set(synth) == {"key", "dataset", "metrics"}
    assert synth["metrics"]["num_samples"] == 36 * 5
    assert synth["metrics"]["main_metric"] == synth["metrics"]["acc1"]
    assert 0 <= synth["metrics"]["acc1"] <= synth["metrics"]["acc5"] <= 1
    assert pairs_line["metrics"]["num_images"] == 6 and pairs_line["metrics"]["num_captions"] == 12
    assert pairs_line["metrics"]["main_metric"] == pairs_line["metrics"]["mean_recall@1"]
    assert list((run / "eval_cache").glob("synth_*.pt"))
    assert evaluate(run, tasks=[f"synth={train_pool / 'eval'}"]) == []  # already there
    assert done_keys(run / "eval_results.jsonl") == {"synth", "pairs"}
