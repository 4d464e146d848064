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


def _conv_im2col(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    b, h, wd, cin = x.shape
    kh, kw, _, cout = w.shape
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
    patches = jnp.concatenate(cols, axis=-1)  # [B, Ho, Wo, kh*kw*Cin], (dy, dx, cin) order
    y = patches.reshape(b * ho * wo, kh * kw * cin) @ w.reshape(kh * kw * cin, cout)
    return y.reshape(b, ho, wo, cout)


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
