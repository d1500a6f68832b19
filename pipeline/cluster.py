"""Starting or joining Ray: the one place every command does it.

    join_ray(address=None, num_cpus=2)     # a new local Ray of this process's own
    join_ray(address="ray://head:10001")   # a running cluster (or RAY_ADDRESS in the environment)

Without an address a command starts its own local instance (``address="local"``), even when
another job's Ray runs on the machine: a user's run neither breaks on someone else's Ray
(``ray.init()`` would join it and refuse ``num_cpus``) nor silently borrows its CPUs.

A local instance gets a watchdog: a small process that remembers every descendant of this
process (Ray's GCS, raylet, agents and workers) and kills them when this process ends
without shutting Ray down (``kill -9``, an OOM kill). Ray's own agents otherwise outlive a
killed driver by about a minute.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

RAY_ADDRESS_ENV = "RAY_ADDRESS"
_WATCH_INTERVAL_S = 0.3
_watchdog: subprocess.Popen | None = None


class RayStartError(RuntimeError):
    """Ray could not be started or reached; the message says what to try."""


def join_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             system_config: dict | None = None) -> bool:
    """Connect this process to Ray unless it already is; returns True when it started Ray here.

    `address` (or $RAY_ADDRESS): a running cluster to join; None: a new local instance with
    `num_cpus`/`num_gpus` (and Ray `system_config` options), watched so that it dies with us.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get(RAY_ADDRESS_ENV) or None
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if address:
            _check_reachable(address)
            ray.init(address=address, **kwargs)
            return False
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, _system_config=system_config or {},
                 **kwargs)
    except RayStartError:
        raise
    except Exception as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise RayStartError(f"cannot start or reach {where} ({type(exc).__name__}: {exc}); check --ray-address "
                            f"or ${RAY_ADDRESS_ENV} (`auto` finds a cluster started on this machine with "
                            "`ray start --head`), or run without Ray") from exc
    _start_watchdog()
    return True


def current_node() -> str:
    """Where this code runs: the Ray node id inside a Ray worker, else ``local:<host>``.
    Recorded per unit of work in the manifests, so a run says which nodes did it."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    import socket

    return f"local:{socket.gethostname()}"


def leave_ray() -> None:
    """Shut down a Ray this process started or joined (nothing when it has none)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when a ``host:port`` address does not answer (Ray itself
    retries for about a minute)."""
    import socket

    target = address.split("://", 1)[-1]
    if address in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise RayStartError(f"no Ray cluster answers at {address} ({exc}); start one with `ray start --head` "
                            "or check the address") from None


def _start_watchdog() -> None:
    global _watchdog
    if _watchdog is not None and _watchdog.poll() is None:
        return
    # stdin is a pipe only this process holds open: the watchdog sees its end when we die
    _watchdog = subprocess.Popen([sys.executable, "-m", "pipeline.cluster", str(os.getpid())],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 cwd=str(Path(__file__).resolve().parents[1]), close_fds=True,
                                 start_new_session=True)


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        table[int(entry)] = (int(fields[1]), fields[19])  # ppid, starttime
    return table


def _descendants(root: int, table: dict[int, tuple[int, str]]) -> dict[int, str]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = {}, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        out[pid] = table[pid][1]
        stack.extend(children.get(pid, []))
    return out


def watch(driver: int) -> None:
    """The watchdog's loop: remember the driver's descendants until stdin closes, then kill
    those still running (the same pid and start time: never a recycled pid)."""
    seen: dict[int, str] = {}
    me = os.getpid()
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], _WATCH_INTERVAL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # the driver is gone (or closed the pipe on exit)
        table = _process_table()
        if driver not in table:
            break
        seen.update({pid: start for pid, start in _descendants(driver, table).items() if pid != me})
    time.sleep(_WATCH_INTERVAL_S)  # a Ray shut down as the driver exits normally goes on its own
    table = _process_table()
    for pid, start in seen.items():
        if pid in table and table[pid][1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))
