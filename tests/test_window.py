"""The GPU window (benchmarks/window.py): its plan fits the budget, and its runner caps, skips and
returns what ran within the device tool's limits (at most 8 files in $OUT).

The plan runs here as on any machine (``bash benchmarks/gpu_session.sh window --dry-run``); the runner
is tried with stand-in steps (a quick one, one past its cap, one past the budget).
"""

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import window

ROOT = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"window plan: (\d+) compiles, (\d+) benchmark runs, estimated (\d+) s \(budget 480 s\)")


def test_dry_run_plan_fits_the_budget():
    run = subprocess.run(["bash", "benchmarks/gpu_session.sh", "window", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    match = LAST_LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    compiles, runs, seconds = map(int, match.groups())
    assert compiles > 0 and runs > 0 and 0 < seconds <= 480
    for step in window.PLANS["window"]:
        assert any(line.startswith(step.name + " ") for line in lines), step.name
    # every kernel the window launches is compiled once, by the parallel precompile, before the tests
    counts = {line.split()[0]: int(line.split()[2]) for line in lines[2:-1]}
    assert counts["precompile"] > 0 and counts["smoke"] == counts["blocks"] == counts["models-256"] == 0


def test_plan_over_budget_fails(monkeypatch, capsys):
    monkeypatch.setitem(window.COSTS, "pytest_start", 1000.0)
    assert window.main(["plan", "window"]) == 1
    assert "budget 480 s" in capsys.readouterr().out.strip().splitlines()[-1]


def test_every_step_command_exists():
    """The modules and test files the steps name are there (a typo would cost a GPU window)."""
    for name, steps in window.PLANS.items():
        for step in steps:
            for arg in step.argv:
                if arg.startswith("benchmarks/") or arg.startswith("tests/"):
                    assert (ROOT / arg.split("::")[0]).exists(), (name, step.name, arg)
            if "-m" in step.argv:
                module = step.argv[step.argv.index("-m") + 1]
                if module != "pytest":
                    assert (ROOT / (module.replace(".", "/") + ".py")).exists(), (name, step.name, module)


def test_runner_caps_skips_and_packs(tmp_path, monkeypatch):
    """Each step under its cap, a step with no time left skipped, and the report run with its reserved
    cap even when the step that fills the budget takes a while to stop after SIGINT (as pytest does)."""
    py = [sys.executable, "-c"]
    slow_stop = ("import sys, time\nprint('budget', sys.argv[1], flush=True)\n"
                 "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    time.sleep(3)")
    monkeypatch.setitem(window.PLANS, "test", [
        window.Step("quick", 20, py + ["print('hello from quick')"]),
        window.Step("stuck", 3, py + ["import time; print('started', flush=True); time.sleep(60)"]),
        window.Step("fill", 0, py + [slow_stop, "{budget}"], fill=True),
        window.Step("late", 30, py + ["print('never')"]),
        window.Step("report", 2, py + ["print('report')"]),
    ])
    monkeypatch.setitem(window.BUDGETS, "test", 20)  # the fill step gets what the others leave
    monkeypatch.setattr(window, "MIN_STEP_S", 2)
    assert window.run("test", tmp_path) == 0
    log = (tmp_path / "window.log").read_text()
    assert re.search(r"quick: 0, \d+ s", log)
    assert "stuck: cut at 3 s" in log and "fill: cut at" in log
    assert "late: skipped" in log and re.search(r"report: 0", log), log
    with tarfile.open(tmp_path / "window.tar.gz") as tar:
        names = tar.getnames()
        assert "raw/quick.log" in names and "raw/stuck.log" in names
        assert b"hello from quick" in tar.extractfile("raw/quick.log").read()
        assert b"started" in tar.extractfile("raw/stuck.log").read()
    top = [p for p in tmp_path.iterdir() if p.is_file()]
    assert len(top) <= 8, top  # the device tool brings back at most 8 files


@pytest.mark.parametrize("name", ["window", "window2"])
def test_plans_start_with_what_matters(name):
    """window: versions, the precompile, then the smoke suite before any benchmark, the tuning last but
    the report; window2: the baselines the goals are judged against first."""
    names = [s.name for s in window.PLANS[name]]
    assert names[-1] == "report"
    if name == "window":
        assert names[:3] == ["versions", "precompile", "smoke"]
        assert names.index("tune") == len(names) - 2
    else:
        assert names[0].startswith("compile-")
    assert json.dumps(window.BUDGETS[name])  # a budget per plan
