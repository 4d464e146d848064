"""Task weightings against hand-computed values and jax.grad of their written-out objectives.

Tolerances: float32 throughout, so relative 1e-5 and absolute 1e-6 unless a test says otherwise.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.algorithms.multitask import MultitaskConfig
from metalearn.config import ConfigError
from metalearn.weighting import (
    make_weighting,
    pairwise_distance_penalty,
    pcgrad_orders,
    project_conflicting,
)

TOL = dict(rtol=1e-5, atol=1e-6)


def step_fn(weighting, task_losses, jit=False):
    """(params, wparams, state, present, step) -> weighting.gradient(...), compiled once if jit."""

    def call(params, wparams, state, present, step):
        return weighting.gradient(task_losses, params, wparams, state, present, step)

    call = jax.jit(call) if jit else call
    return lambda params, wparams, state, present, step=0: call(
        params, wparams, state, jnp.asarray(present), jnp.asarray(step, jnp.int32)
    )


def run(weighting, task_losses, params, wparams, state, present, step=0, jit=False):
    return step_fn(weighting, task_losses, jit)(params, wparams, state, present, step)


def identity_losses(losses):
    """The parameters are the loss vector itself, so grads = d objective / d L_i."""
    return losses, {}


# ------------------------------------------------- every combining mode equals jax.grad of its sum

X = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 3))  # 3 tasks, 4 examples, 3 features
Y = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
PRESENT = np.array([True, False, True])
LOG_VAR = jnp.array([0.3, -0.2, 0.5])
DWA_STATE = {  # ratios r = last / prev = [0.5, 1, 2]
    "last": jnp.array([1.0, 2.0, 0.5]),
    "prev": jnp.array([2.0, 2.0, 0.25]),
    "seen": jnp.array([2, 2, 2], jnp.int32),
}


def regression_losses(params):
    losses = jnp.mean((X @ params["w"] + params["b"] - Y) ** 2, axis=1)
    # The absent task's entry is NaN: the weighting must ignore it, not just weight it by 0.
    return jnp.where(PRESENT, losses, jnp.nan), {"sum": jnp.sum(losses)}


def dwa_lambdas():
    """lambda over the present tasks 0 and 2: |P| exp(r_i / 2) / sum_j exp(r_j / 2)."""
    e0, e2 = math.exp(0.5 / 2), math.exp(2.0 / 2)
    return 2 * e0 / (e0 + e2), 2 * e2 / (e0 + e2)


OBJECTIVES = {  # config overrides -> the documented objective of losses L (tasks 0 and 2 present)
    "uniform": ({}, lambda L, s: (L[0] + L[2]) / 2),
    "static": ({"task_weights": [1.0, 2.0, 3.0]}, lambda L, s: (1 * L[0] + 3 * L[2]) / 4),
    "uncertainty": (
        {},
        lambda L, s: ((jnp.exp(-s[0]) * L[0] + s[0]) + (jnp.exp(-s[2]) * L[2] + s[2])) / 2,
    ),
    "dwa": (
        {"dwa_temperature": 2.0},
        lambda L, s: (dwa_lambdas()[0] * L[0] + dwa_lambdas()[1] * L[2]) / 2,
    ),
    "minmax": ({}, lambda L, s: jnp.maximum(L[0], L[2])),
    "minmax_smooth": (
        {"minmax_temperature": 0.5},
        lambda L, s: 0.5 * jnp.log(jnp.exp(L[0] / 0.5) + jnp.exp(L[2] / 0.5)),
    ),
}


@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow), True])  # fast: jit
@pytest.mark.parametrize("mode", sorted(OBJECTIVES))
def test_gradient_is_jax_grad_of_documented_objective(mode, jit):
    overrides, objective = OBJECTIVES[mode]
    cfg = MultitaskConfig(weighting=mode.removesuffix("_smooth"), **overrides)
    weighting = make_weighting(cfg, 3)
    params = {"w": jnp.array([0.5, -1.0, 0.2]), "b": jnp.array(0.1)}
    wparams = weighting.init_params(3)
    if mode == "uncertainty":
        wparams = {"log_var": LOG_VAR}
    state = DWA_STATE if mode == "dwa" else weighting.init_state(3)

    grads, wgrads, _, metrics = run(
        weighting, regression_losses, params, wparams, state, PRESENT, jit=jit
    )

    def reference(params, log_var):
        L = jnp.mean((X @ params["w"] + params["b"] - Y) ** 2, axis=1)
        return objective(L, log_var)

    want, (want_grads, want_log_var_grad) = jax.value_and_grad(reference, argnums=(0, 1))(
        params, LOG_VAR
    )
    np.testing.assert_allclose(metrics["objective"], want, **TOL)
    for key in params:
        np.testing.assert_allclose(grads[key], want_grads[key], **TOL)
    assert jax.tree.structure(wgrads) == jax.tree.structure(wparams)
    if mode == "uncertainty":
        np.testing.assert_allclose(wgrads["log_var"], want_log_var_grad, **TOL)
    assert metrics["weights"][1] == 0 and np.isfinite(metrics["losses"]).all()
    assert metrics["aux"]["sum"].shape == ()


# ---------------------------------------------------------------------------- uncertainty by hand


def test_uncertainty_objective_and_weights_by_hand():
    """s = [0, log 2, 5], L = [1, 4, 9], task 2 absent. Per-task terms exp(-s) L + s:
    1 + 0 and 4/2 + log 2, so the objective is (3 + log 2)/2; d/dL_i = exp(-s_i)/2 = [0.5, 0.25];
    d/ds_i = (1 - exp(-s_i) L_i)/2 = [0, -0.5]; nothing flows to the absent task."""
    weighting = make_weighting(MultitaskConfig(weighting="uncertainty"), 3)
    assert jax.tree.map(jnp.shape, weighting.init_params(3)) == {"log_var": (3,)}
    wparams = {"log_var": jnp.array([0.0, math.log(2.0), 5.0])}
    grads, wgrads, _, metrics = run(
        weighting, identity_losses, jnp.array([1.0, 4.0, 9.0]), wparams, {}, [True, True, False]
    )
    np.testing.assert_allclose(metrics["objective"], (3 + math.log(2)) / 2, **TOL)
    np.testing.assert_allclose(grads, [0.5, 0.25, 0.0], **TOL)
    np.testing.assert_allclose(wgrads["log_var"], [0.0, -0.5, 0.0], **TOL)


# ------------------------------------------------------------------------------------ DWA by hand


def softmax_times_count(ratios, temperature=2.0):
    e = [math.exp(r / temperature) for r in ratios]
    return [len(e) * v / sum(e) for v in e]


def test_dwa_weights_over_a_sequence_with_an_absent_task():
    """Temperature 2, three tasks. lambda is 1 for the first two steps; afterwards it is the
    softmax of each task's last two observed losses' ratio; task 2 skips step 3 and keeps its
    history, so at step 4 its ratio still uses steps 2 and 1."""
    weighting = make_weighting(MultitaskConfig(weighting="dwa", dwa_temperature=2.0), 3)
    all3 = [True, True, True]
    steps = [  # (losses, present, expected lambda)
        ([1.0, 2.0, 4.0], all3, [1, 1, 1]),
        ([0.5, 2.0, 2.0], all3, [1, 1, 1]),
        ([0.25, 3.0, 1.0], all3, softmax_times_count([0.5 / 1, 2 / 2, 2 / 4])),
        ([0.2, 3.0, np.nan], [True, True, False], [*softmax_times_count([0.25 / 0.5, 3 / 2]), 0]),
        ([0.1, 3.0, 0.5], all3, softmax_times_count([0.2 / 0.25, 3 / 3, 1 / 2])),
    ]
    state, gradient = weighting.init_state(3), step_fn(weighting, identity_losses, jit=True)
    for step, (losses, present, want) in enumerate(steps):
        grads, _, state, metrics = gradient(jnp.array(losses), {}, state, present, step)
        n = sum(present)
        np.testing.assert_allclose(metrics["dwa_weights"], want, **TOL)
        np.testing.assert_allclose(grads, np.array(want) / n, **TOL)  # objective sum lambda L / |P|
        want_objective = sum(w * v for w, v, p in zip(want, losses, present) if p) / n
        np.testing.assert_allclose(metrics["objective"], want_objective, **TOL)
    np.testing.assert_array_equal(state["seen"], [2, 2, 2])


def test_dwa_task_seen_fewer_than_twice_has_ratio_one():
    """Task 1 first appears at step 2: its ratio is 1 while task 0 already has 0.5."""
    weighting = make_weighting(MultitaskConfig(weighting="dwa", dwa_temperature=2.0), 2)
    state = weighting.init_state(2)
    for step, losses in enumerate([[2.0, 0.0], [1.0, 0.0]]):
        _, _, state, _ = run(
            weighting, identity_losses, jnp.array(losses), {}, state, [True, False], step
        )
    _, _, state, metrics = run(
        weighting, identity_losses, jnp.array([1.0, 7.0]), {}, state, [True, True], 2
    )
    np.testing.assert_allclose(metrics["dwa_weights"], softmax_times_count([0.5, 1.0]), **TOL)
    np.testing.assert_array_equal(state["seen"], [2, 1])
    np.testing.assert_allclose(state["last"], [1.0, 7.0], **TOL)


# --------------------------------------------------------------------------------------- static


def test_static_weights_of_the_wrong_length_are_rejected_before_training():
    cfg = MultitaskConfig(weighting="static", task_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match=r"2 entries but the data has 3 tasks"):
        make_weighting(cfg, 3)
    with pytest.raises(ConfigError, match=r"at least one weight must be > 0"):
        make_weighting(MultitaskConfig(weighting="static", task_weights=[0.0, 0.0]), 2)


# --------------------------------------------------------------------------------------- PCGrad


def linear_losses(gradients):
    """L_i = g_i . theta, so task i's gradient is g_i wherever theta is; theta split in a dict."""
    g = jnp.asarray(gradients, jnp.float32)

    def task_losses(params):
        theta = jnp.concatenate([params["a"], params["b"]])
        return g @ theta, {}

    return task_losses


def pcgrad_update(gradients, present, step=0, jit=False):
    n_tasks, dim = np.shape(gradients)
    weighting = make_weighting(MultitaskConfig(weighting="pcgrad"), n_tasks)
    params = {"a": jnp.zeros(1), "b": jnp.zeros(dim - 1)}
    grads, wgrads, _, metrics = run(
        weighting, linear_losses(gradients), params, {}, {}, present, step, jit
    )
    assert wgrads == {}
    return np.concatenate([grads["a"], grads["b"]]), metrics


@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow), True])  # fast: jit
def test_pcgrad_two_conflicting_tasks_by_hand(jit):
    """g1 = (1, 0), g2 = (-1, 1): g1 . g2 = -1 < 0, so g1' = g1 - (-1/2) g2 = (0.5, 0.5) and
    g2' = g2 - (-1/1) g1 = (0, 1); the update is their mean (0.25, 0.75)."""
    g = np.array([[1.0, 0.0], [-1.0, 1.0]])
    projected = project_conflicting(jnp.asarray(g), jnp.array([True, True]), pcgrad_orders(0, 2))
    np.testing.assert_allclose(projected, [[0.5, 0.5], [0.0, 1.0]], **TOL)
    update, metrics = pcgrad_update(g, [True, True], jit=jit)
    np.testing.assert_allclose(update, [0.25, 0.75], **TOL)
    assert metrics["conflicts"] == 1.0


def test_pcgrad_leaves_non_conflicting_gradients_unchanged():
    g = np.array([[1.0, 0.0], [1.0, 1.0]])  # g1 . g2 = 1 > 0
    update, metrics = pcgrad_update(g, [True, True])
    np.testing.assert_allclose(update, g.mean(axis=0), **TOL)  # the uniform gradient
    assert metrics["conflicts"] == 0.0


def test_pcgrad_ignores_absent_tasks():
    """A third task that conflicts with both but is absent changes nothing."""
    g = np.array([[1.0, 0.0], [-1.0, 1.0], [-5.0, -5.0]])
    update, _ = pcgrad_update(g, [True, True, False])
    np.testing.assert_allclose(update, [0.25, 0.75], **TOL)


def reference_pcgrad(g, orders):
    """Algorithm 1 of Yu et al. 2020 in numpy float64, in the given visiting orders."""
    return reference_pcgrad_rows(g, range(len(g)), orders)


def reference_pcgrad_rows(g, tasks, orders):
    """The same over the given tasks only: task tasks[k] visits orders[k]."""
    projected = []
    for i, order in zip(tasks, orders):
        gi = g[i].copy()
        for j in order:
            if j != i and gi @ g[j] < 0:
                gi -= (gi @ g[j]) / (g[j] @ g[j]) * g[j]
        projected.append(gi)
    return np.mean(projected, axis=0)


@pytest.mark.parametrize("step", [0, 7])
def test_pcgrad_four_tasks_match_the_paper_algorithm(step):
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (4, 5)), np.float64)
    orders = np.asarray(pcgrad_orders(step, 4))
    assert all(sorted(row) == [0, 1, 2, 3] for row in orders)
    update, _ = pcgrad_update(g, [True] * 4, step=step, jit=True)
    np.testing.assert_allclose(update, reference_pcgrad(g, orders), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("present", [[1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 1, 1]])
def test_pcgrad_over_sampled_tasks_only_matches_all_tasks(present):
    """With max_present=3 only the present tasks' gradients are computed (padded slots when
    fewer are present); the update equals the paper's algorithm over the present tasks."""
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (6, 4)), np.float64)
    weighting = make_weighting(MultitaskConfig(weighting="pcgrad"), 6, max_present=3)
    params = {"a": jnp.zeros(1), "b": jnp.zeros(3)}
    grads, _, _, metrics = run(
        weighting, linear_losses(g), params, {}, {}, np.asarray(present, bool), step=2, jit=True
    )
    mask = np.asarray(present, bool)
    orders = np.asarray(pcgrad_orders(2, 6))
    kept = [[j for j in row if mask[j]] for row in orders[mask]]
    expected = reference_pcgrad_rows(g, np.flatnonzero(mask), kept)
    np.testing.assert_allclose(
        np.concatenate([grads["a"], grads["b"]]), expected, rtol=1e-4, atol=1e-5
    )
    n = mask.sum()
    dots = g[mask] @ g[mask].T
    pairs = n * (n - 1)
    expected_conflicts = ((dots < 0).sum() / pairs) if pairs else 0.0
    assert float(metrics["conflicts"]) == pytest.approx(expected_conflicts)


def test_pcgrad_from_per_draw_gradients_equals_one_backward_pass_per_task():
    """5 draws of tasks [0, 1, 3, 0, 3] out of 4, squared-error losses: averaging each draw's own
    gradient per task gives the same update as pulling back one-hot cotangents."""
    x = jax.random.normal(jax.random.PRNGKey(6), (5, 3))
    y = jax.random.normal(jax.random.PRNGKey(7), (5,))
    ids = jnp.array([0, 1, 3, 0, 3])
    counts = jnp.maximum(jax.ops.segment_sum(jnp.ones(5), ids, 4), 1)
    params = {"w": jax.random.normal(jax.random.PRNGKey(8), (3,))}

    def draw_loss(p, xb, yb):
        return (jnp.tanh(xb @ p["w"]) - yb) ** 2

    def task_losses(p):
        return jax.ops.segment_sum(jax.vmap(draw_loss, (None, 0, 0))(p, x, y), ids, 4) / counts, {}

    def draw_gradients(p):
        grads = jax.vmap(jax.grad(draw_loss), (None, 0, 0))(p, x, y)
        return task_losses(p)[0], grads, ids, {}

    weighting = make_weighting(MultitaskConfig(weighting="pcgrad"), 4, max_present=5)
    present = jnp.array([True, True, False, True])
    slow = weighting.gradient(task_losses, params, {}, {}, present, 3)
    fast = weighting.gradient(task_losses, params, {}, {}, present, 3, draw_gradients)
    np.testing.assert_allclose(fast[0]["w"], slow[0]["w"], **TOL)
    assert float(fast[3]["conflicts"]) == float(slow[3]["conflicts"])


# --------------------------------------------------------------------------------------- minmax


def toy_losses(theta):
    """L1 = theta^2 and L2 = (theta - 3)^2 / 4. The uniform mean is minimised at theta = 0.6,
    where L = (0.36, 1.44); the max is minimised where they are equal, at theta = 1."""
    return jnp.stack([theta**2, 0.25 * (theta - 3) ** 2]), {}


def descend(cfg, steps=3, lr=0.05):
    gradient = step_fn(make_weighting(cfg, 2), toy_losses, jit=True)
    theta, history = jnp.array(0.6), []
    for step in range(steps + 1):
        grads, _, _, metrics = gradient(theta, {}, {}, [True, True], step)
        history.append(np.asarray(metrics["losses"]))
        theta = theta - lr * grads
    return np.array(history)


@pytest.mark.parametrize("temperature", [0.0, 0.1])
def test_minmax_lowers_the_worst_task_where_uniform_stands_still(temperature):
    uniform = descend(MultitaskConfig(weighting="uniform"))
    np.testing.assert_allclose(uniform[-1], uniform[0], atol=1e-5)  # at its optimum: no move
    minmax = descend(MultitaskConfig(weighting="minmax", minmax_temperature=temperature))
    worst = minmax.max(axis=1)
    assert np.all(np.diff(worst) < -0.05), worst  # the max falls at every step
    assert np.all(np.diff(minmax[:, 1]) < 0)  # by lowering task 2, the worst one
    assert np.all(np.diff(minmax[:, 0]) > 0)  # at the cost of task 1


# --------------------------------------------------------------------------- soft-sharing penalty


def loop_penalty(stacked):
    """sum over pairs i < j of |theta_i - theta_j|^2, in numpy float64, O(T^2)."""
    total = 0.0
    for leaf in jax.tree.leaves(stacked):
        a = np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1)
        for i, j in itertools.combinations(range(len(a)), 2):
            total += np.sum((a[i] - a[j]) ** 2)
    return total


def stacked_params(seed, n_tasks, spread=1.0):
    """Per-task copies of a shared pytree plus noise of the given spread, float32."""
    rng = np.random.default_rng(seed)
    shapes = {"w": (3, 2), "b": (5,)}
    return {
        k: (rng.normal(size=shape) + spread * rng.normal(size=(n_tasks, *shape))).astype(np.float32)
        for k, shape in shapes.items()
    }


def test_pairwise_distance_penalty_matches_the_pairwise_loop():
    penalty = jax.jit(pairwise_distance_penalty)
    for n_tasks in (1, 2, 5):
        params = stacked_params(n_tasks, n_tasks)
        np.testing.assert_allclose(penalty(params), loop_penalty(params), **TOL)
    # Nearly shared parameters (spread 1e-3): no cancellation; relative 1e-3 in float32.
    close = stacked_params(9, 6, spread=1e-3)
    np.testing.assert_allclose(penalty(close), loop_penalty(close), rtol=1e-3)


def test_pairwise_distance_penalty_gradient_matches_the_loop():
    params = stacked_params(4, 4)

    def jax_loop(stacked):
        return sum(
            jnp.sum((leaf[i] - leaf[j]) ** 2)
            for leaf in jax.tree.leaves(stacked)
            for i, j in itertools.combinations(range(leaf.shape[0]), 2)
        )

    got = jax.jit(jax.grad(pairwise_distance_penalty))(params)
    want = jax.jit(jax.grad(jax_loop))(params)
    for key in params:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)
