"""Transductive fine-tuning (Dhillon et al. 2020, algo=finetune algo.transductive_weight=W): the
fine-tuning loss is the support loss plus W times the mean entropy of the query predictions
(float64 NumPy reference, padded or not), the query labels are never read, W=0 is the
inductive fine-tuning, and regression data are refused."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compose_config

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms._pretrain import unlabelled
from metalearn.algorithms.base import classification_loss, query_loss
from metalearn.algorithms.finetune import FinetuneConfig, fine_tuning, transductive_loss
from metalearn.checks import ConfigError
from metalearn.models import make_model
from metalearn.models.mlp import MLPConfig
from metalearn.types import Split, Task

KEY = jax.random.PRNGKey(0)
DIM, WAY, TRAIN_CLASSES, WEIGHT, LR, STEPS = 6, 3, 10, 0.7, 0.1, 5
MODEL = make_model(MLPConfig(hidden=16, layers=1), (DIM,))


def config(weight=WEIGHT, **kw):
    return FinetuneConfig(inner_lr=LR, inner_steps=STEPS, transductive_weight=weight, **kw)


def build(weight=WEIGHT):
    return ALGORITHMS["finetune"](
        config(weight), MODEL, classification_loss, n_out=WAY, n_train_classes=TRAIN_CLASSES
    )


def task_of(key, shots=2, queries=4) -> Task:
    centres = 2 * jax.random.normal(key, (WAY, DIM))
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    ys, yq = jnp.repeat(jnp.arange(WAY), shots), jnp.repeat(jnp.arange(WAY), queries)
    xs = centres[ys] + 0.8 * jax.random.normal(k1, (len(ys), DIM))
    xq = centres[yq] + 0.8 * jax.random.normal(k2, (len(yq), DIM))
    return Task(Split(xs, ys), Split(xq, yq), jnp.zeros((), jnp.int32))


def np_logits(params, x):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.maximum(np.asarray(x, np.float64) @ p["blocks"][0]["w"] + p["blocks"][0]["b"], 0)
    return h @ p["head"]["w"] + p["head"]["b"]


def np_log_softmax(logits, classes):
    """log softmax among `classes` (the others get probability 0)."""
    z = np.where(classes, logits, -np.inf)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_transductive_loss(params, support: Split, query: Split, weight, n_out):
    """Mean CE over the real support examples + weight * the mean entropy over the real query
    inputs, both among the classes the support set has; float64."""
    s_mask = np.ones(len(support.y), bool) if support.mask is None else np.asarray(support.mask)
    q_mask = np.ones(len(query.y), bool) if query.mask is None else np.asarray(query.mask)
    ys = np.asarray(support.y)[s_mask]
    classes = np.isin(np.arange(n_out), ys)
    log_ps = np_log_softmax(np_logits(params, support.x)[s_mask], classes)
    ce = -np.mean(log_ps[np.arange(len(ys)), ys])
    log_pq = np_log_softmax(np_logits(params, query.x)[q_mask], classes)
    p = np.exp(log_pq)
    entropy = -np.sum(p * np.where(p > 0, log_pq, 0.0), -1).mean()  # 0 log 0 = 0
    return ce + weight * entropy


def start_of(params, key, n_out=WAY):
    """Fine-tuning's start: a fresh head of the task's classes (drawn with the adapt key) on the
    pre-trained trunk (the MLP's layout)."""
    return {**params, "head": MODEL.init(key, n_out)["head"]}


def padded(split: Split, slots: int, key) -> Split:
    k_pos, k_x = jax.random.split(key)
    positions = np.sort(np.asarray(jax.random.permutation(k_pos, slots))[: len(split.y)])
    x = (10 * jax.random.normal(k_x, (slots, DIM))).at[positions].set(split.x)
    y = jnp.full((slots,), -1, jnp.int32).at[positions].set(split.y)
    return Split(x, y, jnp.zeros((slots,), bool).at[positions].set(True))


@pytest.mark.parametrize("padding", [False, True])
def test_the_loss_is_support_loss_plus_weight_times_query_entropy(padding):
    """Against the float64 reference (rtol 1e-5). Padded: a 5-output head of which the support
    set uses classes 0..2, padding slots of random inputs; the entropy is among those 3
    classes over the real queries only."""
    n_out = 5 if padding else WAY
    params = start_of(MODEL.init(KEY, TRAIN_CLASSES), jax.random.PRNGKey(3), n_out)
    task = task_of(KEY)
    support, query = task.support, task.query
    if padding:
        support, query = padded(support, 9, KEY), padded(query, 15, jax.random.PRNGKey(1))
    apply = lambda x: MODEL.apply(params, x)  # noqa: E731
    got = transductive_loss(classification_loss, apply, support, unlabelled(query), WEIGHT)
    want = np_transductive_loss(params, support, query, WEIGHT, n_out)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    entropy = np_transductive_loss(params, support, query, 1.0, n_out) - np_transductive_loss(
        params, support, query, 0.0, n_out
    )
    assert WEIGHT * entropy > 0.01 * want  # far above the tolerance: the test can tell
    if padding:  # and equals the unpadded episode's
        unpadded = np_transductive_loss(params, task.support, task.query, WEIGHT, n_out)
        np.testing.assert_allclose(want, unpadded, rtol=1e-12)


def test_each_step_descends_that_loss():
    """One step of the task's fine-tuning is start - lr * grad of the reference loss: its
    directional derivatives along the step and a random direction, by central differences of
    the float64 reference, equal <grad, direction> (rtol 1e-2)."""
    params = MODEL.init(KEY, TRAIN_CLASSES)
    task = task_of(KEY)
    _, adapt_task = fine_tuning(config(), MODEL, classification_loss, WAY)
    start = start_of(params, KEY)
    step = adapt_task(params, task, KEY, 1)
    grad = jax.tree.map(lambda a, b: (np.asarray(a) - np.asarray(b)) / LR, start, step)
    rng = np.random.default_rng(0)
    for direction in (grad, jax.tree.map(lambda g: rng.normal(size=g.shape), grad)):

        def at(t, direction=direction):
            moved = jax.tree.map(lambda p, u: np.asarray(p, np.float64) + t * u, start, direction)
            return np_transductive_loss(moved, task.support, task.query, WEIGHT, WAY)

        eps = 1e-4
        numeric = (at(eps) - at(-eps)) / (2 * eps)
        analytic = sum(
            np.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))
        )
        np.testing.assert_allclose(analytic, numeric, rtol=1e-2)


def test_the_evaluation_never_reads_the_query_labels():
    """Permuted, zeroed or -1 query labels leave the transductively adapted parameters exactly
    as they are; the evaluation's loss is that adaptation's query loss against whatever labels
    it is scored by. The query inputs do matter: the result differs from inductive
    fine-tuning."""
    algo = build()
    params = algo.init(KEY)
    task = task_of(KEY)
    adapt, adapt_task = fine_tuning(config(), MODEL, classification_loss, WAY)
    adapted = adapt_task(params, task, KEY)
    labels = task.query.y
    for y in (labels[::-1], jnp.roll(labels, 5), jnp.zeros_like(labels), jnp.full_like(labels, -1)):
        relabelled = task._replace(query=task.query._replace(y=y))
        jax.tree.map(np.testing.assert_array_equal, adapt_task(params, relabelled, KEY), adapted)
        if int(y.min()) >= 0:
            loss, _ = algo.evaluate(params, relabelled, KEY, STEPS)
            want, _ = query_loss(classification_loss, lambda x: MODEL.apply(adapted, x), relabelled)
            np.testing.assert_allclose(loss, want, rtol=1e-6)
    inductive = adapt(params, task.support, KEY)
    assert not np.allclose(inductive["head"]["w"], adapted["head"]["w"], atol=1e-4)


def test_zero_weight_is_the_inductive_fine_tuning():
    """W=0: the task's fine-tuning equals the support set's (the entropy's gradient times 0 adds
    nothing), and the learner's evaluation is the inductive adapt-then-score, which no change
    of the other query inputs moves (rtol 1e-6)."""
    params = build(0.0).init(KEY)
    task = task_of(KEY)
    adapt, adapt_task = fine_tuning(config(0.0), MODEL, classification_loss, WAY)
    inductive = adapt(params, task.support, KEY)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # noqa: E731
    jax.tree.map(close, adapt_task(params, task, KEY), inductive)
    loss, metrics = build(0.0).evaluate(params, task, KEY, STEPS)
    want, _ = query_loss(classification_loss, lambda x: MODEL.apply(inductive, x), task)
    close(loss, want)
    # the transductive learner's evaluation of the same task differs: it read the queries
    assert abs(float(build().evaluate(params, task, KEY, STEPS)[0]) - float(want)) > 1e-4


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf])
def test_bad_weights_are_refused(bad):
    with pytest.raises(ConfigError, match=f"algo.transductive_weight={bad} is not allowed"):
        FinetuneConfig(transductive_weight=bad)


def test_regression_data_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="transductive_weight=1.0 is not allowed with data=sin"):
        compose_config(
            ["data=sinusoid", "algo=finetune", "algo.transductive_weight=1.0"],
            tmp_path,
            monkeypatch,
        )
    cfg = compose_config(
        ["data=omniglot", "algo=finetune", "algo.transductive_weight=1.0"], tmp_path, monkeypatch
    )
    assert cfg.algo.transductive_weight == 1.0
