"""Target embeddings from .npy, DataComp's .pt files, or an image folder embedded with a CLIP model."""

import numpy as np
import pytest
import torch

from pipeline.models import ModelInputError, load_centroids, load_targets
from pipeline.targets import resolve_targets


def test_npy_and_datacomp_pt_files(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 768)).astype(np.float32)
    b = rng.standard_normal((3, 768)).astype(np.float16)
    np.save(tmp_path / "a.npy", a)
    torch.save({"image_features": torch.from_numpy(b)}, tmp_path / "in1k_clip_vit_l14_0.pt")
    got = load_targets([tmp_path / "a.npy", tmp_path / "in1k_clip_vit_l14_0.pt"])
    assert got.shape == (8, 768) and got.dtype == np.float32
    assert (got[5:] == b.astype(np.float32)).all()
    # DataComp's centroid files are torch.save'd NumPy arrays
    torch.save(a, tmp_path / "small_centroids_l14.pt", pickle_protocol=4)
    assert (load_centroids(tmp_path / "small_centroids_l14.pt") == a).all()
    with pytest.raises(ModelInputError, match="does not exist"):
        load_targets([tmp_path / "missing.npy"])


def test_image_folder_is_embedded_and_cached(tmp_path):
    from PIL import Image

    from trainer.models import create_model

    folder = tmp_path / "images" / "class_a"
    folder.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (40, 30), (40 * i, 100, 200)).save(folder / f"{i}.png")
    net, *_ = create_model("tiny")
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": net.state_dict()}, ckpt)
    arr, described = resolve_targets([tmp_path / "images"], model="tiny", pretrained=str(ckpt), dim=64,
                                     cache_dir=tmp_path / "cache")
    assert arr.shape == (5, 64) and described[0]["rows"] == 5
    assert len(list((tmp_path / "cache").glob("targets_*.npy"))) == 1
    again, _ = resolve_targets([tmp_path / "images"], model="tiny", pretrained=str(ckpt), dim=64,
                               cache_dir=tmp_path / "cache")
    assert np.allclose(again, arr)
    with pytest.raises(ModelInputError, match="64-d"):  # the pool's l14_img are 768-d
        resolve_targets([tmp_path / "images"], model="tiny", pretrained=str(ckpt), cache_dir=tmp_path / "cache")
    with pytest.raises(ModelInputError, match="--targets-model"):
        resolve_targets([tmp_path / "images"])
