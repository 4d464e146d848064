"""The black-box learner: what its cores read (labels, order), query independence, learning."""

from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms.base import classification_loss
from metalearn.algorithms.blackbox import BlackBoxConfig, make_core
from metalearn.config import ConfigError
from metalearn.data import TaskSource
from metalearn.data.episodic import sample_episode
from metalearn.experiment import Experiment
from metalearn.models import make_model
from metalearn.models.conv4 import Conv4Config
from metalearn.models.mlp import MLPConfig
from metalearn.train_step import TrainState, make_train_step
from metalearn.types import Split, Task

KEY = jax.random.PRNGKey(0)
CORES = ("lstm", "snail", "transformer")
N_WAY, K_SHOT, K_QUERY, DIM = 3, 2, 4, 8
TOL = dict(rtol=1e-5, atol=1e-5)


def small_config(core: str, **overrides) -> BlackBoxConfig:
    values = dict(core=core, hidden=16, layers=1, heads=2, tc_layers=3) | overrides
    return BlackBoxConfig(**values)


@functools.cache
def learner(core: str, encoder: str = "mlp", shuffle_support: bool = False):
    """(algorithm, initial parameters, episode): 3-way 2-shot vectors embedded by mlp, or noise
    images embedded by conv4 (whose batch norm uses each embedded batch's statistics). Cached,
    and built under jit (eager ops compile one by one), so the tests share compiled code."""
    cfg = small_config(core, shuffle_support=shuffle_support)
    if encoder == "mlp":
        model = make_model(MLPConfig(hidden=16, layers=1), (DIM,))
        task = jax.jit(vector_task)(KEY)
    else:
        model = make_model(Conv4Config(hidden=8), (12, 12, 1))
        images = jax.random.randint(KEY, (6, 20, 12, 12), 0, 256).astype(jnp.uint8)
        sample = partial(sample_episode, n_way=N_WAY, k_shot=K_SHOT, k_query=K_QUERY)
        task = jax.jit(sample)(KEY, images)
    algo = ALGORITHMS["blackbox"](cfg, model, classification_loss, n_out=N_WAY)
    return algo, jax.jit(algo.init)(KEY), task


@partial(jax.jit, static_argnums=0)
def predictions(algo, params, support: Split, query_x, key=KEY):
    return algo.predict(params, algo.adapt(params, support, key, 0), query_x)


def permuted(split: Split, order) -> Split:
    return Split(split.x[order], split.y[order])


@pytest.mark.slow
def test_transformer_is_invariant_to_support_order():
    algo, params, task = learner("transformer", encoder="conv4")
    order = jax.random.permutation(jax.random.PRNGKey(2), len(task.support.y))
    assert not np.array_equal(order, np.arange(len(order)))
    np.testing.assert_allclose(
        predictions(algo, params, permuted(task.support, order), task.query.x),
        predictions(algo, params, task.support, task.query.x),
        **TOL,
    )


@pytest.mark.parametrize("core", ["lstm", "snail"])
def test_sequential_cores_depend_on_support_order(core):
    """By design: the LSTM and SNAIL's causal stack read the support set as a sequence."""
    algo, params, task = learner(core)
    reversed_support = permuted(task.support, jnp.arange(len(task.support.y))[::-1])
    before = predictions(algo, params, task.support, task.query.x)
    after = predictions(algo, params, reversed_support, task.query.x)
    assert np.abs(after - before).max() > 1e-3


@pytest.mark.parametrize("core", CORES)
def test_predictions_change_when_support_labels_are_permuted(core):
    algo, params, task = learner(core)
    relabelled = Split(task.support.x, (task.support.y + 1) % N_WAY)
    before = predictions(algo, params, task.support, task.query.x)
    after = predictions(algo, params, relabelled, task.query.x)
    assert np.abs(after - before).max() > 1e-3


@pytest.mark.parametrize("core", CORES)
def test_queries_are_answered_independently(core):
    """Each query's prediction is the one it gets alone. (mlp embeds each example on its own;
    conv4's batch norm would share the query batch's statistics, which is the encoder's doing.)"""
    algo, params, task = learner(core)
    together = predictions(algo, params, task.support, task.query.x)
    alone = [predictions(algo, params, task.support, x[None])[0] for x in task.query.x]
    np.testing.assert_allclose(together, np.stack(alone), **TOL)


@pytest.mark.parametrize("core", ["lstm", "snail"])
def test_a_query_is_answered_as_the_last_token_of_the_full_sequence(core):
    """The two-stream read/answer equals the plain causal run over [support; query], per query."""
    support_size, d_in, n_out = 5, 7, 3
    core_fns = make_core(small_config(core), support_size)
    params = jax.jit(core_fns.init, static_argnums=(1, 2))(KEY, d_in, n_out)
    support = jax.random.normal(jax.random.PRNGKey(1), (support_size, d_in))
    queries = jax.random.normal(jax.random.PRNGKey(2), (4, d_in))
    answers = jax.jit(lambda p, s, q: core_fns.answer(p, core_fns.read(p, s), q))(
        params, support, queries
    )
    sequence = jax.jit(core_fns.sequence)
    full_runs = jnp.stack(
        [sequence(params, jnp.concatenate([support, q[None]]))[-1] for q in queries]
    )
    np.testing.assert_allclose(answers, full_runs, **TOL)


def test_shuffling_is_drawn_from_the_adapt_key():
    algo, params, task = learner("lstm", shuffle_support=True)
    same = [predictions(algo, params, task.support, task.query.x, KEY) for _ in range(2)]
    np.testing.assert_array_equal(same[0], same[1])
    other = predictions(algo, params, task.support, task.query.x, jax.random.PRNGKey(7))
    assert np.abs(other - same[0]).max() > 1e-4


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="algo.core='gru'"):
        BlackBoxConfig(core="gru")
    with pytest.raises(ConfigError, match="multiple of heads"):
        BlackBoxConfig(core="transformer", hidden=30, heads=4)
    with pytest.raises(ConfigError, match="algo.tc_layers"):  # no data config to size it from
        make_core(BlackBoxConfig(core="snail", tc_layers=0), None)


# ---------------------------------------------------------------------------------- learning


def vector_task(key) -> Task:
    """3-way 2-shot: fresh random class centres in every task, examples scattered around them,
    so nothing but the support set tells the classes apart."""
    k_centres, k_noise = jax.random.split(key)
    centres = jax.random.normal(k_centres, (N_WAY, 1, DIM))
    x = centres + 0.3 * jax.random.normal(k_noise, (N_WAY, K_SHOT + K_QUERY, DIM))
    y = jnp.broadcast_to(jnp.arange(N_WAY)[:, None], (N_WAY, K_SHOT + K_QUERY))

    def flat(a):
        return a.reshape((-1,) + a.shape[2:])

    return Task(
        Split(flat(x[:, :K_SHOT]), flat(y[:, :K_SHOT])),
        Split(flat(x[:, K_SHOT:]), flat(y[:, K_SHOT:])),
        jnp.zeros((), jnp.int32),
    )


def vector_source() -> TaskSource:
    return TaskSource(
        "classification",
        N_WAY,
        N_WAY,
        (DIM,),
        dict.fromkeys(("train", "val", "test"), ()),
        lambda key, arrays, global_labels=False: vector_task(key),
    )


@pytest.mark.slow
@pytest.mark.parametrize("core", CORES)
def test_every_core_learns_to_classify_from_the_support_set(core):
    source = vector_source()
    model = make_model(MLPConfig(hidden=32, layers=1), source.input_shape)
    algo = ALGORITHMS["blackbox"](
        small_config(core, hidden=32), model, classification_loss, n_out=N_WAY
    )
    exp = Experiment(None, source, model, algo, classification_loss, optax.adam(3e-3))
    params = algo.init(KEY)
    state = TrainState(params, exp.optimizer.init(params))
    step = make_train_step(exp, meta_batch=16)
    for i in range(1000):
        state, _ = step(state, (), jax.random.fold_in(KEY, i))

    tasks = jax.vmap(vector_task)(jax.random.split(jax.random.PRNGKey(99), 300))
    keys = jax.random.split(jax.random.PRNGKey(98), 300)

    @jax.jit
    def query_accuracy(tasks, relabel):
        """Accuracy with the support labels shifted by `relabel` (mod N), scored against
        the query labels shifted by `relabel` and against the unshifted ones."""

        def one(task, key):
            support = Split(task.support.x, (task.support.y + relabel) % N_WAY)
            logits = algo.predict(
                state.params, algo.adapt(state.params, support, key), task.query.x
            )
            predicted = jnp.argmax(logits, -1)
            shifted = (task.query.y + relabel) % N_WAY
            return jnp.mean(predicted == shifted), jnp.mean(predicted == task.query.y)

        follows, original = jax.vmap(one)(tasks, keys)
        return follows.mean(), original.mean()

    accuracy, _ = query_accuracy(tasks, 0)
    assert accuracy > 0.8, accuracy  # chance is 1/3
    # Relabel the support set: the predicted classes follow the new labels.
    follows, original = query_accuracy(tasks, 1)
    assert follows > 0.8 and original < 0.2, (follows, original)
