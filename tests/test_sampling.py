"""Episode sampling on the device, and the compiled train step's behaviour across calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.algorithms.maml import MAMLConfig
from metalearn.data.episodic import sample_episode
from metalearn.data.sinusoid import SinusoidConfig, sample_sinusoid
from metalearn.experiment import build
from metalearn.models.mlp import MLPConfig
from metalearn.train_step import TrainState, make_train_step

KEY = jax.random.PRNGKey(0)
N_CLASSES, N_DRAWINGS = 12, 20


def labelled_images():
    """Image (c, d) is filled with a value that encodes (c, d), so a sample can be decoded."""
    c, d = np.meshgrid(np.arange(N_CLASSES), np.arange(N_DRAWINGS), indexing="ij")
    codes = (c * N_DRAWINGS + d).astype(np.uint8)  # < 256
    return jnp.asarray(np.broadcast_to(codes[:, :, None, None], (N_CLASSES, N_DRAWINGS, 2, 2)))


def decode(x):
    code = np.rint(np.asarray(x)[:, 0, 0, 0] * 255).astype(int)
    return code // N_DRAWINGS, code % N_DRAWINGS


@pytest.mark.parametrize("use_jit", [False, True])
def test_episode_properties(use_jit):
    sample = lambda k: sample_episode(k, labelled_images(), n_way=5, k_shot=3, k_query=4)  # noqa: E731
    sample = jax.jit(sample) if use_jit else sample
    for i in range(20):
        task = sample(jax.random.PRNGKey(i))
        assert task.support.x.shape == (15, 2, 2, 1) and task.query.x.shape == (20, 2, 2, 1)
        s_cls, s_draw = decode(task.support.x)
        q_cls, q_draw = decode(task.query.x)
        assert len(set(s_cls)) == 5, "N distinct classes"
        assert set(q_cls) == set(s_cls)
        for label in range(5):  # one class per label, K support and Q query examples each
            cls = set(s_cls[task.support.y == label]) | set(q_cls[task.query.y == label])
            assert len(cls) == 1
            c = cls.pop()
            draws = list(s_draw[s_cls == c]) + list(q_draw[q_cls == c])
            assert len(draws) == 7 and len(set(draws)) == 7, "K+Q distinct drawings"
            assert (task.support.y == label).sum() == 3 and (task.query.y == label).sum() == 4


def test_labels_are_permuted_per_task():
    """The same class gets different labels in different tasks."""
    labels_of_class = {c: set() for c in range(N_CLASSES)}
    for i in range(60):
        task = sample_episode(
            jax.random.PRNGKey(i), labelled_images(), n_way=5, k_shot=1, k_query=1
        )
        for cls, label in zip(decode(task.support.x)[0], np.asarray(task.support.y)):
            labels_of_class[cls].add(int(label))
    assert all(len(labels) >= 3 for labels in labels_of_class.values())


def test_global_labels_are_class_indices():
    task = sample_episode(KEY, labelled_images(), n_way=4, k_shot=2, k_query=1, global_labels=True)
    np.testing.assert_array_equal(decode(task.support.x)[0], task.support.y)


def test_same_key_same_task_and_jit_agrees():
    images = labelled_images()
    a = sample_episode(KEY, images, n_way=5, k_shot=1, k_query=2)
    b = jax.jit(lambda k: sample_episode(k, images, n_way=5, k_shot=1, k_query=2))(KEY)
    c = sample_episode(jax.random.PRNGKey(1), images, n_way=5, k_shot=1, k_query=2)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a.support.x, c.support.x)


def test_sinusoid_tasks():
    kw = dict(k_shot=5, k_query=7, amplitude=(0.1, 5.0), phase=(0.0, np.pi), x_range=(-5.0, 5.0))
    tasks = jax.vmap(lambda k: sample_sinusoid(k, **kw))(jax.random.split(KEY, 500))
    assert tasks.support.x.shape == (500, 5, 1) and tasks.query.y.shape == (500, 7, 1)
    x = np.asarray(tasks.support.x)
    assert x.min() >= -5 and x.max() <= 5
    amplitude = np.abs(np.concatenate([tasks.support.y, tasks.query.y], 1)).max((1, 2))
    assert amplitude.max() <= 5.0 + 1e-5 and amplitude.min() < 1.0


def small_experiment():
    from metalearn.config import Config, EvalConfig, TrainConfig

    cfg = Config(
        data=SinusoidConfig(k_shot=5, k_query=5),
        model=MLPConfig(hidden=8),
        conditioning=None,
        algo=MAMLConfig(inner_lr=0.01),
        train=TrainConfig(steps=3, meta_batch=4),
        eval=EvalConfig(),
    )
    return build(cfg)


@pytest.mark.slow
def test_train_step_jit_matches_eager_and_does_not_recompile():
    exp = small_experiment()
    params = exp.algo.init(KEY)
    state = TrainState(params, exp.optimizer.init(params))
    step = make_train_step(exp, meta_batch=4)
    jitted_state, jitted_metrics = step(jax.tree.map(jnp.copy, state), (), KEY)
    with jax.disable_jit():
        eager_state, eager_metrics = step(jax.tree.map(jnp.copy, state), (), KEY)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        (jitted_state, jitted_metrics),
        (eager_state, eager_metrics),
    )
    state = jitted_state
    for i in range(3):
        state, _ = step(state, (), jax.random.fold_in(KEY, i))
    assert step._cache_size() == 1, "the step compiled more than once"
