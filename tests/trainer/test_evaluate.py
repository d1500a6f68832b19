import json

import numpy as np
import pytest
import torch

from trainer.evaluate import (classification_metrics, done_keys, evaluate, retrieval_metrics,
                              zero_shot_classifier)
from trainer.models import TINY_MODEL_CFG, create_model


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


def _tiny_run(tmp_path):
    """A run folder holding one checkpoint of a random-init tiny model (seeded: whether acc1 and
    mean per-class recall differ on the unbalanced pets set depends on the init)."""
    torch.manual_seed(0)
    model, _, _, _ = create_model("tiny")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 1, "name": "run", "state_dict": model.state_dict(), "model_name": "tiny",
                "model_cfg": TINY_MODEL_CFG}, run / "checkpoints" / "epoch_1.pt")
    return run


def test_evaluate_writes_datacomp_lines_once(train_pool, tmp_path):
    import tarfile, io
    from pools.synth import encode_jpeg, matching_caption, render_concept
    run = _tiny_run(tmp_path)
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


# --- DataComp's suite -------------------------------------------------------------------------
def test_group_metrics_as_wilds_computes_them():
    from trainer.evaluate import group_accuracy, macro_scores
    correct = np.array([1, 0, 1, 1, 0, 0, 1])
    region = np.array([0, 0, 2, 2, 2, 5, 5])  # region 1, 3, 4 are empty: never the worst
    m = group_accuracy(correct, region, "region")
    assert m["acc_avg"] == pytest.approx(4 / 7)
    assert m["acc_region:0"] == 0.5 and m["acc_region:2"] == pytest.approx(2 / 3) and m["acc_region:5"] == 0.5
    assert m["count_region:2"] == 3.0 and "acc_region:1" not in m
    assert m["acc_wg"] == 0.5
    # F1 and recall macro over the classes in the targets (sklearn's labels=unique(y_true)):
    # class 0: tp 1, predicted 2, actual 2 -> p .5 r .5 f1 .5; class 1: tp 1, predicted 1, actual 2
    # -> p 1 r .5 f1 2/3; class 2: tp 0 (predicted 1, actual 0) is not a target class
    pred, true = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0])
    s = macro_scores(pred, true)
    assert s["recall-macro_all"] == pytest.approx(0.5)
    assert s["F1-macro_all"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_winogavil_scores_as_datacomp_computes_them():
    from trainer.evaluate import winogavil_prompt, winogavil_scores
    assert winogavil_prompt("Apple") == "An apple" and winogavil_prompt("dog") == "A dog"
    sims = [np.array([0.9, 0.1, 0.8, 0.2, 0.3, 0, 0, 0, 0, 0.05]),   # top-2 {0, 2}; truth {0, 1}: 1/3
            np.array([0.5, 0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0, 0, 0, 0]),  # top-3 {0,1,2} = truth: 1
            np.array([0.1, 0.2, 0.3, 0.4, 0.5])]                    # top-1 {4}; truth {0}: 0
    truth = [np.isin(np.arange(10), [0, 1]), np.isin(np.arange(12), [0, 1, 2]), np.isin(np.arange(5), [0])]
    m = winogavil_scores(sims, truth)
    assert m["jaccard_score_10"] == pytest.approx(1 / 3) and m["jaccard_score_12"] == 1.0
    assert m["jaccard_score_10-12"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["jaccard_score_5"] == 0.0 and m["jaccard_score_5-6"] == 0.0 and m["jaccard_score_6"] is None
    assert m["avg_jaccard_score"] == pytest.approx((1 / 3 + 1 + 0) / 3)


def test_aggregate_scores_match_a_hand_computation():
    from trainer.datacomp_tasks import (AVERAGE, MAIN_METRICS, SCORED_TASKS, TASKS, aggregate_scores)
    assert len(TASKS) == 40 and len(MAIN_METRICS) == 38
    names = {t.key: t.name for t in SCORED_TASKS}
    rng = np.random.default_rng(0)
    values = {k: float(v) for k, v in zip(MAIN_METRICS, rng.uniform(0, 1, 38))}
    by_name = {names[k]: v for k, v in values.items()}
    # aggregate_scores.py's groups, by dataset name, written out here by hand
    shifts = ["ImageNet Sketch", "ImageNet v2", "ImageNet-A", "ImageNet-O", "ImageNet-R", "ObjectNet"]
    vtab = ["Caltech-101", "CIFAR-100", "CLEVR Counts", "CLEVR Distance", "Describable Textures", "EuroSAT",
            "KITTI Vehicle Distance", "Oxford Flowers-102", "Oxford-IIIT Pet", "PatchCamelyon", "RESISC45",
            "SVHN", "SUN397"]
    retrieval = ["Flickr", "MSCOCO", "WinoGAViL"]
    got = aggregate_scores({**values, "fairness/fairface": None, "synth": 0.9})
    assert got["ImageNet"].value == by_name["ImageNet 1k"]
    assert got["ImageNet dist. shifts"].value == pytest.approx(np.mean([by_name[n] for n in shifts]))
    assert got["VTAB"].value == pytest.approx(np.mean([by_name[n] for n in vtab]))
    assert got["Retrieval"].value == pytest.approx(np.mean([by_name[n] for n in retrieval]))
    assert got[AVERAGE].value == pytest.approx(np.mean(list(values.values())))
    assert all(s.complete for s in got.values())
    partial = aggregate_scores({k: values[k] for k in ("imagenet1k", "vtab/dtd", "vtab/svhn")})
    assert partial["VTAB"].value == pytest.approx((values["vtab/dtd"] + values["vtab/svhn"]) / 2)
    assert (partial["VTAB"].present, partial["VTAB"].total) == (2, 13)
    assert partial["Retrieval"].value is None and not partial[AVERAGE].complete


def _npy(values) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=np.int64))
    return buf.getvalue()


def _write_task(folder, samples, *, classnames=None, nshards=2, dataset_type=None, templates=True):
    """A task in download_evalsets.py's layout: test/{0..n-1}.tar, test/nshards.txt, ..."""
    import io
    import tarfile
    (folder / "test").mkdir(parents=True)
    for shard in range(nshards):
        with tarfile.open(folder / "test" / f"{shard}.tar", "w") as tar:
            for i, sample in list(enumerate(samples))[shard::nshards]:
                for ext, data in sample.items():
                    info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (folder / "test" / "nshards.txt").write_text(f"{nshards}\n")
    if classnames is not None:
        (folder / "classnames.txt").write_text("".join(c + "\n" for c in classnames))
        if templates:
            (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n{c} icon\n")
    if dataset_type:
        (folder / "dataset_type.txt").write_text(dataset_type + "\n")


@pytest.fixture(scope="module")
def datacomp_dir(train_pool, tmp_path_factory):
    """Tiny stand-ins of DataComp's eval sets, built from the synthetic eval images."""
    from pools.synth import CONCEPTS, concept_name, matching_caption
    from trainer.data import iter_tar_samples
    root = tmp_path_factory.mktemp("datacomp_eval")
    test = train_pool / "eval" / "test"
    images = [(s["jpg"], int(s["cls"])) for t in sorted(test.glob("*.tar")) for _, s in iter_tar_samples(str(t))]
    names = [concept_name(c) for c in range(len(CONCEPTS))]
    plain = [{"jpg": j, "cls": str(c).encode()} for j, c in images]
    _write_task(root / "wds_imagenet1k_test", plain, classnames=names, nshards=4)
    _write_task(root / "wds_vtab-cifar100_test", plain, classnames=names)
    # unbalanced classes, so acc1 and mean per-class recall differ
    pets, taken = [], np.zeros(len(CONCEPTS), int)
    for sample, (_, c) in zip(plain, images):
        if taken[c] < c % 5 + 1:  # class c keeps c % 5 + 1 images
            pets.append(sample)
            taken[c] += 1
    _write_task(root / "wds_vtab-pets_test", pets, classnames=names)
    four = [{"jpg": j, "cls": str(c).encode()} for j, c in images if c < 4]
    _write_task(root / "wds_vtab-kitti_closest_vehicle_distance_test", four, classnames=names[:4])
    rng = np.random.default_rng(0)
    pairs = [{"jpg": j, "txt": (matching_caption(c, rng, entity=False) + "\n" + concept_name(c)).encode()}
             for j, c in images[::5]]
    _write_task(root / "wds_retrieval-flickr_1k_test_image_text_retrieval_test", pairs, dataset_type="retrieval")
    geode = [{**s, "npy": _npy([i % 3, i % 7])} for i, s in enumerate(plain)]
    _write_task(root / "wds_geode_test", geode, classnames=names)
    dollar = [{**s, "npy": _npy([i % 4, i, 0])} for i, s in enumerate(plain)]
    _write_task(root / "wds_dollar_street_test", dollar, classnames=names)
    _write_task(root / "wds_wilds-iwildcam_test", plain, classnames=names)  # F1 needs no metadata
    _write_task(root / "wds_wilds-fmow_test", plain, classnames=names)  # worst region needs it: unusable
    _write_task(root / "wds_imagenet-r_test", plain, classnames=names, templates=False)
    # WinoGAViL: cue = a concept's name; 10 or 12 candidates (5 in one), 2-3 of them its images
    by_class: dict = {}
    for j, c in images:
        by_class.setdefault(c, []).append(j)
    instances = []
    for n, (c, size) in enumerate([(0, 10), (7, 12), (14, 10), (21, 12), (28, 5)]):
        k = 2 + n % 2
        others = [by_class[(c + 1 + i) % len(CONCEPTS)][0] for i in range(size - k)]
        order = rng.permutation(size)
        candidates = [f"c{c}_{i}" if i < k else f"other{i}" for i in range(size)]
        jpgs = by_class[c][:k] + others
        instance = {"json": json.dumps({"cue": names[c], "candidates": [candidates[o] for o in order],
                                        "associations": candidates[:k]}).encode()}
        instance.update({f"c{pos}.jpg": jpgs[o] for pos, o in enumerate(order)})
        instances.append(instance)
    _write_task(root / "wds_misc-winogavil_test", instances)
    (root / "wds_fairface_test").mkdir()
    return root


def test_datacomp_suite_writes_datacomps_lines_and_group_averages(datacomp_dir, tmp_path, capsys):
    from trainer.datacomp_tasks import TASKS_BY_KEY
    from trainer.evaluate import main
    run = _tiny_run(tmp_path)
    new = main(["--run", str(run), "--datacomp-dir", str(datacomp_dir), "--batch-size", "50"])
    err = capsys.readouterr().err
    lines = [json.loads(l) for l in (run / "eval_results.jsonl").read_text().splitlines()]
    assert lines == new
    by_key = {l["key"]: l for l in lines}
    evaluated = ["vtab/cifar100", "imagenet1k", "vtab/kitti_closest_vehicle_distance", "vtab/pets",
                 "retrieval/flickr_1k_test_image_text_retrieval", "misc/winogavil", "wilds/iwildcam",
                 "fairness/dollar_street", "fairness/geode"]
    assert [l["key"] for l in lines] == [k for k in TASKS_BY_KEY if k in evaluated]  # tasklist order
    for line in lines:
        task = TASKS_BY_KEY[line["key"]]
        assert set(line) == {"key", "dataset", "metrics"} and line["dataset"] == task.name
        assert line["metrics"]["main_metric"] == line["metrics"][task.main_metric]
    classification = {"acc1", "acc5", "mean_per_class_recall", "main_metric"}
    assert set(by_key["imagenet1k"]["metrics"]) == classification
    assert by_key["vtab/kitti_closest_vehicle_distance"]["metrics"]["acc5"] is None  # 4 classes
    pets = by_key["vtab/pets"]["metrics"]
    assert pets["main_metric"] == pets["mean_per_class_recall"] != pets["acc1"]
    assert set(by_key["retrieval/flickr_1k_test_image_text_retrieval"]["metrics"]) == {
        f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)} | {"mean_recall@1", "main_metric"}
    geode = by_key["fairness/geode"]["metrics"]
    assert geode["acc_wg"] == min(geode[f"acc_region:{r}"] for r in range(3))
    assert geode["acc_avg"] == pytest.approx(geode["acc1"])
    dollar = by_key["fairness/dollar_street"]["metrics"]
    assert dollar["acc_top5_wg"] == min(dollar[f"acc_top5_income_ds:{g}"] for g in range(4))
    assert dollar["acc_top5_avg"] == pytest.approx(dollar["acc5"])
    wild = by_key["wilds/iwildcam"]["metrics"]
    assert {"acc_avg", "recall-macro_all", "F1-macro_all"} <= set(wild)
    assert wild["recall-macro_all"] == pytest.approx(wild["mean_per_class_recall"])

    wino = by_key["misc/winogavil"]["metrics"]
    assert wino["jaccard_score_10-12"] == pytest.approx(np.mean([wino["jaccard_score_10"], wino["jaccard_score_12"]]))
    assert wino["jaccard_score_6"] is None and wino["jaccard_score_5"] is not None
    assert wino["avg_jaccard_score"] == pytest.approx((2 * wino["jaccard_score_10"] + 2 * wino["jaccard_score_12"]
                                                       + wino["jaccard_score_5"]) / 5)

    summary = json.loads((run / "datacomp_scores.json").read_text())
    status = {t["key"]: (t["status"], t["reason"]) for t in summary["tasks"]}
    assert len(status) == 40 and sum(s == "evaluated" for s, _ in status.values()) == 9
    assert status["wilds/fmow"][0] == "unusable" and ".npy metadata" in status["wilds/fmow"][1]
    assert status["imagenet-r"][0] == "unusable" and "zeroshot_classification_templates.txt" in status["imagenet-r"][1]
    mscoco = status["retrieval/mscoco_2014_5k_test_image_text_retrieval"]
    assert mscoco[0] == "missing" and "nlphuji/mscoco_2014_5k_test_image_text_retrieval" in mscoco[1]
    assert status["fairness/fairface"][0] == "not scored"
    assert status["sun397"] == ("missing", f"no wds_sun397_test in {datacomp_dir}")
    main_of = {k: l["metrics"]["main_metric"] for k, l in by_key.items()}
    groups = summary["groups"]
    assert groups["ImageNet"]["value"] == main_of["imagenet1k"]
    vtab = ["vtab/cifar100", "vtab/kitti_closest_vehicle_distance", "vtab/pets"]
    assert groups["VTAB"]["value"] == pytest.approx(np.mean([main_of[k] for k in vtab]))
    assert (groups["VTAB"]["tasks_present"], groups["VTAB"]["tasks_total"]) == (3, 13)
    assert groups["ImageNet dist. shifts"]["value"] is None
    assert groups["Retrieval"]["value"] == pytest.approx(
        (main_of["retrieval/flickr_1k_test_image_text_retrieval"] + main_of["misc/winogavil"]) / 2)
    assert groups["Average"]["value"] == pytest.approx(np.mean(list(main_of.values())))
    assert summary["all_38"] is False and summary["scored_tasks_present"] == 9
    assert "[12/40] ImageNet 1k (imagenet1k): acc1 = " in err and "| VTAB |" in err and "9 of the 38" in err

    # a rerun evaluates nothing again and keeps the table
    assert main(["--run", str(run), "--datacomp-dir", str(datacomp_dir)]) == []
    assert len((run / "eval_results.jsonl").read_text().splitlines()) == 9
    again = json.loads((run / "datacomp_scores.json").read_text())
    assert again["groups"] == groups and sum(t["status"] == "earlier" for t in again["tasks"]) == 9
