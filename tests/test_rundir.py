"""The run directory's files: atomic checkpoints, metrics that survive a cut, refusal to reuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from metalearn import rundir
from metalearn.rundir import RunDir, RunDirError, read_metrics


def tree(value: float):
    return {"w": np.full((3, 2), value, np.float32), "b": [np.arange(4.0) * value]}


def test_checkpoint_round_trip(tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint("latest", tree(2.0), {"step": 7})
    loaded, meta = run.load_checkpoint("latest", tree(0.0))
    assert meta == {"step": 7}
    np.testing.assert_array_equal(loaded["w"], tree(2.0)["w"])
    np.testing.assert_array_equal(loaded["b"][0], tree(2.0)["b"][0])


def test_interrupted_checkpoint_write_leaves_previous_loadable(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.save_checkpoint("latest", tree(1.0), {"step": 1})

    def write_half_then_die(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(rundir.np, "savez", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint("latest", tree(2.0), {"step": 2})
    monkeypatch.undo()
    loaded, meta = run.load_checkpoint("latest", tree(0.0))
    assert meta["step"] == 1 and float(loaded["w"][0, 0]) == 1.0
    assert os.listdir(tmp_path / "checkpoints") == ["latest.npz"], "no temporary file left"


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint("best", tree(1.0), {})
    other = {"w": np.zeros((4, 2), np.float32), "b": [np.zeros(4)]}
    with pytest.raises(RunDirError, match="shape"):
        run.load_checkpoint("best", other)


def test_metrics_cut_short_and_truncated(tmp_path):
    run = RunDir(tmp_path)
    for step in (1, 2, 3):
        run.log_metrics({"step": step, "split": "train", "loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "spl')  # a kill in the middle of a line
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    run.truncate_metrics(2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_leaves_a_valid_run_dir(tmp_path):
    run = tmp_path / "run"
    args = ["algo.inner_lr=1e12", "train.steps=50", "train.log_every=1", "eval.every=10"]
    result = subprocess.run(
        [sys.executable, "-m", "metalearn", "train", *args, f"hydra.run.dir={run}"],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)},
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "non-finite at step" in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["error"]
    assert (run / ".hydra" / "config.yaml").is_file()
    assert all(
        np.isfinite(r["loss"]) or r["split"] == "train" for r in read_metrics(run / "metrics.jsonl")
    )
