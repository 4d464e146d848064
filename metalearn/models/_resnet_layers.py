"""Layers shared by the built-in residual backbones (model=resnet12, model=wrn), in Flax NNX.

- `conv`: a bias-free nnx.Conv whose convolution goes through metalearn's CPU fast path
  (metalearn/models/conv_ops.py: SAME padding, equal strides; 1x1 and 3x3 kernels alike), with
  PyTorch's symmetric zero padding kept for strided 3x3 convolutions (`torch_padding`);
- `batch_norm`: nnx.BatchNorm with PyTorch's defaults (epsilon 1e-5, moving-average rate 0.1);
  model.norm decides whether its batch or running statistics are used (flax_module.py);
- `DropBlock` (Ghiasi et al. 2018): zeroes block_size x block_size squares of each feature map,
  its key drawn from the task's stream (metalearn/models/randomness.py), so it is the identity
  outside training and at meta-test;
- the schema checks the backbones share.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from metalearn.models import conv_ops, norm, randomness

BN_EPS = 1e-5  # PyTorch's BatchNorm2d default, as the reference implementations use


def kaiming_normal(negative_slope: float = 0.0):
    """He et al.'s normal init with fan_out, as the references' nn.init.kaiming_normal_(w,
    mode='fan_out') (gain^2 = 2 / (1 + slope^2) for a (leaky) ReLU)."""
    return jax.nn.initializers.variance_scaling(
        2.0 / (1.0 + negative_slope**2), "fan_out", "normal"
    )


def torch_padded_conv(lhs, rhs, window_strides, padding, **kwargs):
    """conv_ops.conv_general_dilated with PyTorch's padding of k // 2 on each side, for SAME's.

    Both give ceil(size / stride) outputs, but a stride-2 3x3 SAME conv on an even size pads
    only after the image, so its taps start one pixel later than PyTorch's (and than the 1x1
    shortcut's). Where they differ, the input is padded by k // 2 on both sides and convolved
    SAME, which then pads nothing before it, and the extra last output is cropped: the taps are
    PyTorch's, through the fast path. (Other cases, none in the backbones, go to lax.)
    """
    del padding  # SAME from nnx.Conv, replaced here
    spatial, kernel = lhs.shape[1:3], rhs.shape[:2]
    pads, crops = [], []
    for size, k, s in zip(spatial, kernel, window_strides):
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        if total // 2 == k // 2:  # SAME already pads as PyTorch before the image
            pads.append((0, 0))
        else:
            padded = size + 2 * (k // 2)
            if max((-(-padded // s) - 1) * s + k - padded, 0) // 2 != 0:
                torch_pads = [(k_ // 2, k_ // 2) for k_ in kernel]
                return lax.conv_general_dilated(lhs, rhs, window_strides, torch_pads, **kwargs)
            pads.append((k // 2, k // 2))
        crops.append(out)
    if all(p == (0, 0) for p in pads):
        return conv_ops.conv_general_dilated(lhs, rhs, window_strides, "SAME", **kwargs)
    lhs = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
    out = conv_ops.conv_general_dilated(lhs, rhs, window_strides, "SAME", **kwargs)
    return out[:, : crops[0], : crops[1], :]


def conv(
    cin: int,
    cout: int,
    kernel: int,
    stride: int = 1,
    *,
    kernel_init,
    rngs: nnx.Rngs,
    torch_padding: bool = False,
) -> nnx.Conv:
    """A bias-free k x k convolution (padding k // 2, as the references' padding=1 for 3x3 and
    0 for 1x1), through conv_ops' fast path; torch_padding for strided 3x3 convolutions."""
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=stride,
        padding="SAME",
        use_bias=False,
        kernel_init=kernel_init,
        conv_general_dilated=torch_padded_conv if torch_padding else conv_ops.conv_general_dilated,
        rngs=rngs,
    )


class BatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm whose batch statistics leave out a padded split's padding (the mask of
    norm.examples), so a padded episode normalises as the unpadded one does."""

    def __call__(self, x, use_running_average=None, *, mask=None):
        real = norm.example_mask(x)
        if mask is None and real is not None:
            mask = real.reshape((-1,) + (1,) * (x.ndim - 1))
        return super().__call__(x, use_running_average, mask=mask)


def batch_norm(features: int, momentum: float, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """Batch norm with scale 1 and offset 0; `momentum` in PyTorch's convention (the weight of
    the new batch, 0.1), which is Flax's 1 - momentum."""
    return BatchNorm(features, momentum=1.0 - momentum, epsilon=BN_EPS, rngs=rngs)


def max_pool2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, VALID (PyTorch's nn.MaxPool2d(2), flooring odd sizes):
    [B, H, W, C] -> [B, H // 2, W // 2, C], as a tournament of selects between the 4 elements of
    each window. The gradient goes to one element per window (the first maximum in row-major
    order, as PyTorch's), and differentiating again only selects cotangents, so second-order
    MAML stays exact and cheap.

    (conv_ops.max_pool2x2 is not used: its second derivative goes through reduce_max's JVP,
    which divides by the number of window elements equal to the max. After a batch norm, the
    second-order MAML meta-gradient of a ResNet-12 came out NaN with it on a CPU, most likely
    because XLA's fusions recompute those elements with another rounding than the max's, so
    that none of them equals it and the count is 0.)
    """
    b, h, w, c = x.shape
    win = x[:, : h // 2 * 2, : w // 2 * 2, :].reshape(b, h // 2, 2, w // 2, 2, c)
    (a, bb), (cc, d) = [[win[:, :, i, :, j] for j in (0, 1)] for i in (0, 1)]
    top, bottom = jnp.where(a >= bb, a, bb), jnp.where(cc >= d, cc, d)
    return jnp.where(top >= bottom, top, bottom)


# ------------------------------------------------------------------------------ DropBlock


def drop_block_size(height: int, width: int, block_size: int) -> int:
    """The block size used on a [height, width] map: at most the map (Ghiasi et al.'s code)."""
    return max(1, min(block_size, height, width))


def drop_block_gamma(height: int, width: int, block_size: int, rate: float) -> float:
    """The rate at which block corners are drawn so that about `rate` of the units are dropped
    (Ghiasi et al. 2018, eq. 1): rate / b^2 * (H W) / ((H - b + 1)(W - b + 1))."""
    b = drop_block_size(height, width, block_size)
    return rate / b**2 * (height * width) / ((height - b + 1) * (width - b + 1))


def drop_block_mask(key: jax.Array, shape: tuple[int, ...], rate: float, block_size: int):
    """The 0/1 keep-mask [B, H, W, C] of one DropBlock draw.

    Corners are drawn with probability gamma at the (H - b + 1) x (W - b + 1) positions where a
    b x b block fits, independently for every example and channel (MetaOptNet's and RFS's
    DropBlock, sampled at the valid positions only); each corner zeroes the block below and to
    the right of it. The union of blocks is a max-pool of the corners padded by b - 1.
    """
    batch, height, width, channels = shape
    b = drop_block_size(height, width, block_size)
    gamma = drop_block_gamma(height, width, block_size, rate)
    corners = jax.random.bernoulli(
        key, gamma, (batch, height - b + 1, width - b + 1, channels)
    ).astype(jnp.float32)
    padded = jnp.pad(corners, ((0, 0), (b - 1, b - 1), (b - 1, b - 1), (0, 0)))
    dropped = lax.reduce_window(padded, 0.0, lax.max, (1, b, b, 1), (1, 1, 1, 1), "VALID")
    return 1.0 - dropped


class DropBlock(nnx.Module):
    """DropBlock (Ghiasi et al. 2018) on NHWC maps: x * mask * (mask.size / mask.sum()), the
    kept units rescaled so the map's mean is kept in expectation (as MetaOptNet / RFS do, over
    the whole batch). Its key comes from metalearn.models.randomness.next_key(): outside a
    training scope and at meta-test it is None, and DropBlock is the identity."""

    def __init__(self, rate: float, block_size: int):
        self.rate = float(rate)
        self.block_size = int(block_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.rate <= 0.0:
            return x
        key = randomness.next_key()
        if key is None:
            return x
        mask = drop_block_mask(key, x.shape, self.rate, self.block_size)
        scale = mask.size / jnp.maximum(mask.sum(), 1.0)
        return x * (mask * scale).astype(x.dtype)
