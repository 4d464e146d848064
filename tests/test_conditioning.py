"""Task conditioning: each option's defining property and documented parameter shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.conditioning import (
    CONDITIONINGS,
    ConditioningConfig,
    MMoEConfig,
    make_conditioned_model,
)
from metalearn.config import ConfigError
from metalearn.models import make_model
from metalearn.models.conv4 import Conv4Config
from metalearn.models.mlp import MLPConfig

T, N_OUT = 3, 4
MLP = MLPConfig(hidden=8, layers=2)
CONV = Conv4Config(hidden=6, downsample="maxpool")
KEY = jax.random.PRNGKey(0)


def build(name, model_cfg=MLP, input_shape=(5,), **kw):
    cfg = MMoEConfig(**kw) if name == "mmoe" else ConditioningConfig(name=name, **kw)
    return make_conditioned_model(cfg, model_cfg, input_shape, n_tasks=T)


def perturbed(projections):
    """FiLM projections moved off zero, differently for every task."""
    return [
        p + jax.random.normal(jax.random.PRNGKey(i), p.shape) for i, p in enumerate(projections)
    ]


def inputs(input_shape):
    return jax.random.normal(jax.random.PRNGKey(1), (7, *input_shape))


@pytest.mark.slow
@pytest.mark.parametrize("model_cfg,input_shape", [(MLP, (5,)), (CONV, (16, 16, 1))])
@pytest.mark.parametrize("name", CONDITIONINGS)
def test_output_depends_on_the_task_unless_unconditioned(name, model_cfg, input_shape):
    model = build(name, model_cfg, input_shape)
    params = model.init(KEY, N_OUT)
    x = inputs(input_shape)
    out0, out1 = model.apply(params, x, 0), model.apply(params, x, 1)
    assert out0.shape == (7, N_OUT)
    if name == "none":
        np.testing.assert_array_equal(out0, out1)
    else:
        assert float(jnp.abs(out0 - out1).max()) > 1e-3


def test_learned_embedding_descriptor():
    model = build("additive", descriptor="embedding", embedding_dim=2)
    params = model.init(KEY, N_OUT)
    assert params["task_embedding"].shape == (T, 2)
    assert [p.shape for p in params["cond"]] == [(2, 8), (2, 8)]
    x = inputs((5,))
    assert float(jnp.abs(model.apply(params, x, 0) - model.apply(params, x, 2)).max()) > 1e-4


def test_parameter_shapes():
    def shapes(name, **kw):
        return jax.tree.map(lambda a: a.shape, build(name, **kw).init(KEY, N_OUT))

    # additive: one [z_dim, width] projection per block; film: scale and shift per channel
    assert shapes("additive")["cond"] == [(T, 8), (T, 8)]
    assert shapes("film")["cond"] == [(T, 16), (T, 16)]
    # concat: the first layer reads the input and the one-hot id
    assert shapes("concat")["model"]["blocks"][0]["w"] == (5 + T, 8)
    multihead = shapes("multihead")
    assert multihead["heads"] == {"head": {"w": (T, 8, N_OUT), "b": (T, N_OUT)}}
    assert "head" not in multihead["model"]
    separate = jax.tree.leaves(build("separate").init(KEY, N_OUT)["tasks"])
    assert all(leaf.shape[0] == T for leaf in separate)
    mmoe = shapes("mmoe", experts=2, expert_hidden=3)
    assert mmoe["experts"]["blocks"][0]["w"] == (2, 5, 3)
    assert mmoe["gates"] == (T, 5, 2)
    assert mmoe["heads"] == {"head": {"w": (T, 3, N_OUT), "b": (T, N_OUT)}}


@pytest.mark.slow  # compiles conv4 twice; the fast tier keeps the shape checks
def test_concat_is_the_model_on_the_concatenated_input():
    model = build("concat", CONV, (16, 16, 1))
    params = model.init(KEY, N_OUT)
    x = inputs((16, 16, 1))
    plain = make_model(CONV, (16, 16, 1 + T))
    tiled = jnp.broadcast_to(jax.nn.one_hot(2, T), (7, 16, 16, T))
    expected = plain.apply(params["model"], jnp.concatenate([x, tiled], -1))
    np.testing.assert_allclose(model.apply(params, x, 2), expected, rtol=1e-6)


def test_film_with_a_zero_descriptor_is_the_unconditioned_model():
    model = make_conditioned_model(ConditioningConfig(name="film"), MLP, (5,), z_dim=3)
    params = model.init(KEY, N_OUT)
    plain = make_model(MLP, (5,))
    x = inputs((5,))
    np.testing.assert_allclose(
        model.apply_vector(params, x, jnp.zeros(3)), plain.apply(params["model"], x), rtol=1e-6
    )


@pytest.mark.slow
def test_separate_networks_share_no_parameters():
    model = build("separate")
    params = model.init(KEY, N_OUT)
    x = inputs((5,))
    grads = jax.grad(lambda p: jnp.sum(model.apply(p, x, 1) ** 2))(params)
    for leaf in jax.tree.leaves(grads["tasks"]):
        assert float(jnp.abs(leaf[1]).max()) > 0
        assert float(jnp.abs(leaf[0]).max()) == 0 and float(jnp.abs(leaf[2]).max()) == 0


@pytest.mark.slow
def test_mmoe_gates_mix_shared_experts():
    model = build("mmoe", experts=2)
    params = model.init(KEY, N_OUT)
    x = inputs((5,))
    grads = jax.grad(lambda p: jnp.sum(model.apply(p, x, 0) ** 2))(params)
    # every expert is shared (gets gradient from task 0); only task 0's gate and head do
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["experts"]))
    assert float(jnp.abs(grads["gates"][0]).max()) > 0
    assert float(jnp.abs(grads["gates"][1:]).max()) == 0
    assert float(jnp.abs(grads["heads"]["head"]["w"][1:]).max()) == 0


@pytest.mark.parametrize("name", ["multihead", "mmoe", "separate", "film"])
def test_conditioning_without_task_ids_is_a_clear_error(name):
    with pytest.raises(ConfigError, match=f"conditioning={name}"):
        make_conditioned_model(ConditioningConfig(name=name), MLP, (5,), n_tasks=0)


def test_vector_conditioning_takes_a_callers_descriptor():
    cfg = ConditioningConfig(name="film")
    model = make_conditioned_model(cfg, MLP, (5,), z_dim=2)
    params = model.init(KEY, N_OUT)
    params["cond"] = perturbed(params["cond"])
    x = inputs((5,))
    a = model.apply_vector(params, x, jnp.array([1.0, 0.0]))
    b = model.apply_vector(params, x, jnp.array([0.0, 1.0]))
    assert float(jnp.abs(a - b).max()) > 1e-3
