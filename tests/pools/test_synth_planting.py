"""pools.synth's planted near-duplicate groups and near-copies of eval images, as recorded in
ground_truth.parquet."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pools.synth import SynthConfig, eval_image, generate, plant_duplicate_groups


def _pixels(jpeg_or_image, size=(8, 8)) -> np.ndarray:  # (coarse: a crop shifts fine textures)
    img = jpeg_or_image if isinstance(jpeg_or_image, Image.Image) else Image.open(io.BytesIO(jpeg_or_image))
    return np.asarray(img.convert("RGB").resize(size), dtype=np.float64).ravel()


def _similar(a, b) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_groups_cover_the_fraction_in_groups_of_two_to_five():
    group = plant_duplicate_groups(10_000, 0.15, seed=1)
    sizes = np.bincount(group[group >= 0])
    assert set(sizes) <= {2, 3, 4, 5} and abs((group >= 0).sum() - 1500) <= 5
    assert (plant_duplicate_groups(10_000, 0.15, seed=1) == group).all()
    assert (plant_duplicate_groups(100, 0.0, seed=1) == -1).all()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted") / "pool"
    cfg = SynthConfig(samples=500, seed=5, rows_per_file=250, shard_size=250, eval_per_class=2, duplicates=0.2,
                      eval_copies=30)
    summary = generate(out, cfg)
    images = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            if name.endswith(".json"):
                import json

                images[json.loads(data)["uid"]] = members[name[:-5] + ".jpg"]
    return out, cfg, summary, pq.read_table(out / "ground_truth.parquet").to_pandas(), images


def test_duplicate_groups_are_copies_of_one_image(planted):
    out, cfg, summary, truth, images = planted
    assert summary["duplicate_groups"]["rows"] == int((truth.duplicate_group >= 0).sum()) >= 90
    for g, rows in truth[truth.duplicate_group >= 0].groupby("duplicate_group"):
        source = rows.iloc[0]
        assert (rows.duplicate_of == source.uid).all() and (rows.concept == source.concept).all()
        present = [u for u in rows.uid if u in images]
        for uid in present[1:]:
            assert _similar(_pixels(images[uid]), _pixels(images[present[0]])) > 0.8, (g, uid)
        assert len({images[u] for u in present}) == len(present)  # re-encoded: not byte-identical
    others = [u for u in truth.uid[truth.duplicate_group < 0][:20] if u in images]
    assert np.mean([_similar(_pixels(images[a]), _pixels(images[b])) for a, b in zip(others, others[1:])]) < 0.8


def test_eval_copies_are_near_copies_of_eval_images(planted):
    out, cfg, summary, truth, images = planted
    copies = truth[truth.eval_copy_concept >= 0]
    assert summary["eval_copies"] == len(copies) == 30 and copies.downloaded.all()
    assert (copies.duplicate_group < 0).all() and (copies.concept == copies.eval_copy_concept).all()
    eval_images = {}  # (concept, index within the concept) -> the eval set's image, whatever its layout
    for shard in sorted((out / "eval").rglob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name in sorted(n for n in members if n.endswith(".cls")):
            concept = int(members[name])
            index = sum(1 for c, _ in eval_images if c == concept)
            eval_images[(concept, index)] = members[name[:-4] + ".jpg"]
    for row in copies.itertuples():
        key = (row.eval_copy_concept, row.eval_copy_index)
        assert _similar(_pixels(eval_image(cfg, *key)), _pixels(eval_images[key])) > 0.99  # what the set holds
        assert _similar(_pixels(images[row.uid]), _pixels(eval_images[key])) > 0.8


def test_eval_copies_without_images_need_random_scores(tmp_path, capsys):
    from pools.synth import main

    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "p"), "--samples", "50", "--metadata-only", "--eval-copies", "5"])
    assert exit_.value.code == 2 and "--random-scores" in capsys.readouterr().err.splitlines()[-1]
    summary = main(["--out", str(tmp_path / "p"), "--samples", "50", "--metadata-only", "--random-scores",
                    "--eval-copies", "5", "--eval-per-class", "2"])
    assert summary["eval_copies"] == 5 and summary["eval_embeddings"] == ["eval/b32_img.npy", "eval/l14_img.npy"]
    assert np.load(tmp_path / "p" / "eval" / "l14_img.npy").shape == (summary["config"]["eval_per_class"] * 36, 768)
