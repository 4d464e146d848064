"""Batch norm modes: inductive running statistics are updated in training and used at test."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compose_config

from metalearn.checks import ConfigError
from metalearn.experiment import build, initial_state
from metalearn.models import conv4, norm
from metalearn.train_step import make_train_step

KEY = jax.random.PRNGKey(0)


def test_track_is_the_identity_whose_backward_steps_the_running_statistics():
    y = jnp.arange(6.0).reshape(2, 3)
    rm, rv, bm, bv = jnp.full(3, 0.5), jnp.full(3, 2.0), jnp.arange(3.0), jnp.ones(3)

    def loss(y, rm, rv):
        return jnp.sum(3.0 * norm.track(y, rm, rv, bm, bv, jnp.float32(0.1)))

    np.testing.assert_array_equal(norm.track(y, rm, rv, bm, bv, 0.1), y)
    gy, grm, grv = jax.grad(loss, (0, 1, 2))(y, rm, rv)
    np.testing.assert_array_equal(gy, jnp.full((2, 3), 3.0))  # the loss's own cotangent
    np.testing.assert_allclose(grm, 0.1 * (rm - bm), rtol=1e-6)  # whatever the loss's scale
    np.testing.assert_allclose(grv, 0.1 * (rv - bv), rtol=1e-6)


def test_follow_is_the_identity_whose_backward_steps_the_statistics_to_their_update():
    y, running, updated = jnp.arange(4.0), {"m": jnp.full(2, 0.5)}, {"m": jnp.array([1.0, -1.0])}
    gy, gr = jax.grad(lambda y, r: jnp.sum(2.0 * norm.follow(y, r, updated)), (0, 1))(y, running)
    np.testing.assert_array_equal(gy, jnp.full(4, 2.0))
    np.testing.assert_array_equal(gr["m"], running["m"] - updated["m"])  # SGD rate 1 -> updated


def config(omniglot, tmp_path, monkeypatch, overrides):
    overrides = ["data=omniglot", f"data.root={omniglot}", "data.split_sizes=[12,4,4]",
                 "data.n_way=3", "data.k_query=2", "data.image_size=14", "model.hidden=8",
                 *overrides]  # fmt: skip
    return compose_config(overrides, tmp_path, monkeypatch)


def block_moments(params, x, upto: int):
    """The batch mean and variance of block `upto`'s conv output, by hand (stride conv4)."""
    for p in params["blocks"][:upto]:
        x = conv4.block(p, x, downsample="stride")
    w = params["blocks"][upto]["w"]
    z = jax.lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
    return z.mean((0, 1, 2)), z.var((0, 1, 2))


@pytest.mark.slow  # compiles a conv4 pre-training step; the fast tier keeps track's maths
@pytest.mark.parametrize("task_chunk", [1, 2])
def test_a_pretraining_step_moves_the_running_statistics_to_the_batch_mean(
    omniglot, tmp_path, monkeypatch, task_chunk
):
    """One step of algo=finetune from (mean 0, var 1): r = 0.1 * the mean over the 2 tasks of
    each task's batch statistics (its support and query images, one forward pass), chunked or
    not; the other parameters take Adam's step as usual."""
    cfg = config(omniglot, tmp_path, monkeypatch, ["algo=finetune", "model.norm=inductive"])
    exp = build(cfg)
    params = exp.algo.init(KEY)
    assert {"running_mean", "running_var"} <= set(params["blocks"][0])
    arrays = exp.source.splits["train"]
    step = make_train_step(exp, meta_batch=2, task_chunk=task_chunk)
    new, _ = step(initial_state(exp, jax.tree.map(jnp.copy, params)), arrays, KEY, 1)

    k_tasks, _ = jax.random.split(KEY)  # the tasks the step draws (train.make_train_step)
    tasks = jax.vmap(lambda k: exp.source.sample(k, arrays, True))(jax.random.split(k_tasks, 2))
    for i in (0, 2):
        moments = [
            block_moments(params, jnp.concatenate([tasks.support.x[t], tasks.query.x[t]]), i)
            for t in range(2)
        ]
        mean = np.mean([m for m, _ in moments], 0)
        var = np.mean([v for _, v in moments], 0)
        block = new.params["blocks"][i]
        np.testing.assert_allclose(block["running_mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(block["running_var"], 1 - 0.1 * (1 - var), rtol=1e-4)
    assert not np.allclose(new.params["blocks"][0]["w"], params["blocks"][0]["w"])


def test_at_test_the_running_statistics_normalise_each_query_on_its_own(
    omniglot, tmp_path, monkeypatch
):
    cfg = config(omniglot, tmp_path, monkeypatch, ["algo=protonet", "model.norm=inductive"])
    model = build(cfg).model
    params = model.init(KEY, None)
    stats = jax.random.PRNGKey(3)
    for i, block in enumerate(params["blocks"]):
        k1, k2 = jax.random.split(jax.random.fold_in(stats, i))
        block["running_mean"] = 0.1 * jax.random.normal(k1, block["b"].shape)
        block["running_var"] = jnp.exp(0.2 * jax.random.normal(k2, block["b"].shape))
    x = jax.random.uniform(KEY, (6, 14, 14, 1))

    @jax.jit
    def embed_at_test(params, x):  # the mode is read when tracing: jit inside the context
        with norm.testing():
            return model.embed(params, x)

    together = embed_at_test(params, x)
    np.testing.assert_allclose(embed_at_test(params, x[:2]), together[:2], rtol=1e-5, atol=1e-6)

    p = params["blocks"][0]  # block 0 by hand with the running statistics
    z = jax.lax.conv_general_dilated(x, p["w"], (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
    want = jax.nn.relu(
        (z - p["running_mean"]) * p["scale"] / jnp.sqrt(p["running_var"] + conv4.BN_EPS)
        + p["offset"]
    )
    with norm.testing():
        got = conv4.block(p, x, downsample="stride")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # in training (and transductive), statistics are the batch's: a query depends on the others
    embed = jax.jit(lambda params, x: model.embed(params, x))
    assert float(jnp.abs(embed(params, x[:2]) - embed(params, x)[:2]).max()) > 1e-3


def test_algorithms_without_inductive_support_refuse_it(omniglot, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="model.norm=inductive is not allowed with algo=reptile"):
        config(omniglot, tmp_path, monkeypatch, ["algo=reptile", "model.norm=inductive"])


@pytest.mark.slow
def test_maml_never_adapts_the_running_statistics(omniglot, tmp_path, monkeypatch):
    cfg = config(omniglot, tmp_path, monkeypatch, ["algo=maml", "model.norm=inductive"])
    exp = build(cfg)
    params = exp.algo.init(KEY)
    task = exp.source.sample(KEY, exp.source.splits["train"], False)
    for testing in (False, True):
        with norm.testing() if testing else contextlib.nullcontext():
            adapted = exp.algo.adapt(params, task.support, KEY, 2)
        for a, p in zip(adapted["blocks"], params["blocks"]):
            np.testing.assert_array_equal(a["running_mean"], p["running_mean"])
        assert not np.allclose(adapted["head"]["w"], params["head"]["w"])
