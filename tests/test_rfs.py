"""RFS (Tian et al. 2020): the test-time classifier is the L2-regularised logistic regression of
scikit-learn's form on the frozen, L2-normalised support features (against SciPy's L-BFGS-B in
float64; the solver at other C on raw features too), pre-training is the family's classifier
over support and query examples with split-wide labels, and a padded episode gives the
unpadded results."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from helpers import compose_config

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms._pretrain import LOGREG_TOL, logistic_regression
from metalearn.algorithms.base import classification_loss
from metalearn.algorithms.rfs import RFSConfig
from metalearn.checks import ConfigError
from metalearn.models import make_model, norm
from metalearn.models.mlp import MLPConfig
from metalearn.types import Split, Task

KEY = jax.random.PRNGKey(0)
DIM, WAY, SHOTS, QUERIES, TRAIN_CLASSES = 6, 3, 2, 4, 10
MODEL = make_model(MLPConfig(hidden=16, layers=1), (DIM,))


def build(n_out=WAY, **kw):
    return ALGORITHMS["rfs"](
        RFSConfig(**kw), MODEL, classification_loss, n_out=n_out, n_train_classes=TRAIN_CLASSES
    )


def task_of(key, labels=None, shots=SHOTS) -> Task:
    labels = np.arange(WAY) if labels is None else labels
    centres = 2 * jax.random.normal(key, (TRAIN_CLASSES, DIM))
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    ys = jnp.repeat(jnp.asarray(labels), shots)
    yq = jnp.repeat(jnp.asarray(labels), QUERIES)
    xs = centres[ys] + 0.5 * jax.random.normal(k1, (len(ys), DIM))
    xq = centres[yq] + 0.5 * jax.random.normal(k2, (len(yq), DIM))
    return Task(Split(xs, ys), Split(xq, yq), jnp.zeros((), jnp.int32))


def np_features(params, x, normalize=True):
    block = jax.tree.map(lambda a: np.asarray(a, np.float64), params["blocks"][0])
    f = np.maximum(np.asarray(x, np.float64) @ block["w"] + block["b"], 0)
    return f / np.linalg.norm(f, axis=1, keepdims=True) if normalize else f


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def scipy_logistic_regression(x, y, n, c):
    """scikit-learn's multinomial objective C * sum_i CE(x_i w + b, y_i) + ||w||^2 / 2 (bias not
    penalised), minimised by SciPy's L-BFGS-B in float64 to a gradient of 1e-12."""
    d = x.shape[1]
    targets = np.eye(n)[y]

    def objective(theta):
        w, b = theta[: d * n].reshape(d, n), theta[d * n :]
        log_p = np_log_softmax(x @ w + b)
        error = np.exp(log_p) - targets
        value = -c * np.sum(targets * log_p) + 0.5 * np.sum(w * w)
        grad = np.concatenate([(c * x.T @ error + w).ravel(), c * error.sum(0)])
        return value, grad

    result = scipy.optimize.minimize(
        objective,
        np.zeros(d * n + n),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 0, "maxiter": 10_000},
    )
    w, b = result.x[: d * n].reshape(d, n), result.x[d * n :]
    return w, b - b.mean()  # the bias is defined up to a constant: softmax ignores it


def scipy_reference(params, task, c=1.0, normalize=True):
    f = np_features(params, task.support.x, normalize)
    return scipy_logistic_regression(f, np.asarray(task.support.y), WAY, c)


ATOL = 1e-4  # float32 L-BFGS stopped at a gradient norm of 1e-6; it gets within ~1e-5


def test_the_test_classifier_is_the_logistic_regression_on_normalised_features():
    """RFS's C = 1: the head equals SciPy's solution of the same convex problem (w is unique, b
    up to a constant: compared centred), to ATOL; so do the query probabilities. adapt reads no
    key."""
    algo = build()
    params = algo.init(KEY)
    task = task_of(KEY)
    adapt = jax.jit(algo.adapt)
    head = adapt(params, task.support, KEY)
    w, b = scipy_reference(params, task)
    np.testing.assert_allclose(head["w"], w, atol=ATOL)
    np.testing.assert_allclose(head["b"] - jnp.mean(head["b"]), b, atol=ATOL)
    fq = np_features(params, task.query.x)
    got = jax.nn.softmax(algo.predict(params, head, task.query.x))
    np.testing.assert_allclose(got, np.exp(np_log_softmax(fq @ w + b)), atol=ATOL)
    assert np.abs(w).max() > 100 * ATOL  # a head far from 0, so the tolerance can tell
    other = adapt(params, task.support, jax.random.PRNGKey(5))
    jax.tree.map(np.testing.assert_array_equal, other, head)


def test_the_solver_at_other_regularisation_strengths():
    """_pretrain.logistic_regression against SciPy for C from 0.01 to 10 on raw features (one
    compiled solve, C traced): it stops where the float64 gradient of its objective is below
    2 * LOGREG_TOL (float32 rounding), within 2e-4 of SciPy's solution relative to the weights'
    size. (At C = 100 on raw features the float32 line search stalls at a gradient of ~3e-5
    and the solve runs to max_steps: the bias, unpenalised, is nearly flat there.)"""
    params = MODEL.init(KEY, TRAIN_CLASSES)
    task = task_of(KEY)
    f = np_features(params, task.support.x, normalize=False)  # raw: larger weights
    y = np.asarray(task.support.y)
    solve = jax.jit(
        lambda x, y, c: logistic_regression(x, y, WAY, c=c, max_steps=RFSConfig().max_steps)
    )
    for c in (0.01, 0.1, 10.0):
        head = jax.tree.map(
            lambda a: np.asarray(a, np.float64), solve(jnp.asarray(f, jnp.float32), y, c)
        )
        error = np.exp(np_log_softmax(f @ head["w"] + head["b"])) - np.eye(WAY)[y]
        grad = np.concatenate(
            [(f.T @ error / len(y) + head["w"] / (c * len(y))).ravel(), error.mean(0)]
        )
        assert np.linalg.norm(grad) < 2 * LOGREG_TOL, (c, np.linalg.norm(grad))
        w, b = scipy_logistic_regression(f, y, WAY, c)
        size = max(1.0, np.abs(w).max())
        np.testing.assert_allclose(head["w"], w, atol=2e-4 * size, err_msg=f"C={c}")
        np.testing.assert_allclose(head["b"] - head["b"].mean(), b, atol=2e-4 * size)


@pytest.mark.parametrize("normalize", [True, False])
def test_predictions_read_the_trunk_features_normalised_or_not(normalize):
    """predict: (normalised) features of the pre-trained trunk times the head, plus its bias."""
    algo = build(normalize=normalize)
    params = algo.init(KEY)
    kw, kb = jax.random.split(KEY)
    head = {"w": jax.random.normal(kw, (16, WAY)), "b": jax.random.normal(kb, (WAY,))}
    x = task_of(KEY).query.x
    h = jax.tree.map(lambda a: np.asarray(a, np.float64), head)
    want = np_features(params, x, normalize) @ h["w"] + h["b"]
    np.testing.assert_allclose(algo.predict(params, head, x), want, rtol=1e-4, atol=1e-5)


def test_pretraining_is_a_classifier_over_all_train_classes_on_support_and_query():
    """The meta-loss is the model's 10-class CE over support and query examples together, with
    split-wide labels (classes 7..9): float64 reference, rtol 1e-5."""
    algo = build()
    assert algo.global_labels
    params = algo.init(KEY)
    task = task_of(KEY, labels=np.array([7, 8, 9]))
    head = jax.tree.map(lambda a: np.asarray(a, np.float64), params["head"])
    x = np.concatenate([task.support.x, task.query.x])
    y = np.concatenate([task.support.y, task.query.y])
    log_p = np_log_softmax(np_features(params, x, normalize=False) @ head["w"] + head["b"])
    loss, _ = algo.meta_loss(params, task, KEY, 0)
    np.testing.assert_allclose(loss, -np.mean(log_p[np.arange(len(y)), y]), rtol=1e-5)


def padded(split: Split, slots: int, key) -> Split:
    """The split in `slots` slots, its labels renamed to the padded head's columns PRESENT,
    padding of label -1, mask False and random inputs (which must not matter)."""
    k_pos, k_x = jax.random.split(key)
    positions = np.sort(np.asarray(jax.random.permutation(k_pos, slots))[: len(split.y)])
    x = (10 * jax.random.normal(k_x, (slots, DIM))).at[positions].set(split.x)
    y = jnp.full((slots,), -1, jnp.int32).at[positions].set(jnp.asarray(PRESENT)[split.y])
    return Split(x, y, jnp.zeros((slots,), bool).at[positions].set(True))


PRESENT = np.array([1, 3, 4])  # the padded head's columns of the episode's classes


def test_a_padded_episode_gives_the_unpadded_results():
    """A 6-output head, 3 classes used at scattered columns, padding slots in support and query:
    the query loss and accuracy of SciPy's solution on the unpadded episode (loss to ATOL),
    and the absent classes' columns stay 0."""
    algo = build(n_out=6)
    params = algo.init(KEY)
    task = task_of(KEY)
    ks, kq = jax.random.split(jax.random.PRNGKey(2))
    pad = Task(padded(task.support, 11, ks), padded(task.query, 17, kq), task.task_id)
    with norm.testing():  # one compiled function: the L-BFGS solve is slow to compile
        head, metrics = jax.jit(
            lambda p, t: (algo.adapt(p, t.support, KEY), algo.evaluate(p, t, KEY, 0)[1])
        )(params, pad)
    w, b = scipy_reference(params, task)
    log_p = np_log_softmax(np_features(params, task.query.x) @ w + b)
    yq = np.asarray(task.query.y)
    np.testing.assert_allclose(metrics["loss"], -np.mean(log_p[np.arange(len(yq)), yq]), atol=ATOL)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(log_p.argmax(-1) == yq))
    absent = np.setdiff1d(np.arange(6), PRESENT)
    np.testing.assert_array_equal(np.asarray(head["w"])[:, absent], 0.0)
    np.testing.assert_array_equal(np.asarray(head["b"])[absent], 0.0)
    np.testing.assert_allclose(np.asarray(head["w"])[:, PRESENT], w, atol=ATOL)


def test_config_composes_and_refuses_bad_values(tmp_path, monkeypatch):
    cfg = compose_config(["data=omniglot", "algo=rfs"], tmp_path, monkeypatch)
    assert (cfg.algo.c, cfg.algo.max_steps, cfg.algo.normalize) == (1.0, 1000, True)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match=f"algo.c={bad} is not allowed"):
            RFSConfig(c=bad)
    with pytest.raises(ConfigError, match="algo.max_steps=0"):
        RFSConfig(max_steps=0)
    with pytest.raises(ConfigError, match="algo=rfs needs a classification dataset"):
        compose_config(["data=sinusoid", "algo=rfs"], tmp_path, monkeypatch)
