"""CAVIA's defining properties: only the context adapts, and it learns sinusoids."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms.base import regression_loss
from metalearn.algorithms.cavia import CAVIAConfig
from metalearn.conditioning import ConditioningConfig
from metalearn.config import Config, ConfigError, EvalConfig, TrainConfig
from metalearn.data import make_task_source
from metalearn.data.sinusoid import SinusoidConfig
from metalearn.evaluate import make_evaluator
from metalearn.experiment import build, initial_state
from metalearn.models import make_model
from metalearn.models.mlp import MLPConfig
from metalearn.train_step import make_train_step

KEY = jax.random.PRNGKey(0)


def sinusoid_config(conditioning="none", steps=1500):
    return Config(
        data=SinusoidConfig(),
        model=MLPConfig(),
        conditioning=ConditioningConfig(name=conditioning),
        algo=CAVIAConfig(inner_lr=1.0, inner_steps=2, context_dim=4),
        train=TrainConfig(steps=steps, meta_batch=8),
        eval=EvalConfig(),
    )


@pytest.mark.parametrize("conditioning", ["none", "film", "additive"])
def test_inner_loop_changes_only_the_context(conditioning):
    exp = build(sinusoid_config(conditioning))
    params = exp.algo.init(KEY)
    task = exp.source.sample(KEY, (), False)
    context = exp.algo.adapt(params, task.support, KEY, 2)
    assert context.shape == (4,) and float(jnp.abs(context).max()) > 0  # moved from zero
    # the network's weights are what predict reads, untouched by adaptation; zero steps leave
    # the context at zero
    np.testing.assert_array_equal(exp.algo.adapt(params, task.support, KEY, 0), jnp.zeros(4))

    # the meta-gradient reaches the weights through the inner steps
    def query_loss(p):
        ctx = exp.algo.adapt(p, task.support, KEY, 2)
        return regression_loss(exp.algo.predict(p, ctx, task.query.x), task.query.y)[0]

    grads = jax.grad(query_loss)(params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_context_step_is_one_sgd_step_on_the_support_loss():
    exp = build(sinusoid_config())
    params = exp.algo.init(KEY)
    task = exp.source.sample(KEY, (), False)
    # independent formulation: concat the context to x and step by hand
    model = make_model(MLPConfig(), (1 + 4,))

    def support_loss(ctx):
        x = jnp.concatenate([task.support.x, jnp.broadcast_to(ctx, (len(task.support.x), 4))], 1)
        return jnp.mean((model.apply(params["model"], x) - task.support.y) ** 2)

    expected = -1.0 * jax.grad(support_loss)(jnp.zeros(4))
    np.testing.assert_allclose(exp.algo.adapt(params, task.support, KEY, 1), expected, rtol=1e-5)


@pytest.mark.slow  # a learning curve; the fast tier keeps the inner-loop checks
def test_cavia_learns_sinusoids():
    exp = build(sinusoid_config(steps=1500))
    state = initial_state(exp, exp.algo.init(KEY))
    step = make_train_step(exp, meta_batch=8)
    evaluate = make_evaluator(exp.algo, exp.source, exp.loss_fn, 2, batch=50)
    before = evaluate(state.params, "test", 100, 1)["loss"]
    for i in range(1500):
        state, _ = step(state, (), jax.random.fold_in(KEY, i))
    after = evaluate(state.params, "test", 100, 1)["loss"]
    assert after < 0.5 * before, (before, after)


def test_cavia_refuses_a_conditioning_by_task_id():
    cfg = dataclasses.replace(sinusoid_config(), conditioning=ConditioningConfig(name="multihead"))
    source = make_task_source(cfg.data)
    model = make_model(cfg.model, source.input_shape)
    with pytest.raises(ConfigError, match="algo=cavia"):
        ALGORITHMS["cavia"](cfg.algo, model, regression_loss, n_out=1, config=cfg, source=source)
