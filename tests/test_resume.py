"""Crash safety: a run killed with SIGKILL (or stopped by SIGTERM) and resumed ends exactly as an
uninterrupted run does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = [
    "train.steps=1500",
    "train.checkpoint_every=200",
    "eval.every=500",
    "train.log_every=50",
    "eval.num_tasks=40",
    "eval.val_tasks=20",
]


def command(*args):
    return [sys.executable, "-m", "metalearn", "train", *args]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("xdg"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
    run = tmp_path_factory.mktemp("runs") / "full"
    subprocess.run(command(*ARGS, f"hydra.run.dir={run}"), env=env, check=True, capture_output=True)
    return run


def metric_values(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in lines]


def start_and_stop(run: Path, env, sig) -> subprocess.Popen:
    """Start a run and send `sig` once its first checkpoint exists and it has gone on a little."""
    proc = subprocess.Popen(
        command(*ARGS, f"hydra.run.dir={run}"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while not (run / "checkpoints" / "latest.npz").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, env, uninterrupted, sig):
    run = tmp_path / "run"
    proc = start_and_stop(run, env, sig)
    assert proc.returncode != 0
    summary = run / "summary.json"  # the run must really have been stopped midway
    assert not summary.exists() or json.loads(summary.read_text())["status"] == "interrupted"
    if sig == signal.SIGTERM:
        assert f"resume={run}" in proc.stderr.read().decode()
    resumed = subprocess.run(
        command(f"resume={run}"), env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert metric_values(run) == metric_values(uninterrupted)
    full = json.loads((uninterrupted / "summary.json").read_text())
    again = json.loads((run / "summary.json").read_text())
    assert again["test"] == full["test"] and again["best_step"] == full["best_step"]
    assert not (tmp_path / "outputs").exists(), "resume leaves no stray run folder"


def test_resume_needs_a_checkpoint(tmp_path, env):
    result = subprocess.run(
        command(f"resume={tmp_path / 'nothing'}"),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "holds no run to resume" in result.stderr
