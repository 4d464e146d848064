"""MAML++'s remaining parts: per-step batch-norm weights and biases, and the cosine-annealed
outer learning rate, against an independent inner loop and the schedule's closed form."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms.base import classification_loss
from metalearn.algorithms.maml import MAMLPPConfig
from metalearn.config import TrainConfig
from metalearn.models import make_model
from metalearn.models.conv4 import Conv4Config
from metalearn.types import Split, Task

KEY = jax.random.PRNGKey(0)
SHAPE, WAY, STEPS, LR = (16, 16, 1), 3, 2, 0.3
MODEL = make_model(Conv4Config(hidden=4, downsample="maxpool"), SHAPE)


def task(key) -> Task:
    ks, kq = jax.random.split(key)
    ys = jnp.repeat(jnp.arange(WAY), 2)
    return Task(
        Split(jax.random.uniform(ks, (len(ys), *SHAPE)), ys),
        Split(jax.random.uniform(kq, (len(ys), *SHAPE)), ys),
        jnp.zeros((), jnp.int32),
    )


def mamlpp(**kw):
    cfg = MAMLPPConfig(
        inner_lr=LR, inner_steps=STEPS, learn_inner_lr=False, per_step_lr=False,
        multi_step_loss=0, first_order_until=0, **kw,
    )  # fmt: skip
    return ALGORITHMS["mamlpp"](cfg, MODEL, classification_loss, n_out=WAY)


def distinct_step_norms(meta):
    """Per-step weights unlike the initial ones and unlike each other."""
    return jax.tree.map(
        lambda s: s * jnp.arange(2, 2 + len(s)).reshape((-1,) + (1,) * (s.ndim - 1)) + 0.1,
        meta["step_norms"],
    )


def with_norms(params, block_norms):
    """conv4 params with block i's scale / offset from block_norms[i] (a (scale, offset) pair)."""
    blocks = [dict(b, scale=s, offset=o) for b, (s, o) in zip(params["blocks"], block_norms)]
    return {**params, "blocks": blocks}


def reference_adapt(meta, support, steps):
    """MAML's inner loop written out for conv4: step i normalises with step i's weights (0: the
    initial ones), which the loop never changes; the result carries step `steps`' weights."""
    params = meta["init"]
    stacked = meta["step_norms"]["blocks"]

    def norms_at(i):
        if i == 0:
            return [(b["scale"], b["offset"]) for b in params["blocks"]]
        j = min(i, len(stacked[0]["scale"])) - 1
        return [(b["scale"][j], b["offset"][j]) for b in stacked]

    def loss(p, i):
        logits = MODEL.apply(with_norms(p, norms_at(i)), support.x)
        return classification_loss(logits, support.y)[0]

    p = params
    for i in range(steps):
        g = jax.grad(loss)(p, i)
        g = with_norms(g, [(0 * s, 0 * o) for s, o in norms_at(0)])  # norms are not adapted
        p = jax.tree.map(lambda w, d: w - LR * d, p, g)
    return with_norms(p, norms_at(steps))


@pytest.mark.parametrize("steps", [STEPS, pytest.param(STEPS + 1, marks=pytest.mark.slow)])
def test_per_step_norm_weights_are_used_step_by_step_and_not_adapted(steps):
    """At the trained number of inner steps, and beyond it (the last weights again)."""
    algo = mamlpp()
    meta = algo.init(KEY)
    assert all(s.shape == (STEPS, 4) for s in jax.tree.leaves(meta["step_norms"]))
    meta = {**meta, "step_norms": distinct_step_norms(meta)}
    t = task(KEY)
    got = algo.adapt(meta, t.support, KEY, steps)
    want = reference_adapt(meta, t.support, steps)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, want)


def test_every_steps_norm_weights_get_a_meta_gradient():
    algo = mamlpp()
    meta = algo.init(KEY)
    grads = jax.grad(lambda m: algo.meta_loss(m, task(KEY), KEY, 0)[0])(meta)
    for leaf in jax.tree.leaves(grads["step_norms"]):
        assert np.all(np.abs(np.asarray(leaf)).max(-1) > 0)  # each step's weights are trained
    assert float(jnp.abs(grads["init"]["blocks"][0]["scale"]).max()) > 0  # step 0's too
    # without per-step weights the model's own are adapted and the meta-parameters are plain
    plain = mamlpp(per_step_norm=False)
    assert "init" not in plain.init(KEY)


def test_cosine_outer_rate_follows_its_closed_form():
    """Adam on a constant gradient moves each parameter by the rate itself, so the updates show
    the schedule: outer_lr at step 0, min_outer_lr + (outer_lr - min) (1 + cos(pi t / T)) / 2."""
    train = TrainConfig(steps=20, outer_lr=0.01)
    algo = mamlpp(min_outer_lr=1e-4)
    optimizer = algo.optimizer(train)
    params = jnp.zeros(3)
    state = optimizer.init(params)
    for t in range(25):
        updates, state = optimizer.update(jnp.ones(3), state, params)
        tt = min(t, train.steps)
        want = 1e-4 + (0.01 - 1e-4) * (1 + math.cos(math.pi * tt / train.steps)) / 2
        np.testing.assert_allclose(-updates, want, rtol=1e-4)
    constant = mamlpp(outer_lr_schedule="constant").optimizer(train)
    updates, _ = constant.update(jnp.ones(3), constant.init(params), params)
    np.testing.assert_allclose(-updates, 0.01, rtol=1e-4)
    assert isinstance(optimizer, optax.GradientTransformation)


def test_bad_schedule_and_inductive_per_step_norm_are_refused():
    from metalearn.checks import ConfigError

    with pytest.raises(ConfigError, match="outer_lr_schedule=.linear. is not allowed"):
        MAMLPPConfig(outer_lr_schedule="linear")
    from types import SimpleNamespace

    inductive = SimpleNamespace(model=Conv4Config(norm="inductive"))
    with pytest.raises(ConfigError, match="per_step_norm=true is not allowed with model.norm"):
        MAMLPPConfig().check_with(inductive)
    MAMLPPConfig(per_step_norm=False).check_with(inductive)
