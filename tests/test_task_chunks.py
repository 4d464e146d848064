"""Walking the meta-batch in chunks of tasks gives the same training step as vmapping it whole."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from test_algorithms import image_experiment

from metalearn.config import ConfigError, TrainConfig
from metalearn.task_chunks import auto_chunk_for, auto_task_chunk
from metalearn.train_step import TrainState, make_train_step
from metalearn.types import Split, Task

KEY = jax.random.PRNGKey(3)


@pytest.mark.slow
@pytest.mark.parametrize("algo_name", ["maml", "reptile"])  # meta_loss and meta_gradient paths
def test_chunked_step_equals_whole_batch_step(algo_name):
    # Plain SGD with lr 1, so the parameter change is minus the mean gradient itself.
    exp = image_experiment(algo_name)._replace(optimizer=optax.sgd(1.0))
    params = exp.algo.init(KEY)
    deltas, losses = {}, {}
    for chunk in (4, 2):
        state = TrainState(jax.tree.map(np.array, params), exp.optimizer.init(params))
        step = make_train_step(exp, meta_batch=4, task_chunk=chunk)
        new, metrics = step(state, exp.source.splits["train"], KEY)
        deltas[chunk] = jax.tree.map(lambda a, b: np.asarray(a) - b, new.params, params)
        losses[chunk] = float(metrics["loss"])
    whole = jax.tree.leaves(deltas[4])
    assert max(np.abs(d).max() for d in whole) > 1e-3  # the step moved the parameters
    # Same sums in another order: float32 tolerance relative to each leaf's largest entry.
    for a, b in zip(whole, jax.tree.leaves(deltas[2]), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5 * max(1.0, np.abs(a).max()), rtol=0)
    assert losses[2] == pytest.approx(losses[4], rel=1e-5)


def test_auto_chunk_on_cpu_keeps_about_160_images():
    assert jax.default_backend() == "cpu"
    assert auto_task_chunk(32, 80, image_data=True) == 2  # Omniglot 5-way 1-shot, 15 queries
    assert auto_task_chunk(16, 120, image_data=True) == 1  # 20-way 1-shot, 5 queries
    assert auto_task_chunk(30, 40, image_data=True) == 3  # the largest divisor of 30 up to 4
    assert auto_task_chunk(32, 20, image_data=False) == 32  # vector data: no chunks


def test_auto_chunk_reads_one_tasks_shapes():
    def task(x_shape):  # 5 support and 75 query examples
        split = lambda n: Split(jax.ShapeDtypeStruct((n, *x_shape), np.float32), None)  # noqa: E731
        return Task(split(5), split(75), None)

    assert auto_chunk_for(32, task((28, 28, 1))) == 2  # images: 80 examples, ~160 per chunk
    assert auto_chunk_for(32, task((1,))) == 32  # vector features: all at once


def test_task_chunk_must_divide_the_meta_batch():
    with pytest.raises(ConfigError, match=r"train.task_chunk=5 must be a divisor"):
        TrainConfig(meta_batch=32, task_chunk=5)
    exp = image_experiment("maml")
    with pytest.raises(ConfigError, match=r"train.task_chunk=3 must divide"):
        make_train_step(exp, meta_batch=4, task_chunk=3)
