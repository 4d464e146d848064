"""model=resnet12 and model=wrn: the few-shot backbones as Flax NNX modules behind the Flax
adapter. Parameter counts against the architectures' formulas and published totals, shapes,
a residual block against plain jax.lax, DropBlock's masks, groups and state labels, config
errors, and the algorithms' meta-gradients and a train step through Hydra (slow tier)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import compose_config
from jax import lax

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms.base import classification_loss, task_gradient
from metalearn.algorithms.maml import ANILConfig, MAMLConfig
from metalearn.algorithms.protonet import ProtoNetConfig
from metalearn.algorithms.r2d2 import R2D2Config
from metalearn.checks import ConfigError
from metalearn.experiment import build, initial_state
from metalearn.models import make_model, norm, num_params, randomness
from metalearn.models._resnet12_net import ResNet12, ResNet12Block
from metalearn.models._resnet_layers import (
    BN_EPS,
    DropBlock,
    drop_block_gamma,
    drop_block_mask,
    max_pool2x2,
)
from metalearn.models._wrn_net import WideResNet, WRNBlock
from metalearn.models.groups import HEAD, STATE, names
from metalearn.models.resnet12 import ResNet12Config
from metalearn.models.wrn import WRNConfig
from metalearn.train_step import make_train_step
from metalearn.types import Split, Task

KEY = jax.random.PRNGKey(0)
RTOL, ATOL = 1e-5, 1e-5  # float32: conv_ops' im2col against XLA's conv, then batch norm
SMALL = [4, 4, 4, 4]  # a tiny ResNet-12 through the adapter
IMAGE = (16, 16, 3)  # the smallest ResNet-12 input: four 2x2 max-pools leave 1x1
N_WAY = 3


# ------------------------------------------------------------------ parameter counts by hand


def resnet12_count(cin: int, channels, n_out: int) -> int:
    """Block a -> b: three bias-free 3x3 convs, 9ab + 9b^2 + 9b^2; the 1x1 shortcut conv, ab;
    four batch norms of b channels (bn1-3 and the shortcut's), 4 * 2b (scale and offset).
    Head: D * n + n with D the last block's width."""
    total, a = 0, cin
    for b in channels:
        total += 9 * a * b + 2 * 9 * b * b + a * b + 4 * 2 * b
        a = b
    return total + a * n_out + n_out


def wrn_count(cin: int, depth: int, width: int, n_out: int) -> int:
    """First conv 9 * cin * 16; a pre-activation block a -> b: BN(a) 2a, 3x3 conv 9ab, BN(b) 2b,
    3x3 conv 9b^2, plus a 1x1 projection ab where a != b (the first block of each stage);
    n = (depth - 4) / 6 blocks per stage of 16k, 32k, 64k; the final BN 2 * 64k; head."""
    n = (depth - 4) // 6
    total, a = 9 * cin * 16, 16
    for b in (16 * width, 32 * width, 64 * width):
        for _ in range(n):
            total += 2 * a + 9 * a * b + 2 * b + 9 * b * b + (a * b if a != b else 0)
            a = b
    return total + 2 * a + a * n_out + n_out


def abstract_count(cls, **kwargs) -> int:
    """The module's parameters, counted from shapes only (nnx.eval_shape: nothing is drawn)."""
    module = nnx.eval_shape(lambda: cls(**kwargs, rngs=nnx.Rngs(0)))
    return num_params(nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def test_full_size_parameter_counts_are_the_published_ones():
    """ResNet-12 64-160-320-640: 12.4M in its trunk (MetaOptNet / RFS's 12.4M); WRN-28-10
    with a 10-way head: 36.5M (Zagoruyko & Komodakis 2016, CIFAR-10). The full-size modules
    are the classes the adapter builds, counted abstractly: the adapter's model.init builds
    the module concretely even under jax.eval_shape (49M weights drawn, ~30 s on 2 cores)."""
    assert resnet12_count(3, [64, 160, 320, 640], 0) == 12_424_320
    assert abstract_count(ResNet12, num_classes=5) == resnet12_count(3, [64, 160, 320, 640], 5)
    assert wrn_count(3, 28, 10, 10) == 36_479_194
    assert abstract_count(WideResNet, num_classes=10) == 36_479_194
    # the formulas block by block: distinct widths, other depths
    assert abstract_count(ResNet12, num_classes=7, in_channels=1, channels=[3, 5, 7, 11]) == (
        resnet12_count(1, [3, 5, 7, 11], 7)
    )
    assert abstract_count(WideResNet, num_classes=7, in_channels=1, depth=16, width=3) == (
        wrn_count(1, 16, 3, 7)
    )


# ------------------------------------------------------------------ shapes, groups, state


@pytest.fixture(scope="module")
def resnet():
    """A tiny ResNet-12 through the adapter, its parameters drawn (model.init builds the module
    concretely: one initialiser to compile per distinct shape, so the widths are few)."""
    model = make_model(ResNet12Config(channels=SMALL), IMAGE)
    return model, model.init(KEY, N_WAY)


@pytest.fixture(scope="module")
def wrn():
    model = make_model(WRNConfig(depth=10, width=1), IMAGE)
    return model, model.init(KEY, N_WAY)


def out_shapes(model, params, size: int):
    x = jax.ShapeDtypeStruct((2, size, size, IMAGE[-1]), jnp.float32)
    outputs, features = (jax.eval_shape(f, params, x) for f in (model.apply, model.embed))
    return outputs.shape, features.shape


def abstract(cls, **kwargs):
    """The module's parameters as shapes, and (outputs, features) shapes of x -> [B, ...]."""
    module = nnx.eval_shape(lambda: cls(**kwargs, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))

    def shapes(size):
        def call(x):
            built = cls(**kwargs, rngs=nnx.Rngs(0))
            return built(x), built.embed(x)

        x = jax.ShapeDtypeStruct((2, size, size, kwargs.get("in_channels", 3)), jnp.float32)
        return tuple(out.shape for out in jax.eval_shape(call, x))

    return params, shapes


def test_output_and_feature_shapes(resnet):
    model, params = resnet  # through the adapter
    assert num_params(params) == resnet12_count(3, SMALL, N_WAY)
    for size in (16, 84):  # global average pooling: any size from 16 up
        assert out_shapes(model, params, size) == ((2, N_WAY), (2, SMALL[-1]))
    seen = []  # task conditioning's hooks: each block's output, in depth order

    def hook(i, h):
        seen.append((i, h.shape))
        return h

    x = jax.ShapeDtypeStruct((2, *IMAGE), jnp.float32)
    jax.eval_shape(lambda p, x: model.embed(p, x, hook), params, x)
    assert seen == [(i, (2, 16 >> (i + 1), 16 >> (i + 1), SMALL[i])) for i in range(4)]
    features_only = jax.eval_shape(lambda k: model.init(k, None), KEY)  # ProtoNet's, R2-D2's
    assert "head" not in features_only
    assert num_params(features_only) == resnet12_count(3, SMALL, 0)

    _, shapes = abstract(ResNet12, num_classes=5, in_channels=1, channels=[3, 5, 7, 11])
    assert shapes(20) == ((2, 5), (2, 11))
    _, shapes = abstract(WideResNet, num_classes=5, depth=10, width=1)
    assert shapes(16) == shapes(21) == ((2, 5), (2, 64))
    make_model(WRNConfig(depth=10, width=1), IMAGE)  # the adapter's probe: [B, n] outputs


@pytest.mark.slow  # draws a WRN's weights through the adapter (the fast tier counts abstractly)
def test_wrn_through_the_adapter(wrn):
    model, params = wrn
    assert num_params(params) == wrn_count(3, 10, 1, N_WAY)
    for size in (16, 21):
        assert out_shapes(model, params, size) == ((2, N_WAY), (2, 64))


def test_images_too_small_for_four_poolings_are_refused():
    with pytest.raises(ConfigError, match="at least 16x16; these are 14x14"):
        make_model(ResNet12Config(channels=SMALL), (14, 14, 1))


def labels_by_name(model, params) -> dict[str, str]:
    return dict(zip(jax.tree.leaves(names(params)), jax.tree.leaves(model.groups(params))))


def test_groups_are_the_head_and_one_block_per_residual_block(resnet):
    labels = labels_by_name(*resnet)
    for name, label in labels.items():
        want = HEAD if name.startswith("head.") else "blocks." + name.split(".")[1]
        assert label == want, name
    assert set(labels.values()) == {HEAD, "blocks.0", "blocks.1", "blocks.2", "blocks.3"}
    assert labels["blocks.3.shortcut_bn.scale"] == "blocks.3"

    # WRN: the first conv, the 3n residual blocks and the final BN-ReLU, in depth order
    model = make_model(WRNConfig(depth=10, width=1), IMAGE)
    labels = labels_by_name(model, abstract(WideResNet, num_classes=N_WAY, depth=10, width=1)[0])
    assert labels["blocks.0.kernel"] == "blocks.0"
    assert labels["blocks.1.conv1.kernel"] == "blocks.1"
    assert labels["blocks.3.shortcut.kernel"] == "blocks.3"
    assert labels["blocks.4.bn.scale"] == "blocks.4"
    assert labels["head.kernel"] == HEAD
    assert len(set(labels.values()) - {HEAD}) == 5


def test_inductive_norm_makes_the_running_statistics_state():
    model = make_model(ResNet12Config(channels=SMALL, norm="inductive"), IMAGE)
    labels = labels_by_name(model, jax.eval_shape(lambda k: model.init(k, N_WAY), KEY))
    state = sorted(n for n, label in labels.items() if label == STATE)
    assert len(state) == 4 * 4 * 2  # 4 batch norms per block, running mean and variance
    assert "blocks.0.bn1.running_mean" in state and "blocks.3.shortcut_bn.running_var" in state
    assert all(n.rsplit(".", 1)[1] in ("running_mean", "running_var") for n in state)


# ------------------------------------------------------------------ one block, by hand


def lax_conv(x, w, stride: int = 1):
    """PyTorch's conv: padding k // 2 on every side."""
    pad = w.shape[0] // 2
    return lax.conv_general_dilated(
        x, w, (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST,
    )  # fmt: skip


def lax_bn(x, p):
    mean = x.mean((0, 1, 2))
    var = jnp.square(x - mean).mean((0, 1, 2))
    return (x - mean) / jnp.sqrt(var + BN_EPS) * p["scale"] + p["bias"]


def lax_pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def built(make, seed: int = 0):
    """(module, its pure parameters) of the module `make` builds, every parameter random (batch
    norms' scales and offsets too), drawn by numpy: nothing is compiled to build it."""
    graphdef, params, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    rng = np.random.default_rng(seed)

    def draw(v):
        return jnp.asarray(0.5 * rng.standard_normal(v.shape) + (len(v.shape) == 1), v.dtype)

    params = jax.tree.map(draw, params)
    rest = jax.tree.map(lambda v: jnp.asarray(np.zeros(v.shape, v.dtype)), rest)
    return nnx.merge(graphdef, params, rest), nnx.to_pure_dict(params)


def run(module, x):
    graphdef, state = nnx.split(module)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


def test_a_resnet12_block_equals_lax():
    """conv-BN-leaky ReLU twice, conv-BN, + the 1x1 conv-BN shortcut, leaky ReLU, 2x2 max-pool
    (an odd size: the pool floors, as PyTorch's); batch norm on the batch's statistics."""
    block, p = built(lambda: ResNet12Block(3, 8, rngs=nnx.Rngs(0)))
    x = jax.random.normal(KEY, (4, 9, 9, 3))

    @jax.jit
    def by_hand(p, x):
        def act(v):
            return jnp.where(v > 0, v, 0.1 * v)

        h = act(lax_bn(lax_conv(x, p["conv1"]["kernel"]), p["bn1"]))
        h = act(lax_bn(lax_conv(h, p["conv2"]["kernel"]), p["bn2"]))
        h = lax_bn(lax_conv(h, p["conv3"]["kernel"]), p["bn3"])
        shortcut = lax_bn(lax_conv(x, p["shortcut_conv"]["kernel"]), p["shortcut_bn"])
        return lax_pool(act(h + shortcut))

    got = run(block, x)
    assert got.shape == (4, 4, 4, 8)
    np.testing.assert_allclose(got, by_hand(p, x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("size", [8, 9])  # even: PyTorch's padding, not SAME's, at stride 2
def test_a_strided_wrn_block_equals_lax(size):
    block, p = built(lambda: WRNBlock(4, 8, stride=2, rngs=nnx.Rngs(0)))
    x = jax.random.normal(KEY, (3, size, size, 4))

    @jax.jit
    def by_hand(p, x):
        a = jax.nn.relu(lax_bn(x, p["bn1"]))
        h = jax.nn.relu(lax_bn(lax_conv(a, p["conv1"]["kernel"], 2), p["bn2"]))
        return lax_conv(h, p["conv2"]["kernel"]) + lax_conv(a, p["shortcut"]["kernel"], 2)

    got = run(block, x)
    assert got.shape == (3, (size + 1) // 2, (size + 1) // 2, 8)
    np.testing.assert_allclose(got, by_hand(p, x), rtol=RTOL, atol=ATOL)


def test_max_pool_and_its_second_derivative_are_exact():
    x = jax.random.normal(KEY, (2, 5, 7, 3))
    np.testing.assert_array_equal(max_pool2x2(x), lax_pool(x))

    def f(pool, x):
        return jnp.sum(jnp.sin(pool(x) * 3.0))

    def second(f):  # the gradient of a function of the gradient, as MAML's meta-gradient
        return jax.grad(lambda x: jnp.sum(jax.grad(f)(x) ** 2))

    for order in (jax.grad, second):
        got = jax.jit(order(lambda x: f(max_pool2x2, x)))(x)
        np.testing.assert_allclose(got, jax.jit(order(lambda x: f(lax_pool, x)))(x), rtol=1e-5)


# ------------------------------------------------------------------ DropBlock


def in_training(drop, x, key=KEY):
    """drop(x) in a training scope (entered inside jit, where the train step enters it)."""

    def f(x):
        with randomness.training(key):
            return drop(x)

    return np.asarray(jax.jit(f)(x))


def test_dropblock_is_the_identity_outside_training_and_at_test():
    x = jax.random.normal(KEY, (2, 8, 8, 3))
    drop = DropBlock(0.3, 3)
    assert drop(x) is x  # no training scope
    with randomness.training(KEY):
        with norm.testing():
            assert drop(x) is x
        assert DropBlock(0.0, 3)(x) is x
    assert not np.array_equal(in_training(drop, x), x)


def covered_by_squares(dropped: np.ndarray, b: int) -> np.ndarray:
    """The union of the b x b windows (inside the map) that are dropped everywhere."""
    _, h, w, _ = dropped.shape
    union = np.zeros_like(dropped)
    for i in range(h - b + 1):
        for j in range(w - b + 1):
            full = dropped[:, i : i + b, j : j + b, :].all(axis=(1, 2))  # [B, C]
            union[:, i : i + b, j : j + b, :] |= full[:, None, None, :]
    return union


def expected_dropped(h: int, w: int, b: int, gamma: float) -> float:
    """The fraction of units a draw drops on average: a unit covered by n possible corners is
    kept when none of them is drawn, (1 - gamma)^n."""
    n = np.zeros((h, w))
    for i in range(h - b + 1):
        for j in range(w - b + 1):
            n[i : i + b, j : j + b] += 1
    return float(np.mean(1 - (1 - gamma) ** n))


@pytest.mark.parametrize(
    "shape, block, rate", [((32, 12, 12, 8), 3, 0.25), ((128, 3, 3, 8), 5, 0.1)]
)
def test_dropblock_zeroes_squares_and_rescales_the_rest(shape, block, rate):
    """Training: output = x * mask * scale, the mask's zeros a union of b x b squares (b at
    most the map: 3 on a 3x3 map), scale = units / kept units, about the expected fraction
    dropped, independently per example and channel."""
    x = 1.0 + np.random.default_rng(0).uniform(size=shape).astype(np.float32)  # no zeros
    y = in_training(DropBlock(rate, block), x)
    dropped = y == 0
    b = min(block, shape[1], shape[2])
    np.testing.assert_array_equal(covered_by_squares(dropped, b), dropped)
    kept = ~dropped
    np.testing.assert_allclose(y[kept] / x[kept], dropped.size / kept.sum(), rtol=1e-6)
    fraction = dropped.mean()
    want = expected_dropped(
        shape[1], shape[2], b, drop_block_gamma(shape[1], shape[2], block, rate)
    )
    assert abs(fraction - want) < 0.03, (fraction, want)
    assert 0.7 * rate < want <= rate  # Ghiasi et al.'s gamma: `rate` up to overlapping blocks
    per_map = dropped.mean(axis=(1, 2))  # [B, C]: the maps differ
    assert per_map.std() > 0


def test_dropblock_masks_differ_between_draws_and_are_reproducible():
    mask = jax.jit(lambda key: drop_block_mask(key, (4, 10, 10, 2), 0.3, 3))
    a, b = mask(jax.random.PRNGKey(0)), mask(jax.random.PRNGKey(1))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, mask(jax.random.PRNGKey(0)))
    assert set(np.unique(a)) <= {0.0, 1.0}


# ------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    "schema, kwargs, named",
    [
        (ResNet12Config, {"channels": [4, 4, 4]}, r"model.channels=\[4, 4, 4\].*4 positive"),
        (ResNet12Config, {"channels": [4, 0, 4, 4]}, r"model.channels=\[4, 0, 4, 4\]"),
        (ResNet12Config, {"channels": 64}, r"model.channels=64 "),
        (ResNet12Config, {"drop_rate": 1.0}, r"model.drop_rate=1.0 .*\[0, 1\)"),
        (ResNet12Config, {"drop_rate": -0.1}, r"model.drop_rate=-0.1 "),
        (ResNet12Config, {"dropblock_size": 0}, r"model.dropblock_size=0 "),
        (ResNet12Config, {"norm": "batch"}, r"model.norm='batch'"),
        (WRNConfig, {"depth": 27}, r"model.depth=27 .*6n \+ 4"),
        (WRNConfig, {"depth": 4}, r"model.depth=4 "),
        (WRNConfig, {"width": 0}, r"model.width=0 "),
        (WRNConfig, {"drop_rate": 1.5}, r"model.drop_rate=1.5 "),
        (WRNConfig, {"norm_momentum": 0.0}, r"model.norm_momentum=0.0 "),
    ],
)
def test_bad_values_are_one_clear_paragraph(schema, kwargs, named):
    with pytest.raises(ConfigError, match=named):
        schema(**kwargs)


# ------------------------------------------------------------------ Hydra and the algorithms


def config(omniglot, tmp_path, monkeypatch, overrides):
    overrides = ["data=omniglot", f"data.root={omniglot}", "data.split_sizes=[12,4,4]",
                 f"data.n_way={N_WAY}", "data.k_query=2", "data.image_size=16",
                 "train.meta_batch=2", *overrides]  # fmt: skip
    return compose_config(overrides, tmp_path, monkeypatch)


def test_hydra_options_compose_with_their_schemas_defaults(omniglot, tmp_path, monkeypatch):
    cfg = config(omniglot, tmp_path, monkeypatch, ["model=resnet12"])
    assert cfg.model == ResNet12Config()
    assert cfg.model.channels == [64, 160, 320, 640] and cfg.model.drop_rate == 0.1
    cfg = config(omniglot, tmp_path, monkeypatch, ["model=wrn", "model.depth=16"])
    assert cfg.model == WRNConfig(depth=16)
    with pytest.raises(ConfigError, match=r"model.channels=\[4, 4, 4\]"):
        config(omniglot, tmp_path, monkeypatch, ["model=resnet12", "model.channels=[4,4,4]"])
    with pytest.raises(ConfigError, match="model.depth=12 "):
        config(omniglot, tmp_path, monkeypatch, ["model=wrn", "model.depth=12"])


RESNET = ["model=resnet12", "model.channels=[4,4,4,4]"]
WRN = ["model=wrn", "model.depth=10", "model.width=1", "model.drop_rate=0.3"]


@pytest.mark.slow  # each compiles a train step (15-35 s on 2 cores)
@pytest.mark.parametrize(
    "overrides",
    [
        # (MAML, ANIL and R2-D2 are covered by the meta-gradient tests below, whose gradients
        # are what their train steps apply)
        [*RESNET, "algo=protonet", "model.norm=inductive"],
        [*RESNET, "algo=finetune", "model.norm=inductive"],
        [*WRN, "algo=protonet"],
    ],
    ids=["protonet-inductive", "finetune", "wrn"],
)
def test_one_train_step_of_each_algorithm_from_hydra(omniglot, tmp_path, monkeypatch, overrides):
    cfg = config(omniglot, tmp_path, monkeypatch, overrides)
    exp = build(cfg)
    params = exp.algo.init(KEY)
    step = make_train_step(exp, meta_batch=2)
    before = jax.tree.leaves(jax.tree.map(np.array, params))
    state = initial_state(exp, jax.tree.map(jnp.copy, params))  # the step donates its buffers
    new, metrics = step(state, exp.source.splits["train"], KEY, 1)
    assert np.isfinite(float(metrics["loss"]))
    after = jax.tree.leaves(new.params)
    assert all(np.isfinite(leaf).all() for leaf in after)
    assert sum(not np.array_equal(a, b) for a, b in zip(before, after)) > len(after) // 2


def image_task(key, size: int = 16, shots: int = 2, queries: int = 2) -> Task:
    ks, kq = jax.random.split(key)
    xs = jax.random.normal(ks, (N_WAY * shots, size, size, IMAGE[-1]))
    xq = jax.random.normal(kq, (N_WAY * queries, size, size, IMAGE[-1]))
    ys, yq = jnp.repeat(jnp.arange(N_WAY), shots), jnp.repeat(jnp.arange(N_WAY), queries)
    return Task(Split(xs, ys), Split(xq, yq), jnp.zeros((), jnp.int32))


def meta_gradient(algo_cfg, model, task):
    algo = ALGORITHMS[algo_cfg.name](
        algo_cfg, model, classification_loss, n_out=N_WAY, n_train_classes=N_WAY
    )
    params = algo.init(KEY)
    return jax.jit(lambda p: task_gradient(algo, p, task, jax.random.PRNGKey(3)))(params)


@pytest.mark.slow  # each compiles a second-order ResNet-12 meta-gradient (10-20 s on 2 cores)
@pytest.mark.parametrize(
    "algo_cfg",
    [
        MAMLConfig(inner_lr=0.1, inner_steps=1),
        ANILConfig(inner_lr=0.1, inner_steps=2),
        ProtoNetConfig(),
        R2D2Config(),
    ],
    ids=["maml", "anil", "protonet", "r2d2"],
)
def test_meta_gradients_are_finite_and_nonzero(resnet, algo_cfg):
    """Dropout and DropBlock on (the default 0.1); the second-order MAML meta-gradient
    differentiates through batch norm and max-pooling twice."""
    model, _ = resnet
    grads, metrics = meta_gradient(algo_cfg, model, image_task(jax.random.PRNGKey(5)))
    assert np.isfinite(float(metrics["loss"]))
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(g).all() for g in leaves)
    assert sum(float(jnp.abs(g).max()) > 0 for g in leaves) > len(leaves) // 2


@pytest.mark.slow
def test_wrn_maml_meta_gradient_is_finite_and_nonzero(wrn):
    model, _ = wrn
    grads, _ = meta_gradient(MAMLConfig(inner_lr=0.1, inner_steps=1), model, image_task(KEY))
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


@pytest.mark.slow
def test_inductive_test_time_features_do_not_depend_on_the_other_queries():
    model = make_model(ResNet12Config(channels=SMALL, norm="inductive"), IMAGE)
    params = model.init(KEY, None)
    x = jax.random.normal(KEY, (6, *IMAGE))

    @jax.jit
    def embed_at_test(params, x):  # the mode is read when tracing: enter it inside jit
        with norm.testing():
            return model.embed(params, x)

    together = embed_at_test(params, x)
    np.testing.assert_allclose(embed_at_test(params, x[:2]), together[:2], rtol=1e-5, atol=1e-6)
    train = jax.jit(model.embed)  # batch statistics: a query depends on the others
    assert float(jnp.abs(train(params, x[:2]) - train(params, x)[:2]).max()) > 1e-3
