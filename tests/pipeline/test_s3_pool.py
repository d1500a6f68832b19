"""A pool in object storage (a loopback S3 server, moto) gives the same outputs as its local copy:
pipeline.filter (uid files), pipeline.reshard (shards) and pipeline.score (scores and embeddings),
with outputs written to the store as complete objects, reruns that resume, and one-line errors."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared helpers

from filter_pools import make_centroids_and_targets  # noqa: E402
from object_store import create_bucket, loopback_s3, object_bytes, upload_folder  # noqa: E402

pytestmark = pytest.mark.slow  # end to end: filter, reshard and score, about 30 s together

BUCKET = "pools"
POOL = f"s3://{BUCKET}/small"


@pytest.fixture(scope="module")
def s3_pool(tmp_path_factory):
    """(local pool, its copy at POOL, local centroids, targets); the server runs for the module."""
    from pools.synth import SynthConfig, generate

    local = tmp_path_factory.mktemp("s3pool") / "small"
    generate(local, SynthConfig(samples=600, seed=7, rows_per_file=250, shard_size=200, eval_per_class=3,
                                random_scores=True))
    centroids, targets = make_centroids_and_targets(local, tmp_path_factory.mktemp("s3image"))
    with loopback_s3():
        create_bucket(BUCKET)
        upload_folder(local, POOL)
        upload_folder(centroids.parent, f"s3://{BUCKET}/image")
        yield local, centroids, targets


# metadata only; the npz's l14 columns; npz + centroids; global steps (their results in the store)
@pytest.fixture
def own_ray():
    """A Ray that an earlier test left running in this process has worker processes started before
    the loopback server's variables were set (they would ask the real AWS): start our own."""
    from pipeline.cluster import leave_ray

    leave_ray()
    yield
    leave_ray()


STRATEGIES = ["basic", "clip", "image", "semdedup", "negclip"]


def _filter(pool, out, centroids, targets, *extra):
    from pipeline.filter import main

    return main(["--pool", str(pool), "--strategy", *STRATEGIES, "--centroids", str(centroids), "--targets",
                 str(targets), "--out", str(out), "--semdedup-clusters", "4", "--negclip-batch-size", "64", "--quiet",
                 *extra])


def test_filter_from_s3_equals_local_and_a_rerun_reuses_the_signals(s3_pool, tmp_path, monkeypatch):
    local, centroids, targets = s3_pool
    monkeypatch.chdir(tmp_path)  # a path taken for local would show up here as a folder "s3:"
    _filter(local, tmp_path / "local", centroids, targets, "--executor", "local")
    out = f"s3://{BUCKET}/runs/filter"
    first = _filter(POOL, out, f"s3://{BUCKET}/image/centroids.npy", targets, "--executor", "local")
    written = object_bytes(out)
    for name in STRATEGIES:
        assert written[f"{name}.npy"] == (tmp_path / "local" / f"{name}.npy").read_bytes(), name
        assert first["strategies"][name]["kept"] > 0
    assert not any(n.startswith(".") for n in written)  # no temporary key left behind
    signals = object_bytes(f"{out}/signals")
    assert sorted(signals) == sorted(p.name for p in (local / "metadata").glob("*.parquet"))
    # a rerun: the signals in the store are reused (their header matches), the subsets are the same
    _filter(POOL, out, f"s3://{BUCKET}/image/centroids.npy", targets, "--executor", "local")
    import json

    manifest = json.loads(object_bytes(out)["manifest.json"])
    assert {f["signals"] for f in manifest["pool"]["inputs"]} == {"reused"}
    assert object_bytes(f"{out}/signals") == signals
    assert {n: b for n, b in object_bytes(out).items() if n.endswith(".npy")} == \
        {n: b for n, b in written.items() if n.endswith(".npy")}
    assert not (tmp_path / "s3:").exists()


def test_filter_of_an_s3_pool_with_local_signals_on_the_ray_executor(s3_pool, tmp_path, monkeypatch, own_ray):
    """Ray's workers get the pool's URIs and read the files from the store."""
    import json

    local, centroids, targets = s3_pool
    monkeypatch.chdir(tmp_path)
    _filter(local, tmp_path / "local", centroids, targets, "--executor", "local")
    _filter(POOL, tmp_path / "remote", centroids, targets, "--signals-dir", str(tmp_path / "signals"),
            "--executor", "ray", "--num-workers", "2")
    manifest = json.loads((tmp_path / "remote" / "manifest.json").read_text())
    assert manifest["signals"]["computed_by"] == {"ray": 3}
    for name in STRATEGIES:
        assert (tmp_path / "remote" / f"{name}.npy").read_bytes() == (tmp_path / "local" / f"{name}.npy").read_bytes()
    assert len(list((tmp_path / "signals").glob("*.parquet"))) == 3
    assert not (tmp_path / "s3:").exists()


def test_reshard_from_s3_equals_local_byte_for_byte_and_resumes(s3_pool, tmp_path, monkeypatch, own_ray):
    import pipeline.reshard as reshard_mod
    from pipeline.filter import main as filter_main

    local, _, _ = s3_pool
    monkeypatch.chdir(tmp_path)  # where a URI flattened into a local path would land
    filter_main(["--pool", str(local), "--strategy", "basic", "--out", str(tmp_path / "f"), "--quiet",
                 "--executor", "local"])
    upload_folder(tmp_path / "f", f"s3://{BUCKET}/subsets")
    common = ["--shard-size", "40", "--max-task-samples", "250"]
    reshard_mod.main(["--pool", str(local), "--subset", str(tmp_path / "f" / "basic.npy"), "--out",
                      str(tmp_path / "rs"), "--executor", "local", *common])
    want = {p.name: p.read_bytes() for p in (tmp_path / "rs").iterdir() if p.name != "meta.json"}
    out = f"s3://{BUCKET}/train/basic"
    args = ["--pool", POOL, "--subset", f"s3://{BUCKET}/subsets/basic.npy", "--out", out, *common]

    # killed after the tasks, before their shards are moved into place: the task markers are in the store
    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(reshard_mod, "_finalize", killed)
    with pytest.raises(KeyboardInterrupt):
        reshard_mod.main([*args, "-j", "2"])  # Ray tasks: they get the URIs as strings
    parts = object_bytes(f"{out}/_parts")
    assert "plan.json" in parts and sum(n.endswith(".found.npy") for n in parts) == 3
    monkeypatch.undo()
    redone = []
    real_task = reshard_mod.reshard_task
    monkeypatch.setattr(reshard_mod, "reshard_task", lambda *a, **k: redone.append(a) or real_task(*a, **k))
    meta = reshard_mod.main([*args, "--executor", "local"])
    assert redone == []  # the rerun only moved the finished tasks' shards into place
    got = object_bytes(out)
    assert {n: b for n, b in got.items() if n != "meta.json"} == want
    assert meta["output_count"] > 0 and meta["tasks"] == 3
    assert not any(n.startswith(".") or n == "_parts" for n in got)
    assert reshard_mod.main([*args, "--executor", "local"]) == meta  # finished: nothing redone
    assert not (tmp_path / "s3:").exists()


def test_score_of_an_s3_pool_equals_scoring_the_local_copy(s3_pool, checkpoints, tmp_path):
    import shutil

    from pipeline.score import main

    local, _, _ = s3_pool
    copy = tmp_path / "pool"
    shutil.copytree(local, copy)
    remote = f"s3://{BUCKET}/to_score"
    upload_folder(local, remote)
    args = ["--model", str(checkpoints["b32"]), "--as", "b32", "--executor", "local", "--batch-size", "64"]
    want = main(["--pool", str(copy), *args])
    got = main(["--pool", remote, *args])
    for k in ("rows", "scored", "missing_from_shards", "image_decode_failed", "shard_samples"):
        assert got[k] == want[k], k
    metadata = object_bytes(f"{remote}/metadata")
    for parquet in sorted((copy / "metadata").glob("*.parquet")):
        assert metadata[parquet.name] == parquet.read_bytes()
        with np.load(parquet.with_suffix(".npz")) as a, np.load(io.BytesIO(metadata[parquet.stem + ".npz"])) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])
    assert "score_b32.json" in object_bytes(remote)
    assert not object_bytes(f"{remote}/.scoring/b32")  # the staged results are removed at the end
    assert main(["--pool", remote, *args])["signature"] == got["signature"]  # already scored: nothing redone


def test_centroids_of_an_s3_pool_equal_the_local_copys(s3_pool, tmp_path):
    from pipeline.centroids import main

    local, _, _ = s3_pool
    args = ["--scale", "tiny", "--k", "8", "--executor", "local"]
    want = main(["--pool", str(local), "--out", str(tmp_path / "c.npy"), "--signals-dir", str(tmp_path / "sig"), *args])
    got = main(["--pool", POOL, "--out", f"s3://{BUCKET}/centroids/c.npy", *args])  # signals beside them
    assert object_bytes(f"s3://{BUCKET}/centroids")["c.npy"] == (tmp_path / "c.npy").read_bytes()
    assert got["sampled"] == want["sampled"] > 0
    assert len(object_bytes(f"s3://{BUCKET}/centroids/signals")) == 3


@pytest.mark.parametrize("case", ["missing bucket", "missing pool", "bad credentials"])
def test_object_storage_errors_are_one_line_naming_the_uri(s3_pool, tmp_path, case):
    from moto.core.authorization import enable_iam_authentication

    pool = {"missing bucket": "s3://no-such-bucket/small", "missing pool": f"s3://{BUCKET}/nothing-here",
            "bad credentials": POOL}[case]
    cmd = [sys.executable, "-m", "pipeline.filter", "--pool", pool, "--strategy", "basic", "--out",
           str(tmp_path / "out"), "--quiet", "--executor", "local"]
    if case == "bad credentials":
        with enable_iam_authentication():  # the server now checks keys: ours belong to no user
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: ") and pool in lines[-1], lines[-1]
    if case == "bad credentials":
        assert "AWS_ACCESS_KEY_ID" in lines[-1]
