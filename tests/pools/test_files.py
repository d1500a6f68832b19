"""Atomic outputs: temporary names say who writes them, and a killed run's are removed."""

import os
import socket
import subprocess
import sys

import pytest

from pools.files import atomic_path, remove_stale_temporaries


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writers_temporaries_go_a_live_or_remote_ones_stay(tmp_path):
    host = socket.gethostname()
    dead = _dead_pid()
    stale = tmp_path / f".clip.npy.tmp-{dead}@{host}-0123abcd.npy"
    live = tmp_path / f".clip.npy.tmp-{os.getpid()}@{host}-0123abcd.npy"
    remote = tmp_path / f".clip.npy.tmp-{dead}@another-machine-0123abcd.npy"
    mine = tmp_path / "clip.npy"
    for p in (stale, live, remote, mine):
        p.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and live.exists() and remote.exists() and mine.exists()
    assert remove_stale_temporaries(tmp_path / "absent") == 0


def test_atomic_path_names_its_writer_and_cleans_up_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.json") as tmp:
            assert tmp.name.startswith(f".out.json.tmp-{os.getpid()}@{socket.gethostname()}-")
            assert tmp.name.endswith(".json")
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_reshard_into_a_folder_a_killed_run_left_temporaries_in(small_pool, tmp_path):
    """A reshard killed while writing its first shard leaves only a temporary: the rerun
    removes it instead of calling the folder "not empty"."""
    import numpy as np

    from pipeline.reshard import main
    from pools.uids import uids_to_records, write_subset

    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".00000000.tar.tmp-{_dead_pid()}@{socket.gethostname()}-0123abcd.tar"
    stale.write_bytes(b"half a tar")
    subset = tmp_path / "s.npy"
    write_subset(subset, uids_to_records(["ab" * 16]))
    meta = main(["--pool", str(small_pool), "--subset", str(subset), "--out", str(out), "--executor", "local"])
    assert meta["output_count"] == 0 and not stale.exists()
    assert np.load(out / "sample_ids.npy").shape == (1,)
