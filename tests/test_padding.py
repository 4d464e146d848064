"""Padded episodes (types.Split.mask) give every learner the results of the unpadded episode.

A variable-way episode (data=meta_dataset) is padded to one shape: slots of label -1 and mask
False in support and query, and a head of data.max_way outputs of which the episode uses some.
Each learner here gets one 5-way episode twice: as is, with a 5-output head, and padded (extra
slots interleaved with the real ones, an 8-output head whose used columns are a scattered
subset). Its meta-loss, meta-gradient and test metrics must agree (float32; the padded
computation sums zeros in other orders: rtol 2e-4, atol 2e-6), and the head columns of classes
the episode lacks must get no gradient. The learners whose masking lives in the model's batch
norms run conv4 (transductive and inductive); the others an MLP, whose second-order steps
compile in a fraction of the time (their masking is in the losses and prototypes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compose_config

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms.base import classification_loss
from metalearn.checks import ConfigError
from metalearn.conditioning import ConditioningConfig
from metalearn.config import Config, EvalConfig, TrainConfig, schemas
from metalearn.data.base import DataSpec, source_of
from metalearn.data.omniglot import OmniglotConfig
from metalearn.data.sinusoid import SinusoidConfig
from metalearn.models import make_model, norm
from metalearn.models.conv4 import Conv4Config
from metalearn.models.mlp import MLPConfig
from metalearn.types import Split, Task

WAY, SHOT, QUERY = 5, 2, 3
PADDED_OUT = 8
PRESENT = np.array([0, 2, 3, 5, 6])  # the padded head's columns the episode's classes use
IMAGES, VECTORS = (16, 16, 1), (12,)
CONV4 = ("maml", "maml_inductive", "protonet")  # batch statistics over the real examples
KEY = jax.random.PRNGKey(0)
RTOL, ATOL = 2e-4, 2e-6

LEARNERS = {
    "maml": {},
    "fomaml": {"first_order": True},
    "maml_inductive": {},
    "anil": {},
    "metasgd": {},
    "mamlpp": {"inner_steps": 2, "multi_step_loss": 10, "first_order_until": 0},
    "reptile": {"inner_steps": 2, "inner_optimizer": "sgd", "inner_lr": 0.1},
    "imaml": {"inner_steps": 3, "cg_steps": 2},
    "cavia": {"context_dim": 4},
    "protonet": {},
    "r2d2": {},
    "metaoptnet": {"qp_steps": 300},
    "amortized": {"context_dim": 8, "encoder_hidden": 16},
}
FAST = ("maml", "protonet")


def episode(key, shape) -> Task:
    """An unpadded 5-way 2-shot 3-query episode of random inputs, labels 0..4."""
    ks, kq = jax.random.split(key)
    labels = jnp.arange(WAY)
    return Task(
        Split(jax.random.uniform(ks, (WAY * SHOT, *shape)), jnp.repeat(labels, SHOT)),
        Split(jax.random.uniform(kq, (WAY * QUERY, *shape)), jnp.repeat(labels, QUERY)),
        jnp.zeros((), jnp.int32),
    )


def padded(split: Split, slots: int, key) -> Split:
    """The split in `slots` slots, its examples at random positions in their order, labels
    renamed to the padded head's columns, padding of label -1, mask False and random pixels
    (which must not matter)."""
    k_pos, k_x = jax.random.split(key)
    positions = np.sort(np.asarray(jax.random.permutation(k_pos, slots))[: len(split.y)])
    x = jax.random.uniform(k_x, (slots, *split.x.shape[1:])).at[positions].set(split.x)
    y = jnp.full((slots,), -1, jnp.int32).at[positions].set(jnp.asarray(PRESENT)[split.y])
    mask = jnp.zeros((slots,), bool).at[positions].set(True)
    return Split(x, y, mask)


def padded_episode(task: Task, key) -> Task:
    k1, k2 = jax.random.split(key)
    return task._replace(
        support=padded(task.support, len(task.support.y) + 7, k1),
        query=padded(task.query, len(task.query.y) + 9, k2),
    )


def algo_config(name: str):
    base = {"fomaml": "maml", "maml_inductive": "maml"}.get(name, name)
    return schemas("algo")[base](**LEARNERS[name])


def learner(name: str, n_out: int):
    if name in CONV4:
        norm_mode = "inductive" if name == "maml_inductive" else "transductive"
        model_cfg, shape = Conv4Config(hidden=8, downsample="maxpool", norm=norm_mode), IMAGES
    else:
        model_cfg, shape = MLPConfig(hidden=16), VECTORS
    cfg = algo_config(name)
    config = Config(
        data=OmniglotConfig(n_way=WAY) if name in CONV4 else SinusoidConfig(),
        model=model_cfg,
        conditioning=ConditioningConfig(name="none"),
        algo=cfg,
        train=TrainConfig(),
        eval=EvalConfig(),
    )
    source = source_of(DataSpec("classification", n_out, n_out, shape))
    model = make_model(model_cfg, shape)
    make = ALGORITHMS[cfg.name]
    return make(
        cfg, model, classification_loss, n_out=n_out, n_train_classes=n_out, config=config,
        source=source,
    )  # fmt: skip


def unpadded_leaf(big: jax.Array, small_shape: tuple[int, ...]) -> jax.Array:
    """A padded learner's parameter as the unpadded learner has it: an axis sized by the head's
    outputs (its last PADDED_OUT entries) keeps the columns of PRESENT."""
    for axis, (b, s) in enumerate(zip(big.shape, small_shape)):
        if b != s:
            assert b - s == PADDED_OUT - WAY, (big.shape, small_shape)
            keep = np.concatenate([np.arange(b - PADDED_OUT), b - PADDED_OUT + PRESENT])
            return jnp.take(big, keep, axis=axis)
    return big


def absent_part(big: jax.Array, small_shape: tuple[int, ...]) -> jax.Array | None:
    for axis, (b, s) in enumerate(zip(big.shape, small_shape)):
        if b != s:
            absent = np.setdiff1d(np.arange(PADDED_OUT), PRESENT) + b - PADDED_OUT
            return jnp.take(big, absent, axis=axis)
    return None


def close(got, want):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), got, want)


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in LEARNERS]
)
def test_a_padded_episode_gives_the_unpadded_results(name):
    small, big = learner(name, WAY), learner(name, PADDED_OUT)
    big_params = big.init(KEY)
    small_shapes = jax.tree.map(lambda a: a.shape, jax.eval_shape(small.init, KEY))
    small_params = jax.tree.map(unpadded_leaf, big_params, small_shapes)
    task = episode(jax.random.PRNGKey(1), IMAGES if name in CONV4 else VECTORS)
    pad = padded_episode(task, jax.random.PRNGKey(2))

    def gradient(algo, params, t):
        return jax.jit(jax.grad(lambda p: algo.meta_loss(p, t, KEY, 0), has_aux=True))(params)

    def metrics(algo, params, t):
        with norm.testing():
            return jax.jit(lambda p: algo.evaluate(p, t, KEY, 1)[1])(params)

    small_grad, small_metrics = gradient(small, small_params, task)
    big_grad, big_metrics = gradient(big, big_params, pad)
    close(big_metrics, small_metrics)
    close(jax.tree.map(unpadded_leaf, big_grad, small_shapes), small_grad)
    for part in jax.tree.leaves(jax.tree.map(absent_part, big_grad, small_shapes)):
        np.testing.assert_array_equal(part, 0.0)  # classes the episode lacks learn nothing
    close(metrics(big, big_params, pad), metrics(small, small_params, task))


def test_masked_moments_equal_those_of_the_real_examples():
    x = jax.random.normal(KEY, (7, 4, 4, 3))
    mask = jnp.array([True, False, True, True, False, False, True])
    with norm.examples(mask):
        mean, var = norm.moments(x, (0, 1, 2))
    real = x[np.asarray(mask)]
    np.testing.assert_allclose(mean, real.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, real.var((0, 1, 2)), rtol=1e-5, atol=1e-6)
    with norm.examples(mask), pytest.raises(ValueError, match="batch of 6 examples"):
        norm.moments(x[:6], (0, 1, 2))


def test_losses_skip_padding_and_classes_the_episode_lacks():
    logits = jnp.array([[2.0, 9.0, 1.0], [0.5, 9.0, 3.0], [7.0, 7.0, 7.0]])
    labels = jnp.array([0, 2, -1])
    mask = jnp.array([True, True, False])
    classes = jnp.array([True, False, True])  # class 1 is absent: its large logits are ignored
    loss, m = classification_loss(logits, labels, mask, classes)
    want, want_m = classification_loss(logits[:2][:, [0, 2]], jnp.array([0, 1]))
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"], want_m["accuracy"])
    assert float(m["accuracy"]) == 1.0


def test_resnet_batch_norm_reads_the_mask():
    """The NNX backbones' batch norm: outputs of the real examples and the running averages of
    a padded batch equal those of the unpadded one."""
    from flax import nnx

    from metalearn.models import _resnet_layers

    bn = _resnet_layers.batch_norm(3, 0.1, nnx.Rngs(0))
    x = jax.random.normal(KEY, (5, 4, 4, 3)) * 2 + 1
    bn_small = nnx.clone(bn)
    want = bn_small(x)
    pad = jnp.concatenate([x[:2], jnp.full((3, 4, 4, 3), 50.0), x[2:]])
    mask = jnp.array([True, True, False, False, False, True, True, True])
    with norm.examples(mask):
        got = bn(pad)
    np.testing.assert_allclose(got[np.asarray(mask)], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.mean[...], bn_small.mean[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], bn_small.var[...], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (["algo=blackbox"], "algo=blackbox cannot train on data=meta_dataset"),
        (["model=flax", "model.module=flax.nnx:Linear"], "model=flax cannot train on"),
    ],
)
def test_learners_and_models_that_would_count_padding_are_refused(
    overrides, refused, tmp_path, monkeypatch
):
    with pytest.raises(ConfigError, match=refused) as error:
        compose_config(["data=meta_dataset", *overrides], tmp_path, monkeypatch)
    assert "protonet" in str(error.value) or "conv4" in str(error.value)  # names what fits
    compose_config(["data=meta_dataset", "algo=protonet"], tmp_path, monkeypatch)  # fits
