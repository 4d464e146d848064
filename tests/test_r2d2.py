"""R2-D2: the head is the closed-form ridge solution, and the embedding learns through it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms.base import classification_loss, task_gradient
from metalearn.algorithms.r2d2 import R2D2Config, ridge_head
from metalearn.models import make_model
from metalearn.models.mlp import MLPConfig
from metalearn.types import Split, Task

KEY = jax.random.PRNGKey(0)


def test_head_equals_the_primal_ridge_solution():
    """The S x S (Woodbury) solve equals (X^T X + lambda I_D)^-1 X^T Y, computed in float64."""
    x = np.asarray(jax.random.normal(KEY, (10, 32)))
    y = np.eye(5)[np.arange(10) % 5]
    for ridge in (0.1, 1.0, 50.0):
        want = np.linalg.solve(x.T @ x + ridge * np.eye(32), x.T @ y)
        got = ridge_head(jnp.asarray(x), jnp.asarray(y, jnp.float32), ridge)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)
        # and it is the minimiser: the objective's gradient vanishes there
        grad = 2 * x.T @ (x @ np.asarray(got, np.float64) - y) + 2 * ridge * np.asarray(got)
        assert np.abs(grad).max() < 1e-3


def tiny_task(key, n_way=3, shots=2, dim=6):
    centres = 3 * jax.random.normal(key, (n_way, dim))
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    ys = jnp.repeat(jnp.arange(n_way), shots)
    yq = jnp.repeat(jnp.arange(n_way), 4)
    xs = centres[ys] + 0.3 * jax.random.normal(k1, (len(ys), dim))
    xq = centres[yq] + 0.3 * jax.random.normal(k2, (len(yq), dim))
    return Task(Split(xs, ys), Split(xq, yq), jnp.zeros((), jnp.int32))


def build(**kw):
    model = make_model(MLPConfig(hidden=16, layers=1), (6,))
    return ALGORITHMS["r2d2"](R2D2Config(**kw), model, classification_loss, n_out=3)


@pytest.mark.slow  # the fast tier keeps the closed form and its gradient
def test_predictions_use_the_learned_scale_and_bias():
    algo = build(scale=2.0)
    params = algo.init(KEY)
    task = tiny_task(KEY)
    head = algo.adapt(params, task.support, KEY)
    feats = jax.nn.relu(task.query.x @ params["embed"]["blocks"][0]["w"]
                        + params["embed"]["blocks"][0]["b"])  # fmt: skip
    want = 2.0 * feats @ head
    np.testing.assert_allclose(algo.predict(params, head, task.query.x), want, rtol=1e-5)


@pytest.mark.parametrize("learn_ridge", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_ridge_gradient_matches_finite_differences(learn_ridge):
    algo = build(ridge=0.5, learn_ridge=learn_ridge)
    params = algo.init(KEY)
    task = tiny_task(KEY)
    grads, _ = task_gradient(algo, params, task, KEY)
    if not learn_ridge:
        assert float(grads["log_ridge"]) == 0.0
        return
    eps = 1e-3

    def loss_at(log_ridge):
        shifted = {**params, "log_ridge": jnp.asarray(log_ridge, jnp.float32)}
        return float(algo.meta_loss(shifted, task, KEY)[0])

    lr0 = float(params["log_ridge"])
    fd = (loss_at(lr0 + eps) - loss_at(lr0 - eps)) / (2 * eps)
    np.testing.assert_allclose(float(grads["log_ridge"]), fd, rtol=2e-2, atol=1e-4)
