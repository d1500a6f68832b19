"""One execution layer for every stage that fans out: signals, scoring, centroid assignment,
resharding.

A stage is declared once, as data (`Stage`): the class that builds a worker (called on one
unit of work at a time: a metadata file, a shard, a reshard task), the CPUs and GPUs a worker
needs, and whether it holds a model. `run_stage` runs its units with one of three executors,
chosen by ``--executor`` (flags from `add_execution_flags`, the same in every command):

- ``local``: this machine only. In this process when there is one worker or too little work to
  pay for starting processes, else a plain process pool of ``--num-workers`` processes, each
  building its worker (and loading its models) once, with the stage's CPUs for its math
  libraries; while the pool starts, this process works on units too.
- ``ray``: a Ray Data job on the Ray that `pipeline.cluster.join_ray` starts or joins
  (``--ray-address`` / ``$RAY_ADDRESS``): a task pool for per-file maps (each Ray worker process
  keeps its stage worker), an actor pool for model stages (a model per actor).
- ``auto`` (default): Ray when a cluster address is given; otherwise the work is estimated by
  running the first `PROBE_UNITS` units in this process (models loaded first; the last one's
  time, free of one-time costs such as imports, times the units left) and the rest runs
    * in this process, when spreading it over processes would save less than starting them
      (``PROCESS_START_S`` per process: interpreter, imports, models);
    * on a local Ray, when the local workers would need more than ``RAY_WORTH_S`` of wall time
      (Ray's start-up, a few seconds on a small machine, is then a small share, and the job
      gets Ray's retries, memory accounting and dashboard);
    * in a process pool otherwise.
  On 2 CPUs, a 2M-row pool's signals for any built-in strategy stay on this machine without Ray;
  a 128M-row pool goes to Ray.

Every result says which executor computed it (``by``) and on which node; the decision and its
reason are `StageRun.decision`, recorded in the commands' manifests.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
import os
import time
import traceback
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from pipeline.cluster import RAY_ADDRESS_ENV, RayStartError, current_node, join_ray

EXECUTORS = ("auto", "ray", "local")
PROBE_UNITS = 2  # units `auto` runs here to time them; the last one's time is the estimate
PROCESS_START_S = 1.5  # a spawned worker process: interpreter, imports, its models (measured ~1 s here)
RAY_WORTH_S = 60.0  # local workers' estimated wall time above which `auto` starts a local Ray
ACTORS_START_TIMEOUT_S = 600  # model actors must all be up before any unit is handed out
# The math libraries' thread counts, read when a worker process loads them.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Execution:
    """Where a command's stages run (``--executor``, ``--ray-address``, ``--num-workers``)."""

    executor: str = "auto"
    ray_address: str | None = None  # a Ray cluster to join; None: $RAY_ADDRESS, else a local Ray of our own
    num_workers: int = default_workers()

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.num_workers < 1:
            raise ValueError(f"--num-workers must be at least 1, got {self.num_workers}")

    @property
    def cluster_address(self) -> str | None:
        return self.ray_address or os.environ.get(RAY_ADDRESS_ENV) or None


@dataclass(frozen=True)
class Stage:
    """A stage that fans out: ``worker(*args)`` builds, once per process or actor, a callable
    that takes one unit and returns a JSON-serializable dict. `worker` must be importable
    (a class or function at module level): processes and Ray workers build their own."""

    name: str
    worker: Callable[..., Callable[[Any], dict]]
    args: tuple = ()
    cpus: float = 1.0  # per worker
    gpus: float = 0.0  # per worker (Ray only; a local worker sees the machine's GPUs)
    models: bool = False  # the worker holds a model: an actor pool on Ray, one model per actor


@dataclass(frozen=True)
class Decision:
    """Which executor a stage ran with, on how many workers, and why."""

    executor: str  # "in-process", "processes" or "ray"
    workers: int
    reason: str

    def as_json(self) -> dict:
        return {"executor": self.executor, "workers": self.workers, "reason": self.reason}


class StageError(RuntimeError):
    """A worker failed with an error of a type this process could not rebuild."""


def add_execution_flags(parser: argparse.ArgumentParser, *, workers_help: str,
                        default_workers_: int | None = None, worker_flags: Sequence[str] = ("--num-workers",)
                        ) -> None:
    """The execution flags every command that fans out takes, with the same names and meaning."""
    g = parser.add_argument_group("execution")
    g.add_argument("--executor", choices=EXECUTORS, default="auto",
                   help="auto (default): Ray with --ray-address, else this machine for small jobs and a "
                        "local Ray for large ones (see pipeline/execution.py); local: this process or a "
                        "process pool, no Ray; ray: a Ray Data job")
    g.add_argument("--ray-address", help=f"a running Ray cluster to join (default: ${RAY_ADDRESS_ENV}, else a "
                                         "local Ray of this command's own); the pool and the outputs must be "
                                         "on storage every node sees")
    g.add_argument(*worker_flags, dest="num_workers", type=int,
                   default=default_workers_ if default_workers_ is not None else default_workers(),
                   help=f"{workers_help} (default %(default)s)")


def execution_from_args(args: argparse.Namespace) -> Execution:
    return Execution(executor=args.executor, ray_address=args.ray_address, num_workers=args.num_workers)


class StageRun:
    """Runs a stage's units; iterate for ``(unit index, result)`` pairs as they finish.
    After the run, `decision` says which executor did the work and why."""

    def __init__(self, stage: Stage, units: Sequence[Any], execution: Execution):
        self.stage, self.units, self.execution = stage, list(units), execution
        self.decision: Decision | None = None

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        n = len(self.units)
        if n == 0:
            return
        ex = self.execution
        workers = max(1, min(ex.num_workers, n))
        if ex.executor == "ray" or (ex.executor == "auto" and ex.cluster_address):
            why = "--executor ray" if ex.executor == "ray" else "a Ray cluster address was given"
            self.decision = Decision("ray", workers, why)
            yield from self._ray(range(n))
            return
        if workers == 1 and ex.executor == "local":
            self.decision = Decision("in-process", 1, "--executor local with one worker")
            yield from self._in_process(self._build(), range(n))
            return
        # Time units here (models loaded first), then decide for the rest. The first unit also
        # pays one-time costs (imports, caches), so the second one's time is the estimate.
        worker = self._build()
        warm_up = getattr(worker, "warm_up", None)
        if warm_up is not None:
            warm_up()
        probed = min(PROBE_UNITS, n)
        for i in range(probed):
            started = time.perf_counter()
            yield from self._in_process(worker, [i])
            unit_s = time.perf_counter() - started
        rest = range(probed, n)
        if not rest:
            self.decision = Decision("in-process", 1, f"{n} unit(s), run while timing them")
            return
        serial_s = unit_s * len(rest)
        spread = max(1, min(ex.num_workers, len(rest)))
        parallel_s = serial_s / spread + PROCESS_START_S
        if ex.executor == "auto" and parallel_s > RAY_WORTH_S:
            self.decision = Decision("ray", spread, f"estimated {serial_s:.0f} s of work: over {RAY_WORTH_S:.0f} s "
                                                    f"on {spread} local workers")
            worker = None  # (its models: Ray's workers load their own)
            yield from self._ray(rest)
        elif spread == 1 or serial_s <= parallel_s:
            self.decision = Decision("in-process", 1, f"estimated {serial_s:.1f} s of work: less than starting "
                                                      "worker processes")
            yield from self._in_process(worker, rest)
        else:
            self.decision = Decision("processes", spread, f"estimated {serial_s:.1f} s of work")
            yield from self._processes(rest, spread, worker)

    # --- the three executors --------------------------------------------------------------------
    def _build(self):
        return self.stage.worker(*self.stage.args)

    def _in_process(self, worker, indices) -> Iterator[tuple[int, dict]]:
        for i in indices:
            yield i, self._result(_call(worker, self.units[i]), "in-process")

    def _processes(self, indices, workers: int, worker=None) -> Iterator[tuple[int, dict]]:
        """A spawn process pool over `indices`. Until the pool's first result (its processes
        start, import and load their models: a second or more), this process goes on with
        units of its own `worker`, from the other end of the list; nothing is done twice,
        since this process alone hands units out."""
        # spawn, not fork: the parent may hold threads (Polars', tqdm's, Ray's) whose locks a
        # forked child would inherit held.
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_process, initargs=(self.stage,))
        left = deque(indices)
        pending: dict = {}
        # Each process gets the stage's CPUs for its math libraries (OpenMP, BLAS, faiss), as
        # Ray does for its workers: by default each would start a thread per core, and
        # `workers` processes spinning that many threads on the same cores waste CPU time.
        saved = {k: os.environ.get(k) for k in THREAD_ENV}
        os.environ.update({k: str(max(1, int(self.stage.cpus))) for k in THREAD_ENV})
        try:
            while left or pending:
                while left and len(pending) < 2 * workers:  # a few queued per process, not all:
                    i = left.popleft()  # the rest stay ours to take while the pool starts
                    pending[pool.submit(_process_unit, self.units[i])] = i
                if worker is not None and left:
                    done, _ = wait(pending, timeout=0, return_when=FIRST_COMPLETED)
                    if not done:
                        i = left.pop()
                        yield i, self._result(_call(worker, self.units[i]), "in-process")
                        continue
                    worker = None  # the pool is up: leave the CPUs to it
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield pending.pop(future), self._result(future.result(), "processes")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _ray(self, indices) -> Iterator[tuple[int, dict]]:
        import ray

        ex, stage = self.execution, self.stage
        indices = list(indices)
        address = ex.cluster_address
        workers = max(1, min(ex.num_workers, len(indices)))
        started_here = join_ray(address, num_cpus=None if address else max(1, math.ceil(workers * stage.cpus)),
                                num_gpus=None if address or stage.gpus else 0)
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            # One operator does all the work: do not hold CPUs back for the input operator (with
            # the default reservation only one of two tasks runs at a time on 2 CPUs).
            ctx.op_resource_reservation_enabled = False
            units = self.units
            if stage.models:
                # Every model replica is up before units are handed out, one at a time: the first
                # actor to load its model would otherwise take them all.
                ctx.wait_for_min_actors_s = ACTORS_START_TIMEOUT_S
                ds = ray.data.from_items([{"index": i} for i in indices], override_num_blocks=len(indices))
                ds = ds.map_batches(_RayActor, fn_constructor_args=(stage, units), batch_size=1,
                                    compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
                                    num_cpus=stage.cpus, num_gpus=stage.gpus or None)
            else:
                per_call = max(1, min(64, len(indices) // (workers * 4)))
                ds = ray.data.from_items([{"index": i} for i in indices],
                                         override_num_blocks=math.ceil(len(indices) / per_call))
                ds = ds.map_batches(_ray_tasks, fn_kwargs={"stage": stage, "units": units}, batch_size=per_call,
                                    compute=ray.data.TaskPoolStrategy(size=workers), num_cpus=stage.cpus,
                                    num_gpus=stage.gpus or None)
            try:
                for row in ds.iter_rows():
                    yield int(row["index"]), self._result(json.loads(row["record"]), "ray")
            except ray.exceptions.GetTimeoutError:
                raise RayStartError(f"Ray could not start {workers} {stage.name} workers ({stage.cpus:g} CPUs and "
                                    f"{stage.gpus:g} GPUs each) within {ACTORS_START_TIMEOUT_S} s: lower the "
                                    "number of workers or what each needs, or add nodes") from None
        finally:
            if started_here:
                ray.shutdown()

    def _result(self, record: dict, by: str) -> dict:
        if "error" in record:
            raise _rebuild(record["error"])
        return {**record["ok"], "by": by, "node": record["node"]}


def run_stage(stage: Stage, units: Sequence[Any], execution: Execution) -> StageRun:
    """`StageRun` over `units`: ``for index, result in run_stage(...)``."""
    return StageRun(stage, units, execution)


# --- inside the workers ---------------------------------------------------------------------------
def _call(worker, unit) -> dict:
    """One unit, its error returned as data: the executors (a process pool, Ray Data) would
    otherwise wrap the one line that names the bad file in their own tracebacks."""
    try:
        return {"ok": worker(unit), "node": current_node()}
    except Exception as exc:  # noqa: BLE001 (rebuilt, with its type, in the driver)
        return {"error": {"type": f"{type(exc).__module__}:{type(exc).__qualname__}", "message": str(exc),
                          "traceback": traceback.format_exc()}, "node": current_node()}


def _rebuild(error: dict) -> BaseException:
    """The worker's exception, of its own type when that takes a message (so commands print
    their one-line errors), else a `StageError`; the worker's traceback is attached as a note."""
    module, _, name = error["type"].partition(":")
    exc: BaseException
    try:
        cls = importlib.import_module(module)
        for part in name.split("."):
            cls = getattr(cls, part)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            raise TypeError(name)
        exc = cls(error["message"])
    except Exception:  # noqa: BLE001
        exc = StageError(f"{error['type'].replace(':', '.')}: {error['message']}")
    exc.add_note(f"in a worker:\n{error['traceback']}")
    return exc


_WORKER: tuple[Stage, Any] | None = None  # this process's stage worker (a process pool's or a Ray task's)


def _worker_for(stage: Stage):
    global _WORKER
    if _WORKER is None or _WORKER[0] != stage:
        worker = stage.worker(*stage.args)
        warm_up = getattr(worker, "warm_up", None)
        if warm_up is not None:
            warm_up()
        _WORKER = (stage, worker)
    return _WORKER[1]


def _init_process(stage: Stage) -> None:
    _worker_for(stage)


def _process_unit(unit) -> dict:
    assert _WORKER is not None
    return _call(_WORKER[1], unit)


def _ray_tasks(batch: dict, stage: Stage, units: list) -> dict:
    """A Ray Data task over a batch of unit indices; the worker is kept per Ray worker process,
    so its models load once per process, as an actor's would, without an actor pool's start-up."""
    worker = _worker_for(stage)
    indices = [int(i) for i in batch["index"]]
    return {"index": indices, "record": [json.dumps(_call(worker, units[i])) for i in indices]}


class _RayActor:
    """A Ray Data actor holding one stage worker (and its model)."""

    def __init__(self, stage: Stage, units: list):
        self.worker = _worker_for(stage)
        self.units = units

    def __call__(self, batch: dict) -> dict:
        indices = [int(i) for i in batch["index"]]
        return {"index": indices, "record": [json.dumps(_call(self.worker, self.units[i])) for i in indices]}
