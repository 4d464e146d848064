"""A conv4 written the way a Flax NNX user writes it, for `bench_maml.py --flax` (model=flax).

Same network as metalearn's built-in conv4 (metalearn/models/conv4.py): 4 x [3x3 conv SAME ->
batch norm with the batch's statistics -> ReLU, then stride 2 or a 2x2 max-pool], the mean over
what is left of the image, a linear head. It uses Flax's own layers (nnx.Conv, nnx.BatchNorm,
nnx.max_pool); with fast_conv=True its convolutions go through metalearn's drop-in
`conv_ops.conv_general_dilated` (the built-in model's CPU path for the convolution only).
"""

from __future__ import annotations

import jax
from flax import nnx

from metalearn.models import conv_ops


class Block(nnx.Module):
    def __init__(self, cin: int, cout: int, downsample: str, fast_conv: bool, *, rngs: nnx.Rngs):
        self.downsample = downsample
        strides = 2 if downsample == "stride" else 1
        conv = {"conv_general_dilated": conv_ops.conv_general_dilated} if fast_conv else {}
        self.conv = nnx.Conv(cin, cout, (3, 3), strides=strides, padding="SAME", rngs=rngs, **conv)
        self.norm = nnx.BatchNorm(cout, epsilon=1e-5, rngs=rngs)

    def __call__(self, x, train: bool = True):
        x = jax.nn.relu(self.norm(self.conv(x), use_running_average=not train))
        if self.downsample == "maxpool":
            x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        return x


class Conv4(nnx.Module):
    def __init__(
        self,
        hidden: int = 64,
        num_classes: int = 5,
        in_channels: int = 1,
        downsample: str = "stride",
        fast_conv: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        widths = [in_channels] + [hidden] * 4
        self.blocks = nnx.List(
            [Block(a, b, downsample, fast_conv, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
        )
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def embed(self, x, train: bool = True):
        for block in self.blocks:
            x = block(x, train)
        return x.mean(axis=(1, 2))

    def __call__(self, x, train: bool = True):
        return self.head(self.embed(x, train))
