"""trainer.evaluate's zero-shot numbers equal those of DataComp's own path (its
`eval_utils/wds_eval.py`: clip_benchmark's webdataset builder, classifier, classification loop
and accuracy, sklearn's balanced accuracy, 4 loader workers) on the synthetic eval set.

clip_benchmark (1.4.0, DataComp's pin) is not a dependency: it needs NumPy < 2.4 and
scikit-learn. Run with it installed apart, e.g.
`pip install --target /tmp/cb clip-benchmark==1.4.0 --no-deps && pip install --target /tmp/cb
numpy==2.2.6 scikit-learn`, then `PYTHONPATH=/tmp/cb pytest tests/trainer/test_clip_benchmark_parity.py`.
"""

import pytest
import torch

clip_benchmark = pytest.importorskip("clip_benchmark", reason="clip_benchmark is installed apart (see docstring)")


@pytest.fixture(scope="module")
def trained(train_pool, tmp_path_factory):
    from trainer.train import main as train_main

    run = tmp_path_factory.mktemp("parity") / "run"
    train_main(["--scale", "tiny", "--data", str(train_pool / "shards"), "--out", str(run),
                "--allow-nonstandard", "--samples-seen", "2048", "--global-batch-size", "128",
                "--num-checkpoints", "1", "--no-progress", "--workers", "0", "--no-tensorboard"])
    return run


def _datacomp_model(run):
    import open_clip

    open_clip.add_model_config(run / "model_configs")
    torch.manual_seed(0)
    model, _, transform = open_clip.create_model_and_transforms(
        "tiny", pretrained=str(run / "checkpoints" / "epoch_latest.pt"))
    return model.eval(), transform, open_clip.get_tokenizer("tiny")


@pytest.mark.slow
def test_acc1_acc5_and_mean_per_class_recall_equal_datacomps_path(trained, train_pool):
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from sklearn.metrics import balanced_accuracy_score

    from trainer.evaluate import evaluate

    run = trained
    [ours] = evaluate(run, tasks=[f"synth={train_pool / 'eval'}"])

    # DataComp's wds_eval.evaluate_webdataset, step by step, on the same checkpoint
    model, transform, tokenizer = _datacomp_model(run)
    dataset = build_dataset(dataset_name="wds/synth", root=str(train_pool / "eval"), transform=transform,
                            split="test", download=False)
    loader = torch.utils.data.DataLoader(dataset.batched(64), batch_size=None, shuffle=False, num_workers=4)
    classifier = zsc.zero_shot_classifier(model, tokenizer, dataset.classes,
                                          dataset.templates, "cpu")
    logits, target = zsc.run_classification(model, classifier, loader, "cpu", amp=False)
    acc1, acc5 = zsc.accuracy(logits, target, topk=(1, 5))
    recall = balanced_accuracy_score(target, logits.argmax(axis=1))
    m = ours["metrics"]
    print(f"ours acc1 {m['acc1']:.6f} acc5 {m['acc5']:.6f} mpcr {m['mean_per_class_recall']:.6f}; "
          f"DataComp's path acc1 {acc1:.6f} acc5 {acc5:.6f} mpcr {recall:.6f}")
    assert len(target) == m["num_samples"] == 36 * 5
    assert m["acc1"] == pytest.approx(acc1, abs=1e-12)
    assert m["acc5"] == pytest.approx(acc5, abs=1e-12)
    assert m["mean_per_class_recall"] == pytest.approx(recall, abs=1e-12)
    assert m["acc1"] > 1 / 36  # a trained model, not chance: the comparison means something


@pytest.mark.slow
def test_retrieval_recalls_equal_clip_benchmarks(trained, train_pool, tmp_path):
    """clip_benchmark's zeroshot_retrieval.evaluate (DataComp's retr_eval) on a retrieval set in
    its webdataset layout, two captions per image, against trainer.evaluate --retrieval."""
    import io
    import tarfile

    import numpy as np
    from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval as zsr

    from pools.synth import concept_name, matching_caption
    from trainer.data import iter_tar_samples
    from trainer.evaluate import evaluate

    folder = tmp_path / "wds_flickr"
    (folder / "test").mkdir(parents=True)
    rng = np.random.default_rng(0)
    samples = [(s["jpg"], int(s["cls"])) for t in sorted((train_pool / "eval" / "test").glob("*.tar"))
               for _, s in iter_tar_samples(str(t))][::2]
    for shard in range(2):
        with tarfile.open(folder / "test" / f"{shard}.tar", "w") as tar:
            for i, (jpg, c) in list(enumerate(samples))[shard::2]:
                # unique captions: identical ones tie exactly, and ties are broken differently
                # (torch.topk there, a stable sort here)
                txt = f"{matching_caption(c, rng, entity=False)} ({i})\n{concept_name(c)} number {i}".encode()
                for name, data in ((f"{i:05d}.jpg", jpg), (f"{i:05d}.txt", txt)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (folder / "test" / "nshards.txt").write_text("2\n")
    (folder / "dataset_type.txt").write_text("retrieval\n")

    [ours] = evaluate(trained, retrieval=[f"flickr={folder}"], out=tmp_path / "out")
    model, transform, tokenizer = _datacomp_model(trained)
    dataset = build_dataset(dataset_name="wds/flickr", root=str(folder), transform=transform, split="test",
                            download=False)
    loader = torch.utils.data.DataLoader(dataset.batched(16, collation_fn=image_captions_collate_fn),
                                         batch_size=None, shuffle=False, num_workers=0)
    theirs = zsr.evaluate(model, loader, tokenizer, recall_k_list=[1, 5, 10], device="cpu", amp=False)
    print({k: (ours["metrics"][k], v) for k, v in theirs.items()})
    assert ours["metrics"]["num_images"] == len(samples)
    for key, value in theirs.items():
        assert ours["metrics"][key] == pytest.approx(value, abs=1e-6), key  # theirs: float32
    assert 0 < ours["metrics"]["mean_recall@1"] < 1
