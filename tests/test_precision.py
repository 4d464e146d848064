"""train.precision=bf16: models compute in bfloat16 with float32 parameters, gradients and
outputs (metalearn/models/precision.py), checked against the float32 model."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from metalearn.checks import ConfigError
from metalearn.config import register_schemas, to_config
from metalearn.experiment import build, initial_state
from metalearn.models import make_model
from metalearn.models.conv4 import Conv4Config
from metalearn.models.precision import mixed
from metalearn.train_step import make_train_step

CONF = Path(__file__).resolve().parents[1] / "conf"
KEY = jax.random.PRNGKey(0)


def test_bf16_computes_in_bf16_and_keeps_float32_parameters_gradients_and_outputs():
    model = make_model(Conv4Config(hidden=16), (28, 28, 1))
    half = mixed(model)
    params = model.init(KEY, 5)
    x = jax.random.uniform(jax.random.PRNGKey(1), (10, 28, 28, 1))
    y = jnp.arange(10) % 5
    full_out, half_out = jax.jit(model.apply)(params, x), jax.jit(half.apply)(params, x)
    assert half_out.dtype == jnp.float32
    # bf16 keeps 8 bits of mantissa: outputs agree to a few percent of their scale
    assert float(jnp.abs(half_out - full_out).max()) < 0.05 * float(jnp.abs(full_out).max())
    hlo = jax.jit(half.apply).lower(params, x).as_text()
    # conv4 convolves by im2col: its matmuls take bf16 operands
    assert any("dot_general" in line and "bf16" in line for line in hlo.splitlines())

    def loss(model):
        def f(p):
            logits = model.apply(p, x)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(10), y])

        return f

    g_full, g_half = jax.jit(jax.grad(loss(model)))(params), jax.jit(jax.grad(loss(half)))(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g_half))
    flat = lambda t: jnp.concatenate([a.ravel() for a in jax.tree.leaves(t)])  # noqa: E731
    a, b = flat(g_full), flat(g_half)
    # bf16 batch-norm statistics perturb each entry by ~1%: the direction agrees to cosine 0.98
    assert float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b))) > 0.98


def test_a_bf16_train_step_keeps_float32_state():
    register_schemas()
    overrides = ["data=sinusoid", "algo=maml", "train.precision=bf16", "algo.inner_steps=1"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = to_config(compose("config", overrides=overrides), overrides)
    exp = build(cfg)
    state = initial_state(exp, exp.algo.init(KEY))
    new, metrics = make_train_step(exp, meta_batch=2)(state, exp.source.splits["train"], KEY, 1)
    assert np.isfinite(float(metrics["loss"]))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new.params))
    with pytest.raises(ConfigError, match="train.precision='fp8' is not allowed"):
        bad = ["data=sinusoid", "train.precision=fp8"]
        with initialize_config_dir(str(CONF), version_base="1.3"):
            to_config(compose("config", overrides=bad), bad)
