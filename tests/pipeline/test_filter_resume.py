"""Killed runs resume to byte-identical outputs; stored signals are reused and invalidated right."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.filter import main

STRATEGIES = ["no_filter", "basic", "text", "laion", "clip"]


@pytest.fixture(scope="module")
def many_files_pool(tmp_path_factory):
    from pools.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("resume") / "pool"
    generate(out, SynthConfig(samples=24_000, seed=5, rows_per_file=100, images=False, random_scores=True))
    return out


def _cmd(pool, out, signals, *extra):
    return [sys.executable, "-m", "pipeline.filter", "--pool", str(pool), "--strategy", *STRATEGIES,
            "--out", str(out), "--signals-dir", str(signals), *extra]


def _kill_midway(cmd, signals: Path, total: int, *, at_least: int) -> int:
    """Start `cmd`, SIGKILL its whole process group once `at_least` signals files exist."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if signals.is_dir() and len(list(signals.glob("[!.]*.parquet"))) >= at_least:
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list(signals.glob("[!.]*.parquet")))
    assert at_least <= done < total, f"the run was not caught mid-way ({done} of {total} files)"
    return done


def _outputs(out: Path) -> dict[str, bytes]:
    return {s: (out / f"{s}.npy").read_bytes() for s in STRATEGIES}


@pytest.fixture(scope="module")
def clean_run(many_files_pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    main(["--pool", str(many_files_pool), "--strategy", *STRATEGIES, "--out", str(out), "--executor", "local",
          "--signals-dir", str(out / "signals"), "--quiet"])
    return out


@pytest.mark.parametrize("executor", ["local", "ray", "auto"])
def test_killed_run_resumes_to_identical_files(many_files_pool, clean_run, tmp_path, executor):
    out, signals = tmp_path / "out", tmp_path / "signals"
    extra = ("--executor", executor, "--num-workers", "2")
    _kill_midway(_cmd(many_files_pool, out, signals, *extra), signals, total=240, at_least=12)
    assert not any(out.glob("*.npy"))  # nothing half-written is left as if finished
    proc = subprocess.run(_cmd(many_files_pool, out, signals, *extra, "--quiet"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _outputs(out) == _outputs(clean_run)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["signals"]["files_reused"] >= 12
    if executor == "ray":
        assert set(manifest["signals"]["computed_by"]) == {"ray"}
    assert manifest["signals"]["files_computed"] + manifest["signals"]["files_reused"] == 240
    # the signals themselves equal the clean run's, file for file
    for path in sorted(signals.glob("[!.]*.parquet"))[:20]:
        assert pq.read_table(path).equals(pq.read_table(clean_run / "signals" / path.name))


def test_rerun_reuses_and_recomputes_only_what_changed(tmp_path):
    from pools.synth import SynthConfig, generate

    pool = tmp_path / "pool"
    generate(pool, SynthConfig(samples=900, seed=8, rows_per_file=300, images=False, random_scores=True))
    out = tmp_path / "out"
    common = ["--pool", str(pool), "--out", str(out), "--executor", "local", "--quiet"]
    main(common + ["--strategy", "basic"])
    first = json.loads((out / "manifest.json").read_text())
    assert first["signals"]["files_computed"] == 3
    assert (pool / "signals").is_dir()  # the pool's own signals table by default
    before = (out / "basic.npy").read_bytes()

    main(common + ["--strategy", "basic"])
    again = json.loads((out / "manifest.json").read_text())
    assert again["signals"]["files_computed"] == 0 and again["signals"]["files_reused"] == 3
    assert (out / "basic.npy").read_bytes() == before

    # a new strategy computes only its own group
    from pipeline.signals import read_signals_header

    sig = sorted((pool / "signals").glob("*.parquet"))[0]
    lid_key = read_signals_header(sig)["groups"]["fasttext"]
    main(common + ["--strategy", "text"])
    header = read_signals_header(sig)
    assert header["groups"]["fasttext"] == lid_key and "entity" in header["groups"]

    # editing one metadata file recomputes that file only
    meta = sorted((pool / "metadata").glob("*.parquet"))[1]
    table = pq.read_table(meta)
    texts = table.column("text").to_pylist()
    texts[0] = "a red star printed on a shirt"
    import pyarrow as pa

    pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts)), meta)
    main(common + ["--strategy", "basic", "text"])
    last = json.loads((out / "manifest.json").read_text())
    assert last["signals"]["files_computed"] == 1 and last["signals"]["files_reused"] == 2

    # a stale temporary file from a killed run is ignored
    (pool / "signals" / ".x.parquet.tmp-deadbeef.parquet").write_bytes(b"partial")
    main(common + ["--strategy", "basic"])
    assert np.load(out / "basic.npy").dtype == np.dtype("u8,u8")


def test_lid_model_change_invalidates_caption_signals(tmp_path):
    from pipeline.models import fasttext_lid_model_path
    from pools.synth import SynthConfig, generate

    pool = tmp_path / "pool"
    generate(pool, SynthConfig(samples=300, seed=9, rows_per_file=300, images=False, random_scores=True))
    common = ["--pool", str(pool), "--out", str(tmp_path / "out"), "--executor", "local", "--quiet",
              "--strategy", "basic"]
    main(common)
    copy = tmp_path / "lid.176.ftz"
    shutil.copy(fasttext_lid_model_path(), copy)
    os.utime(copy, (1, 1))  # same model, another file: another fingerprint
    main(common + ["--lid-model", str(copy)])
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["signals"]["files_computed"] == 1
    assert m["models"]["fasttext"]["path"] == str(copy)


