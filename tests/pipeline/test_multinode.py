"""Past one machine: filter, reshard and score on a two-node Ray cluster (Ray's own test
cluster: a head and a worker node on this machine) give the local run's bytes, and the
work ran on both nodes."""

import hashlib
import shutil

import numpy as np
import pytest

from pools.format import Pool
from pools.uids import uids_to_records, write_subset


@pytest.fixture(scope="module")
def cluster():
    ray_utils = pytest.importorskip("ray.cluster_utils")
    import ray

    if ray.is_initialized():
        ray.shutdown()  # a Ray an earlier test of this process left joined
    c = ray_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def _digest(folder, names):
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


@pytest.mark.slow
def test_filter_reshard_and_score_on_two_nodes_equal_the_local_run(cluster, scored_pool, small_pool, checkpoints,
                                                                   tmp_path):
    import ray

    from pipeline.filter import main as filter_main
    from pipeline.reshard import main as reshard_main
    from pipeline.score import main as score_main

    # filter: text and basic need the signals pass (fastText, WordNet) on every file
    common = ["--pool", str(scored_pool), "--strategy", "basic", "text", "--quiet"]
    filter_main(common + ["--out", str(tmp_path / "local"), "--signals-dir", str(tmp_path / "sig_local"),
                          "--executor", "local"])
    filter_main(common + ["--out", str(tmp_path / "cluster"), "--signals-dir", str(tmp_path / "sig_cluster"),
                          "--ray-address", cluster.address, "--num-workers", "2"])
    names = ["basic.npy", "text.npy"]
    assert _digest(tmp_path / "cluster", names) == _digest(tmp_path / "local", names)
    import json

    manifest = json.loads((tmp_path / "cluster" / "manifest.json").read_text())
    assert manifest["signals"]["computed_by"] == {"ray": 3}
    assert len(manifest["signals"]["ray_nodes"]) == 2

    # reshard
    subset = tmp_path / "subset.npy"
    truth_uids = [u for p in Pool(small_pool).metadata_files()
                  for u in __import__("pyarrow.parquet", fromlist=["x"]).read_table(p, columns=["uid"])
                  .column("uid").to_pylist()]
    write_subset(subset, uids_to_records(truth_uids[::2]))
    args = ["--pool", str(small_pool), "--subset", str(subset), "-j", "2", "--shard-size", "50"]
    local = reshard_main(args + ["--out", str(tmp_path / "reshard_local"), "--executor", "local"])
    meta = reshard_main(args + ["--out", str(tmp_path / "reshard_cluster"), "--ray-address", cluster.address])
    ray.shutdown()
    shards = [p.name for p in sorted((tmp_path / "reshard_local").iterdir()) if p.name != "meta.json"]
    assert _digest(tmp_path / "reshard_cluster", shards) == _digest(tmp_path / "reshard_local", shards)
    assert meta["output_count"] == local["output_count"] > 0
    assert len(meta["nodes"]) == 2

    # score: two model actors, one per node
    pools = {}
    for name in ("score_local", "score_cluster"):
        pools[name] = tmp_path / name
        shutil.copytree(small_pool, pools[name])
    args = ["--model", str(checkpoints["b32"]), "--batch-size", "64", "--cpus-per-actor", "1"]
    score_main(["--pool", str(pools["score_local"]), "--executor", "local", *args])
    summary = score_main(["--pool", str(pools["score_cluster"]), "--ray-address", cluster.address,
                          "--num-actors", "2", *args])
    ray.shutdown()
    assert len(summary["nodes"]) == 2
    for parquet in Pool(pools["score_local"]).metadata_files():
        other = pools["score_cluster"] / "metadata" / parquet.name
        assert other.read_bytes() == parquet.read_bytes()
        with np.load(Pool.npz_for(parquet)) as a, np.load(Pool.npz_for(other)) as b:
            assert all(np.array_equal(a[k], b[k]) for k in a.files)
