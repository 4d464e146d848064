"""Crash safety: a run killed at any moment (SIGKILL before its first checkpoint, inside a
checkpoint write, midway) or stopped by SIGTERM, and resumed, ends exactly as an uninterrupted
run does; so does a requeued job that runs its very same command line again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here starts metalearn processes

ARGS = [
    "train.steps=1500",
    "train.checkpoint_every=200",
    "eval.every=500",
    "train.log_every=50",
    "eval.num_tasks=40",
    "eval.val_tasks=20",
]
KILL_INSIDE_WRITE = Path(__file__).with_name("kill_inside_write.py")


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


def start_and_stop(run: Path, env, sig, when: str = "checkpoints/latest.npz") -> subprocess.Popen:
    """Start a run and send `sig` once the file `when` exists (for the first checkpoint: once
    the run has gone on a little after it)."""
    proc = subprocess.Popen(
        command(*ARGS, f"hydra.run.dir={run}"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while not (run / when).exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.01)
    if when.startswith("checkpoints"):
        time.sleep(0.3)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def assert_same_as_uninterrupted(run: Path, uninterrupted: Path) -> None:
    assert metric_values(run) == metric_values(uninterrupted)
    full = json.loads((uninterrupted / "summary.json").read_text())
    again = json.loads((run / "summary.json").read_text())
    assert again["status"] == "completed"
    assert again["test"] == full["test"] and again["best_step"] == full["best_step"]


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
    assert_same_as_uninterrupted(run, uninterrupted)
    assert not (tmp_path / "outputs").exists(), "resume leaves no stray run folder"


def test_killed_before_first_checkpoint_is_rerun_by_the_same_command(tmp_path, env, uninterrupted):
    """SIGKILL as soon as the run's config is written (long before step 200's checkpoint):
    the requeued job's very same command, with resume=true, starts it again from step 0."""
    run = tmp_path / "run"
    proc = start_and_stop(run, env, signal.SIGKILL, when=".hydra/config.yaml")
    assert proc.returncode == -signal.SIGKILL and not (run / "checkpoints").exists()
    again = subprocess.run(
        command(*ARGS, f"hydra.run.dir={run}", "resume=true", "progress=false", "algo=maml"),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr
    assert_same_as_uninterrupted(run, uninterrupted)


def test_killed_inside_a_checkpoint_write_resumes_and_cleans_up(tmp_path, env, uninterrupted):
    """SIGKILL between writing checkpoint 3's temporary file and renaming it into place."""
    run = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, str(KILL_INSIDE_WRITE), "3", "train", *ARGS, f"hydra.run.dir={run}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL
    assert list((run / "checkpoints").glob(".*.npz")), "the kill left a temporary checkpoint"
    resumed = subprocess.run(
        command(f"resume={run}"), env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert not list((run / "checkpoints").glob(".*")), "temporary files are removed on start"
    assert_same_as_uninterrupted(run, uninterrupted)


def test_resume_needs_a_run(tmp_path, env):
    result = subprocess.run(
        command(f"resume={tmp_path / 'nothing'}"),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "holds no run to resume" in result.stderr
