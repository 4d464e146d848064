"""Relation networks: an MLP scores [class sum; query] pairs, trained by squared error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compose_config
from test_matching import DIM, padded_task, task_of

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms.base import classification_loss
from metalearn.algorithms.relation import RelationConfig, relation_loss
from metalearn.checks import ConfigError
from metalearn.models import make_model, norm
from metalearn.models.mlp import MLPConfig

KEY = jax.random.PRNGKey(0)
WAY = 3
RTOL, ATOL = 1e-5, 1e-6  # float32 against float64


def build(n_out=WAY, **kw):
    model = make_model(MLPConfig(hidden=16, layers=1), (DIM,))
    algo = ALGORITHMS["relation"](RelationConfig(**kw), model, classification_loss, n_out=n_out)
    return algo, model


def reference_scores(params, fs, ys, fq, n_way):
    """sigmoid(W2 relu(W1 [sum_{y_i=c} f(x_i); f(q)] + b1) + b2) for every (query, class)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["relation"])
    fs, fq = np.asarray(fs, np.float64), np.asarray(fq, np.float64)
    classes = np.stack([fs[np.asarray(ys) == c].sum(0) for c in range(n_way)])
    scores = np.zeros((len(fq), n_way))
    for i, q in enumerate(fq):
        for j, c in enumerate(classes):
            h = np.maximum(np.concatenate([c, q]) @ p["w1"] + p["b1"], 0)
            scores[i, j] = 1 / (1 + np.exp(-(h @ p["w2"][:, 0] + p["b2"][0])))
    return scores


def test_scores_and_loss_equal_a_numpy_reference():
    algo, model = build(relation_hidden=8)
    params = algo.init(KEY)
    # a non-zero bias, so every term of the reference is exercised
    params["relation"]["b1"] = jnp.linspace(-0.5, 0.5, 8)
    params["relation"]["b2"] = jnp.array([0.3])
    task = task_of(KEY)
    fs = model.embed(params["embed"], task.support.x)
    fq = model.embed(params["embed"], task.query.x)
    want = reference_scores(params, fs, task.support.y, fq, WAY)
    got = algo.predict(params, algo.adapt(params, task.support, KEY), task.query.x)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert 1e-3 < want.min() and want.max() < 0.999  # not saturated: the check can fail

    loss, metrics = algo.meta_loss(params, task, KEY)
    onehot = np.eye(WAY)[np.asarray(task.query.y)]
    np.testing.assert_allclose(float(loss), np.mean((want - onehot) ** 2), rtol=RTOL)
    assert float(metrics["accuracy"]) == pytest.approx(
        np.mean(want.argmax(1) == np.asarray(task.query.y))
    )


def test_loss_against_one_hot_targets_and_calibration():
    scores = jnp.array([[0.9, 0.2, 0.1], [0.3, 0.6, 0.8], [0.5, 0.5, 0.4]])
    labels = jnp.array([0, 1, 2])
    loss, m = relation_loss(scores, labels)
    want = np.mean((np.asarray(scores) - np.eye(3)) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert float(m["accuracy"]) == pytest.approx(1 / 3)
    # padded: the masked query and the absent class are left out
    mask, classes = jnp.array([True, True, False]), jnp.array([True, True, False])
    loss, m = relation_loss(scores, labels, mask, classes)
    sub = np.asarray(scores)[:2, :2]
    np.testing.assert_allclose(float(loss), np.mean((sub - np.eye(2)) ** 2), rtol=1e-6)
    assert float(m["accuracy"]) == 1.0  # the absent class's 0.8 is not the argmax
    with norm.testing():
        _, m = relation_loss(scores, labels)
    # top scores 0.9 (right), 0.8 (wrong), 0.5 (wrong; argmax ties go to class 0): three bins
    np.testing.assert_allclose(float(m["ece"]), (0.1 + 0.8 + 0.5) / 3, rtol=1e-6)


def test_permuting_the_classes_permutes_the_scores():
    algo, _ = build()
    params = algo.init(KEY)
    task = task_of(KEY)
    perm = np.array([2, 0, 1])  # class c is renamed perm[c]
    renamed = task.support._replace(y=jnp.asarray(perm)[task.support.y])
    a = algo.predict(params, algo.adapt(params, task.support, KEY), task.query.x)
    b = algo.predict(params, algo.adapt(params, renamed, KEY), task.query.x)
    np.testing.assert_allclose(b[:, perm], a, rtol=1e-6)
    assert not np.allclose(a[:, perm], a, rtol=1e-3)  # the permutation does move scores


def test_relation_module_is_meta_learned():
    algo, _ = build()
    params = algo.init(KEY)
    grads = jax.grad(lambda p: algo.meta_loss(p, task_of(KEY), KEY)[0])(params)
    w1 = params["relation"]["w1"]  # it starts as a function of class - query
    np.testing.assert_array_equal(w1[: len(w1) // 2], -w1[len(w1) // 2 :])
    for name, leaf in grads["relation"].items():
        assert np.abs(np.asarray(leaf)).max() > 0, name
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads["embed"]))


def test_a_padded_episode_gives_the_unpadded_loss_and_gradient():
    """float32 sums of zeros in another order: rtol 2e-5."""
    small, _ = build(n_out=WAY)
    big, _ = build(n_out=WAY + 2)  # any_way: the same parameters for a larger head
    params = small.init(KEY)
    task = task_of(KEY)
    pad = padded_task(task, WAY + 2, np.array([0, 2, 3]), jax.random.PRNGKey(5))

    def grad(algo, t):
        return jax.grad(lambda p: algo.meta_loss(p, t, KEY), has_aux=True)(params)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
                 grad(big, pad), grad(small, task))  # fmt: skip
    with norm.testing():
        small_m = small.evaluate(params, task, KEY, 0)[1]
        big_m = big.evaluate(params, pad, KEY, 0)[1]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5), big_m, small_m)


def test_other_ways_and_bad_values():
    algo, _ = build(n_out=5)
    params = algo.init(KEY)
    loss, m = algo.meta_loss(params, task_of(KEY, n_way=5, shots=1), KEY)
    assert np.isfinite(float(loss)) and 0 <= float(m["accuracy"]) <= 1
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, build(n_out=20)[0].init(KEY))
    with pytest.raises(ConfigError, match="algo.relation_hidden=0"):
        RelationConfig(relation_hidden=0)


def test_config_composes_with_hydra(tmp_path, monkeypatch):
    cfg = compose_config(["data=omniglot", "algo=relation"], tmp_path, monkeypatch)
    assert cfg.algo == RelationConfig() and cfg.algo.relation_hidden == 8  # the paper's FC
    over = ["algo.relation_hidden=32", "model.norm=inductive"]
    cfg = compose_config(["data=omniglot", "algo=relation", *over], tmp_path, monkeypatch)
    assert cfg.algo.relation_hidden == 32
    compose_config(["data=meta_dataset", "algo=relation"], tmp_path, monkeypatch)  # padded
    with pytest.raises(ConfigError, match="algo=relation needs a classification dataset"):
        compose_config(["data=sinusoid", "algo=relation"], tmp_path, monkeypatch)
