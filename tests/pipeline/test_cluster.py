"""Starting Ray: a command's own local instance, which dies with it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

DRIVER = """
import sys, time
from pipeline.cluster import join_ray
import ray
join_ray(num_cpus=1)
@ray.remote
def pid():
    import os
    return os.getpid()
print(ray.get(pid.remote()), ray.get_runtime_context().gcs_address, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(root: int) -> set[int]:
    from pipeline.cluster import _descendants, _process_table

    return set(_descendants(root, _process_table()))


@pytest.mark.slow
def test_a_killed_driver_leaves_no_ray_process_running():
    """kill -9 of a process that started a local Ray: within seconds nothing it started runs
    (Ray's own agents otherwise outlive it by about a minute)."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(driver.stdout.readline().split()[0])
        time.sleep(1.0)  # the watchdog has seen every process by now
        started = _descendants(driver.pid)
        assert worker_pid in started and len(started) >= 4  # gcs, raylet, agents, the worker, the watchdog
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(p) for p in started):
            time.sleep(0.2)
        assert not [p for p in started if _alive(p)]
    finally:
        if driver.poll() is None:
            driver.kill()


@pytest.mark.slow
def test_a_command_starts_its_own_ray_beside_another_jobs():
    """Another job's local Ray on the machine is neither joined nor a reason to fail."""
    other = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        _, other_gcs = other.stdout.readline().split()
        probe = subprocess.run([sys.executable, "-c", DRIVER.replace("time.sleep(600)", "")], cwd=ROOT,
                               capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
        assert probe.returncode == 0, probe.stderr[-2000:]
        _, own_gcs = probe.stdout.split()
        assert own_gcs != other_gcs
    finally:
        other.kill()
        other.wait()
