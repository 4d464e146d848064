"""ANIL, Meta-SGD and remat: each variant's defining property against plain MAML."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import LINEAR, linear_task

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms.base import regression_loss, task_gradient
from metalearn.algorithms.maml import ANILConfig, MAMLConfig, MetaSGDConfig
from metalearn.config import ConfigError
from metalearn.models import mlp

KEY = jax.random.PRNGKey(0)
MLP = LINEAR._replace(
    init=lambda k, n: mlp.init(k, n, in_features=3, hidden=16, layers=2), apply=mlp.apply
)
TASK = linear_task(KEY)


def make(cfg):
    return ALGORITHMS[cfg.name](cfg, MLP, regression_loss, n_out=1, n_train_classes=1)


def meta_grad(algo, params, steps):
    def loss(p):
        adapted = algo.adapt(p, TASK.support, KEY, steps)
        return regression_loss(MLP.apply(adapted, TASK.query.x), TASK.query.y)[0]

    return jax.grad(loss)(params)


def test_anil_adapts_only_the_head():
    algo = make(ANILConfig(inner_lr=0.1, inner_steps=3))
    params = algo.init(KEY)
    adapted = algo.adapt(params, TASK.support, KEY, 3)
    jax.tree.map(np.testing.assert_array_equal, adapted["blocks"], params["blocks"])
    assert not np.allclose(adapted["head"]["w"], params["head"]["w"])
    # The trunk is still meta-learned: the outer gradient reaches it.
    grads = meta_grad(algo, params, 3)
    assert float(jnp.abs(grads["blocks"][0]["w"]).max()) > 0


def test_adapting_one_block_and_unknown_groups():
    algo = make(MAMLConfig(inner_lr=0.1, adapt=["blocks.1"]))
    params = algo.init(KEY)
    adapted = algo.adapt(params, TASK.support, KEY, 2)
    np.testing.assert_array_equal(adapted["blocks"][0]["w"], params["blocks"][0]["w"])
    np.testing.assert_array_equal(adapted["head"]["w"], params["head"]["w"])
    assert not np.allclose(adapted["blocks"][1]["w"], params["blocks"][1]["w"])
    with pytest.raises(ConfigError, match="blocks.7"):
        make(MAMLConfig(adapt=["blocks.7"])).init(KEY)


def test_metasgd_with_equal_frozen_rates_is_maml():
    maml = make(MAMLConfig(inner_lr=0.05, inner_steps=2))
    metasgd = make(MetaSGDConfig(inner_lr=0.05, inner_steps=2))
    meta = metasgd.init(KEY)
    params = maml.init(KEY)
    jax.tree.map(np.testing.assert_array_equal, meta["init"], params)
    assert all(np.all(lr == 0.05) for lr in jax.tree.leaves(meta["inner_lr"]))
    got = meta_grad(metasgd, meta, 2)
    want = meta_grad(maml, params, 2)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got["init"], want
    )
    # and the rates themselves get a gradient, so they are meta-learned
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(got["inner_lr"]))


@pytest.mark.slow
def test_remat_changes_memory_not_results():
    steps = 25
    plain = make(MAMLConfig(inner_lr=0.02, inner_steps=steps))
    remat = make(MAMLConfig(inner_lr=0.02, inner_steps=steps, remat=True))
    params = plain.init(KEY)
    got, want = meta_grad(remat, params, steps), meta_grad(plain, params, steps)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)

    def temp_bytes(algo):
        compiled = jax.jit(lambda p: meta_grad(algo, p, steps)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(remat) < temp_bytes(plain)


def test_imaml_meta_gradient_matches_closed_form_on_a_quadratic():
    """Linear regression: the proximal inner problem is quadratic, so phi* and its implicit
    meta-gradient have closed forms. 400 inner steps converge; 3 CG steps are exact in 3-D."""
    from metalearn.algorithms.imaml import IMAMLConfig

    lam = 1.5
    cfg = IMAMLConfig(inner_lr=0.05, inner_steps=400, prox_lambda=lam, cg_steps=3)
    algo = ALGORITHMS["imaml"](cfg, LINEAR, regression_loss, n_out=1, n_train_classes=1)
    theta = LINEAR.init(jax.random.PRNGKey(1), 1)
    xs, ys, xq, yq = TASK.support.x, TASK.support.y, TASK.query.x, TASK.query.y
    h = 2 / len(xs) * xs.T @ xs  # Hessian of the support MSE
    phi = jnp.linalg.solve(h + lam * jnp.eye(3), lam * theta["head"]["w"] + 2 / len(xs) * xs.T @ ys)
    g = 2 / len(xq) * xq.T @ (xq @ phi - yq)
    want = jnp.linalg.solve(jnp.eye(3) + h / lam, g)

    adapted = algo.adapt(theta, TASK.support, KEY)
    np.testing.assert_allclose(adapted["head"]["w"], phi, rtol=1e-4, atol=1e-5)
    got, metrics = task_gradient(algo, theta, TASK, KEY)
    np.testing.assert_allclose(got["head"]["w"], want, rtol=1e-4, atol=1e-5)
    assert "loss" in metrics


def mamlpp(**kw):
    from metalearn.algorithms.maml import MAMLPPConfig

    base = dict(inner_lr=0.05, inner_steps=3, multi_step_loss=0, first_order_until=0)
    return make(MAMLPPConfig(**{**base, **kw}))


def scheduled_grad(algo, meta, step):
    return jax.grad(lambda m: algo.meta_loss(m, TASK, KEY, step)[0])(meta)


def close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


def test_mamlpp_rates_are_per_step_and_per_array_and_start_as_maml():
    algo = mamlpp()
    meta = algo.init(KEY)
    assert all(r.shape == (3,) for r in jax.tree.leaves(meta["inner_lr"]))
    close(
        meta_grad(algo, meta, 3)["init"],
        meta_grad(make(MAMLConfig(inner_lr=0.05, inner_steps=3)), meta["init"], 3),
    )
    # Rates of a later step change the result only when that step runs.
    bumped = jax.tree.map(lambda r: r.at[2].set(0.5), meta["inner_lr"])
    one = algo.adapt(meta, TASK.support, KEY, 2)
    close(one, algo.adapt({**meta, "inner_lr": bumped}, TASK.support, KEY, 2))
    assert not np.allclose(
        algo.adapt(meta, TASK.support, KEY, 3)["head"]["w"],
        algo.adapt({**meta, "inner_lr": bumped}, TASK.support, KEY, 3)["head"]["w"],
    )


def test_multi_step_loss_weights_anneal_to_the_last_step():
    from metalearn.algorithms.maml import multi_step_weights

    np.testing.assert_allclose(multi_step_weights(4, 0, 100), [0.25] * 4)
    np.testing.assert_allclose(multi_step_weights(4, 100, 100), [0, 0, 0, 1])
    np.testing.assert_allclose(multi_step_weights(4, 50, 100), [0.125, 0.125, 0.125, 0.625])

    algo = mamlpp(multi_step_loss=100)
    meta = algo.init(KEY)
    losses = [
        regression_loss(
            MLP.apply(algo.adapt(meta, TASK.support, KEY, k), TASK.query.x), TASK.query.y
        )[0]
        for k in (1, 2, 3)
    ]
    np.testing.assert_allclose(algo.meta_loss(meta, TASK, KEY, 0)[0], np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(algo.meta_loss(meta, TASK, KEY, 100)[0], losses[-1], rtol=1e-5)


def test_derivative_order_annealing():
    algo = mamlpp(first_order_until=10)
    meta = algo.init(KEY)
    first = mamlpp(first_order=True)
    second = mamlpp()
    close(scheduled_grad(algo, meta, 10), jax.grad(lambda m: episode_loss(first, m))(meta))
    close(scheduled_grad(algo, meta, 11), jax.grad(lambda m: episode_loss(second, m))(meta))


def episode_loss(algo, meta):
    adapted = algo.adapt(meta, TASK.support, KEY)
    return regression_loss(MLP.apply(adapted, TASK.query.x), TASK.query.y)[0]
