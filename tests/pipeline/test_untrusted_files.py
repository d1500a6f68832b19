"""Nothing a user hands us, or a cache folder holds, is unpickled with code execution."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models import ModelInputError, load_centroids, load_targets, load_wordnet_tables, wordnet_fingerprint

REPO = Path(__file__).resolve().parents[2]


class Planted:
    """An object whose unpickling creates a marker file: what a crafted .pt file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def plant(path: Path, marker: Path, *, inside_dict: bool = False, protocol: int = 2) -> Path:
    payload = Planted(marker)
    torch.save({"image_features": payload} if inside_dict else payload, path, pickle_protocol=protocol)
    return path


@pytest.mark.parametrize("inside_dict", [False, True])
@pytest.mark.parametrize("protocol", [2, 4])  # 4: read by our NumPy-only unpickler, not torch's
def test_crafted_pt_files_are_refused_and_run_nothing(tmp_path, inside_dict, protocol):
    marker = tmp_path / "ran"
    evil = plant(tmp_path / "in1k_clip_vit_l14_0.pt", marker, inside_dict=inside_dict, protocol=protocol)
    for load in (lambda: load_centroids(evil), lambda: load_targets([evil])):
        with pytest.raises(ModelInputError, match=r"in1k_clip_vit_l14_0\.pt: refused: .*\(\S+\), .*could run code"):
            load()
    assert not marker.exists()


def test_datacomp_style_pt_files_still_load(tmp_path):
    rng = np.random.default_rng(0)
    for dtype in (np.float16, np.float32, np.float64):
        for protocol in (2, 4, 5):
            a = rng.standard_normal((5, 768)).astype(dtype)
            torch.save(a, tmp_path / "centroids.pt", pickle_protocol=protocol)  # a torch.save'd NumPy array
            assert (load_centroids(tmp_path / "centroids.pt") == a.astype(np.float32)).all()
    b = rng.standard_normal((3, 768)).astype(np.float32)
    torch.save({"image_features": torch.from_numpy(b)}, tmp_path / "targets.pt")
    assert (load_targets([tmp_path / "targets.pt"]) == b).all()


def test_filter_command_names_the_refused_file_in_one_line(scored_pool, tmp_path):
    marker = tmp_path / "ran"
    evil = plant(tmp_path / "evil_centroids.pt", marker)
    proc = subprocess.run([sys.executable, "-m", "pipeline.filter", "--pool", str(scored_pool), "--strategy", "image",
                           "--centroids", str(evil), "--targets", str(evil), "--out", str(tmp_path / "out"),
                           "--executor", "local", "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(evil) in lines[0] and "refused" in lines[0]
    assert not marker.exists()


def test_a_planted_wordnet_cache_is_never_executed(tmp_path):
    """The cache is JSON: an old-style pickle beside it is ignored, a planted or broken JSON
    file is rebuilt, and the rebuilt tables equal the ones NLTK gives."""
    fingerprint = wordnet_fingerprint()
    marker = tmp_path / "ran"
    import pickle

    (tmp_path / f"wordnet_tables_{fingerprint}.pkl").write_bytes(pickle.dumps(Planted(marker)))
    cache = tmp_path / f"wordnet_tables_{fingerprint}.json"
    cache.write_bytes(pickle.dumps(Planted(marker)))  # not JSON: rebuilt
    built = load_wordnet_tables(cache_dir=tmp_path)
    assert not marker.exists()
    data = json.loads(cache.read_text())  # rewritten as JSON
    assert set(data) == {"first_offset", "exceptions", "substitutions"}
    cached = load_wordnet_tables(cache_dir=tmp_path)  # read back from JSON
    assert cached == built
    assert cached.first_offset["dog"]["n"] == 2084071  # WordNet 3.0's first noun sense of "dog"


def test_no_code_path_unpickles_a_file():
    """The issue's grep: no weights_only=False, no pickle.load, no allow_pickle=True."""
    hits = []
    for folder in ("pipeline", "trainer", "pools", "filters"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(|allow_pickle\s*=\s*True", code):
                    hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert hits == []
