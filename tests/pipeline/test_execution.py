"""The execution layer: the same units give the same results with every executor, `auto`
decides by the measured cost of the first unit, and a worker's error keeps its type and line."""

import os
import time

import pytest

import pipeline.execution as execution
from pipeline.execution import Execution, Stage, StageError, run_stage
from pools.format import PoolFormatError


class Squarer:
    """A toy stage worker: squares its unit after `delay` seconds; unit `bad` raises."""

    def __init__(self, delay: float, bad: int | None = None):
        self.delay, self.bad = delay, bad
        self.warmed = False

    def warm_up(self):
        self.warmed = True

    def __call__(self, unit: int) -> dict:
        time.sleep(self.delay)
        if unit == self.bad:
            raise PoolFormatError(f"unit{unit}.parquet: not a readable parquet file")
        return {"square": unit * unit, "pid": os.getpid(), "warmed": self.warmed}


class Picky(Exception):
    def __init__(self, code: int, where: str):  # not rebuildable from a message alone
        super().__init__(f"{where}: code {code}")


class Failing:
    def __call__(self, unit):
        raise Picky(7, f"unit {unit}")


def _run(stage, units, execution_):
    run = run_stage(stage, units, execution_)
    results = dict(iter(run))
    return run.decision, results


def test_local_with_one_worker_runs_here():
    decision, results = _run(Stage("toy", Squarer, (0.0,)), range(5), Execution("local", num_workers=1))
    assert decision.executor == "in-process"
    assert {i: r["square"] for i, r in results.items()} == {i: i * i for i in range(5)}
    assert {r["pid"] for r in results.values()} == {os.getpid()} and {r["by"] for r in results.values()} == {
        "in-process"}


def test_auto_keeps_little_work_in_this_process():
    decision, results = _run(Stage("toy", Squarer, (0.001,)), range(6), Execution("auto", num_workers=2))
    assert decision.executor == "in-process" and "less than starting worker processes" in decision.reason
    assert [results[i]["square"] for i in range(6)] == [i * i for i in range(6)]
    assert results[0]["warmed"]  # the probe loads the models before it times the unit


def test_auto_spreads_more_work_over_processes(monkeypatch):
    monkeypatch.setattr(execution, "PROCESS_START_S", 0.05)
    decision, results = _run(Stage("toy", Squarer, (0.1,)), range(60), Execution("auto", num_workers=2))
    assert decision.executor == "processes" and decision.workers == 2
    assert [results[i]["square"] for i in range(60)] == [i * i for i in range(60)]
    assert results[0]["pid"] == results[1]["pid"] == os.getpid()  # timed here
    by_pool = {results[i]["pid"] for i in range(60) if results[i]["by"] == "processes"}
    here = [i for i in range(2, 60) if results[i]["by"] == "in-process"]
    assert by_pool and os.getpid() not in by_pool  # (how many of the 2 got a unit depends on their start)
    # while the pool started, this process took units from the end of the list
    assert here == list(range(60 - len(here), 60)) and {results[i]["pid"] for i in here} <= {os.getpid()}
    assert all(results[i]["warmed"] for i in range(60))  # each process warms its worker up once


def test_auto_sends_large_work_to_ray(monkeypatch):
    monkeypatch.setattr(execution, "RAY_WORTH_S", 0.01)
    decision, results = _run(Stage("toy", Squarer, (0.05,)), range(6), Execution("auto", num_workers=2))
    assert decision.executor == "ray" and "over" in decision.reason
    assert [results[i]["square"] for i in range(6)] == [i * i for i in range(6)]
    assert {results[i]["by"] for i in range(2, 6)} == {"ray"}
    import ray

    assert not ray.is_initialized()  # the Ray it started is shut down again


def test_a_cluster_address_means_ray(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    from pipeline.cluster import RayStartError

    with pytest.raises(RayStartError, match="no Ray cluster answers at 127.0.0.1:1"):
        _run(Stage("toy", Squarer, (0.0,)), range(3), Execution("auto"))


@pytest.mark.parametrize("executor,models", [("local", False), ("ray", False), ("ray", True)])
def test_a_workers_error_keeps_its_type_and_line(monkeypatch, executor, models):
    monkeypatch.setattr(execution, "PROCESS_START_S", 0.0)  # local: the bad unit runs in a process
    stage = Stage("toy", Squarer, (0.01, 3), models=models)
    with pytest.raises(PoolFormatError) as caught:
        _run(stage, range(6), Execution(executor, num_workers=2))
    assert str(caught.value) == "unit3.parquet: not a readable parquet file"  # the line a command prints
    assert "in a worker" in "".join(caught.value.__notes__)  # the worker's traceback, for DATACOMP_DEBUG


def test_an_error_type_that_needs_more_than_a_message_is_a_stage_error():
    with pytest.raises(StageError, match=r"Picky: unit 0: code 7"):
        _run(Stage("toy", Failing), range(2), Execution("local", num_workers=1))


@pytest.mark.parametrize("command", ["pipeline.filter", "pipeline.reshard", "pipeline.score", "pipeline.centroids"])
def test_every_command_takes_the_same_execution_flags(command):
    import importlib
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(command).main(["--help"])
    text = out.getvalue()
    for flag in ("--executor {auto,ray,local}", "--ray-address", "--num-workers"):
        assert flag in text, (command, flag)
    assert "--no-ray" not in text and "--helpers" not in text
