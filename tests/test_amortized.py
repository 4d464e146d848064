"""The amortised learner: order-invariant over the support set, reads its labels, learns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.algorithms.amortized import AmortizedConfig
from metalearn.conditioning import ConditioningConfig
from metalearn.config import Config, EvalConfig, TrainConfig
from metalearn.data.sinusoid import SinusoidConfig
from metalearn.evaluate import make_evaluator
from metalearn.experiment import build, initial_state
from metalearn.models.mlp import MLPConfig
from metalearn.train_step import make_train_step

KEY = jax.random.PRNGKey(0)


def experiment(conditioning="none"):
    return build(
        Config(
            data=SinusoidConfig(),
            model=MLPConfig(),
            conditioning=ConditioningConfig(name=conditioning),
            algo=AmortizedConfig(context_dim=8, encoder_hidden=32),
            train=TrainConfig(meta_batch=8),
            eval=EvalConfig(),
        )
    )


@pytest.mark.parametrize("conditioning", ["none", "additive", "concat"])
def test_support_order_does_not_matter_but_its_targets_do(conditioning):
    exp = experiment(conditioning)
    params = exp.algo.init(KEY)
    task = exp.source.sample(KEY, (), False)
    order = jax.random.permutation(jax.random.PRNGKey(3), len(task.support.y))
    shuffled = jax.tree.map(lambda a: a[order], task.support)
    relabelled = task.support._replace(y=task.support.y[order])  # targets moved to other x

    def predictions(support):
        return exp.algo.predict(params, exp.algo.adapt(params, support, KEY), task.query.x)

    np.testing.assert_allclose(
        predictions(shuffled), predictions(task.support), rtol=1e-5, atol=1e-6
    )
    assert float(jnp.abs(predictions(relabelled) - predictions(task.support)).max()) > 1e-4


@pytest.mark.slow
def test_amortized_learner_fits_sinusoids_from_the_support_set():
    exp = experiment()
    state = initial_state(exp, exp.algo.init(KEY))
    step = make_train_step(exp, meta_batch=8)
    evaluate = make_evaluator(exp.algo, exp.source, exp.loss_fn, 0, batch=50)
    before = evaluate(state.params, "test", 100, 1)["loss"]
    for i in range(1500):
        state, _ = step(state, (), jax.random.fold_in(KEY, i))
    after = evaluate(state.params, "test", 100, 1)["loss"]
    assert after < 0.5 * before, (before, after)
