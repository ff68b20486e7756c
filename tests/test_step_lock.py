"""One run per step folder: a second process stops with one line naming the holder; a dead holder's lock is taken over.

Two whole run-alls on one folder are in `test_run_all.py` (the smoke run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, SMOKE_CONFIG

from neu_det_pipeline.config import load_config
from neu_det_pipeline.recipe import Step, StepBusyError, lock_path, run_step

STEP_NAME = "step0_prepare"

# Holds the Step 0 lock of the config given on the command line until killed, like a run in progress.
HOLDER = """
import sys, time
from neu_det_pipeline.config import load_config
from neu_det_pipeline.recipe import step_lock

with step_lock(load_config(sys.argv[1], sys.argv[2:]), "step0_prepare"):
    print("held", flush=True)
    time.sleep(600)
"""


def config_args(out: Path) -> list[str]:
    return [str(SMOKE_CONFIG), f"run.output_dir={out}", f"data.root={REPO / 'data' / 'neu-det-sample'}", "run.tiny_models_dir=null"]


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen]:
    """Another process holding Step 0's lock on tmp_path/run."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, *config_args(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def fake_step(calls: list[str], fail: bool = False) -> Step:
    def run(ctx) -> dict:
        calls.append(ctx.step.name)
        if fail:
            raise RuntimeError("step broke")
        return {}

    return Step(name=STEP_NAME, title="a step", run=run, config_keys=("run.seed",))


def test_second_process_stops_with_one_line_and_writes_nothing(holder: subprocess.Popen, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", f"neu_det_pipeline.{STEP_NAME}", "--config", *config_args(out)], capture_output=True, text=True, cwd=REPO
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert f"in use by pid {holder.pid} on {os.uname().nodename} since" in lines[0]
    assert f"ps -p {holder.pid}" in lines[0] and "-c" in lines[0]  # the holder's command
    assert not (out / STEP_NAME).exists()


def test_extra_ranks_take_no_lock(holder: subprocess.Popen, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 of an `accelerate launch` holds the lock; rank 1 of the same launch must still run."""
    config = load_config(SMOKE_CONFIG, config_args(tmp_path / "run")[1:])
    calls: list[str] = []
    with pytest.raises(StepBusyError):
        run_step(fake_step(calls), config)
    monkeypatch.setenv("RANK", "1")
    run_step(fake_step(calls), config)
    assert calls == [STEP_NAME]


def test_lock_of_a_killed_run_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, *config_args(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    process.send_signal(signal.SIGKILL)
    process.wait()
    config = load_config(SMOKE_CONFIG, config_args(out)[1:])
    assert json.loads(lock_path(config, STEP_NAME).read_text())["pid"] == process.pid  # left behind

    calls: list[str] = []
    run_step(fake_step(calls), config)
    assert calls == [STEP_NAME]
    assert f"taking over the lock of pid {process.pid}" in capsys.readouterr().err
    assert lock_path(config, STEP_NAME).read_text() == ""  # released cleanly this time

    run_step(fake_step(calls), config.model_copy(update={"run": config.run.model_copy(update={"seed": 1})}))
    assert "taking over" not in capsys.readouterr().err


def test_lock_is_released_when_the_step_fails(tmp_path: Path) -> None:
    config = load_config(SMOKE_CONFIG, config_args(tmp_path / "run")[1:])
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="step broke"):
        run_step(fake_step(calls, fail=True), config)
    assert lock_path(config, STEP_NAME).read_text() == ""
    run_step(fake_step(calls), config)  # not held any more
    assert calls == [STEP_NAME, STEP_NAME]
