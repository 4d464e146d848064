"""2-D convolution and pooling written so that vmapped, twice-differentiated MAML is fast on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("xla", "im2col")


def default_impl() -> str:
    """The one place the convolution path is chosen: XLA's native conv on accelerators."""
    return "im2col" if jax.default_backend() == "cpu" else "xla"


def _same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, impl: str | None = None) -> jax.Array:
    """SAME-padded conv: x [B, H, W, Cin], w [kh, kw, Cin, Cout] -> [B, Ho, Wo, Cout]."""
    impl = impl or default_impl()
    if impl == "xla":
        return lax.conv_general_dilated(
            x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    if impl == "im2col":
        return _conv_im2col(x, w, stride)
    raise ValueError(f"unknown conv impl {impl!r}; expected one of {IMPLS}")


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """lax.conv_general_dilated, through conv2d's fast path where it applies: a drop-in for
    Flax's layers (`nnx.Conv(..., conv_general_dilated=conv_ops.conv_general_dilated)`).

    On a CPU, a convolution vmapped over per-task kernels (MAML's inner loop) becomes a grouped
    convolution that XLA runs about 40x slower than conv2d's im2col path (scripts/BENCHMARKS.md).
    The fast path takes 2-D NHWC inputs with HWIO kernels, SAME padding, equal strides, no
    dilation and no feature groups; anything else goes to lax unchanged.
    """
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    undilated = all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if (
        lhs.ndim == 4
        and dims == nhwc
        and isinstance(padding, str)
        and padding.upper() == "SAME"
        and len(set(window_strides)) == 1
        and undilated
        and feature_group_count == 1
        and not kwargs.get("batch_group_count", 1) > 1
    ):
        return conv2d(lhs, rhs, window_strides[0])
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **kwargs,
    )


def _conv_im2col(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    kh, kw, cin, _ = w.shape
    if stride == 1 and (kh, kw) == (3, 3) and cin >= ROWS3_MIN_CIN:
        return conv3x3_rows(x, w)
    patches = _patches(x, kh, kw, stride)  # [B, Ho, Wo, kh*kw*Cin], (dy, dx, cin) order
    y = patches.reshape(-1, kh * kw * cin) @ w.reshape(kh * kw * cin, -1)
    return y.reshape(*patches.shape[:3], -1)


def _patches(x: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    """im2col from kh*kw strided slices of the padded input (no patches-convolution)."""
    b, h, wd, cin = x.shape
    (pt, pb), (pl, pr) = _same_pads(h, kh, stride), _same_pads(wd, kw, stride)
    ho, wo = -(-h // stride), -(-wd // stride)
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    cols = [
        lax.slice(
            xp,
            (0, dy, dx, 0),
            (b, dy + (ho - 1) * stride + 1, dx + (wo - 1) * stride + 1, cin),
            (1, stride, stride, 1),
        )
        for dy in range(kh)
        for dx in range(kw)
    ]
    return jnp.concatenate(cols, axis=-1)


# Below this many input channels the 9-slice im2col is cheaper than the row formulation (whose
# matmul output is 3 * Cout wide); conv4's first layer (Cin = 1) stays on im2col.
ROWS3_MIN_CIN = 16


@jax.custom_vjp
def conv3x3_rows(x: jax.Array, w: jax.Array) -> jax.Array:
    """3x3 SAME stride-1 conv with a third of im2col's patch traffic.

    Patches hold only the 3 horizontal shifts of the input, [B, H, W, 3*Cin]; one matmul with
    the kernel laid out [3*Cin (dx, cin), 3*Cout (dy, cout)] gives Z, and the output row h is
    Z[h-1, dy=0] + Z[h, dy=1] + Z[h+1, dy=2] (rows outside the image are the zero padding, so
    they are never multiplied). The backward reuses the layouts: dZ = the 3 row-shifted copies
    of dY, dW = P^T dZ and dP = dZ W^T, all plain matmuls (no transposed activation copy); it
    is written with differentiable ops, so second-order MAML differentiates through it.
    """
    return _rows_fwd(x, w)[0]


def _hshift_patches(x: jax.Array) -> jax.Array:
    xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    wd = x.shape[2]
    return jnp.concatenate([xp[:, :, dx : dx + wd, :] for dx in range(3)], axis=-1)


def _shift_rows(a: jax.Array, by: int) -> jax.Array:
    """a [B, H, ...] moved down by `by` rows (up if negative), zero-filled."""
    if by > 0:
        return jnp.pad(a[:, :-by], ((0, 0), (by, 0)) + ((0, 0),) * (a.ndim - 2))
    return jnp.pad(a[:, -by:], ((0, 0), (0, -by)) + ((0, 0),) * (a.ndim - 2))


def _rows_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    b, h, wd, cin = x.shape
    cout = w.shape[-1]
    p3 = _hshift_patches(x)  # [B, H, W, 3*Cin]
    wcat = w.transpose(1, 2, 0, 3).reshape(3 * cin, 3 * cout)
    z = (p3.reshape(-1, 3 * cin) @ wcat).reshape(b, h, wd, 3, cout)
    y = _shift_rows(z[:, :, :, 0], 1) + z[:, :, :, 1] + _shift_rows(z[:, :, :, 2], -1)
    return y, (p3, w)


def _rows_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    p3, w = res
    b, h, wd, c3 = p3.shape
    cin, cout = c3 // 3, w.shape[-1]
    dz = jnp.concatenate([_shift_rows(g, -1), g, _shift_rows(g, 1)], axis=-1).reshape(
        -1, 3 * cout
    )  # [B*H*W, 3*Cout], (dy, cout) order
    dwcat = p3.reshape(-1, c3).T @ dz  # [3*Cin (dx, cin), 3*Cout (dy, cout)]
    dw = dwcat.reshape(3, cin, 3, cout).transpose(2, 0, 1, 3)
    wt = w.transpose(0, 3, 1, 2).reshape(3 * cout, 3 * cin)  # W^T: [3*Cout (dy), 3*Cin (dx)]
    dp3 = (dz @ wt).reshape(b, h, wd, 3, cin)
    dxp = sum(jnp.pad(dp3[:, :, :, dx], ((0, 0), (0, 0), (dx, 2 - dx), (0, 0))) for dx in range(3))
    return dxp[:, :, 1:-1, :], dw


conv3x3_rows.defvjp(_rows_fwd, _rows_bwd)


def conv2d_moments(
    x: jax.Array, w: jax.Array, stride: int = 1, impl: str | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """conv2d(x, w) and its per-channel mean and (biased) variance over batch and space.

    With few input channels (conv4's first layer: 9 * Cin <= 32) the statistics come from the
    patches instead of the output: mean = mean(P) @ W and var = diag(W^T Cov(P) W), exact
    algebra on a [9, 9] covariance, so neither they nor their gradients read the big
    full-resolution output (481 MB per pass for the max-pool query sets).
    """
    impl = impl or default_impl()
    kh, kw, cin, cout = w.shape
    if impl == "im2col" and kh * kw * cin <= 32:
        patches = _patches(x, kh, kw, stride)
        p = patches.reshape(-1, kh * kw * cin)
        w2 = w.reshape(kh * kw * cin, cout)
        y = (p @ w2).reshape(*patches.shape[:3], cout)
        mean_p = p.mean(axis=0)
        centred = p - mean_p
        cov = centred.T @ centred / p.shape[0]
        return y, mean_p @ w2, jnp.sum((cov @ w2) * w2, axis=0)
    y = conv2d(x, w, stride, impl=impl)
    mean = y.mean(axis=(0, 1, 2))
    return y, mean, jnp.square(y - mean).mean(axis=(0, 1, 2))


@jax.custom_vjp
def max_pool2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, VALID: [B, H, W, C] -> [B, H // 2, W // 2, C].

    The gradient goes to every element equal to its window's max (ties each get the full
    cotangent; JAX's reduce_max splits them). The backward is one fused select, and it is
    linear in the cotangent, so second-order MAML differentiates it cheaply.
    """
    return _windows(x).max(axis=(2, 4))


def _windows(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2, :].reshape(b, h // 2, 2, w // 2, 2, c)


def _max_pool_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = _windows(x).max(axis=(2, 4))
    return y, (x, y)


def _max_pool_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
    x, y = res
    b, h, w, c = x.shape
    win = _windows(x)
    dx = jnp.where(win == y[:, :, None, :, None, :], g[:, :, None, :, None, :], 0.0)
    dx = dx.reshape(b, h // 2 * 2, w // 2 * 2, c)
    if dx.shape != x.shape:
        dx = jnp.pad(dx, ((0, 0), (0, h - dx.shape[1]), (0, w - dx.shape[2]), (0, 0)))
    return (dx,)


max_pool2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


@jax.custom_vjp
def signed_max_pool2x2(x: jax.Array, s: jax.Array) -> jax.Array:
    """s * max_pool2x2(s * x) for a per-channel sign s (+-1, no gradient), without writing s * x.

    Same gradient convention as max_pool2x2; the sign's cotangent is zero.
    """
    return s * (_windows(x) * s).max(axis=(2, 4))


def _signed_pool_fwd(x, s):
    y = signed_max_pool2x2(x, s)
    return y, (x, y, s)


def _signed_pool_bwd(res, g):
    x, y, s = res
    return _max_pool_bwd((x, y), g)[0], jnp.zeros_like(s)


signed_max_pool2x2.defvjp(_signed_pool_fwd, _signed_pool_bwd)
