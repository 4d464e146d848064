"""The meta-gradients against closed forms, finite differences and independent formulations."""

from __future__ import annotations

from functools import partial

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import LINEAR, linear_maml_experiment, linear_task

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms.base import regression_loss, task_gradient
from metalearn.algorithms.maml import MAMLConfig
from metalearn.algorithms.protonet import prototypes, squared_distance_logits
from metalearn.algorithms.reptile import ReptileConfig
from metalearn.train_step import TrainState, make_train_step

KEY = jax.random.PRNGKey(0)


def step_gradient(exp, params):
    """Minus the update of one shared train step (SGD, rate 1): the meta-gradient it follows."""
    step = make_train_step(exp, meta_batch=1)
    state = TrainState(params, exp.optimizer.init(params))
    new, _ = step(jax.tree.map(jnp.copy, state), (), KEY)
    return jax.tree.map(lambda a, b: a - b, params, new.params)


def closed_form_maml_gradient(w, task, lr, first_order):
    """MSE L(w) = |Xw - y|^2 / n; one inner step w' = w - lr * 2/ns Xs^T (Xs w - ys)."""
    xs, ys, xq, yq = task.support.x, task.support.y, task.query.x, task.query.y
    ns, nq = len(xs), len(xq)
    w_adapted = w - lr * 2 / ns * xs.T @ (xs @ w - ys)
    query_grad = 2 / nq * xq.T @ (xq @ w_adapted - yq)
    if first_order:
        return query_grad
    jacobian = jnp.eye(len(w)) - lr * 2 / ns * xs.T @ xs  # d w' / d w, symmetric
    return jacobian @ query_grad


@pytest.mark.parametrize("first_order", [False, True])
def test_one_step_meta_gradient_equals_closed_form(first_order):
    task = linear_task(KEY)
    exp = linear_maml_experiment(task, lr=0.1, first_order=first_order)
    params = LINEAR.init(jax.random.PRNGKey(1), 1)
    got = step_gradient(exp, params)["head"]["w"]
    want = closed_form_maml_gradient(params["head"]["w"], task, 0.1, first_order)
    # float32 throughout: relative 1e-5, absolute 1e-6.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if not first_order:  # the second-order term matters here, so the two must differ
        fo = closed_form_maml_gradient(params["head"]["w"], task, 0.1, True)
        assert np.abs(np.asarray(want - fo)).max() > 1e-3


@pytest.mark.slow
def test_two_step_meta_gradient_matches_finite_differences():
    """A nonlinear MLP, 2 inner steps, float64, central differences along random directions."""
    from metalearn.models import mlp

    with jax.enable_x64(True):
        x = jax.random.normal(KEY, (10, 1), jnp.float64)
        task = linear_task(KEY)._replace(
            support=linear_task(KEY).support._replace(x=x[:4], y=jnp.sin(x[:4])),
            query=linear_task(KEY).query._replace(x=x[4:], y=jnp.sin(x[4:])),
        )
        cfg = MAMLConfig(inner_lr=0.3, inner_steps=2, first_order=False)
        model = LINEAR._replace(
            init=lambda k, n: mlp.init(k, n, in_features=1, hidden=8, layers=2),
            apply=mlp.apply,
        )
        algo = ALGORITHMS["maml"](cfg, model, regression_loss, n_out=1, n_train_classes=1)
        params = model.init(jax.random.PRNGKey(2), 1)

        def meta_loss(p):
            adapted = algo.adapt(p, task.support, KEY, 2)
            return regression_loss(model.apply(adapted, task.query.x), task.query.y)[0]

        grad = jax.grad(meta_loss)(params)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        gflat = jax.flatten_util.ravel_pytree(grad)[0]
        for i in range(3):
            direction = jax.random.normal(jax.random.PRNGKey(10 + i), flat.shape, jnp.float64)
            eps = 1e-5
            fd = (
                meta_loss(unravel(flat + eps * direction))
                - meta_loss(unravel(flat - eps * direction))
            ) / (2 * eps)
            np.testing.assert_allclose(float(gflat @ direction), float(fd), rtol=1e-6, atol=1e-9)


def test_first_order_equals_maml_with_stop_gradient():
    """FOMAML = grad of the query loss with the inner gradient held constant (an independent
    formulation written here), on a nonlinear model with 3 inner steps. float32, and the two
    sum in different orders: rtol 1e-4."""
    from metalearn.models import mlp

    task = linear_task(KEY)
    model = LINEAR._replace(
        init=lambda k, n: mlp.init(k, n, in_features=3, hidden=16, layers=2), apply=mlp.apply
    )
    cfg = MAMLConfig(inner_lr=0.05, inner_steps=3, first_order=True)
    algo = ALGORITHMS["maml"](cfg, model, regression_loss, n_out=1, n_train_classes=1)
    params = model.init(jax.random.PRNGKey(3), 1)

    def loss(p, split):
        return jnp.mean((model.apply(p, split.x) - split.y) ** 2)

    def independent(p):
        for _ in range(3):
            g = jax.tree.map(jax.lax.stop_gradient, jax.grad(loss)(p, task.support))
            p = jax.tree.map(lambda a, b: a - 0.05 * b, p, g)
        return loss(p, task.query)

    def ours(p):
        return loss(algo.adapt(p, task.support, KEY, 3), task.query)

    got, want = jax.grad(ours)(params), jax.grad(independent)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)


def test_reptile_update_is_mean_of_adapted_minus_initial():
    tasks = [linear_task(jax.random.PRNGKey(i)) for i in range(3)]
    batch = jax.tree.map(lambda *xs: jnp.stack(xs), *tasks)
    cfg = ReptileConfig(inner_lr=0.05, inner_steps=4, inner_optimizer="sgd")
    algo = ALGORITHMS["reptile"](cfg, LINEAR, regression_loss, n_out=1, n_train_classes=1)
    params = LINEAR.init(jax.random.PRNGKey(1), 1)
    w = params["head"]["w"]

    adapted = []
    for task in tasks:  # plain SGD written out by hand
        v = w
        for _ in range(4):
            xs, ys = task.support.x, task.support.y
            v = v - 0.05 * 2 / len(xs) * xs.T @ (xs @ v - ys)
        adapted.append(v)
    want = jnp.mean(jnp.stack(adapted), 0) - w

    grads, _ = jax.vmap(partial(task_gradient, algo), (None, 0, 0))(
        params, batch, jax.random.split(KEY, 3)
    )
    update = -jax.tree.map(lambda g: g.mean(0), grads)["head"]["w"]
    np.testing.assert_allclose(update, want, rtol=1e-5, atol=1e-6)

    # Through the shared train step with Reptile's SGD at outer rate 1, params land on the mean.
    exp = linear_maml_experiment(tasks[0])._replace(algo=algo, optimizer=optax.sgd(1.0))
    step = make_train_step(exp, meta_batch=1)
    new, _ = step(TrainState(jax.tree.map(jnp.copy, params), exp.optimizer.init(params)), (), KEY)
    np.testing.assert_allclose(new.params["head"]["w"], adapted[0], rtol=1e-5, atol=1e-6)


def test_protonet_logits_are_negative_squared_distances():
    emb = jax.random.normal(KEY, (6, 4))
    labels = jnp.array([0, 1, 2, 0, 1, 2])
    protos = prototypes(emb, labels, 3)
    np.testing.assert_allclose(protos[1], (emb[1] + emb[4]) / 2, rtol=1e-6)
    queries = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
    want = -np.sum((np.asarray(queries)[:, None] - np.asarray(protos)[None]) ** 2, -1)
    np.testing.assert_allclose(squared_distance_logits(queries, protos), want, rtol=1e-5, atol=1e-5)
