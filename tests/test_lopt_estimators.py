"""ES and PES meta-gradient estimators (learned_optimizers/estimators.py) against closed forms and
exact backprop, averaged over many perturbations, within stated statistical tolerances.

The closed-form problem: a "drift" rule that moves a quadratic's parameters by its
meta-parameters v every step, x_t = x_{t0} + (t - t0) v, so every loss is exactly quadratic in v
and the antithetic estimates are exactly unbiased (no smoothing bias). Tolerances are Z standard
errors (computed from the per-pair estimates, or across repeats) per coordinate, and each test
also checks that its standard errors are small against what it compares, so a test cannot pass
by being noisy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.conditioning import ConditioningConfig
from metalearn.config import Config, TrainConfig
from metalearn.data.quadratic import QuadraticConfig, make_source
from metalearn.learned_optimizers import LearnedOptimizer
from metalearn.learned_optimizers import estimators as est
from metalearn.learned_optimizers.algorithm import LearnedOptimizerConfig, make
from metalearn.learned_optimizers.unroll import segment_loss, unroll
from metalearn.models.mlp import MLPConfig

Z = 5.0  # a 5-sigma bound per coordinate: a false failure has odds ~1e-6
DIM = 3
KEY = jax.random.PRNGKey(0)

DRIFT = LearnedOptimizer(
    init=lambda key, params: {"v": jnp.zeros(DIM)},
    init_state=lambda theta, params: (),
    update=lambda theta, grads, state, params: ({"theta": theta["v"]}, state),
)


def quadratic():
    cfg = QuadraticConfig(dim=DIM)
    task = make_source(cfg).sample(KEY, jnp.uint32(0))
    return cfg.problem(), task.support, {"theta": jnp.ones(DIM)}


def closed_form(split, x_start, v, offsets, steps):
    """d/dv of mean_j f(x_start + (offset + j) v) over j = 1..steps, x_start fixed (the carry),
    where f(x) = |W x - y|^2: mean_j 2 j' W^T (W x_j - y), j' = j + offset if the carry's
    offset steps depend on v (the full unroll), j' = j if not (truncation)."""
    W, y = split.x, split.y
    total = 0.0
    for j in range(1, steps + 1):
        x = x_start + j * v
        total = total + 2 * (j + offsets) * W.T @ (W @ x - y)
    return total / steps


def drift_segment(problem, split, steps):
    def segment(theta, carry):
        p, s, losses = unroll(DRIFT, problem, theta, carry, (), split, steps)
        return segment_loss(losses), p

    return segment


def check_close(estimates, truth, z=Z):
    """estimates [n, d] (independent draws of an unbiased estimate): their mean is within z
    standard errors of truth in every coordinate, and the standard errors are < 5% of truth's
    norm (so that the match is a precise one)."""
    mean, se = estimates.mean(0), estimates.std(0, ddof=1) / np.sqrt(len(estimates))
    assert np.all(np.abs(mean - truth) < z * se), (mean, truth, se)
    assert np.all(se < 0.05 * np.linalg.norm(truth)), (se, truth)
    return se


def test_es_is_unbiased_for_a_segments_closed_form_gradient():
    """Truncated ES on one 3-step segment from a carry x_K: the mean of 4000 pairs' estimates
    equals the closed-form gradient of that segment's loss (carry fixed) within Z SE."""
    problem, split, x = quadratic()
    v = jnp.array([0.05, -0.1, 0.02])
    segment = drift_segment(problem, split, 3)
    grads, loss, carry, (eps, pos, neg) = est.es_segment(segment, {"v": v}, x, KEY, 0.05, 4000)
    singles = np.asarray(est.per_pair(eps, pos, neg, 0.05)["v"])
    np.testing.assert_allclose(singles.mean(0), grads["v"], rtol=1e-5)  # the mean is the estimate
    check_close(singles, closed_form(split, x["theta"], v, 0, 3))
    # it carries the unperturbed run
    np.testing.assert_allclose(carry["theta"], x["theta"] + 3 * v, rtol=1e-6)
    np.testing.assert_allclose(loss, segment({"v": v}, x)[0], rtol=1e-6)


def test_pes_is_unbiased_for_the_full_unroll_where_truncated_es_is_not():
    """A 6-step run cut into 3 segments of 2 steps, summed over the segments: PES's estimate
    matches the closed-form gradient of the whole run (sum of the segments' losses), truncated
    ES's matches the truncated gradient instead and misses the full one by many SE (Vicol et
    al. 2021's point: truncation bias, which PES removes)."""
    problem, split, x0 = quadratic()
    v = jnp.array([0.05, -0.1, 0.02])
    theta, K, n, sigma, pairs = {"v": v}, 2, 3, 0.05, 4000
    segment = drift_segment(problem, split, K)

    full = sum(closed_form(split, x0["theta"] + s * K * v, v, s * K, K) for s in range(n))
    truncated = sum(closed_form(split, x0["theta"] + s * K * v, v, 0, K) for s in range(n))

    pes_state = est.pes_start(x0, theta, pairs)
    pes_total, es_total, carry = 0.0, 0.0, x0
    for s in range(n):
        key = jax.random.fold_in(KEY, s)
        _, _, pes_state, (accum, pos, neg) = est.pes_segment(
            segment, theta, pes_state, key, sigma, pairs
        )
        pes_total = pes_total + np.asarray(est.per_pair(accum, pos, neg, sigma)["v"])
        _, _, carry, (eps, pos, neg) = est.es_segment(segment, theta, carry, key, sigma, pairs)
        es_total = es_total + np.asarray(est.per_pair(eps, pos, neg, sigma)["v"])

    check_close(pes_total, full)
    se = check_close(es_total, truncated)
    gap = np.linalg.norm(es_total.mean(0) - full)
    assert gap > 20 * np.linalg.norm(se), (es_total.mean(0), full, se)
    assert np.max(np.abs(truncated - full) / np.abs(full)) > 0.3  # the bias is not small


def learner(**algo):
    cfg = Config(
        data=QuadraticConfig(dim=DIM, init_scale=0.0),  # every start is 0: keys only draw noise
        model=MLPConfig(),
        conditioning=ConditioningConfig(name="none"),
        algo=LearnedOptimizerConfig(optimizer="hyper", lr=0.01, momentum=0.5, **algo),
        train=TrainConfig(meta_batch=2),
    )
    source = make_source(cfg.data)
    return source, make(cfg.algo, None, None, DIM, config=cfg, source=source)


def run_total(algo, tasks, keys, n_segments, repeat):
    """The sum of the objective's gradients over one whole run's segments, as a flat vector."""
    gradient = jax.jit(algo.objective.gradient)
    state, total = algo.objective.init_state(), 0.0
    theta = algo.init(KEY)
    for s in range(n_segments):
        step_keys = jax.vmap(lambda k, s=s: jax.random.fold_in(k, 1000 * repeat + s))(keys)
        grads, state, _ = gradient(theta, state, tasks, step_keys, s + 1, None)
        total = total + np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
    assert int(state.t) == 0  # the run is over
    return total


def test_algorithm_estimators_match_backprop_through_segments_and_the_whole_run():
    """Through algo=learned_optimizer's objective (optimizer=hyper on 2 quadratics, a 4-step run
    in 4 segments, float64, sigma = 1e-3 so the smoothing bias of a non-quadratic loss is
    ~sigma^2, far below the noise): over 16 repeats of 500 pairs, estimator=pes's total matches
    exact backprop through the whole run (second order), and estimator=es's matches exact
    backprop through each segment (truncated), which differs from the whole run's."""
    with jax.enable_x64(True):
        source, exact_full = learner(unroll=4, truncation=4, second_order=True)
        keys = jax.random.split(KEY, 2)
        tasks = jax.vmap(lambda k: source.sample(k, source.splits["train"]))(keys)
        full = 4 * run_total(exact_full, tasks, keys, 1, 0)  # the mean loss over 4 steps
        _, exact_truncated = learner(unroll=4, truncation=1, second_order=True)
        truncated = run_total(exact_truncated, tasks, keys, 4, 0)

        totals = {}
        for name in ("pes", "es"):
            _, algo = learner(unroll=4, truncation=1, estimator=name, es_sigma=1e-3, es_samples=500)
            totals[name] = np.stack([run_total(algo, tasks, keys, 4, r) for r in range(16)])
        check_close(totals["pes"], full)
        se = check_close(totals["es"], truncated)
        gap = np.linalg.norm(totals["es"].mean(0) - full)
        assert gap > 10 * np.linalg.norm(se), (totals["es"].mean(0), full, truncated, se)
