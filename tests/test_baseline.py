"""Baseline and Baseline++ (Chen et al. 2019): the cosine classifier's invariances, the test
head's start and its gradient steps against a float64 NumPy reference, the pre-training loss
over support and query examples with split-wide labels, the frozen embedding at test, and a
padded episode giving the unpadded results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compose_config

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms._pretrain import chen_scale, classifier, cosine_logits
from metalearn.algorithms.base import classification_loss
from metalearn.algorithms.baseline import BaselineConfig
from metalearn.checks import ConfigError
from metalearn.models import make_model, norm
from metalearn.models.mlp import MLPConfig
from metalearn.types import Split, Task

KEY = jax.random.PRNGKey(0)
DIM, WAY, SHOTS, QUERIES, TRAIN_CLASSES = 6, 3, 2, 4, 10
MODEL = make_model(MLPConfig(hidden=16, layers=1), (DIM,))


def build(n_out=WAY, n_train_classes=TRAIN_CLASSES, **kw):
    return ALGORITHMS["baseline"](
        BaselineConfig(**kw),
        MODEL,
        classification_loss,
        n_out=n_out,
        n_train_classes=n_train_classes,
    )


def task_of(key, labels=None) -> Task:
    """A WAY-way episode with the given class labels (split-wide ones for pre-training; None:
    0..WAY-1)."""
    labels = np.arange(WAY) if labels is None else labels
    centres = 2 * jax.random.normal(key, (TRAIN_CLASSES, DIM))
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    ys = jnp.repeat(jnp.asarray(labels), SHOTS)
    yq = jnp.repeat(jnp.asarray(labels), QUERIES)
    xs = centres[ys] + 0.5 * jax.random.normal(k1, (len(ys), DIM))
    xq = centres[yq] + 0.5 * jax.random.normal(k2, (len(yq), DIM))
    return Task(Split(xs, ys), Split(xq, yq), jnp.zeros((), jnp.int32))


def trunk(params):
    """The embedding's parameters: the model's own (linear) or under "embed" (cosine)."""
    return params.get("embed", params)


def np_features(params, x):
    """The MLP's embedding in float64: relu(x w + b)."""
    block = jax.tree.map(lambda a: np.asarray(a, np.float64), trunk(params)["blocks"][0])
    return np.maximum(np.asarray(x, np.float64) @ block["w"] + block["b"], 0)


def np_normalize(a, axis=-1):
    return a / np.linalg.norm(a, axis=axis, keepdims=True)


def np_cross_entropy(logits, labels):
    logits = logits - logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.mean(log_p[np.arange(len(labels)), labels])


def np_softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------------- cosine classifier


def test_cosine_logits_are_scale_times_cos_and_ignore_norms():
    """Against NumPy's scale * cos(w_c, f); rescaling each feature and each class weight by a
    positive factor leaves them unchanged (rtol 1e-5, float32)."""
    kf, kw, ka, kb = jax.random.split(KEY, 4)
    f, w = jax.random.normal(kf, (7, 5)), jax.random.normal(kw, (5, 4))
    want = 2.5 * np_normalize(np.asarray(f, np.float64)) @ np_normalize(np.asarray(w), axis=0)
    np.testing.assert_allclose(cosine_logits(f, w, 2.5), want, rtol=1e-5, atol=1e-6)
    a = jnp.exp(3 * jax.random.normal(ka, (7, 1)))  # factors from ~1e-4 to ~1e4
    b = jnp.exp(3 * jax.random.normal(kb, (1, 4)))
    np.testing.assert_allclose(cosine_logits(a * f, b * w, 2.5), want, rtol=1e-5, atol=1e-6)
    # a dead feature (all zeros: a ReLU layer off) has logits 0 and finite gradients
    zero = jnp.zeros((1, 5))
    assert np.all(np.asarray(cosine_logits(zero, w, 2.5)) == 0)
    grads = jax.grad(lambda f, w: cosine_logits(f, w, 2.5).sum(), argnums=(0, 1))(zero, w)
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("n_train_classes, scale", [(TRAIN_CLASSES, 2.0), (300, 10.0)])
def test_cosine_pretraining_head_uses_chen_scale_and_ignores_weight_norms(n_train_classes, scale):
    """Chen et al.'s scale (2 up to 200 classes, 10 above); scaling a class weight leaves the
    pre-training logits unchanged."""
    assert chen_scale(n_train_classes) == scale
    algo = build(n_train_classes=n_train_classes, classifier="cosine")
    params = algo.init(KEY)
    task = task_of(KEY)
    w = np.asarray(params["cosine"]["w"], np.float64)
    want = scale * np_normalize(np_features(params, task.support.x)) @ np_normalize(w, axis=0)
    logits = classifier(MODEL, "cosine").logits(params, task.support.x)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    factors = jnp.exp(jax.random.normal(KEY, (1, n_train_classes)))
    rescaled = {**params, "cosine": {"w": params["cosine"]["w"] * factors}}
    np.testing.assert_allclose(
        classifier(MODEL, "cosine").logits(rescaled, task.support.x), logits, rtol=1e-5, atol=1e-5
    )


def test_the_cosine_test_head_starts_at_the_imprinted_class_means():
    """With no steps the head is each class's mean normalised support feature (weight
    imprinting), so it predicts 2 * cos(f, class mean) (Chen et al.'s scale for 3 classes)."""
    algo = build(classifier="cosine")
    params = algo.init(KEY)
    task = task_of(KEY)
    head = algo.adapt(params, task.support, KEY, 0)
    f = np_normalize(np_features(params, task.support.x))
    ys = np.asarray(task.support.y)
    means = np.stack([f[ys == c].mean(0) for c in range(WAY)], 1)
    np.testing.assert_allclose(head["w"], means, rtol=1e-5, atol=1e-6)
    fq = np_features(params, task.query.x)
    want = 2.0 * np_normalize(fq) @ np_normalize(means, axis=0)
    np.testing.assert_allclose(algo.predict(params, head, task.query.x), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ test head's steps


def np_linear_head_descent(features, labels, lr, steps):
    """Full-batch gradient descent from zero on mean CE(f w + b, y), float64; and its losses."""
    n, d = features.shape
    targets = np.eye(WAY)[labels]
    w, b = np.zeros((d, WAY)), np.zeros(WAY)
    losses = []
    for _ in range(steps):
        logits = features @ w + b
        losses.append(np_cross_entropy(logits, labels))
        error = (np_softmax(logits) - targets) / n
        w, b = w - lr * features.T @ error, b - lr * error.sum(0)
    losses.append(np_cross_entropy(features @ w + b, labels))
    return w, b, np.array(losses)


def test_linear_head_steps_equal_numpy_gradient_descent_and_lower_the_support_loss():
    """Baseline's head after 100 steps of rate 0.1 equals the float64 NumPy descent on the same
    frozen features (rtol 1e-3, atol 1e-4: float32 over 100 steps), and the support loss falls
    at every step, from log(3) at the zero start."""
    steps, lr = 100, 0.1
    algo = build(inner_lr=lr, inner_steps=steps)
    params = algo.init(KEY)
    task = task_of(KEY)
    head = algo.adapt(params, task.support, KEY)
    f = np_features(params, task.support.x)
    w, b, losses = np_linear_head_descent(f, np.asarray(task.support.y), lr, steps)
    np.testing.assert_allclose(head["w"], w, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(head["b"], b, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(losses[0], np.log(WAY), rtol=1e-12)
    assert np.all(np.diff(losses) < 0) and losses[-1] < 0.5 * losses[0], losses[[0, -1]]
    got = np_cross_entropy(np.asarray(algo.predict(params, head, task.support.x)), task.support.y)
    np.testing.assert_allclose(got, losses[-1], rtol=1e-3)


def test_cosine_head_steps_equal_an_independent_descent_and_lower_the_support_loss():
    """Baseline++'s head steps against gradient descent written here from the formula
    (normalise, scale 2, cross-entropy; jax.grad in float32): rtol 1e-4, atol 1e-5."""
    steps, lr = 30, 0.5
    algo = build(classifier="cosine", inner_lr=lr, inner_steps=steps)
    params = algo.init(KEY)
    task = task_of(KEY)
    f = jnp.asarray(np_features(params, task.support.x), jnp.float32)
    ys = task.support.y

    def loss(w):
        cos = (f / jnp.linalg.norm(f, axis=1, keepdims=True)) @ (
            w / jnp.linalg.norm(w, axis=0, keepdims=True)
        )
        return -jnp.mean(jax.nn.log_softmax(2.0 * cos)[jnp.arange(len(ys)), ys])

    w = algo.adapt(params, task.support, KEY, 0)["w"]
    losses = [float(loss(w))]
    for _ in range(steps):
        w = w - lr * jax.grad(loss)(w)
        losses.append(float(loss(w)))
    head = algo.adapt(params, task.support, KEY)
    np.testing.assert_allclose(head["w"], w, rtol=1e-4, atol=1e-5)
    assert losses[-1] < losses[0], losses


# ------------------------------------------------------------- pre-training and test-time trunk


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_pretraining_loss_covers_support_and_query_with_split_wide_labels(kind):
    """The meta-loss is the CE of a 10-class classifier over support and query examples
    together, their labels split-wide (here classes 7, 8 and 9 of the 10): float64 NumPy
    reference, rtol 1e-5. Either split alone gives another value, so the test can tell."""
    algo = build(classifier=kind)
    assert algo.global_labels
    params = algo.init(KEY)
    task = task_of(KEY, labels=np.array([7, 8, 9]))

    def np_logits(x):
        f = np_features(params, x)
        if kind == "cosine":
            w = np.asarray(params["cosine"]["w"], np.float64)
            return 2.0 * np_normalize(f) @ np_normalize(w, axis=0)
        head = jax.tree.map(lambda a: np.asarray(a, np.float64), params["head"])
        return f @ head["w"] + head["b"]

    x = np.concatenate([task.support.x, task.query.x])
    y = np.concatenate([task.support.y, task.query.y])
    want = np_cross_entropy(np_logits(x), y)
    loss, metrics = algo.meta_loss(params, task, KEY, 0)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    for split in (task.support, task.query):
        assert abs(np_cross_entropy(np_logits(split.x), split.y) - want) > 1e-3
    accuracy = np.mean(np.argmax(np_logits(x), -1) == y)
    np.testing.assert_allclose(metrics["accuracy"], accuracy)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_embedding_is_frozen_at_test(kind):
    """adapt returns a head only, which no trunk parameter reaches (its gradient with respect to
    every meta-parameter is exactly 0), needs no key, and predict reads the pre-trained trunk."""
    algo = build(classifier=kind, inner_steps=5)
    params = algo.init(KEY)
    task = task_of(KEY)
    head = algo.adapt(params, task.support, KEY)
    assert set(head) == ({"w"} if kind == "cosine" else {"w", "b"})
    weights = jax.tree.map(lambda a: jax.random.normal(KEY, a.shape), head)

    def projection(p):
        h = algo.adapt(p, task.support, KEY)
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(h), jax.tree.leaves(weights)))

    for g in jax.tree.leaves(jax.grad(projection)(params)):
        np.testing.assert_array_equal(g, 0.0)
    other = algo.adapt(params, task.support, jax.random.PRNGKey(7))
    jax.tree.map(np.testing.assert_array_equal, other, head)
    f = np_features(params, task.query.x)
    h = jax.tree.map(lambda a: np.asarray(a, np.float64), head)
    want = (
        2.0 * np_normalize(f) @ np_normalize(h["w"], 0) if kind == "cosine" else f @ h["w"] + h["b"]
    )
    np.testing.assert_allclose(algo.predict(params, head, task.query.x), want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------- padding

PADDED_OUT = 6
PRESENT = np.array([0, 2, 5])  # the padded test head's columns of the episode's classes


def padded(split: Split, slots: int, key, rename: bool) -> Split:
    """The split in `slots` slots at random positions, padding of label -1, mask False and
    random inputs (which must not matter); rename: labels become the padded head's columns."""
    k_pos, k_x = jax.random.split(key)
    positions = np.sort(np.asarray(jax.random.permutation(k_pos, slots))[: len(split.y)])
    x = (10 * jax.random.normal(k_x, (slots, DIM))).at[positions].set(split.x)
    labels = jnp.asarray(PRESENT)[split.y] if rename else split.y
    y = jnp.full((slots,), -1, jnp.int32).at[positions].set(labels)
    return Split(x, y, jnp.zeros((slots,), bool).at[positions].set(True))


def pad(task: Task, rename: bool) -> Task:
    ks, kq = jax.random.split(jax.random.PRNGKey(2))
    return Task(
        padded(task.support, 11, ks, rename), padded(task.query, 17, kq, rename), task.task_id
    )


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_a_padded_episode_gives_the_unpadded_results(kind):
    """Pre-training (split-wide labels, same 10-class head) gives the unpadded loss and
    gradient; at test a 6-output head whose used columns are scattered gives the unpadded
    3-way metrics (rtol 2e-4, atol 2e-6: sums of zeros in other orders)."""
    small, big = build(classifier=kind), build(n_out=PADDED_OUT, classifier=kind)
    params = small.init(KEY)
    task = task_of(KEY, labels=np.array([4, 1, 8]))

    def gradient(algo, t):
        return jax.grad(lambda p: algo.meta_loss(p, t, KEY, 0), has_aux=True)(params)

    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)  # noqa: E731
    jax.tree.map(close, gradient(big, pad(task, rename=False)), gradient(small, task))
    local = task_of(KEY)  # a test task: labels 0..2
    with norm.testing():
        want = small.evaluate(params, local, KEY, 20)[1]
        got = big.evaluate(params, pad(local, rename=True), KEY, 20)[1]
    jax.tree.map(close, got, want)
    head = big.adapt(params, pad(local, rename=True).support, KEY, 20)
    absent = np.setdiff1d(np.arange(PADDED_OUT), PRESENT)
    np.testing.assert_array_equal(np.asarray(head["w"])[:, absent], 0.0)  # never trained


# ----------------------------------------------------------------------------------- config


def test_config_composes_and_refuses_bad_values(tmp_path, monkeypatch):
    cfg = compose_config(["data=omniglot", "algo=baseline"], tmp_path, monkeypatch)
    assert (cfg.algo.classifier, cfg.algo.scale) == ("linear", None)
    cfg = compose_config(
        ["data=omniglot", "algo=baseline", "algo.classifier=cosine"], tmp_path, monkeypatch
    )
    assert cfg.algo.classifier == "cosine"
    with pytest.raises(ConfigError, match="algo.classifier"):
        BaselineConfig(classifier="svm")
    with pytest.raises(ConfigError, match="algo.scale=3.0 is not allowed with algo.classifier"):
        BaselineConfig(scale=3.0)
    with pytest.raises(ConfigError, match="algo.scale"):
        BaselineConfig(classifier="cosine", scale=-1.0)
    with pytest.raises(ConfigError, match="algo=baseline needs a classification dataset"):
        compose_config(["data=sinusoid", "algo=baseline"], tmp_path, monkeypatch)
