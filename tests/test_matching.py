"""Matching networks: the query's prediction is the cosine attention over the support set."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compose_config

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms.base import classification_loss
from metalearn.algorithms.matching import MatchingConfig
from metalearn.checks import ConfigError
from metalearn.models import make_model
from metalearn.models.conv4 import Conv4Config
from metalearn.models.mlp import MLPConfig
from metalearn.types import Split, Task

KEY = jax.random.PRNGKey(0)
WAY, SHOT, QUERY, DIM = 3, 2, 4, 6
RTOL, ATOL = 1e-5, 1e-6  # float32 against float64


def task_of(key, n_way=WAY, shots=SHOT) -> Task:
    centres = 2 * jax.random.normal(key, (n_way, DIM))
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    ys, yq = jnp.repeat(jnp.arange(n_way), shots), jnp.repeat(jnp.arange(n_way), QUERY)
    xs = centres[ys] + jax.random.normal(k1, (len(ys), DIM))
    xq = centres[yq] + jax.random.normal(k2, (len(yq), DIM))
    return Task(Split(xs, ys), Split(xq, yq), jnp.zeros((), jnp.int32))


def build(n_out=WAY, model_cfg=None, shape=(DIM,), **kw):
    model = make_model(model_cfg or MLPConfig(hidden=16, layers=1), shape)
    algo = ALGORITHMS["matching"](MatchingConfig(**kw), model, classification_loss, n_out=n_out)
    return algo, model


def reference_probs(fq, fs, ys, n_way, scale):
    """p(y | x) = sum_i softmax_i(scale cos(f(x), g(x_i))) onehot(y_i), in float64."""
    fq, fs = np.asarray(fq, np.float64), np.asarray(fs, np.float64)
    cos = (fq / np.linalg.norm(fq, axis=1, keepdims=True)) @ (
        fs / np.linalg.norm(fs, axis=1, keepdims=True)
    ).T
    a = np.exp(scale * cos - (scale * cos).max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    return a @ np.eye(n_way)[np.asarray(ys)]


@pytest.mark.parametrize("scale", [1.0, 7.0])
def test_predictions_are_the_cosine_attention_of_a_numpy_reference(scale):
    algo, model = build(scale=scale)
    params = algo.init(KEY)
    task = task_of(KEY)
    fs = model.embed(params["embed"], task.support.x)
    fq = model.embed(params["embed"], task.query.x)
    want = reference_probs(fq, fs, task.support.y, WAY, scale)
    logits = algo.predict(params, algo.adapt(params, task.support, KEY), task.query.x)
    np.testing.assert_allclose(np.exp(logits), want, rtol=RTOL, atol=ATOL)
    # the loss is the NLL of that mixture
    loss, metrics = algo.meta_loss(params, task, KEY)
    nll = -np.mean(np.log(want[np.arange(len(want)), np.asarray(task.query.y)]))
    np.testing.assert_allclose(float(loss), nll, rtol=RTOL)
    assert float(metrics["accuracy"]) == pytest.approx(
        np.mean(want.argmax(1) == np.asarray(task.query.y))
    )


def test_the_scale_is_learned_only_when_asked():
    task = task_of(KEY)
    for learn in (False, True):
        algo, _ = build(scale=3.0, learn_scale=learn)
        params = algo.init(KEY)
        grads = jax.grad(lambda p, algo=algo: algo.meta_loss(p, task, KEY)[0])(params)
        assert (float(grads["log_scale"]) != 0.0) == learn


@pytest.mark.parametrize("fce", [False, True])
def test_permuting_the_support_set_leaves_predictions_unchanged_without_fce(fce):
    algo, _ = build(fce=fce)
    params = algo.init(KEY)
    task = task_of(KEY)
    perm = np.asarray(jax.random.permutation(jax.random.PRNGKey(3), len(task.support.y)))
    shuffled = Split(task.support.x[perm], task.support.y[perm])
    a = algo.predict(params, algo.adapt(params, task.support, KEY), task.query.x)
    b = algo.predict(params, algo.adapt(params, shuffled, KEY), task.query.x)
    if fce:  # the bidirectional LSTM reads the support set in order (as the paper says)
        assert not np.allclose(a, b, rtol=1e-4)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def padded_task(task: Task, n_out: int, present: np.ndarray, key) -> Task:
    """The task in more slots: padding interleaved (label -1, mask False, random inputs that
    must not matter), labels renamed to the columns `present` of an n_out-output learner."""

    def pad(split: Split, extra: int, k) -> Split:
        slots = len(split.y) + extra
        k_pos, k_x = jax.random.split(k)
        pos = np.sort(np.asarray(jax.random.permutation(k_pos, slots))[: len(split.y)])
        x = (10 * jax.random.normal(k_x, (slots, *split.x.shape[1:]))).at[pos].set(split.x)
        y = jnp.full((slots,), -1, jnp.int32).at[pos].set(jnp.asarray(present)[split.y])
        return Split(x, y, jnp.zeros((slots,), bool).at[pos].set(True))

    k1, k2 = jax.random.split(key)
    return task._replace(support=pad(task.support, 5, k1), query=pad(task.query, 3, k2))


@pytest.mark.parametrize("fce", [False, True])
def test_padding_gets_no_attention_loss_and_gradient_are_the_unpadded_ones(fce):
    """Padding slots (and the absent classes of a larger head) change nothing: float32 sums of
    zeros in another order, rtol 2e-5."""
    small, _ = build(n_out=WAY, fce=fce, learn_scale=True)
    big, _ = build(n_out=WAY + 2, fce=fce, learn_scale=True)  # any_way: same parameters
    params = small.init(KEY)
    task = task_of(KEY)
    pad = padded_task(task, WAY + 2, np.array([0, 2, 3]), jax.random.PRNGKey(5))

    def grad(algo, t):
        return jax.grad(lambda p: algo.meta_loss(p, t, KEY), has_aux=True)(params)

    (g_small, m_small), (g_big, m_big) = grad(small, task), grad(big, pad)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
                 (g_big, m_big), (g_small, m_small))  # fmt: skip
    # the padding slots get exactly zero attention
    g, _, mask = big.adapt(params, pad.support, KEY)
    if not fce:
        logits = big.predict(params, (g, pad.support.y, mask), pad.query.x)
        perturbed = pad.support._replace(x=jnp.where(mask[:, None], pad.support.x, 0.0))
        again = big.predict(params, big.adapt(params, perturbed, KEY), pad.query.x)
        np.testing.assert_array_equal(logits, again)


def test_padding_is_left_out_of_the_batch_statistics_too():
    """conv4's transductive batch norm over the real examples only (norm.examples)."""
    shape, conv = (8, 8, 1), Conv4Config(hidden=4, downsample="maxpool")
    small, _ = build(n_out=WAY, model_cfg=conv, shape=shape)
    big, _ = build(n_out=WAY + 2, model_cfg=conv, shape=shape)
    params = small.init(KEY)
    ks, kq = jax.random.split(jax.random.PRNGKey(7))
    ys, yq = jnp.repeat(jnp.arange(WAY), SHOT), jnp.repeat(jnp.arange(WAY), QUERY)
    task = Task(
        Split(jax.random.uniform(ks, (len(ys), *shape)), ys),
        Split(jax.random.uniform(kq, (len(yq), *shape)), yq),
        jnp.zeros((), jnp.int32),
    )
    pad = padded_task(task, WAY + 2, np.array([0, 2, 3]), jax.random.PRNGKey(5))

    def grad(algo, t):
        return jax.jit(jax.grad(lambda p: algo.meta_loss(p, t, KEY), has_aux=True))(params)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
                 grad(big, pad), grad(small, task))  # fmt: skip


def test_fce_attention_lstm_follows_the_papers_equations():
    """f(x, S) after K=2 steps equals the appendix's recursion written out in numpy."""
    from metalearn.algorithms.matching import query_context

    k = jax.random.split(KEY, 4)
    d, s = 4, 5
    p = {
        "wx": np.asarray(jax.random.normal(k[0], (d, 4 * d))) * 0.5,
        "wh": np.asarray(jax.random.normal(k[1], (2 * d, 4 * d))) * 0.5,
        "b": np.asarray(jax.random.normal(k[2], (4 * d,))) * 0.1,
    }
    q = np.asarray(jax.random.normal(k[3], (d,)), np.float64)
    g = np.asarray(jax.random.normal(jax.random.fold_in(KEY, 9), (s, d)), np.float64)

    def sig(z):
        return 1 / (1 + np.exp(-z))

    h, c = np.zeros(d), np.zeros(d)
    for _ in range(2):
        a = np.exp(g @ h - (g @ h).max())
        r = (a / a.sum()) @ g
        z = q @ p["wx"] + np.concatenate([h, r]) @ p["wh"] + p["b"]
        i, f, gg, o = np.split(z, 4)
        c = sig(f) * c + sig(i) * np.tanh(gg)
        h = sig(o) * np.tanh(c) + q
    got = query_context(jax.tree.map(jnp.asarray, p), jnp.asarray(q, jnp.float32),
                        jnp.asarray(g, jnp.float32), None, 2)  # fmt: skip
    np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-6)


def test_other_ways_than_trained_and_bad_values():
    algo, _ = build(n_out=5)
    params = algo.init(KEY)  # the parameters do not depend on the way
    task = task_of(KEY, n_way=5, shots=1)
    loss, metrics = algo.meta_loss(params, task, KEY)
    assert np.isfinite(float(loss)) and 0 <= float(metrics["accuracy"]) <= 1
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, build(n_out=20)[0].init(KEY))
    with pytest.raises(ConfigError, match="algo.scale=0"):
        MatchingConfig(scale=0)
    with pytest.raises(ConfigError, match="algo.fce_steps=0"):
        MatchingConfig(fce_steps=0)


def test_config_composes_with_hydra(tmp_path, monkeypatch):
    cfg = compose_config(["data=omniglot", "algo=matching"], tmp_path, monkeypatch)
    assert cfg.algo == MatchingConfig()  # the paper's: no scale learned, no FCE
    over = ["algo.fce=true", "algo.fce_steps=3", "algo.learn_scale=true", "model.norm=inductive"]
    cfg = compose_config(["data=omniglot", "algo=matching", *over], tmp_path, monkeypatch)
    assert (cfg.algo.fce, cfg.algo.fce_steps, cfg.algo.learn_scale) == (True, 3, True)
    compose_config(["data=meta_dataset", "algo=matching"], tmp_path, monkeypatch)  # padded
    with pytest.raises(ConfigError, match="algo=matching needs a classification dataset"):
        compose_config(["data=sinusoid", "algo=matching"], tmp_path, monkeypatch)
