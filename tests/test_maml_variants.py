"""ANIL, Meta-SGD and remat: each variant's defining property against plain MAML."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import LINEAR, linear_task

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms.base import regression_loss
from metalearn.config import ANILConfig, ConfigError, MAMLConfig, MetaSGDConfig
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
    from metalearn.config import IMAMLConfig

    lam = 1.5
    cfg = IMAMLConfig(inner_lr=0.05, inner_steps=400, prox_lambda=lam, cg_steps=3)
    algo = ALGORITHMS["imaml"](cfg, LINEAR, regression_loss, n_out=1, n_train_classes=1)
    theta = LINEAR.init(jax.random.PRNGKey(1), 1)
    (xs, ys), (xq, yq) = TASK.support, TASK.query
    h = 2 / len(xs) * xs.T @ xs  # Hessian of the support MSE
    phi = jnp.linalg.solve(h + lam * jnp.eye(3), lam * theta["head"]["w"] + 2 / len(xs) * xs.T @ ys)
    g = 2 / len(xq) * xq.T @ (xq @ phi - yq)
    want = jnp.linalg.solve(jnp.eye(3) + h / lam, g)

    adapted = algo.adapt(theta, TASK.support, KEY)
    np.testing.assert_allclose(adapted["head"]["w"], phi, rtol=1e-4, atol=1e-5)
    got, metrics = algo.meta_gradient(theta, TASK, KEY)
    np.testing.assert_allclose(got["head"]["w"], want, rtol=1e-4, atol=1e-5)
    assert "loss" in metrics
