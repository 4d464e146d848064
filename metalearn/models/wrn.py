"""model=wrn: the Wide ResNet of Zagoruyko & Komodakis (2016), WRN-28-10 by default, the
backbone of LEO (Rusu et al. 2019), S2M2 (Mangla et al. 2020) and Chen et al. (2019)'s
baselines, as a Flax NNX module served by metalearn's Flax adapter.

    3x3 conv (16) -> 3 stages of n = (depth - 4) / 6 pre-activation basic blocks with 16k, 32k
    and 64k filters (k = model.width; the first block of stages 2 and 3 has stride 2)
    -> BN -> ReLU -> mean over space -> linear head

A block is x -> BN -> ReLU = a -> 3x3 conv (stride s) -> BN -> ReLU -> dropout
(model.drop_rate) -> 3x3 conv, plus x, or a 1x1 conv (stride s) of a where the width or size
changes (the reference code's convShortcut). Convolutions have no bias and padding 1, as
PyTorch pads (a strided SAME conv on an even size would pad only after the image:
_resnet_layers.torch_padded_conv); they are He-normal with fan_out, batch norms start at scale 1
and offset 0. At 84x84 the features are [B, 640] from 21x21 maps.

Blocks, for the group labels and task-conditioning hooks, in depth order: blocks.0 is the first
conv, blocks.1 .. blocks.<3n> the residual blocks, the last one the final BN -> ReLU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metalearn import registry
from metalearn.checks import MAX_DEPTH, MAX_WIDTH, at_most, choice, require
from metalearn.models import Model, ModelConfig, flax_module
from metalearn.models.norm import NORMS
from metalearn.models.resnet12 import check_drop_rate, check_norm_momentum, check_width

STEM = 16  # the first conv's filters; the stages have 16k, 32k and 64k


@dataclass
class WRNConfig(ModelConfig):
    inputs: ClassVar[tuple[str, ...]] = ("images",)
    reads_padded: ClassVar[bool] = True  # _resnet_layers.BatchNorm

    name: str = "wrn"
    depth: int = 28  # 6n + 4: n residual blocks of 2 convs in each of the 3 stages
    width: int = 10  # k, the widening factor: stages of 16k, 32k and 64k filters
    drop_rate: float = 0.0  # dropout between a block's two convs (WRN's paper: 0.3 on CIFAR)
    # batch-norm statistics: transductive (each batch's own) | inductive (running averages,
    # used at meta-test; metalearn/models/flax_module.py), updated with rate norm_momentum
    norm: str = "transductive"
    norm_momentum: float = 0.1

    def __post_init__(self) -> None:
        depth = self.depth
        require(
            isinstance(depth, int)
            and not isinstance(depth, bool)
            and depth >= 10
            and (depth - 4) % 6 == 0
            and depth <= MAX_DEPTH,
            f"model.depth={depth} is not allowed: a Wide ResNet has depth 6n + 4, for n >= 1 "
            "residual blocks of 2 convs in each of its 3 stages: 10, 16, 22, 28 (WRN-28-10), "
            f"34, 40, ... (at most {MAX_DEPTH:,}).",
        )
        check_width("model.width", self.width)
        at_most("model.width", self.width, MAX_WIDTH // 64)  # the last stage has 64k filters
        check_drop_rate("model.drop_rate", self.drop_rate)
        choice("model.norm", self.norm, NORMS)
        check_norm_momentum(self.norm_momentum)


def make(cfg: WRNConfig, input_shape: tuple[int, ...]) -> Model:
    flax_cfg = flax_module.FlaxConfig(
        module="metalearn.models._wrn_net:WideResNet",
        kwargs={
            "in_channels": int(input_shape[-1]),
            "depth": int(cfg.depth),
            "width": int(cfg.width),
            "drop_rate": float(cfg.drop_rate),
            "norm_momentum": float(cfg.norm_momentum),
        },
        norm=cfg.norm,
    )
    return flax_module.make(flax_cfg, input_shape)


registry.register("model", "wrn", WRNConfig, make)
