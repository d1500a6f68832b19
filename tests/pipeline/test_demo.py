"""pipeline.demo: the stage markers, and a CI-sized demo run end to end."""

from __future__ import annotations

import json

from pipeline.demo import Stages


def test_a_stage_runs_once_per_settings_and_outputs_of_old_settings_are_removed(tmp_path):
    calls = []
    output = tmp_path / "made"

    def work():
        calls.append(1)
        output.mkdir(exist_ok=True)
        (output / "part").write_text(str(len(calls)))
        return {"n": len(calls)}

    stages = Stages(tmp_path)
    assert stages.run("s", {"seed": 0}, work, outputs=[output]) == {"n": 1}
    assert stages.run("s", {"seed": 0}, work, outputs=[output]) == {"n": 1}  # reused
    assert len(calls) == 1 and stages.timings["s"] == 0.0
    (output / "stale").write_text("from seed 0")
    assert Stages(tmp_path).run("s", {"seed": 1}, work, outputs=[output]) == {"n": 2}
    assert not (output / "stale").exists()  # made with other settings: removed before rerunning
    assert json.loads((tmp_path / ".stages" / "s.json").read_text())["settings"] == {"seed": 1}


def test_a_failed_stage_leaves_no_marker_and_runs_again(tmp_path):
    stages = Stages(tmp_path)

    def fail():
        raise RuntimeError("killed")

    try:
        stages.run("s", {}, fail)
    except RuntimeError:
        pass
    assert not (tmp_path / ".stages" / "s.json").exists()
    assert stages.run("s", {}, lambda: 7) == 7
