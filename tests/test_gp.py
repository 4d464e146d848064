"""data=gp: the padded GP sampler, the exact GP oracle against scipy, and the Gaussian predictive
metrics (log-likelihood, MSE, interval coverage) against hand computations and calibrated
predictors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from metalearn.algorithms.base import COVERAGE_LEVELS, gaussian_loss
from metalearn.algorithms.gp_oracle import oracle_metrics
from metalearn.checks import ConfigError
from metalearn.data.gp import (
    KERNELS,
    GPConfig,
    gp_posterior,
    joint_log_likelihood,
    kernel_matrix,
    make_source,
)
from metalearn.models import norm
from metalearn.types import Split, Task

KEY = jax.random.PRNGKey(0)


def numpy_kernel(kernel, a, b):
    r = a[:, None] - b[None, :]
    if kernel == "eq":
        return np.exp(-0.5 * (r / 0.25) ** 2)
    if kernel == "matern52":
        d = np.sqrt(5) * np.abs(r) / 0.25
        return (1 + d + d**2 / 3) * np.exp(-d)
    return np.exp(-0.5 * (r / 0.5) ** 2) * np.exp(-2 * np.sin(np.pi * r / 0.25) ** 2)


def padded(x, y, n_real, slots):
    """A split of n_real points padded to `slots` with junk (which the mask must hide)."""
    pad = slots - n_real
    xs = np.concatenate([x, np.full(pad, 7.0)])[:, None].astype(np.float32)
    ys = np.concatenate([y, np.full(pad, -9.0)])[:, None].astype(np.float32)
    return Split(jnp.asarray(xs), jnp.asarray(ys), jnp.arange(slots) < n_real)


@pytest.mark.parametrize("kernel", KERNELS)
def test_oracle_matches_scipy_multivariate_normal(kernel):
    """The GP predictive (mean, covariance, joint log-likelihood of the targets) against a
    float64 numpy/scipy computation of the conditional Gaussian, with padded context and
    target slots holding junk values; tolerance 2e-3 (float32 Cholesky)."""
    cfg = GPConfig(kernel=kernel, noise=0.1)
    rng = np.random.default_rng(1)
    xc, xt = rng.uniform(-2, 2, 5), rng.uniform(-2, 2, 4)
    joint = numpy_kernel(kernel, np.r_[xc, xt], np.r_[xc, xt]) + 0.01 * np.eye(9)
    y = rng.multivariate_normal(np.zeros(9), joint)
    yc, yt = y[:5], y[5:]
    s_cc, s_tc, s_tt = joint[:5, :5], joint[5:, :5], joint[5:, 5:]
    want_mean = s_tc @ np.linalg.solve(s_cc, yc)
    want_cov = s_tt - s_tc @ np.linalg.solve(s_cc, s_tc.T)
    want_ll = stats.multivariate_normal(want_mean, want_cov).logpdf(yt) / 4

    task = Task(padded(xc, yc, 5, 8), padded(xt, yt, 4, 6), jnp.zeros((), jnp.int32))
    mean, cov = gp_posterior(cfg, task.support, task.query.x, task.query.mask)
    np.testing.assert_allclose(mean[:4, 0], want_mean, atol=2e-3)
    np.testing.assert_allclose(cov[:4, :4], want_cov, atol=2e-3)
    np.testing.assert_allclose(joint_log_likelihood(cfg, task), want_ll, rtol=2e-3, atol=2e-3)


def test_oracle_marginals_score_as_scipy_norm():
    """The oracle's per-point log-likelihood is the mean of scipy's marginal log-densities."""
    cfg = GPConfig(noise=0.2)
    xc, xt = np.array([-1.0, 0.0, 1.5]), np.array([-0.5, 0.7])
    yc, yt = np.array([0.3, -0.2, 1.0]), np.array([0.1, 0.4])
    joint = numpy_kernel("eq", np.r_[xc, xt], np.r_[xc, xt]) + 0.04 * np.eye(5)
    s_cc, s_tc, s_tt = joint[:3, :3], joint[3:, :3], joint[3:, 3:]
    mean = s_tc @ np.linalg.solve(s_cc, yc)
    std = np.sqrt(np.diag(s_tt - s_tc @ np.linalg.solve(s_cc, s_tc.T)))
    want = stats.norm(mean, std).logpdf(yt).mean()
    task = Task(padded(xc, yc, 3, 3), padded(xt, yt, 2, 4), jnp.zeros((), jnp.int32))
    got_mean, got_cov = gp_posterior(cfg, task.support, task.query.x, task.query.mask)
    outputs = (got_mean, jnp.sqrt(jnp.diag(got_cov))[:, None])
    loss, metrics = gaussian_loss(outputs, task.query.y, task.query.mask)
    np.testing.assert_allclose(metrics["log_likelihood"], want, rtol=1e-4, atol=1e-4)


def test_sampler_draws_padded_tasks_of_the_configured_sizes():
    cfg = GPConfig(k_shot=12, k_query=9, min_shot=3, min_query=2)
    sample = jax.jit(jax.vmap(lambda k: make_source(cfg).sample(k, (), False)))
    tasks = sample(jax.random.split(KEY, 400))
    n_c, n_t = tasks.support.mask.sum(1), tasks.query.mask.sum(1)
    assert tasks.support.x.shape == (400, 12, 1) and tasks.query.y.shape == (400, 9, 1)
    assert n_c.min() == 3 and n_c.max() == 12 and n_t.min() == 2 and n_t.max() == 9
    for split in (tasks.support, tasks.query):  # padding holds zeros; real x lie in x_range
        real = split.mask[..., None]
        assert not np.any(np.where(real, 0.0, np.abs(split.x) + np.abs(split.y)))
        assert np.all(np.where(real, np.abs(split.x), 0.0) <= 2.0)
    # y is a draw of a unit-variance GP plus noise: its variance is 1 + noise^2
    y = np.asarray(tasks.support.y[..., 0])[np.asarray(tasks.support.mask)]
    assert abs(y.var() - (1 + cfg.noise**2)) < 0.1  # ~2900 correlated draws: a loose bound
    again = sample(jax.random.split(KEY, 400))
    np.testing.assert_array_equal(again.query.y, tasks.query.y)  # a key fixes the task


def test_kernels_match_their_formulas():
    a = jnp.linspace(-2, 2, 7)[:, None]
    for kernel in KERNELS:
        want = numpy_kernel(kernel, np.asarray(a[:, 0]), np.asarray(a[:, 0]))
        np.testing.assert_allclose(kernel_matrix(kernel, a, a), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "setting, value, says",
    [
        ("kernel", "rbf", "data.kernel='rbf'"),
        ("min_shot", 60, "data.min_shot=60"),
        ("min_query", 0, "data.min_query=0"),
        ("noise", 0.0, "data.noise=0.0"),
        ("x_range", (1.0, -1.0), "data.x_range"),
    ],
)
def test_bad_settings_are_refused_with_the_value_named(setting, value, says):
    with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace(".", r"\.")):
        GPConfig(**{setting: value})


def test_gaussian_metrics_against_hand_computed_values():
    """Three real points at z = 0.5, -1.2, 2.5 standard deviations, one padded slot."""
    mean = jnp.array([[0.0], [1.0], [-1.0], [0.0]])
    std = jnp.array([[2.0], [0.5], [1.0], [1.0]])
    y = jnp.array([[1.0], [0.4], [1.5], [100.0]])
    mask = jnp.array([True, True, True, False])
    with norm.testing():
        loss, m = gaussian_loss((mean, std), y, mask)
    z, s = np.array([0.5, -1.2, 2.5]), np.array([2.0, 0.5, 1.0])
    want_ll = np.mean(-0.5 * z**2 - np.log(s) - 0.5 * math.log(2 * math.pi))
    np.testing.assert_allclose(m["log_likelihood"], want_ll, rtol=1e-6)
    np.testing.assert_allclose(loss, -want_ll, rtol=1e-6)
    np.testing.assert_allclose(m["mse"], np.mean([1.0, 0.36, 6.25]), rtol=1e-6)
    # |z| <= 0.674 (50%): one of three; <= 1.645 (90%) and <= 1.960 (95%): two of three
    np.testing.assert_allclose([m["coverage_50"], m["coverage_90"], m["coverage_95"]],
                               [1 / 3, 2 / 3, 2 / 3], rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(COVERAGE_LEVELS[95], 1.959964, rtol=1e-6)
    _, train_metrics = gaussian_loss((mean, std), y, mask)
    assert "coverage_50" not in train_metrics  # coverage is a meta-test metric only


def test_a_calibrated_predictor_covers_at_the_nominal_levels():
    """Targets drawn from the predictive itself: each coverage is within 4 binomial standard
    errors of its level, and the log-likelihood is the Gaussian's expected value."""
    n = 20_000
    k_mean, k_std, k_y = jax.random.split(KEY, 3)
    mean = jax.random.normal(k_mean, (n, 1))
    std = jnp.exp(jax.random.normal(k_std, (n, 1)))
    y = mean + std * jax.random.normal(k_y, (n, 1))
    with norm.testing():
        _, m = gaussian_loss((mean, std), y)
    for level in COVERAGE_LEVELS:
        p = level / 100
        assert abs(float(m[f"coverage_{level}"]) - p) < 4 * math.sqrt(p * (1 - p) / n)
    entropy = np.mean(np.log(np.asarray(std))) + 0.5 * math.log(2 * math.pi * math.e)
    assert abs(float(m["log_likelihood"]) + entropy) < 4 * math.sqrt(0.5 / n)
    # an overconfident one (half the std) covers less, an underconfident one more
    with norm.testing():
        _, sharp = gaussian_loss((mean, std / 2), y)
        _, wide = gaussian_loss((mean, std * 2), y)
    assert sharp["coverage_90"] < 0.7 and wide["coverage_90"] > 0.99


def test_the_oracle_is_calibrated_on_the_test_tasks():
    """The GP oracle predicts with the distribution that drew the targets: through the shared
    evaluator its coverage is within 1.5 of the evaluator's 95% CIs (3 standard errors) of
    nominal."""
    cfg = GPConfig(k_shot=10, k_query=10)
    result = oracle_metrics(cfg, "test", 300, seed=0)
    for level in COVERAGE_LEVELS:
        gap = abs(result[f"coverage_{level}"] - level / 100)
        assert gap < 1.5 * result[f"coverage_{level}_ci95"] + 0.005, (level, result)
    # the joint density is at least as good as the product of marginals on average: the
    # targets are correlated given the context
    assert result["joint_log_likelihood"] > result["log_likelihood"]


def test_every_learner_declares_a_known_predictive():
    """The capability the Gaussian metrics hang on: each algorithm's schema declares what its
    predict returns, and a "gaussian" one is scored by gaussian_loss on regression data."""
    from metalearn import registry
    from metalearn.algorithms.base import PREDICTIVES, regression_loss, task_loss_fn

    declared = {name: o.schema.predictive for name, o in registry.options("algo").items()}
    assert set(declared.values()) <= set(PREDICTIVES), declared
    assert "gaussian" in declared.values()
    assert task_loss_fn("regression", "gaussian") is gaussian_loss
    assert task_loss_fn("regression") is regression_loss
