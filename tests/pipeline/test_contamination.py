"""The contamination signal finds every near-copy of an evaluation image planted in a pool."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.filter import main
from pools.uids import uids_to_records


@pytest.fixture(scope="module")
def contaminated(tmp_path_factory):
    """A 600-row pool in 2 files; 14 rows hold near-copies (cosine ~0.98) of images of two
    evaluation sets saved as embeddings (cars: 30, pets: 40); one row has no embedding."""
    from pools.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("contamination")
    pool = root / "pool"
    generate(pool, SynthConfig(samples=600, seed=17, rows_per_file=300, images=False, random_scores=True))
    rng = np.random.default_rng(3)
    sets = {"cars": rng.standard_normal((30, 768)), "pets": rng.standard_normal((40, 768))}
    for name, emb in sets.items():
        np.save(root / f"{name}.npy", (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32))
    rows = rng.choice(np.arange(1, 600), 14, replace=False)
    planted = {int(r): ("cars" if i % 2 else "pets", int(rng.integers(30))) for i, r in enumerate(rows)}
    npz_files = sorted((pool / "metadata").glob("*.npz"))
    arrays = [dict(np.load(p)) for p in npz_files]
    for row, (task, index) in planted.items():
        source = np.load(root / f"{task}.npy")[index]
        noise = rng.standard_normal(768)
        copy = source + 0.15 * noise / np.linalg.norm(noise)
        arrays[row // 300]["l14_img"][row % 300] = (copy / np.linalg.norm(copy)).astype(np.float16)
    arrays[0]["l14_img"][0] = 0  # no image embedding
    for path, a in zip(npz_files, arrays):
        np.savez_compressed(path, **a)
    return pool, root, planted


def test_every_planted_near_copy_is_found_with_its_task(contaminated, tmp_path):
    pool, root, planted = contaminated
    spec = tmp_path / "clean.toml"
    spec.write_text('name = "clean"\nrules = ["eval_max_similarity IS NULL OR eval_max_similarity < 0.95"]\n')
    signals = tmp_path / "signals"
    stats = main(["--pool", str(pool), "--strategy", str(spec), "decontaminated", "no_filter", "--eval-sets",
                  f"cars={root / 'cars.npy'}", str(root / "pets.npy"), "--out", str(tmp_path / "out"),
                  "--signals-dir", str(signals), "--executor", "local", "--quiet"])
    table = pq.read_table(sorted(signals.glob("*.parquet"))[0]).to_pandas()
    columns = {c: np.array(sum((pq.read_table(p, columns=[c]).column(0).to_pylist()
                                for p in sorted(signals.glob("*.parquet"))), []), dtype=object)
               for c in ("eval_max_similarity", "eval_task", "eval_nearest")}
    assert "eval_task" in table
    sims = columns["eval_max_similarity"].astype(np.float64)
    assert np.isnan(sims[0]) and columns["eval_task"][0] is None
    found = {int(r) for r in np.flatnonzero(sims >= 0.95)}
    assert found == set(planted)
    for row, (task, index) in planted.items():
        assert columns["eval_task"][row] == task and columns["eval_nearest"][row] == index
    assert np.nanmax(np.delete(sims, list(planted))) < 0.5
    uids = pq.read_table(pool / "ground_truth.parquet", columns=["uid"]).column(0).to_pylist()
    kept = np.isin(uids_to_records(uids), np.load(tmp_path / "out" / "clean.npy"))
    assert not kept[list(planted)].any() and kept.sum() == 600 - len(planted)
    assert stats["strategies"]["decontaminated"]["kept"] <= stats["strategies"]["clean"]["kept"]
    tasks = [task for task, _ in planted.values()]
    assert stats["eval_near_copies"]["pool"] == {t: tasks.count(t) for t in sorted(set(tasks))}
    counts = stats["eval_near_copies"]
    assert counts["strategies"] == {"clean": {}, "decontaminated": {}, "no_filter": counts["pool"]}


def test_missing_eval_sets_is_a_clear_error(contaminated, tmp_path):
    from pipeline.filter import FilterError

    pool, _, _ = contaminated
    with pytest.raises(FilterError, match="no evaluation sets: pass --eval-sets"):
        main(["--pool", str(pool), "--strategy", "decontaminated", "--out", str(tmp_path / "o"),
              "--signals-dir", str(tmp_path / "s"), "--executor", "local", "--quiet"])


def test_eval_embeddings_of_another_width_are_one_line(contaminated, tmp_path):
    import subprocess
    import sys

    pool, root, _ = contaminated
    np.save(tmp_path / "narrow.npy", np.ones((4, 512), np.float32))
    proc = subprocess.run([sys.executable, "-m", "pipeline.filter", "--pool", str(pool), "--strategy", "decontaminated",
                           "--eval-sets", str(tmp_path / "narrow.npy"), "--out", str(tmp_path / "o"), "--signals-dir",
                           str(tmp_path / "s"), "--executor", "local"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "width 512" in proc.stderr.splitlines()[-1] and "768" in proc.stderr.splitlines()[-1]


def test_the_synthetic_pools_planted_eval_copies_are_found_with_their_task_and_image(tmp_path):
    """pools.synth --random-scores --eval-copies: the copies' embeddings are near-copies of the eval
    images' (eval/l14_img.npy, the eval set's order); the signal finds exactly those rows."""
    from pools.synth import main as synth_main

    pool = tmp_path / "pool"
    synth_main(["--out", str(pool), "--samples", "2000", "--seed", "4", "--rows-per-file", "700", "--metadata-only",
                "--random-scores", "--duplicates", "0.15", "--eval-copies", "40", "--eval-per-class", "5"])
    truth = pq.read_table(pool / "ground_truth.parquet").to_pandas()
    copies = truth.eval_copy_concept.to_numpy() >= 0
    assert copies.sum() == 40 and (truth.duplicate_group[copies] < 0).all()
    signals = tmp_path / "signals"
    stats = main(["--pool", str(pool), "--strategy", "decontaminated", "no_filter", "--eval-sets",
                  f"synth={pool / 'eval' / 'l14_img.npy'}", "--out", str(tmp_path / "out"), "--signals-dir",
                  str(signals), "--executor", "local", "--quiet"])
    table = pa.concat_tables(pq.read_table(p) for p in sorted(signals.glob("*.parquet"))).to_pandas()
    assert len(table) == len(truth)  # signal files are the metadata files', in the pool's row order
    sims = table.eval_max_similarity.to_numpy()
    assert (np.flatnonzero(sims >= 0.95) == np.flatnonzero(copies)).all()
    assert sims[copies].min() > 0.97 and sims[~copies].max() < 0.3
    assert (table.eval_task[copies] == "synth").all()
    want = truth.eval_copy_concept[copies] * 5 + truth.eval_copy_index[copies]
    assert (table.eval_nearest[copies].to_numpy() == want.to_numpy()).all()
    assert stats["eval_near_copies"]["pool"] == {"synth": 40}
    assert stats["eval_near_copies"]["strategies"]["decontaminated"] == {}
    kept = np.isin(uids_to_records(truth.uid.tolist()), np.load(tmp_path / "out" / "decontaminated.npy"))
    assert not kept[copies].any()

    # the planted embeddings do not depend on how the pool is split into files
    again = tmp_path / "again"
    synth_main(["--out", str(again), "--samples", "2000", "--seed", "4", "--rows-per-file", "2000", "--metadata-only",
                "--random-scores", "--duplicates", "0.15", "--eval-copies", "40", "--eval-per-class", "5"])
    split = np.concatenate([np.load(p)["l14_img"] for p in sorted((pool / "metadata").glob("*.npz"))])
    whole = np.load(next((again / "metadata").glob("*.npz")))["l14_img"]
    assert np.array_equal(split, whole)

