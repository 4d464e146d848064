"""The conv4 few-shot network (4 x conv-BN-ReLU, linear head) as pure functions over a dict."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.checks import choice, require, width
from metalearn.models import Model, ModelConfig, conv_ops, norm
from metalearn.models.groups import label_by_names
from metalearn.models.norm import NORMS

Params = dict[str, Any]
DOWNSAMPLE = ("stride", "maxpool")
BN_EPS = 1e-5
POOLS = ("mean", "flatten")


@dataclass
class Conv4Config(ModelConfig):
    inputs: ClassVar[tuple[str, ...]] = ("images",)
    reads_padded: ClassVar[bool] = True

    name: str = "conv4"
    hidden: int = 64  # filters per block
    downsample: str = "stride"  # stride (MAML's Omniglot net) | maxpool
    # batch-norm statistics: transductive (each batch's own) | inductive (running averages,
    # used at meta-test; metalearn/models/norm.py), updated with rate norm_momentum
    norm: str = "transductive"
    norm_momentum: float = 0.1
    # features: mean over the last map (hidden of them) | flatten it (MAML's and ProtoNets'
    # miniImageNet nets: 5 x 5 x hidden at 84x84, 800 with 32 filters, 1600 with 64)
    pool: str = "mean"

    def __post_init__(self) -> None:
        width("model.hidden", self.hidden)
        choice("model.pool", self.pool, POOLS)
        choice("model.downsample", self.downsample, DOWNSAMPLE)
        choice("model.norm", self.norm, NORMS)
        require(
            0 < self.norm_momentum <= 1,
            f"model.norm_momentum={self.norm_momentum} must be in (0, 1].",
        )


def init(
    key: jax.Array,
    n_out: int | None,
    *,
    in_channels: int = 1,
    hidden: int = 64,
    downsample: str = "stride",
    image_size: int = 28,
    norm: str = "transductive",
    pool: str = "mean",
) -> Params:
    """Glorot-uniform conv and head weights, zero biases, BN scale 1 and offset 0 (no head when
    n_out is None); norm=inductive adds running statistics (mean 0, variance 1) per block."""
    _check(downsample)
    conv_init = jax.nn.initializers.glorot_uniform(in_axis=-2, out_axis=-1)
    keys = jax.random.split(key, 5)
    blocks = []
    cin = in_channels
    for k in keys[:4]:
        blocks.append(
            {
                "w": conv_init(k, (3, 3, cin, hidden), jnp.float32),
                "b": jnp.zeros((hidden,), jnp.float32),
                "scale": jnp.ones((hidden,), jnp.float32),
                "offset": jnp.zeros((hidden,), jnp.float32),
            }
        )
        if norm == "inductive":
            blocks[-1]["running_mean"] = jnp.zeros((hidden,), jnp.float32)
            blocks[-1]["running_var"] = jnp.ones((hidden,), jnp.float32)
        cin = hidden
    if n_out is None:
        return {"blocks": blocks}
    features = hidden * (final_side(image_size, downsample) ** 2 if pool == "flatten" else 1)
    head = {
        "w": jax.nn.initializers.glorot_uniform()(keys[4], (features, n_out), jnp.float32),
        "b": jnp.zeros((n_out,), jnp.float32),
    }
    return {"blocks": blocks, "head": head}


def batch_norm(x: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    """Normalise each channel with the batch's own statistics (transductive, no running stats)."""
    mean, var = norm.moments(x, (0, 1, 2))
    return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + offset


def block(
    p: dict[str, jax.Array],
    x: jax.Array,
    *,
    downsample: str,
    conv_impl: str | None = None,
    momentum: float = 0.1,
) -> jax.Array:
    """conv 3x3 SAME -> batch norm -> ReLU (-> 2x2 max-pool). A block with running statistics
    (norm=inductive) normalises with them at meta-test and tracks the batch's in training."""
    stride = 2 if downsample == "stride" else 1
    if norm.example_mask(x) is None:
        z, mean, var = conv_ops.conv2d_moments(x, p["w"], stride, impl=conv_impl)
    else:  # a padded split: statistics of its real examples only
        z = conv_ops.conv2d(x, p["w"], stride, impl=conv_impl)
        mean, var = norm.moments(z, (0, 1, 2))
    inductive = "running_mean" in p
    batch_mean, batch_var = mean, var
    if inductive and norm.is_testing():
        mean, var = p["running_mean"], p["running_var"]
    if downsample == "maxpool":
        # max-pool(ReLU(BN(z))) computed as ReLU(BN(pooled z)): BN is a per-channel affine
        # map, monotone in z with the sign of its scale, and ReLU is monotone, so pooling s * z
        # with s = sign(scale) picks the same element (and in float32 the same value: each
        # rounding step is monotone too). Only the statistics and the pooling read the
        # full-resolution activations; everything else, and most of the backward pass, runs at
        # a quarter size.
        s = jax.lax.stop_gradient(jnp.where(p["scale"] >= 0, 1.0, -1.0))
        z = conv_ops.signed_max_pool2x2(z, s)
    # The conv bias shifts z and its batch mean alike (it cancels in BN), so it is added here,
    # after pooling, instead of as one more pass over the full-resolution conv output.
    normed = (z + p["b"] - (mean + p["b"])) * (p["scale"] * jax.lax.rsqrt(var + BN_EPS))
    out = jax.nn.relu(normed + p["offset"])
    if inductive and not norm.is_testing():
        out = norm.track(
            out, p["running_mean"], p["running_var"], batch_mean, batch_var, jnp.float32(momentum)
        )
    return out


def embed(
    params: Params,
    x: jax.Array,
    hook=None,
    *,
    downsample: str,
    conv_impl: str | None = None,
    momentum: float = 0.1,
    pool: str = "mean",
) -> jax.Array:
    """x [B, H, W, C] float32 -> features [B, hidden] (pool=flatten: [B, H' W' hidden]);
    hook(i, h) transforms block i's output [B, H', W', hidden] (task conditioning)."""
    _check(downsample)
    for i, p in enumerate(params["blocks"]):
        x = block(p, x, downsample=downsample, conv_impl=conv_impl, momentum=momentum)
        if hook is not None:
            x = hook(i, x)
    if pool == "flatten":
        return x.reshape(x.shape[0], -1)
    return x.mean(axis=(1, 2))  # stride: mean over what is left; maxpool: 1x1 at 28x28


def final_side(image_size: int, downsample: str) -> int:
    """The side of the last block's map: SAME stride-2 convs round up, 2x2 max-pools down."""
    side = image_size
    for _ in range(4):
        side = -(-side // 2) if downsample == "stride" else side // 2
    return side


def apply(
    params: Params,
    x: jax.Array,
    *,
    downsample: str,
    conv_impl: str | None = None,
    momentum: float = 0.1,
    pool: str = "mean",
) -> jax.Array:
    """x [B, H, W, C] -> logits [B, n_out]."""
    features = embed(
        params, x, downsample=downsample, conv_impl=conv_impl, momentum=momentum, pool=pool
    )
    return head(params, features)


def head(params: Params, features: jax.Array) -> jax.Array:
    return features @ params["head"]["w"] + params["head"]["b"]


def _check(downsample: str) -> None:
    if downsample not in DOWNSAMPLE:
        raise ValueError(f"downsample must be one of {DOWNSAMPLE}, got {downsample!r}")


def make(cfg: Conv4Config, input_shape: tuple[int, ...]) -> Model:
    return Model(
        init=partial(
            init,
            in_channels=input_shape[-1],
            hidden=cfg.hidden,
            downsample=cfg.downsample,
            image_size=input_shape[0],
            norm=cfg.norm,
            pool=cfg.pool,
        ),
        apply=partial(apply, downsample=cfg.downsample, momentum=cfg.norm_momentum, pool=cfg.pool),
        embed=partial(embed, downsample=cfg.downsample, momentum=cfg.norm_momentum, pool=cfg.pool),
        head=head,
        groups=label_by_names,
        input_shape=tuple(input_shape),
    )


registry.register("model", "conv4", Conv4Config, make)
