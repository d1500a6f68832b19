import hashlib
import json
import tarfile
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

import pipeline.execution as execution_mod
import pipeline.reshard as reshard_mod
from pipeline.execution import Execution
from pipeline.reshard import InputShard, ReshardConfig, discover_shards, main, plan_tasks, reshard
from pools.format import Pool
from pools.uids import UID_DTYPE, uids_to_records, write_subset
from trainer.data import ShardStream, StreamSpec, expand_shards, iter_tar_samples

SHARD_SIZE = 40  # small output shards, so several are written and the size cap is exercised


def _tar_samples(path):
    """{key: {ext: bytes}} of one tar, read with tarfile (independent of the code under test)."""
    out = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _input_by_uid(pool):
    by_uid = {}
    for shard in Pool(pool).shard_files():
        for files in _tar_samples(shard).values():
            by_uid[json.loads(files["json"])["uid"]] = files
    return by_uid


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.name != "meta.json"}


@pytest.fixture(scope="module")
def subset(small_pool, tmp_path_factory):
    """A subset with duplicates, uids whose download failed, and uids foreign to the pool.

    Returns (subset path, {uid: times listed}, set of uids present in the shards).
    """
    truth = pq.read_table(small_pool / "ground_truth.parquet").to_pydict()
    downloaded = [u for u, ok in zip(truth["uid"], truth["downloaded"]) if ok]
    failed = [u for u, ok in zip(truth["uid"], truth["downloaded"]) if not ok]
    rng = np.random.default_rng(0)
    picked = rng.choice(downloaded, size=150, replace=False).tolist()
    multiplicity = {u: 1 for u in picked}
    for u in picked[:20]:
        multiplicity[u] = 2
    for u in picked[20:25]:
        multiplicity[u] = 3
    for u in failed[:6]:
        multiplicity[u] = 1
    foreign = ["ab" * 16, "0" * 31 + "7", "f" * 32]
    for u in foreign:
        multiplicity[u] = 2 if u == foreign[0] else 1
    listed = [u for u, k in multiplicity.items() for _ in range(k)]
    rng.shuffle(listed)
    path = tmp_path_factory.mktemp("subset") / "subset.npy"
    write_subset(path, uids_to_records(listed))
    return path, multiplicity, set(downloaded)


def test_reshard_counts_bytes_and_meta(small_pool, subset, tmp_path):
    path, multiplicity, present = subset
    out = tmp_path / "out"
    meta = main(["--pool", str(small_pool), "--subset", str(path), "--out", str(out),
                 "--shard-size", str(SHARD_SIZE), "--executor", "local", "-j", "2"])

    expected = {u: k for u, k in multiplicity.items() if u in present}
    listed = sum(multiplicity.values())
    assert meta["output_count"] == sum(expected.values()) == 150 + 20 + 2 * 5
    assert meta["selected_count"] == len(expected) == 150
    assert meta["subset_size"] == listed
    assert meta["subset_uids_not_found"] == listed - sum(expected.values()) == 6 + 4
    assert meta["subset_unique_uids"] == len(multiplicity)
    assert meta["subset_unique_uids_not_found"] == 6 + 3
    total_in = sum(Pool(small_pool).shard_stats(s)["successes"] for s in Pool(small_pool).shard_files())
    assert meta["processed_count"] == total_in
    assert meta["processed_count"] == (meta["selected_count"] + meta["dropped_not_in_subset"]
                                       + meta["dropped_no_json"] + meta["dropped_bad_uid"])

    shards = sorted(out.glob("*.tar"))
    assert [p.name for p in shards] == [f"{i:08d}.tar" for i in range(meta["output_shard_count"])]
    inputs = _input_by_uid(small_pool)
    seen = {}
    for shard in shards:
        samples = _tar_samples(shard)
        stats = json.loads(shard.with_name(shard.stem + "_stats.json").read_text())
        assert stats == {"successes": len(samples)}
        assert 0 < len(samples) <= SHARD_SIZE
        for key, files in samples.items():
            uid, j = key.rsplit("-", 1)
            seen.setdefault(uid, []).append(int(j))
            assert files == inputs[uid]  # every file, byte for byte, no re-encoding
    assert {u: sorted(js) for u, js in seen.items()} == {u: list(range(k)) for u, k in expected.items()}
    # the subset is copied beside the shards, as the reference does
    assert (out / "sample_ids.npy").read_bytes() == path.read_bytes()
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["output_shard_count"] == len(shards)
    assert on_disk["output_shard_format"] == "{:08d}.tar"


def test_ray_gives_the_same_files_and_the_trainer_reads_them(small_pool, subset, tmp_path):
    path, multiplicity, present = subset
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    base = ["--pool", str(small_pool), "--subset", str(path), "--shard-size", str(SHARD_SIZE), "-j", "2"]
    main(base + ["--out", str(local), "--executor", "local"])
    meta = main(base + ["--out", str(ray_out)])
    assert meta["tasks"] == 2
    assert _digest(local) == _digest(ray_out)

    # What a trainer does with a resharded folder (DataComp's train.py does the same): read
    # meta.json, expand {0..N-1} with output_shard_format, stream, decode.
    urls = [str(ray_out / meta["output_shard_format"].format(i)) for i in range(meta["output_shard_count"])]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json")
    n = 0
    for image, text, info in ds:
        assert image.size[0] > 0 and isinstance(text, str) and info["uid"] in present
        n += 1
    assert n == meta["output_count"]

    # Our trainer's shard lister, reader and stream on the same folder: every copy of every
    # selected sample, and batches with nothing skipped.
    assert expand_shards(str(ray_out)) == urls
    keys = [key for url in urls for key, _ in iter_tar_samples(url)]
    assert len(keys) == meta["output_count"]
    copies = {}
    for key in keys:
        uid, j = key.rsplit("-", 1)
        copies.setdefault(uid, []).append(int(j))
    assert {u: sorted(js) for u, js in copies.items()} == {
        u: list(range(k)) for u, k in multiplicity.items() if u in present}
    stream = ShardStream(StreamSpec(shards=tuple(urls), seed=0, epoch=0, rank=0, local_batches=(16, 16),
                                    shuffle_buffer=50),
                         preprocess=lambda im: torch.from_numpy(np.asarray(im.resize((8, 8)), np.float32)),
                         tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long))
    steps = list(stream)
    assert [(step, images.shape, tokens.shape[0]) for step, images, tokens, _ in steps] == [
        (0, (16, 8, 8, 3), 16), (1, (16, 8, 8, 3), 16)]
    counters = sum((Counter(c) for *_, c in steps), Counter())
    assert counters["samples"] == 32 and not any(k.startswith("skipped") for k in counters)


def test_rerun_resumes_and_finished_output_is_left_alone(small_pool, subset, tmp_path, monkeypatch):
    path, _, _ = subset
    out, ref = tmp_path / "out", tmp_path / "ref"
    shards, _ = discover_shards(Pool(small_pool).shards_dir)
    cfg = ReshardConfig(input_dir=Pool(small_pool).shards_dir, subset_file=path, output_dir=out,
                        shard_size=SHARD_SIZE, execution=Execution("local", num_workers=3))
    reshard(ReshardConfig(**{**cfg.__dict__, "output_dir": ref}))

    calls, kill = [], {2}
    real_task = reshard_mod.reshard_task

    def counted_task(task, *args):
        calls.append(task.task_id)
        if task.task_id in kill:
            raise RuntimeError("killed")
        return real_task(task, *args)

    monkeypatch.setattr(reshard_mod, "reshard_task", counted_task)
    monkeypatch.setattr(execution_mod, "PROCESS_START_S", 1e9)  # every task in this process: counted
    with pytest.raises(RuntimeError, match="killed"):
        reshard(cfg)
    assert calls == [0, 1, 2]
    assert not (out / "meta.json").exists()

    calls.clear()
    kill.clear()
    meta = reshard(cfg)
    assert calls == [2]  # tasks 0 and 1 left their markers and are not redone
    assert _digest(out) == _digest(ref)
    assert not (out / "_parts").exists()

    calls.clear()
    assert reshard(cfg)["output_count"] == meta["output_count"]
    assert calls == []  # finished: nothing to do

    other = tmp_path / "other.npy"
    write_subset(other, uids_to_records(["ab" * 16]))
    with pytest.raises(FileExistsError, match="different reshard"):
        reshard(ReshardConfig(**{**cfg.__dict__, "subset_file": other}))


def test_refuses_foreign_output_and_unsorted_subset(small_pool, subset, tmp_path):
    path, _, _ = subset
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        main(["--pool", str(small_pool), "--subset", str(path), "--out", str(busy), "--executor", "local"])
    assert (busy / "notes.txt").read_text() == "mine"

    unsorted = tmp_path / "unsorted.npy"
    np.save(unsorted, uids_to_records(["f" * 32, "0" * 32]))
    with pytest.raises(ValueError, match="not sorted"):
        main(["--pool", str(small_pool), "--subset", str(unsorted), "--out", str(tmp_path / "o"), "--executor", "local"])


def test_raw_memmap_subset_and_missing_stats(small_pool, tmp_path):
    """A headerless u8,u8 file works; a shard without _stats.json is skipped and reported."""
    shards_dir = tmp_path / "shards"
    shards_dir.mkdir()
    for p in Pool(small_pool).shards_dir.iterdir():
        if p.name == "00000002_stats.json":
            continue  # as if img2dataset was killed before finishing shard 2
        (shards_dir / p.name).write_bytes(p.read_bytes())
    truth = pq.read_table(small_pool / "ground_truth.parquet").to_pydict()
    uids = sorted(u for u, ok in zip(truth["uid"], truth["downloaded"]) if ok)[:30]
    raw = tmp_path / "subset.bin"
    np.sort(uids_to_records(uids)).tofile(raw)
    assert np.fromfile(raw, dtype=UID_DTYPE).shape == (30,)
    meta = main(["-i", str(shards_dir), "-s", str(raw), "-o", str(tmp_path / "out"), "--executor", "local"])
    assert meta["input_shards_skipped"] == ["00000002.tar"]
    shard_of = dict(zip(truth["uid"], truth["shard"]))
    assert meta["output_count"] == sum(1 for u in uids if shard_of[u] != 2)
    assert meta["subset_uids_not_found"] == sum(1 for u in uids if shard_of[u] == 2)


def test_plan_tasks_splits_contiguously_by_samples():
    sizes = [100, 100, 5, 300, 100, 100]
    shards, start = [], 0
    for i, s in enumerate(sizes):
        shards.append(InputShard(i, f"{i}.tar", s, start))
        start += s
    for n in range(1, 8):
        tasks = plan_tasks(shards, n)
        flat = [s.shard_id for t in tasks for s in t.shards]
        assert flat == list(range(len(sizes)))  # every shard once, in order
        assert 1 <= len(tasks) <= n
        assert [t.task_id for t in tasks] == list(range(len(tasks)))
    # the reference cuts at the first shard starting at or after each multiple of ceil(705/2)
    assert [len(t.shards) for t in plan_tasks(shards, 2)] == [4, 2]


def _run_cli(*args):
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run([sys.executable, "-m", "pipeline.reshard", *map(str, args)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(n in line for n in needles), line
    return line


def test_malformed_subset_files_get_one_line_errors(small_pool, subset, tmp_path):
    path, _, _ = subset
    good = np.load(path)
    cases = {
        "wrong_dtype.npy": lambda p: np.save(p, np.arange(10, dtype=np.int64)),
        "two_d.npy": lambda p: np.save(p, np.stack([good[:4], good[4:8]])),
        "unsorted.npy": lambda p: np.save(p, good[::-1]),
        "truncated.npy": lambda p: p.write_bytes(path.read_bytes()[:200]),
        "uids.txt": lambda p: p.write_text("".join(f"{u:032x}\n" for u in range(1, 4))),  # 3 x 33 bytes
        "objects.npy": lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
    }
    wants = {"wrong_dtype.npy": "dtype is int64", "two_d.npy": "one-dimensional", "unsorted.npy": "not sorted",
             "truncated.npy": "not a readable .npy", "uids.txt": "a text file",
             "objects.npy": "not a readable .npy"}
    for name, make in cases.items():
        bad = tmp_path / name
        make(bad)
        _one_line_error(_run_cli("--pool", small_pool, "--subset", bad, "--out", tmp_path / f"out_{name}",
                                 "--executor", "local"), str(bad), wants[name])


@pytest.mark.parametrize("use_ray", [False, True])
def test_an_unreadable_shard_is_named(small_pool, subset, tmp_path, use_ray):
    path, _, _ = subset
    for damage, write in (("truncated", lambda p, raw: p.write_bytes(raw[:len(raw) // 3 + 100])),
                          ("random", lambda p, raw: p.write_bytes(np.random.default_rng(0).bytes(4096)))):
        if use_ray and damage == "random":
            continue  # one Ray case is enough to show the cause comes back as one line
        shards_dir = tmp_path / f"shards_{damage}_{use_ray}"
        shards_dir.mkdir()
        for p in Pool(small_pool).shards_dir.iterdir():
            (shards_dir / p.name).write_bytes(p.read_bytes())
        bad = shards_dir / "00000001.tar"
        write(bad, bad.read_bytes())
        proc = _run_cli("-i", shards_dir, "-s", path, "-o", tmp_path / f"out_{damage}_{use_ray}",
                        "-j", "2", "--executor", "ray" if use_ray else "local")
        _one_line_error(proc, str(bad), "truncated?" if damage == "truncated" else "not a readable tar")


def _copy_shards(small_pool, folder, skip=()):
    folder.mkdir()
    for p in Pool(small_pool).shards_dir.iterdir():
        if not any(p.name.startswith(s) for s in skip):
            (folder / p.name).write_bytes(p.read_bytes())
    return folder


def _accounted(meta):
    """Every input sample is read and counted with its outcome, or belongs to a failed shard."""
    assert meta["processed_count"] == (meta["selected_count"] + meta["dropped_not_in_subset"]
                                       + meta["dropped_no_json"] + meta["dropped_bad_uid"]
                                       + meta["dropped_duplicate_uid"])
    assert meta["processed_count"] + meta["input_samples_failed"] == meta["expected_input_samples"]


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_on_bad_shard_skip_leaves_the_shard_out_whole(small_pool, subset, tmp_path, damage):
    """The output equals a reshard of the pool without the bad shard, which is listed with its reason."""
    path, _, _ = subset
    shards_dir = _copy_shards(small_pool, tmp_path / "shards")
    bad = shards_dir / "00000001.tar"
    raw = bad.read_bytes()
    bad.write_bytes(raw[:len(raw) // 3 + 100] if damage == "truncated" else np.random.default_rng(0).bytes(4096))
    without = _copy_shards(small_pool, tmp_path / "without", skip=("00000001",))
    args = ["-s", str(path), "--shard-size", str(SHARD_SIZE), "-j", "3", "--executor", "local"]
    meta = main(["-i", str(shards_dir), "-o", str(tmp_path / "out"), "--on-bad-shard", "skip", *args])
    ref = main(["-i", str(without), "-o", str(tmp_path / "ref"), *args])
    assert _digest(tmp_path / "out") == _digest(tmp_path / "ref")
    expected = json.loads((shards_dir / "00000001_stats.json").read_text())["successes"]
    assert [(f["shard"], f["expected_samples"]) for f in meta["input_shards_failed"]] == [("00000001.tar", expected)]
    assert ("truncated?" if damage == "truncated" else "not a readable tar") in meta["input_shards_failed"][0]["reason"]
    assert meta["input_samples_failed"] == expected
    assert meta["output_count"] == ref["output_count"] and meta["processed_count"] == ref["processed_count"]
    _accounted(meta)


def _add_copy_of_shard(shards_dir, source_id, new_id):
    for suffix in (".tar", "_stats.json"):
        (shards_dir / f"{new_id:08d}{suffix}").write_bytes((shards_dir / f"{source_id:08d}{suffix}").read_bytes())


def test_a_uid_in_two_shards_is_an_error_naming_both_or_kept_once(small_pool, subset, tmp_path):
    path, multiplicity, present = subset
    shards_dir = _copy_shards(small_pool, tmp_path / "shards")
    _add_copy_of_shard(shards_dir, 0, 3)  # shard 0 copied under a new id: every uid of it twice
    proc = _run_cli("-i", shards_dir, "-s", path, "-o", tmp_path / "err", "-j", "2", "--executor", "local")
    _one_line_error(proc, f"{shards_dir}/00000000.tar (sample ", f"{shards_dir}/00000003.tar (sample ",
                    "--on-duplicate-uid keep-first")

    args = ["-s", str(path), "--shard-size", str(SHARD_SIZE), "-j", "2"]
    meta = main(["-i", str(shards_dir), "-o", str(tmp_path / "out"), "--on-duplicate-uid", "keep-first",
                 "--executor", "local", *args])
    ref = main(["-i", str(Pool(small_pool).shards_dir), "-o", str(tmp_path / "ref"), "--executor", "local", *args])
    assert _digest(tmp_path / "out") == {k: v for k, v in _digest(tmp_path / "ref").items()}
    copied = sum(1 for files in _tar_samples(shards_dir / "00000000.tar").values()
                 if json.loads(files["json"])["uid"] in multiplicity)
    assert meta["dropped_duplicate_uid"] == copied > 0
    for key in ("selected_count", "output_count", "subset_uids_not_found", "subset_unique_uids_not_found"):
        assert meta[key] == ref[key], key  # true counts whatever the shards hold
    _accounted(meta)
    # the same through Ray, and a rerun over the finished output changes nothing
    ray_meta = main(["-i", str(shards_dir), "-o", str(tmp_path / "ray"), "--on-duplicate-uid", "keep-first", *args])
    assert _digest(tmp_path / "ray") == _digest(tmp_path / "out")
    assert ray_meta["dropped_duplicate_uid"] == copied


def test_members_with_crafted_names_are_skipped_and_counted(small_pool, subset, tmp_path):
    """`../../x.jpg` members with a real uid's json are not written as extra copies, nor outside --out."""
    path, multiplicity, present = subset
    shards_dir = _copy_shards(small_pool, tmp_path / "shards")
    target = shards_dir / "00000002.tar"
    uid = next(u for u in multiplicity if u in present)
    import io

    with tarfile.open(target, "a") as tar:
        for name, data in (("../../evil.jpg", b"x"), ("../../evil.json", json.dumps({"uid": uid}).encode()),
                           ("/tmp/evil.txt", b"t")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    args = ["-s", str(path), "--shard-size", str(SHARD_SIZE), "--executor", "local"]
    meta = main(["-i", str(shards_dir), "-o", str(tmp_path / "deep" / "out"), *args])
    ref = main(["-i", str(Pool(small_pool).shards_dir), "-o", str(tmp_path / "ref"), *args])
    assert meta["members_skipped_bad_name"] == 3
    assert _digest(tmp_path / "deep" / "out") == _digest(tmp_path / "ref")
    assert meta["output_count"] == ref["output_count"]
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["out"]
    _accounted(meta)


def test_datacomp_debug_shows_the_traceback(small_pool, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    bad = tmp_path / "wrong_dtype.npy"
    np.save(bad, np.arange(10, dtype=np.int64))
    args = [sys.executable, "-m", "pipeline.reshard", "--pool", str(small_pool), "--subset", str(bad),
            "--out", str(tmp_path / "out"), "--executor", "local"]
    cwd = Path(__file__).resolve().parents[2]
    quiet = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    _one_line_error(quiet, str(bad), "dtype is int64")
    loud = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env={**os.environ, "DATACOMP_DEBUG": "1"})
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "ReshardError" in loud.stderr
