"""The meta-batch sharded over 4 (host-simulated) devices gives the same training as 1 device,
also when each device walks its tasks in chunks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # starts a process with 4 simulated devices

SCRIPT = r"""
import json, jax, jax.numpy as jnp
from metalearn.config import Config, EvalConfig, TrainConfig
from metalearn.algorithms.maml import MAMLConfig
from metalearn.models.mlp import MLPConfig
from metalearn.data.sinusoid import SinusoidConfig
from metalearn.train_step import TrainState, make_train_step, task_mesh
from metalearn.experiment import build

cfg = Config(data=SinusoidConfig(), model=MLPConfig(), conditioning=None,
             algo=MAMLConfig(inner_lr=0.01), train=TrainConfig(meta_batch=8), eval=EvalConfig())
exp = build(cfg)
key = jax.random.PRNGKey(0)
out = {"devices": jax.device_count()}
runs = (("single", None, None), ("sharded", task_mesh(8), None), ("chunked", task_mesh(8), 1))
for name, mesh, chunk in runs:
    params = exp.algo.init(key)
    state = TrainState(params, exp.optimizer.init(params))
    step = make_train_step(exp, 8, mesh, task_chunk=chunk)
    losses = []
    for i in range(20):
        state, metrics = step(state, (), jax.random.fold_in(key, i))
        losses.append(float(metrics["loss"]))
    out[name] = losses
    if name == "sharded":
        leaf = jax.tree.leaves(state.params)[0]
        out["param_devices"] = len(leaf.sharding.device_set)
        compiled = step.lower(state, (), key).compile().as_text()
        out["all_reduce"] = "all-reduce" in compiled
print(json.dumps(out))
"""


def test_sharded_steps_match_one_device():
    flags = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags}  # O0: the suite's faster compiles (conftest.py)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4 and out["param_devices"] == 4
    assert out["all_reduce"], "the gradient mean over tasks must be an all-reduce across devices"
    # Same maths, different reduction order across devices: float32 tolerance.
    for other in ("sharded", "chunked"):  # chunked: 2 chunks of 1 task per device
        for a, b in zip(out["single"], out[other], strict=True):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (out["single"], out[other])
