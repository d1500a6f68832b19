import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from loopback import HubServer, ImageServer  # noqa: E402

from pools.download import HubError, main, summarize_shards  # noqa: E402
from pools.format import Pool, validate_pool  # noqa: E402
from pools.synth import SynthConfig, encode_jpeg, generate, render_concept  # noqa: E402

REPO = "mlfoundations/datacomp_small"


def _hub_repo(pool: Path, dest: Path, npz: bool) -> Path:
    """The pool's metadata laid out as on the hub (xlarge-style part_0/ subfolder included)."""
    for p in Pool(pool).metadata_dir.iterdir():
        if p.suffix == ".parquet" or (npz and p.suffix == ".npz"):
            (dest / "part_0").mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest / "part_0" / p.name)
    (dest / "README.md").write_text("a stand-in dataset card\n")
    return dest


def test_metadata_from_the_hub_is_verified_and_resumable(tmp_path):
    src = tmp_path / "src"
    generate(src, SynthConfig(samples=150, seed=2, rows_per_file=60, images=False, random_scores=True))
    repo = _hub_repo(src, tmp_path / "repo", npz=True)
    root = tmp_path / "pool"
    with HubServer({REPO: repo}) as hub:
        args = ["--scale", "small", "--data-root", str(root), "--npz", "--skip-images", "--hf-endpoint", hub.url]
        first = main(args)["metadata"]
        assert first["files"] == 6 and first["downloaded"] == 6
        for p in Pool(src).metadata_dir.iterdir():
            assert (root / "metadata" / p.name).read_bytes() == p.read_bytes()  # flattened, identical
        assert validate_pool(root)["rows"] == 150
        assert not (root / "metadata" / "README.md").exists()

        # a damaged file is fetched again; the others are not
        victim = sorted((root / "metadata").glob("*.parquet"))[0]
        victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
        hub.requests.clear()
        second = main(args)["metadata"]
        assert second["downloaded"] == 1 and second["already_present"] == 5
        assert [r for r in hub.requests if r.startswith("GET /datasets")] == \
            [f"GET /datasets/{REPO}/resolve/main/part_0/{victim.name}"]
        assert victim.read_bytes() == (Pool(src).metadata_dir / victim.name).read_bytes()
        # a finished download downloads nothing
        hub.requests.clear()
        assert main(args)["metadata"]["downloaded"] == 0
        assert not [r for r in hub.requests if "/resolve/" in r]

    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(HubError, match="could not reach the Hugging Face hub"):
        main(["--scale", "small", "--data-root", str(tmp_path / "x"), "--skip-images",
              "--hf-endpoint", closed])
    with pytest.raises(HubError, match="no .parquet files"):
        with HubServer({REPO: tmp_path / "empty"}) as empty:
            (tmp_path / "empty").mkdir()
            main(["--scale", "small", "--data-root", str(tmp_path / "y"), "--skip-images",
                  "--hf-endpoint", empty.url])


@pytest.mark.slow
def test_download_a_pool_over_loopback_end_to_end(tmp_path):
    images = ImageServer({}, delay=6).start()
    try:
        src = tmp_path / "src"
        generate(src, SynthConfig(samples=120, seed=4, rows_per_file=60, images=False, url_base=images.url))
        truth = pq.read_table(src / "ground_truth.parquet").to_pydict()
        uids = truth["uid"]
        ok = [u for u, d in zip(uids, truth["downloaded"]) if d]
        missing = [u for u, d in zip(uids, truth["downloaded"]) if not d]  # 404
        slow, corrupt = set(ok[:3]), set(ok[3:6])
        good = set(ok) - slow - corrupt
        rng = np.random.default_rng(0)
        for u, c in zip(uids, truth["concept"]):
            if u in ok:
                images.images[f"{u}.jpg"] = encode_jpeg(render_concept(int(c), rng, width=96, height=80))
        images.slow = {f"{u}.jpg" for u in slow}
        images.corrupt = {f"{u}.jpg" for u in corrupt}
        repo = _hub_repo(src, tmp_path / "repo", npz=False)
        root = tmp_path / "pool"
        with HubServer({REPO: repo}) as hub:
            args = ["--scale", "small", "--data-root", str(root), "--hf-endpoint", hub.url,
                    "--processes-count", "1", "--thread-count", "8", "--shard-size", "50",
                    "--retries", "0", "--timeout", "3"]
            summary = main(args)
            shards = summary["images"]
            assert shards["count"] == 120 and shards["accounted"], shards
            assert shards["successes"] == len(good)
            assert shards["failed_to_download"] == len(missing) + len(slow)  # 404s and timeouts
            assert shards["failed_to_resize"] == len(corrupt)  # bytes that do not decode
            # img2dataset shards each input parquet on its own: 2 files of 60 rows -> 50 + 10 each
            assert shards["shards"] == 4 and not shards["unfinished_shards"]
            assert sum(shards["failure_reasons"].values()) == 120 - len(good)

            # the pool validates, its shards hold exactly the good images, each with its uid
            assert validate_pool(root)["shard_samples"] == len(good)
            import webdataset as wds
            got = {s["json"]["uid"]: s for s in
                   wds.WebDataset([str(p) for p in Pool(root).shard_files()], shardshuffle=False).decode("pil")}
            assert set(got) == good
            assert all(s["jpg"].size == (96, 80) for s in got.values())  # not upscaled
            status = pa.concat_tables(pq.read_table(p) for p in sorted(Pool(root).shards_dir.glob("*.parquet")))
            by_uid = dict(zip(status.column("uid").to_pylist(), status.column("status").to_pylist()))
            assert set(by_uid) == set(uids)  # every row accounted for, failed URLs included
            assert {u for u, s in by_uid.items() if s != "success"} == set(missing) | slow | corrupt
            assert json.loads((root / "download_summary.json").read_text())["images"]["successes"] == len(good)

            # a rerun fetches nothing new: no image requests, no metadata downloads
            images.requests.clear()
            hub.requests.clear()
            again = main(args)
            assert images.requests == []
            assert again["metadata"]["downloaded"] == 0
            assert again["images"]["successes"] == len(good)
            assert summarize_shards(Pool(root).shards_dir)["count"] == 120
    finally:
        images.stop()
