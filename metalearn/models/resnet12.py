"""model=resnet12: the few-shot ResNet-12 of MetaOptNet (Lee et al. 2019) and RFS (Tian et al.
2020), after TADAM and SNAIL, as a Flax NNX module served by metalearn's Flax adapter.

Four residual blocks (model.channels, 64-160-320-640), each

    x -> [3x3 conv -> BN -> leaky ReLU(0.1)] x 2 -> 3x3 conv -> BN -> (+ 1x1 conv -> BN of x)
      -> leaky ReLU(0.1) -> 2x2 max-pool -> dropout (blocks 1-2) | DropBlock (blocks 3-4)

(convolutions without bias, padding 1; the shortcut is a projection in every block, since every
block changes the width), then the mean over space (RFS's average pool: 640 features at 84x84)
and a linear head. Convolutions are He-normal with fan_out and the leaky ReLU's gain, batch
norms start at scale 1, offset 0 (the references' init). model.drop_rate (0.1 in MetaOptNet
and RFS) is the rate of both the dropout and DropBlock, whose blocks are model.dropblock_size
wide (5 for miniImageNet, 2 for CIFAR-FS / FC100 in both papers). The references ramp
DropBlock's rate up linearly over their first 40,000 forward passes; metalearn's models do not
see the training step, so here the full rate applies from the start.

The module goes through model=flax's adapter (metalearn/models/flax_module.py), so groups
(blocks.0..3, head), task-conditioning hooks on each block's output, model.norm
(transductive | inductive) and dropout keys work as for any Flax module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from metalearn import registry
from metalearn.checks import MAX_WIDTH, choice, require
from metalearn.models import Model, ModelConfig, flax_module
from metalearn.models.norm import NORMS

CHANNELS = (64, 160, 320, 640)
LEAKY_SLOPE = 0.1
MIN_SIZE = 16  # four 2x2 max-pools leave a 1x1 map


@dataclass
class ResNet12Config(ModelConfig):
    inputs: ClassVar[tuple[str, ...]] = ("images",)
    reads_padded: ClassVar[bool] = True  # _resnet_layers.BatchNorm

    name: str = "resnet12"
    channels: list[int] = field(default_factory=lambda: list(CHANNELS))  # filters of the 4 blocks
    # dropout rate in blocks 1-2 and DropBlock rate in blocks 3-4 (MetaOptNet / RFS: 0.1); 0: off
    drop_rate: float = 0.1
    dropblock_size: int = 5  # DropBlock's square side (the papers: 5 at 84x84, 2 at 32x32)
    # batch-norm statistics: transductive (each batch's own) | inductive (running averages,
    # used at meta-test; metalearn/models/flax_module.py), updated with rate norm_momentum
    norm: str = "transductive"
    norm_momentum: float = 0.1

    def __post_init__(self) -> None:
        channels = self.channels
        require(
            isinstance(channels, (list, tuple))
            and len(channels) == 4
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels),
            f"model.channels={_shown(channels)} is not allowed: ResNet-12 has 4 residual blocks, "
            "so give 4 positive filter counts, e.g. model.channels=[64,160,320,640] (the "
            "papers') or [8,8,8,8] for a small test.",
        )
        for i, c in enumerate(channels):
            check_width(f"model.channels[{i}]", c)
        check_drop_rate("model.drop_rate", self.drop_rate)
        check_width("model.dropblock_size", self.dropblock_size)
        choice("model.norm", self.norm, NORMS)
        check_norm_momentum(self.norm_momentum)


def _shown(value) -> str:
    return str(list(value)) if isinstance(value, (list, tuple)) else repr(value)


def make(cfg: ResNet12Config, input_shape: tuple[int, ...]) -> Model:
    height, width = input_shape[0], input_shape[1]
    require(
        min(height, width) >= MIN_SIZE,
        f"model=resnet12 halves its input 4 times (a 2x2 max-pool per block), so images must "
        f"be at least {MIN_SIZE}x{MIN_SIZE}; these are {height}x{width} (raise data.image_size, "
        "or use model=conv4).",
    )
    flax_cfg = flax_module.FlaxConfig(
        module="metalearn.models._resnet12_net:ResNet12",
        kwargs={
            "in_channels": int(input_shape[-1]),
            "channels": [int(c) for c in cfg.channels],
            "drop_rate": float(cfg.drop_rate),
            "dropblock_size": int(cfg.dropblock_size),
            "norm_momentum": float(cfg.norm_momentum),
        },
        norm=cfg.norm,
    )
    return flax_module.make(flax_cfg, input_shape)


# ------------------------------------------------------------------- schema checks (and wrn's)


def check_drop_rate(name: str, value: float) -> None:
    require(
        isinstance(value, (int, float)) and 0.0 <= value < 1.0,
        f"{name}={value} is not allowed: it is the fraction of units dropped in training, so it "
        "must be in [0, 1) (0 turns dropout off).",
    )


def check_norm_momentum(value: float) -> None:
    require(
        0 < value <= 1,
        f"model.norm_momentum={value} is not allowed: it is the weight of each new batch in the "
        "running statistics (PyTorch's convention, 0.1), so it must be in (0, 1].",
    )


def check_width(name: str, value: int) -> None:
    require(
        isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WIDTH,
        f"{name}={value} is not allowed: it must be a whole number from 1 to {MAX_WIDTH:,}.",
    )


registry.register("model", "resnet12", ResNet12Config, make)
