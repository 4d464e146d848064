"""conv4 and its CPU convolution path: shapes, equality with XLA's conv, BN statistics, MAML."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from metalearn.models import conv4, conv_ops, make_model
from metalearn.models.conv4 import Conv4Config

# float32 tolerances; values are O(1) by construction.
RTOL, ATOL = 1e-4, 1e-5


def close(a, b, rtol=RTOL, atol=ATOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def normal(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float32)


def xla_conv(x, w, stride):
    return lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


# ------------------------------------------------------------------------- the convolution
CONV_CASES = [  # (batch, size, cin, cout, stride)
    (3, 28, 1, 8, 1),
    (3, 28, 1, 8, 2),
    (2, 14, 8, 8, 1),
    (2, 7, 8, 8, 2),
    (2, 4, 8, 8, 2),
    (2, 3, 8, 8, 1),
]


@pytest.mark.parametrize("b,size,cin,cout,stride", CONV_CASES)
def test_conv_matches_xla_value_and_first_derivatives(b, size, cin, cout, stride):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = normal(kx, (b, size, size, cin))
    w = normal(kw, (3, 3, cin, cout), 1.0 / np.sqrt(9 * cin))
    y, vjp = jax.vjp(lambda x, w: conv_ops.conv2d(x, w, stride, impl="im2col"), x, w)
    y_ref, vjp_ref = jax.vjp(lambda x, w: xla_conv(x, w, stride), x, w)
    assert y.shape == y_ref.shape == (b, -(-size // stride), -(-size // stride), cout)
    close(y, y_ref)
    ct = normal(kg, y.shape)
    close(vjp(ct), vjp_ref(ct))  # d/dx and d/dw


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_matches_xla_second_order(stride):
    """grad over w of a function of the weight gradient (what second-order MAML needs)."""
    kx, kw, kt = jax.random.split(jax.random.key(1), 3)
    x = normal(kx, (2, 14, 14, 8))
    w = normal(kw, (3, 3, 8, 8), 1.0 / np.sqrt(72))
    target = normal(kt, (2, -(-14 // stride), -(-14 // stride), 8))

    def meta(conv):
        def inner(w, x):
            return jnp.mean(jnp.tanh(conv(x, w, stride)) * target)

        def outer(w, x):
            g_w, g_x = jax.grad(inner, (0, 1))(w, x)
            w2 = w - 0.5 * g_w
            return jnp.sum(jnp.sin(conv(x + g_x, w2, stride))) + jnp.sum(g_w**2)

        return jax.grad(outer, (0, 1))(w, x)

    got = meta(lambda x, w, s: conv_ops.conv2d(x, w, s, impl="im2col"))
    want = meta(xla_conv)
    close(got, want)


ROW_CASES = [(2, 14, 16, 8), (2, 7, 16, 16), (3, 3, 16, 8), (2, 5, 24, 4)]  # (b, size, cin, cout)


@pytest.mark.slow
@pytest.mark.parametrize("b,size,cin,cout", ROW_CASES)
def test_row_conv_matches_xla_to_second_order_in_float64(b, size, cin, cout):
    """The custom_vjp row formulation (stride 1, Cin >= 16): value, first and second derivatives."""
    assert cin >= conv_ops.ROWS3_MIN_CIN  # these cases take the row path through conv2d
    with jax.enable_x64(True):
        kx, kw, kt = jax.random.split(jax.random.key(9), 3)
        x = jax.random.normal(kx, (b, size, size, cin), jnp.float64)
        w = jax.random.normal(kw, (3, 3, cin, cout), jnp.float64) / np.sqrt(9 * cin)
        target = jax.random.normal(kt, (b, size, size, cout), jnp.float64)
        ours = functools.partial(conv_ops.conv2d, stride=1, impl="im2col")

        def meta(conv):
            def inner(w, x):
                return jnp.mean(jnp.tanh(conv(x, w)) * target)

            def outer(w, x):
                g_w, g_x = jax.grad(inner, (0, 1))(w, x)
                y = conv(x + g_x, w - 0.5 * g_w)
                return jnp.sum(jnp.sin(y)) + jnp.sum(g_w**2) + jnp.sum(g_x**3)

            return conv(x, w), jax.grad(inner, (0, 1))(w, x), jax.grad(outer, (0, 1))(w, x)

        close(meta(ours), meta(lambda x, w: xla_conv(x, w, 1)), rtol=1e-10, atol=1e-12)


def test_row_conv_under_vmap_with_per_task_weights_float32():
    kx, kw, kg = jax.random.split(jax.random.key(10), 3)
    x = normal(kx, (3, 2, 14, 14, 16))
    w = normal(kw, (3, 3, 3, 16, 8), 1.0 / 12)
    ct = normal(kg, (3, 2, 14, 14, 8))
    f = jax.vmap(lambda x, w: conv_ops.conv2d(x, w, 1, impl="im2col"))
    y, vjp = jax.vjp(f, x, w)
    y_ref, vjp_ref = jax.vjp(jax.vmap(lambda x, w: xla_conv(x, w, 1)), x, w)
    close(y, y_ref)
    close(vjp(ct), vjp_ref(ct), rtol=1e-4, atol=1e-4)  # sums over 2*14*14 positions


@pytest.mark.slow
@pytest.mark.parametrize("cin,stride", [(1, 1), (1, 2), (3, 1), (16, 1), (16, 2)])
def test_conv_moments_match_direct_statistics(cin, stride):
    """Mean and variance of the conv output (from the patch covariance when 9 * Cin <= 32) and
    their gradients equal those computed from the output itself, in float64."""
    with jax.enable_x64(True):
        kx, kw = jax.random.split(jax.random.key(11))
        x = 2.0 + jax.random.normal(kx, (3, 14, 14, cin), jnp.float64)
        w = jax.random.normal(kw, (3, 3, cin, 8), jnp.float64)

        def direct(x, w):
            y = xla_conv(x, w, stride)
            return y, y.mean((0, 1, 2)), y.var((0, 1, 2))

        def ours(x, w):
            return conv_ops.conv2d_moments(x, w, stride, impl="im2col")

        close(ours(x, w), direct(x, w), rtol=1e-10, atol=1e-10)

        def scalar(f):
            def g(x, w):
                y, m, v = f(x, w)
                return jnp.sum(jnp.sin(y)) + jnp.sum(m**2) + jnp.sum(jnp.sqrt(v))

            return g

        grads = jax.grad(scalar(ours), (0, 1))(x, w)
        close(grads, jax.grad(scalar(direct), (0, 1))(x, w), rtol=1e-10, atol=1e-10)


def test_signed_max_pool_equals_sign_pool_sign():
    kx, kg = jax.random.split(jax.random.key(12))
    x = normal(kx, (2, 7, 7, 4))
    s = jnp.array([1.0, -1.0, 1.0, -1.0])
    ref = lambda x: s * ref_pool(s * x)  # noqa: E731
    y, vjp = jax.vjp(lambda x: conv_ops.signed_max_pool2x2(x, s), x)
    y_ref, vjp_ref = jax.vjp(ref, x)
    close(y, y_ref)
    ct = normal(kg, y.shape)
    close(vjp(ct), vjp_ref(ct))


def test_conv_under_vmap_with_per_task_weights():
    kx, kw = jax.random.split(jax.random.key(2))
    x = normal(kx, (3, 2, 7, 7, 8))
    w = normal(kw, (3, 3, 3, 8, 8), 0.1)
    got = jax.vmap(lambda x, w: conv_ops.conv2d(x, w, 1, impl="im2col"))(x, w)
    close(got, jnp.stack([xla_conv(x[i], w[i], 1) for i in range(3)]))


def test_conv_rejects_unknown_impl():
    with pytest.raises(ValueError):
        conv_ops.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), impl="nope")


# ---------------------------------------------------------------------------------- pooling
def ref_pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


@pytest.mark.slow
@pytest.mark.parametrize("size,out", [(28, 14), (14, 7), (7, 3), (3, 1)])
def test_max_pool_shape_value_and_derivatives(size, out):
    kx, kg = jax.random.split(jax.random.key(3))
    x = normal(kx, (2, size, size, 4))  # continuous values: no ties
    y, vjp = jax.vjp(conv_ops.max_pool2x2, x)
    y_ref, vjp_ref = jax.vjp(ref_pool, x)
    assert y.shape == (2, out, out, 4)
    close(y, y_ref)
    ct = normal(kg, y.shape)
    close(vjp(ct), vjp_ref(ct))

    def second(pool):  # grad of a function of the input gradient
        def f(x):
            g = jax.grad(lambda x: jnp.sum(jnp.sin(pool(x)) * ct))(x)
            return jnp.sum(g * jnp.cos(x))

        return jax.grad(f)(x)

    close(second(conv_ops.max_pool2x2), second(ref_pool))


# ------------------------------------------------------------------------------ the model
def ref_apply(params, x, downsample):
    """Independent reference: XLA conv, BN, ReLU, reduce_window max-pool in textbook order."""
    for p in params["blocks"]:
        h = xla_conv(x, p["w"], 2 if downsample == "stride" else 1) + p["b"]
        mean = h.mean((0, 1, 2))
        var = ((h - mean) ** 2).mean((0, 1, 2))
        h = (h - mean) / jnp.sqrt(var + conv4.BN_EPS) * p["scale"] + p["offset"]
        x = jax.nn.relu(h)
        if downsample == "maxpool":
            x = ref_pool(x)
    return x.mean((1, 2)) @ params["head"]["w"] + params["head"]["b"]


def perturbed_params(downsample, hidden=8, n_out=5):
    """Init plus random BN scale/offset, some scales negative (the max-pool path handles both)."""
    params = conv4.init(jax.random.key(4), n_out, hidden=hidden, downsample=downsample)
    keys = jax.random.split(jax.random.key(5), 8)
    for i, p in enumerate(params["blocks"]):
        p["scale"] = 1.0 + 0.5 * normal(keys[2 * i], p["scale"].shape)
        p["scale"] = p["scale"].at[0].set(-0.8)
        p["offset"] = 0.3 * normal(keys[2 * i + 1], p["offset"].shape)
    return params


@pytest.mark.slow
@pytest.mark.parametrize(
    "downsample,sizes", [("stride", [14, 7, 4, 2]), ("maxpool", [14, 7, 3, 1])]
)
def test_shapes_and_params_layout(downsample, sizes):
    params = conv4.init(jax.random.key(0), 5, hidden=16, downsample=downsample)
    assert [p["w"].shape for p in params["blocks"]] == [(3, 3, 1, 16)] + [(3, 3, 16, 16)] * 3
    assert params["head"]["w"].shape == (16, 5) and params["head"]["b"].shape == (5,)
    assert all(float(jnp.abs(p["b"]).max()) == 0.0 for p in params["blocks"])
    assert all(float(jnp.abs(p["scale"] - 1).max()) == 0.0 for p in params["blocks"])
    x = normal(jax.random.key(1), (6, 28, 28, 1))
    h = jax.ShapeDtypeStruct(x.shape, x.dtype)
    for p, s in zip(params["blocks"], sizes, strict=True):
        h = jax.eval_shape(functools.partial(conv4.block, downsample=downsample), p, h)
        assert h.shape == (6, s, s, 16)
    assert conv4.embed(params, x, downsample=downsample).shape == (6, 16)
    assert conv4.apply(params, x, downsample=downsample).shape == (6, 5)
    with pytest.raises(ValueError):
        conv4.apply(params, x, downsample="avgpool")


def test_batch_norm_uses_batch_statistics():
    kx, ks = jax.random.split(jax.random.key(6))
    x = 3.0 + 2.0 * normal(kx, (6, 7, 7, 5))
    h = conv4.batch_norm(x, jnp.ones(5), jnp.zeros(5))
    np.testing.assert_allclose(h.mean((0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(h.var((0, 1, 2)), 1.0, rtol=1e-3)
    # scale/offset are applied after normalisation
    scale, offset = normal(ks, (5,)), jnp.arange(5.0)
    close(conv4.batch_norm(x, scale, offset), h * scale + offset)
    # transductive: an example's output depends on the rest of the batch
    assert float(jnp.abs(conv4.batch_norm(x[:3], jnp.ones(5), jnp.zeros(5)) - h[:3]).max()) > 1e-3
    # a whole block normalises its conv output with the batch's statistics
    p = {"w": normal(ks, (3, 3, 5, 4), 0.3), "b": jnp.full(4, 7.0)}
    p |= {"scale": jnp.ones(4), "offset": jnp.zeros(4)}
    pre = xla_conv(x, p["w"], 2) + p["b"]
    pre = (pre - pre.mean((0, 1, 2))) / jnp.sqrt(pre.var((0, 1, 2)) + conv4.BN_EPS)
    close(conv4.block(p, x, downsample="stride"), jax.nn.relu(pre), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("downsample", ["stride", "maxpool"])
def test_model_matches_reference_value_and_gradient(downsample):
    params = perturbed_params(downsample)
    x = normal(jax.random.key(7), (10, 28, 28, 1))
    y = jnp.arange(10) % 5

    def loss(apply):
        def f(params):
            logits = apply(params, x, downsample)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(10), y])

        return f

    ours = jax.jit(jax.value_and_grad(loss(lambda p, x, d: conv4.apply(p, x, downsample=d))))
    ref = jax.jit(jax.value_and_grad(loss(ref_apply)))(params)
    got = ours(params)
    close(got[0], ref[0])
    close(got[1], ref[1], rtol=1e-3, atol=1e-5)


def maml_meta_grad(apply, downsample, first_order, params, batch, lr):
    def loss(params, x, y):
        logits = apply(params, x, downsample)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])

    def task_loss(params, sx, sy, qx, qy):
        g = jax.grad(loss)(params, sx, sy)
        if first_order:
            g = jax.lax.stop_gradient(g)
        return loss(jax.tree.map(lambda p, g: p - lr * g, params, g), qx, qy)

    def meta_loss(params):
        return jax.vmap(task_loss, (None, 0, 0, 0, 0))(params, *batch).mean()

    return jax.jit(jax.value_and_grad(meta_loss))(params)


def maml_batch(tasks=3, n_way=5, shots=1, queries=3):
    kx, kq = jax.random.split(jax.random.key(8))
    sy = jnp.tile(jnp.repeat(jnp.arange(n_way), shots), (tasks, 1))
    qy = jnp.tile(jnp.repeat(jnp.arange(n_way), queries), (tasks, 1))
    sx = normal(kx, (tasks, n_way * shots, 28, 28, 1))
    qx = normal(kq, (tasks, n_way * queries, 28, 28, 1))
    return sx, sy, qx, qy


@functools.cache
def meta_grads(first_order):
    params, batch = perturbed_params("stride"), maml_batch()
    apply = lambda p, x, d: conv4.apply(p, x, downsample=d)  # noqa: E731
    ours = maml_meta_grad(apply, "stride", first_order, params, batch, 0.1)
    ref = maml_meta_grad(ref_apply, "stride", first_order, params, batch, 0.1)
    return ours, ref


@pytest.mark.slow
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_matches_reference(first_order):
    """vmapped, second-order MAML through our conv path equals the plain XLA formulation.

    Stride mode: the max-pool meta-gradient is piecewise (argmax switches) and ill-conditioned
    on random data (a 1e-6 relative change of the parameters moves XLA's own reference by
    ~10%), so max-pool is checked through the model-gradient test and the pool tests.
    """
    ours, ref = meta_grads(first_order)
    close(ours[0], ref[0])
    close(ours[1], ref[1], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_first_order_differs_from_second_order():
    so, fo = meta_grads(False)[0][1], meta_grads(True)[0][1]
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(*map(jax.tree.leaves, (so, fo))))
    assert diff > 1e-5


@pytest.mark.parametrize(
    "stride, padding, dilation",
    [(1, "SAME", 1), (2, "SAME", 1), (1, "VALID", 1), (1, "SAME", 2)],
)
def test_drop_in_conv_general_dilated_equals_lax(stride, padding, dilation):
    """conv_ops.conv_general_dilated (for Flax layers) equals lax's on its fast path (SAME,
    undilated) and hands every other case to lax."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    kw = dict(rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    want = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, **kw)
    got = conv_ops.conv_general_dilated(x, w, (stride, stride), padding, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden, features", [(32, 800), (64, 1600)])
def test_flatten_pool_gives_the_papers_miniimagenet_features(hidden, features):
    """MAML's (32 filters) and ProtoNets' (64) 84x84 conv4: 84 -> 42 -> 21 -> 10 -> 5 by max-pool,
    5 x 5 x hidden features flattened; pool=mean averages the same map."""
    cfg = Conv4Config(hidden=hidden, downsample="maxpool", pool="flatten")
    model = make_model(cfg, (84, 84, 3))
    params = model.init(jax.random.PRNGKey(0), 5)
    assert params["head"]["w"].shape == (features, 5)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 84, 84, 3))
    flat = jax.jit(model.embed)(params, x)
    mean = make_model(Conv4Config(hidden=hidden, downsample="maxpool"), (84, 84, 3)).embed
    np.testing.assert_allclose(
        flat.reshape(2, 5, 5, hidden).mean((1, 2)), jax.jit(mean)(params, x), rtol=1e-5, atol=1e-6
    )
    assert jax.eval_shape(model.apply, params, x).shape == (2, 5)
    assert conv4.final_side(84, "stride") == 6  # SAME stride-2 convs round up
