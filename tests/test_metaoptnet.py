"""MetaOptNet: the SVM head's QP solution meets its KKT conditions, its implicit gradient equals
the unrolled solver's and a finite difference, and the embedding learns through it; the shared
implicit-differentiation helper (which iMAML uses too) against a closed form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.algorithms import ALGORITHMS, implicit
from metalearn.algorithms.base import classification_loss, task_gradient
from metalearn.algorithms.metaoptnet import MetaOptNetConfig, project_rows, svm_dual, svm_head
from metalearn.models import make_model
from metalearn.models.mlp import MLPConfig
from metalearn.types import Split, Task

KEY = jax.random.PRNGKey(0)
C = 0.1


def problem(key, shots=2, way=3, dim=5, scale=1.0):
    """Support features [S, D] and one-hot targets of a way-class, shots-shot episode."""
    features = scale * jax.random.normal(key, (way * shots, dim))
    return features, jax.nn.one_hot(jnp.repeat(jnp.arange(way), shots), way)


def test_projection_equals_a_bisection_on_its_threshold():
    """Against an independent float64 computation: a = min(v - tau, cap) with tau found by
    bisection on sum(min(v - tau, cap)) = 0; and a is feasible."""
    v = 3 * jax.random.normal(KEY, (50, 4))
    cap = C * jax.nn.one_hot(jnp.arange(50) % 4, 4)
    a = np.asarray(project_rows(v, cap))
    v64, cap64 = np.asarray(v, np.float64), np.asarray(cap, np.float64)
    lo, hi = (v64 - cap64).min(1) - 1, v64.max(1) + 1
    for _ in range(100):
        mid = (lo + hi) / 2
        positive = np.minimum(v64 - mid[:, None], cap64).sum(1) > 0
        lo, hi = np.where(positive, mid, lo), np.where(positive, hi, mid)
    want = np.minimum(v64 - lo[:, None], cap64)
    np.testing.assert_allclose(a, want, atol=1e-5)
    assert np.all(a <= cap64 + 1e-6)
    np.testing.assert_allclose(a.sum(-1), 0, atol=1e-5)


def kkt_residuals(alpha, gram, targets, classes=None):
    """Stationarity and complementary-slackness violations of the dual at alpha, per the KKT
    conditions of min q(alpha) s.t. alpha <= C Y, rows sum to 0: grad q + mu + nu 1 = 0 with
    mu >= 0 zero where the bound is slack."""
    alpha, cap = np.asarray(alpha, np.float64), C * np.asarray(targets, np.float64)
    used = np.ones(alpha.shape[1], bool) if classes is None else np.asarray(classes)
    grad = np.asarray(gram, np.float64) @ alpha + alpha - np.asarray(targets)
    slack = (alpha < cap - 1e-5) & used
    nu = -np.sum(np.where(slack, grad, 0), 1) / np.maximum(slack.sum(1), 1)
    stationarity = np.where(slack, np.abs(grad + nu[:, None]), 0).max()
    mu = -grad - nu[:, None]  # the bound's multiplier where it is tight: must be >= 0
    dual_feasibility = np.where(~slack & used, np.maximum(-mu, 0), 0).max()
    primal = max(
        np.max(alpha - cap), np.abs(alpha.sum(1)).max(), np.abs(alpha[:, ~used]).max(initial=0)
    )
    return stationarity, dual_feasibility, primal


@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_qp_solution_meets_its_kkt_conditions(scale):
    features, targets = problem(KEY, scale=scale)
    gram = features @ features.T
    alpha = svm_dual(gram, targets, C, steps=3000)
    assert max(kkt_residuals(alpha, gram, targets)) < 1e-4
    # and the default number of FISTA steps gets close on these small problems
    default = svm_dual(gram, targets, C, steps=MetaOptNetConfig().qp_steps)
    np.testing.assert_allclose(default, alpha, atol=2e-3)


def test_qp_over_a_padded_episodes_classes_ignores_the_other_columns():
    """A class column without support examples is held at 0 and leaves the others' solution."""
    features, targets = problem(KEY)
    gram = features @ features.T
    want = svm_dual(gram, targets, C, steps=2000)
    wide = jnp.zeros((len(targets), 5)).at[:, jnp.array([0, 2, 4])].set(targets)
    classes = jnp.array([True, False, True, False, True])
    got = svm_dual(gram, wide, C, steps=2000, classes=classes)
    assert max(kkt_residuals(got, gram, wide, classes)) < 1e-4
    np.testing.assert_allclose(got[:, jnp.array([0, 2, 4])], want, atol=1e-5)
    np.testing.assert_array_equal(got[:, jnp.array([1, 3])], 0)


def head_loss(features, queries, weights, solver):
    """A scalar of the logits the head gives the queries: what a meta-gradient differentiates."""
    targets = jax.nn.one_hot(jnp.repeat(jnp.arange(3), 2), 3)
    alpha = solver(features, targets)
    return jnp.sum(weights * ((queries @ features.T) @ alpha))


def test_implicit_gradient_equals_the_unrolled_solver_and_finite_differences():
    features, _ = problem(KEY, scale=1.0)
    queries = jax.random.normal(jax.random.fold_in(KEY, 1), (4, 5))
    weights = jax.random.normal(jax.random.fold_in(KEY, 2), (4, 3))

    def implicit_head(f, t):
        return svm_head(f, t, C, qp_steps=2000, implicit_steps=30)

    def unrolled_head(f, t):  # backpropagation through every FISTA iteration
        return svm_dual(f @ f.T, t, C, steps=2000)

    got = jax.grad(head_loss)(features, queries, weights, implicit_head)
    unrolled = jax.grad(head_loss)(features, queries, weights, unrolled_head)
    np.testing.assert_allclose(got, unrolled, rtol=1e-3, atol=1e-5)
    # central differences along random directions (float32: eps 1e-2, 2% of the slope)
    loss = jax.jit(lambda f: head_loss(f, queries, weights, implicit_head))
    for i in range(3):
        direction = jax.random.normal(jax.random.fold_in(KEY, 10 + i), features.shape)
        eps = 1e-2
        fd = (loss(features + eps * direction) - loss(features - eps * direction)) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(got, direction), fd, rtol=2e-2, atol=1e-4)


def test_implicit_root_differentiates_a_linear_system_in_closed_form():
    """x* = A^-1 theta as the root of A x - theta, solved by an opaque solver: the helper's
    gradient with respect to theta and A equals that of the closed form, through vmap and jit,
    by CG (A symmetric positive definite) and GMRES."""
    m = jax.random.normal(KEY, (4, 4))
    a = m @ m.T + 4 * jnp.eye(4)
    thetas = jax.random.normal(jax.random.fold_in(KEY, 1), (3, 4))

    def reference(theta, a):
        return jnp.sum(jnp.sin(jnp.linalg.solve(a, theta)))

    for solver in implicit.LINEAR_SOLVERS:

        def through_root(theta, a, solver=solver):
            solve = lambda x0: jnp.linalg.solve(jax.lax.stop_gradient(a), theta)  # noqa: E731
            x = implicit.root(lambda x: a @ x - theta, solve, jnp.zeros(4), linear_solver=solver)
            return jnp.sum(jnp.sin(x))

        got = jax.jit(jax.vmap(jax.grad(through_root, (0, 1)), (0, None)))(thetas, a)
        want = jax.vmap(jax.grad(reference, (0, 1)), (0, None))(thetas, a)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), got, want)


def tiny_task(key, n_way=3, shots=2, dim=6):
    centres = 3 * jax.random.normal(key, (n_way, dim))
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    ys, yq = jnp.repeat(jnp.arange(n_way), shots), jnp.repeat(jnp.arange(n_way), 4)
    xs = centres[ys] + 0.3 * jax.random.normal(k1, (len(ys), dim))
    xq = centres[yq] + 0.3 * jax.random.normal(k2, (len(yq), dim))
    return Task(Split(xs, ys), Split(xq, yq), jnp.zeros((), jnp.int32))


def test_embedding_gradient_matches_finite_differences():
    """The learner end to end: the meta-gradient of the logit scale and of an embedding weight
    through the implicit SVM head agree with central differences of the meta-loss."""
    model = make_model(MLPConfig(hidden=16, layers=1), (6,))
    algo = ALGORITHMS["metaoptnet"](
        MetaOptNetConfig(qp_steps=500), model, classification_loss, n_out=3
    )
    params = algo.init(KEY)
    task = tiny_task(KEY)
    grads, metrics = task_gradient(algo, params, task, KEY)
    assert 0 <= float(metrics["accuracy"]) <= 1
    loss = jax.jit(lambda p: algo.meta_loss(p, task, KEY)[0])
    eps = 1e-2
    for path in (("scale",), ("embed", "blocks", 0, "w")):

        def at(delta, path=path):
            leaf = params
            for k in path:
                leaf = leaf[k]
            direction = jax.random.normal(jax.random.fold_in(KEY, 7), jnp.shape(leaf))
            shifted = jax.tree_util.tree_map_with_path(
                lambda p, x: x + delta * direction if _is(p, path) else x, params
            )
            return loss(shifted), direction

        (up, direction), (down, _) = at(eps), at(-eps)
        grad = grads
        for k in path:
            grad = grad[k]
        np.testing.assert_allclose(
            jnp.vdot(grad, direction), (up - down) / (2 * eps), rtol=3e-2, atol=1e-4
        )


def _is(key_path, path) -> bool:
    keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in key_path)
    return keys == tuple(path)
