"""The ResNet-12 network of model=resnet12 (metalearn/models/resnet12.py), as Flax NNX modules:
a private module (the registry does not import it), loaded by the Flax adapter by import path,
so processes that do not build it never import flax.nnx."""

from __future__ import annotations

from functools import partial

import jax
from flax import nnx

from metalearn.models import _resnet_layers as resnet_layers
from metalearn.models.resnet12 import CHANNELS, LEAKY_SLOPE


class ResNet12Block(nnx.Module):
    """One residual block (module docstring); `dropblock` picks DropBlock over dropout."""

    def __init__(
        self,
        cin: int,
        cout: int,
        *,
        drop_rate: float = 0.0,
        dropblock: bool = False,
        dropblock_size: int = 5,
        norm_momentum: float = 0.1,
        rngs: nnx.Rngs,
    ):
        conv = partial(
            resnet_layers.conv, kernel_init=resnet_layers.kaiming_normal(LEAKY_SLOPE), rngs=rngs
        )
        norm = partial(resnet_layers.batch_norm, momentum=norm_momentum, rngs=rngs)
        self.conv1, self.bn1 = conv(cin, cout, 3), norm(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3), norm(cout)
        self.conv3, self.bn3 = conv(cout, cout, 3), norm(cout)
        self.shortcut_conv, self.shortcut_bn = conv(cin, cout, 1), norm(cout)
        if drop_rate <= 0:
            self.drop = None
        elif dropblock:
            self.drop = resnet_layers.DropBlock(drop_rate, dropblock_size)
        else:
            self.drop = nnx.Dropout(drop_rate, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = partial(jax.nn.leaky_relu, negative_slope=LEAKY_SLOPE)
        out = act(self.bn1(self.conv1(x)))
        out = act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = act(out + self.shortcut_bn(self.shortcut_conv(x)))
        out = resnet_layers.max_pool2x2(out)
        return out if self.drop is None else self.drop(out)


class ResNet12(nnx.Module):
    """ResNet-12 (module docstring): embed(x [B, H, W, C]) -> [B, channels[-1]] features;
    __call__ -> [B, num_classes] logits."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        channels: tuple[int, ...] | list[int] = CHANNELS,
        drop_rate: float = 0.1,
        dropblock_size: int = 5,
        norm_momentum: float = 0.1,
        *,
        rngs: nnx.Rngs,
    ):
        widths = [in_channels, *channels]
        self.blocks = nnx.List(
            [
                ResNet12Block(
                    cin,
                    cout,
                    drop_rate=drop_rate,
                    dropblock=i >= 2,  # DropBlock in blocks 3 and 4, dropout before
                    dropblock_size=dropblock_size,
                    norm_momentum=norm_momentum,
                    rngs=rngs,
                )
                for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:]))
            ]
        )
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def embed(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x.mean(axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.embed(x))
