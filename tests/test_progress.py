"""What a run shows while it trains: TensorBoard event files, and no progress bar in pipes."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

ARGS = ["train.steps=300", "eval.every=100", "eval.num_tasks=20", "eval.val_tasks=10"]


def read_scalars(event_file) -> dict[str, list[tuple[int, float]]]:
    """Decode a TFRecord file of Event protos (length, crc, data, crc per record)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    data = event_file.read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def run(tmp_path, *extra):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "metalearn", "train", *ARGS, *extra, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    return run_dir, result


@pytest.mark.slow
def test_tensorboard_events_match_metrics_jsonl(tmp_path):
    import json

    run_dir, _ = run(tmp_path, "logger=tensorboard")
    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars = read_scalars(files[0])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for split in ("train", "val", "test"):
        want = [(r["step"], r["loss"]) for r in records if r["split"] == split]
        got = scalars[f"{split}/loss"]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert all(abs(a - b) <= 1e-6 * max(1, abs(b)) for (_, a), (_, b) in zip(got, want))


@pytest.mark.slow
def test_no_progress_bar_when_not_a_terminal(tmp_path):
    run_dir, result = run(tmp_path)
    assert "%|" not in result.stderr and "step/s]" not in result.stderr
    assert "step    100  train loss" in result.stdout  # the log lines are still there
    assert not (run_dir / "tensorboard").exists()
