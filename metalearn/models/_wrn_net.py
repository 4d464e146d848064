"""The Wide ResNet of model=wrn (metalearn/models/wrn.py), as Flax NNX modules: a private module
(the registry does not import it), loaded by the Flax adapter by import path."""

from __future__ import annotations

from functools import partial

import jax
from flax import nnx

from metalearn.models import _resnet_layers as resnet_layers
from metalearn.models.wrn import STEM


class WRNBlock(nnx.Module):
    """A pre-activation basic block (module docstring)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int = 1,
        *,
        drop_rate: float = 0.0,
        norm_momentum: float = 0.1,
        rngs: nnx.Rngs,
    ):
        conv = partial(resnet_layers.conv, kernel_init=resnet_layers.kaiming_normal(), rngs=rngs)
        norm = partial(resnet_layers.batch_norm, momentum=norm_momentum, rngs=rngs)
        self.bn1 = norm(cin)
        self.conv1 = conv(cin, cout, 3, stride, torch_padding=stride > 1)
        self.bn2 = norm(cout)
        self.drop = nnx.Dropout(drop_rate, rngs=rngs) if drop_rate > 0 else None
        self.conv2 = conv(cout, cout, 3)
        projected = stride != 1 or cin != cout
        self.shortcut = conv(cin, cout, 1, stride) if projected else None

    def __call__(self, x: jax.Array) -> jax.Array:
        act = jax.nn.relu(self.bn1(x))
        out = jax.nn.relu(self.bn2(self.conv1(act)))
        if self.drop is not None:
            out = self.drop(out)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(act))


class NormReLU(nnx.Module):
    """The final BN -> ReLU of a pre-activation network."""

    def __init__(self, features: int, *, norm_momentum: float = 0.1, rngs: nnx.Rngs):
        self.bn = resnet_layers.batch_norm(features, norm_momentum, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(x))


class WideResNet(nnx.Module):
    """WRN-depth-width (module docstring): embed(x [B, H, W, C]) -> [B, 64 * width] features;
    __call__ -> [B, num_classes] logits."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        depth: int = 28,
        width: int = 10,
        drop_rate: float = 0.0,
        norm_momentum: float = 0.1,
        *,
        rngs: nnx.Rngs,
    ):
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        blocks: list = [
            resnet_layers.conv(
                in_channels, STEM, 3, kernel_init=resnet_layers.kaiming_normal(), rngs=rngs
            )
        ]
        cin = STEM
        for cout, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            for i in range(n):
                blocks.append(
                    WRNBlock(
                        cin,
                        cout,
                        stride if i == 0 else 1,
                        drop_rate=drop_rate,
                        norm_momentum=norm_momentum,
                        rngs=rngs,
                    )
                )
                cin = cout
        blocks.append(NormReLU(cin, norm_momentum=norm_momentum, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def embed(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x.mean(axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.embed(x))
