"""Running the signals pass: a Ray Data job, with helper processes covering Ray's start-up.

`run_ray` is what ``pipeline.filter`` uses by default:

- a thread owns Ray's whole life: it starts a local Ray (or connects to ``--ray-address``),
  submits a Ray Data job over the files still unclaimed once Ray is up (``map_batches`` over a
  pool of tasks; each worker process keeps one `SignalsWorker`), and shuts Ray down again;
- meanwhile, helper processes on this machine (``--helpers``, default ``--num-workers`` for
  a local Ray, 0 for a cluster) work through the files from the other end of the list, and
  stop once a Ray task has its models loaded;
- a marker per file (created with ``O_EXCL``) decides who does it; signals are written
  atomically, so a file done twice (no shared disk between nodes) is only wasted work;
- when the helpers would finish the rest sooner than a Ray Data job could start (estimated
  from their CPU time per file), no job is submitted: on a 2M-row pool on 2 cores, Ray's
  start-up is longer than the whole pass;
- Ray's shutdown runs while the caller queries the signals; `finish_ray` waits for it.

`run_local` runs the same worker in this process (``--executor local``).
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.cluster import current_node
from pipeline.signals import SignalsError, SignalsSpec, SignalsWorker
from pools.format import PoolFormatError


@dataclass(frozen=True)
class Executor:
    """Where the signals pass runs."""

    kind: str = "ray"  # "ray" (a Ray Data job) or "local" (this process, one file at a time)
    ray_address: str | None = None
    num_workers: int = max(1, os.cpu_count() or 1)
    use_gpu: bool = False
    helpers: int | None = None  # local helper processes while Ray starts (default: num_workers)



def run_local(todo, spec, executor, progress):
    """The signals of `todo` in this process, one file at a time."""
    worker = SignalsWorker(spec)
    for i, (parquet, out) in enumerate(todo, 1):
        yield {**worker.process(parquet, out), "by": "local"}
        if progress and (i == len(todo) or i % max(1, len(todo) // 10) == 0):
            print(f"signals: {i}/{len(todo)} files", file=sys.stderr)


class _Claims:
    """First come, first served: a file is processed by whoever creates its claim marker."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def claim(self, parquet: str | Path) -> bool:
        try:
            os.close(os.open(self.root / Path(parquet).name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def claimed(self, parquet: str | Path) -> bool:
        return (self.root / Path(parquet).name).exists()


def new_claims_root(signals_dir: Path) -> Path:
    """A claims folder for this run, named by this process and machine
    (``.claims-<id>-<pid>@<host>``), after removing the ones that runs killed on this machine
    left behind (their process is gone; folders of other machines sharing the disk are theirs)."""
    import uuid

    from pools.files import owner_is_dead, owner_tag

    for old in Path(signals_dir).glob(".claims-*"):
        name, _, old_host = old.name.rpartition("@")
        pid = name.rsplit("-", 1)[-1]
        if pid.isdigit() and owner_is_dead(int(pid), old_host):
            shutil.rmtree(old, ignore_errors=True)
    return Path(signals_dir) / f".claims-{uuid.uuid4().hex[:12]}-{owner_tag()}"


_TASK_WORKER: SignalsWorker | None = None


def _process_batch(batch: dict, spec: SignalsSpec, claims: str) -> dict:
    """A Ray Data task: the signals of a batch of files, skipping files claimed elsewhere.

    The worker (and its models) is kept per worker process, so each process loads fastText,
    CLD3 and WordNet once, as an actor would, without an actor pool's start-up cost.
    """
    global _TASK_WORKER
    if _TASK_WORKER is None or _TASK_WORKER.spec != spec:
        _TASK_WORKER = SignalsWorker(spec)
        _TASK_WORKER.warm_up()  # load the models before taking over from the helpers
    claim = _Claims(Path(claims))
    (claim.root / _RAY_WARM).touch()
    out = []
    for parquet, signals in zip(batch["parquet"], batch["signals"]):
        if not claim.claim(parquet):
            out.append({"file": Path(parquet).name, "status": "claimed"})
            continue
        try:
            out.append({**_TASK_WORKER.process(Path(parquet), Path(signals)), "by": "ray", "node": current_node()})
        except PoolFormatError as exc:
            # Returned, not raised: Ray Data would bury the line that names the file in its own
            # traceback of the task.
            out.append({"file": Path(parquet).name, "status": "error", "message": str(exc)})
            break
    return {"summary": [json.dumps(s) for s in out]}


_SHUTDOWN: threading.Thread | None = None


def finish_ray() -> None:
    """Wait until a Ray this module started is shut down again (call before exiting)."""
    global _SHUTDOWN
    if _SHUTDOWN is not None:
        _SHUTDOWN.join()
        _SHUTDOWN = None


_RAY_WARM = ".ray-warm"  # a Ray task has loaded its models: the helpers stop taking files


def _helper_main() -> None:
    """A helper process (see `_run_ray`): takes unclaimed files from the end of the list until a
    Ray task is ready, printing one JSON summary per file; ``python -c`` entry point, argument:
    the claims folder; the job (spec and files) comes pickled on stdin, from the parent only
    (never from a file someone else could have written)."""
    import pickle

    try:  # Ray's start-up (and its workers) come first; helpers use what CPU is left
        os.nice(5)
    except OSError:
        pass
    root = Path(sys.argv[1])
    spec, todo = pickle.load(sys.stdin.buffer)
    claims = _Claims(root)
    try:
        worker = SignalsWorker(spec)
        for parquet, out in reversed(todo):
            if (root / _RAY_WARM).exists():
                break
            if claims.claim(parquet):
                print(json.dumps({**worker.process(Path(parquet), Path(out)), "by": "helper"}), flush=True)
    except PoolFormatError as exc:
        print(json.dumps({"error": "PoolFormatError", "message": str(exc)}), flush=True)
        raise SystemExit(1)


class _Helpers:
    """Helper processes on this machine that compute signals while Ray starts."""

    def __init__(self, count: int, spec: SignalsSpec, todo: list, claims: _Claims):
        import pickle
        import subprocess

        job = pickle.dumps((spec, [(str(p), str(o)) for p, o in todo]))
        self.count = count
        self.summaries: list[dict] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._logs = [open(claims.root / f"helper-{i}.log", "w+") for i in range(count)]
        self._procs = [subprocess.Popen(
            [sys.executable, "-c", "from pipeline.execution import _helper_main; _helper_main()", str(claims.root)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log) for log in self._logs]
        for proc in self._procs:
            try:
                proc.stdin.write(job)
                proc.stdin.close()
            except BrokenPipeError:  # it died at start-up: its reader thread reports its log
                pass
        self._readers = [threading.Thread(target=self._read, args=(p, log), daemon=True)
                         for p, log in zip(self._procs, self._logs)]
        for t in self._readers:
            t.start()

    def _read(self, proc, log) -> None:
        for line in proc.stdout:
            record = json.loads(line)
            with self._lock:
                if "error" in record:
                    self.errors.append(PoolFormatError(record["message"]))
                else:
                    self.summaries.append(record)
        proc.wait()
        if proc.returncode and proc.returncode > 0 and not self.errors:
            log.seek(0)
            self.errors.append(SignalsError(f"a signals helper process failed:\n{log.read()[-3000:]}"))

    def finished(self) -> bool:
        return all(not t.is_alive() for t in self._readers)

    def take(self) -> list[dict]:
        with self._lock:
            out, self.summaries = self.summaries, []
        return out

    def wait(self) -> None:
        for t in self._readers:
            t.join()

    def stop(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        for p in self._procs:
            p.wait()
        self.wait()
        for log in self._logs:
            log.close()


class _RayRunner(threading.Thread):
    """Ray's whole life in one thread: start (or connect), run the Ray Data job over the files
    that are still unclaimed, shut down. The main thread only collects results, so it can move
    on to the queries as soon as every file is done, whether Ray is still starting or already
    shutting down."""

    # About how long a Ray Data job takes to get its first task running (worker processes,
    # imports, models); files the helper processes will finish sooner are left to them.
    JOB_STARTUP_S = 3.0

    def __init__(self, todo, spec: SignalsSpec, executor: Executor, claims: _Claims, results: "queue.Queue",
                 helpers_eta: "Callable[[int], float]"):
        super().__init__(name="ray-runner", daemon=True)
        self.todo, self.spec, self.executor, self.claims, self.results = todo, spec, executor, claims, results
        self.helpers_eta = helpers_eta  # seconds the helper processes need for n more files
        self.error: BaseException | None = None
        self.submitted = 0
        self.stop = threading.Event()  # set by the caller once every file is done

    def _remaining(self) -> list:
        """Files to give Ray once it is up: none if the helpers will be done sooner than a Ray
        Data job could start (then Ray is shut down at once and they finish alone)."""
        remaining = [(p, o) for p, o in self.todo if not self.claims.claimed(p)]
        if remaining and self.helpers_eta(len(remaining)) <= self.JOB_STARTUP_S:
            return []
        return remaining

    def run(self) -> None:
        import ray

        from pipeline.cluster import join_ray

        started_here = False
        try:
            if not ray.is_initialized():
                # A local Ray: no idle workers started in advance; the job starts its own, and
                # the helpers already use the CPUs while Ray comes up.
                join_ray(self.executor.ray_address, num_cpus=self.executor.num_workers,
                         system_config={"prestart_worker_first_driver": False})
                started_here = True
            remaining = self._remaining()
            self.submitted = len(remaining)
            if remaining and not self.stop.is_set():
                job = threading.Thread(target=self._iterate, args=(ray, remaining), name="ray-job", daemon=True)
                job.start()
                while job.is_alive() and not self.stop.is_set():
                    job.join(timeout=0.05)
                # Once every file is done, the job ends at its next result (its tasks now only
                # find files claimed by the helpers); one still starting up is cut short.
                job.join(timeout=self.JOB_STARTUP_S)
        except BaseException as exc:
            self.error = exc
        finally:
            self.results.put(None)  # end of Ray's results
            if started_here:
                ray.shutdown()

    def _iterate(self, ray, remaining) -> None:
        try:
            for row in self._dataset(ray, remaining).iter_rows():
                if self.stop.is_set():
                    break
                summary = json.loads(row["summary"])
                if summary["status"] == "error":
                    self.error = PoolFormatError(summary["message"])
                    break
                if summary["status"] != "claimed":
                    self.results.put(summary)
        except BaseException as exc:
            if not self.stop.is_set():
                self.error = exc

    def _dataset(self, ray, remaining):
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # One operator does all the work: do not hold CPUs back for the input operator (with
        # the default reservation only one of two tasks runs at a time on 2 CPUs).
        ctx.op_resource_reservation_enabled = False
        gpus = float(ray.cluster_resources().get("GPU", 0)) if self.executor.use_gpu else 0.0
        workers = max(1, min(self.executor.num_workers, len(remaining)))
        per_call = max(1, min(64, len(remaining) // (workers * 4)))
        ds = ray.data.from_items([{"parquet": str(p), "signals": str(o)} for p, o in remaining],
                                 override_num_blocks=math.ceil(len(remaining) / per_call))
        return ds.map_batches(_process_batch, fn_kwargs={"spec": self.spec, "claims": str(self.claims.root)},
                              batch_size=per_call, compute=ray.data.TaskPoolStrategy(size=workers),
                              num_cpus=1, num_gpus=min(1.0, gpus / workers) if gpus else None)


def run_ray(todo, spec, executor, progress):
    """A Ray Data job over the files, with helper processes on this machine covering Ray's
    start-up. The helpers take files from the end of the list (a marker per file decides who
    does it) until a Ray task has loaded its models; when Ray is up, it gets the files left,
    unless the helpers would finish them before a Ray Data job could start (then Ray is shut
    down unused: on a 2M-row pool with 2 CPUs, Ray's start-up is longer than the whole pass).
    Ray runs in its own thread and is shut down there while the caller goes on: call
    `finish_ray` before exiting."""
    global _SHUTDOWN

    finish_ray()
    claims = _Claims(new_claims_root(Path(todo[0][1]).parent))
    count = executor.helpers
    if count is None:  # a cluster we connect to is up already: nothing to cover
        count = 0 if executor.ray_address else min(executor.num_workers, os.cpu_count() or 1)
    helpers = _Helpers(count, spec, todo, claims)
    results: queue.Queue = queue.Queue()
    helper_cpu: list[float] = []  # CPU seconds per file in the helpers: unlike wall time, it
    # does not depend on how much of the machine Ray's start-up is taking meanwhile

    def helpers_eta(files: int) -> float:
        """Seconds the helpers need for `files` more files (inf until a few are timed)."""
        if len(helper_cpu) < 4 or helpers.count == 0:
            return math.inf
        return files * float(np.median(helper_cpu)) / helpers.count

    runner = _RayRunner(todo, spec, executor, claims, results, helpers_eta)
    runner.start()
    _SHUTDOWN = runner
    seen: set[str] = set()
    ray_finished = False
    try:
        while len(seen) < len(todo):
            for summary in helpers.take():
                seen.add(summary["file"])
                if "cpu_seconds" in summary:
                    helper_cpu.append(summary["cpu_seconds"])
                yield _progress(summary, len(seen), len(todo), progress)
            if helpers.errors:
                raise helpers.errors[0]
            if runner.error is not None:
                raise runner.error
            if ray_finished and helpers.finished():
                for summary in helpers.take():  # what they printed last
                    seen.add(summary["file"])
                    yield _progress(summary, len(seen), len(todo), progress)
                missing = [p.name for p, _ in todo if p.name not in seen]
                if missing:
                    raise SignalsError(f"no worker computed the signals of {', '.join(missing[:5])}")
                break
            try:
                summary = results.get(timeout=0.05)
            except queue.Empty:
                continue
            if summary is None:
                ray_finished = True
                continue
            seen.add(summary["file"])
            yield _progress(summary, len(seen), len(todo), progress)
    finally:
        runner.stop.set()
        helpers.stop()
        shutil.rmtree(claims.root, ignore_errors=True)


def _progress(summary: dict, done: int, total: int, progress: bool) -> dict:
    if progress and (done == total or done % max(1, total // 10) == 0):
        print(f"signals: {done}/{total} files", file=sys.stderr)
    return summary


