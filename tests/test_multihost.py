"""Two processes joined by jax.distributed train one run: same results as one process, and only
process 0 writes the run directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here starts metalearn processes

ARGS = [
    "train.steps=60",
    "train.meta_batch=8",
    "eval.every=30",
    "eval.num_tasks=20",
    "eval.val_tasks=8",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run_dir, env, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "metalearn", "train", *ARGS, *extra, f"hydra.run.dir={run_dir}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["split"], r["loss"]) for r in map(json.loads, lines)]


def test_two_processes_match_one(tmp_path):
    base = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    base.pop("XLA_FLAGS", None)
    o0 = "--xla_backend_optimization_level=0"  # the suite's faster compiles (conftest.py)
    single = train(
        tmp_path / "single", {**base, "XLA_FLAGS": f"{o0} --xla_force_host_platform_device_count=4"}
    )
    port = free_port()
    procs = [
        train(
            tmp_path / "multi",
            {
                **base,
                "XLA_FLAGS": f"{o0} --xla_force_host_platform_device_count=2",
                "METALEARN_COORDINATOR": f"127.0.0.1:{port}",
                "METALEARN_NUM_PROCESSES": "2",
                "METALEARN_PROCESS_ID": str(i),
            },
            "distributed=true",
        )
        for i in range(2)
    ]
    for proc in [single, *procs]:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert summary["devices"] and len(summary["devices"]) == 4
    one, two = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert [r[:2] for r in one] == [r[:2] for r in two], "each record written exactly once"
    for (_, _, a), (_, _, b) in zip(one, two):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a))
