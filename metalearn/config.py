"""Typed configuration: one dataclass schema per config group, registered in Hydra's ConfigStore.

The YAML files in conf/ extend these schemas (each lists its schema first in `defaults`), so an
unknown key or a wrong type is rejected by OmegaConf, and `__post_init__` runs the semantic checks
when `OmegaConf.to_object` builds the dataclasses. JAX code only ever sees these dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import BooleanNode

log = logging.getLogger("metalearn")


class ConfigError(ValueError):
    """A configuration value that is out of range; the message is shown to the user as is."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(name: str, value: float) -> None:
    _require(
        value is not None and value > 0 and math.isfinite(value),
        f"{name}={value} is not allowed: it must be a positive number.",
    )


# Upper bounds on sizes that allocate arrays or unroll loops: far beyond any published setting,
# low enough that what they ask for is refused here, not by the allocator or an int32 overflow.
# (Sizes that only interact, such as meta_batch x k_query x hidden, are checked on the compiled
# step's memory instead: metalearn/memory.py.)
MAX_EXAMPLES = 100_000  # support or query examples per class or task
MAX_WIDTH = 65_536  # hidden units or filters
MAX_DEPTH = 1_000  # layers
MAX_TASKS = 1_000_000  # tasks per meta-batch, per evaluation, in a multi-task set
MAX_INNER_STEPS = 100_000  # adaptation steps of an inner loop
INT32_MAX = 2**31 - 1  # JAX's default integers are 32-bit


def _at_most(name: str, value: int, limit: int) -> None:
    _require(
        value <= limit,
        f"{name}={value} is not allowed: it must be at most {limit:,} (metalearn's bound for this "
        "size, far beyond any published setting; it keeps a typo from exhausting memory).",
    )


def _seed(name: str, value: int) -> None:
    _require(
        0 <= value <= INT32_MAX,
        f"{name}={value} is not allowed: a seed must be an integer from 0 to {INT32_MAX} "
        "(JAX keys are built from 32-bit integers, so larger seeds would repeat smaller ones).",
    )


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{name}={value!r} is not allowed; choose one of {list(allowed)}.")


# ----------------------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    kind: ClassVar[str] = "classification"  # or "regression"; what the data's targets are
    multitask: ClassVar[bool] = False  # a fixed set of T tasks with ids (multi-task learning)

    name: str = MISSING
    k_shot: int = 1  # support examples per class (per task for regression and multi-task data)
    k_query: int = 15  # query examples per class (per task for regression and multi-task data)

    def __post_init__(self) -> None:
        _require(self.k_shot >= 1, f"data.k_shot={self.k_shot} is not allowed: it must be >= 1.")
        _require(self.k_query >= 1, f"data.k_query={self.k_query} is not allowed: it must be >= 1.")
        # Support and query are drawn as arrays on the device: bound them before any allocation.
        for key in ("k_shot", "k_query"):
            _at_most(f"data.{key}", getattr(self, key), MAX_EXAMPLES)


@dataclass
class EpisodicDataConfig(DataConfig):
    """N-way K-shot classification episodes: only these data have a number of classes per task."""

    n_way: int = 5  # classes per task

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.n_way >= 2, f"data.n_way={self.n_way} is not allowed: it must be >= 2.")


@dataclass
class SinusoidConfig(DataConfig):
    kind: ClassVar[str] = "regression"

    name: str = "sinusoid"
    k_shot: int = 10
    k_query: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("amplitude", "phase", "x_range"):
            lo, hi = getattr(self, key)
            _require(
                lo < hi,
                f"data.{key}=[{lo}, {hi}] is not allowed: the low end must be below the high end.",
            )


@dataclass
class OmniglotConfig(EpisodicDataConfig):
    name: str = "omniglot"
    root: str | None = None  # folder with images_background.zip and images_evaluation.zip
    split: str = "random"  # random (1100/100/423 characters) | alphabet (background vs evaluation)
    split_seed: int = 0
    split_sizes: tuple[int, int, int] = (1100, 100, 423)  # random split: train/val/test characters
    val_alphabets: int = 5  # alphabet split: last background alphabets held out for meta-val
    rotations: bool = False  # add 90/180/270-degree rotations as new meta-train classes
    image_size: int = 28
    download: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _seed("data.split_seed", self.split_seed)
        _choice("data.split", self.split, ("random", "alphabet"))
        _require(
            self.k_shot + self.k_query <= 20,
            f"data.k_shot + data.k_query = {self.k_shot + self.k_query} is not allowed: Omniglot "
            "has 20 drawings per character, and support and query drawings must be distinct.",
        )
        _require(
            8 <= self.image_size <= 105, f"data.image_size={self.image_size} must be in [8, 105]."
        )


# data=tfds and its presets (conf/data/<option>.yaml): a TFDS dataset with its usual settings.
TFDS_DATA = ("tfds", "cifar_fs", "fc100", "cub", "vgg_flowers", "dtd", "quickdraw", "omniglot_tfds")
# How a TFDS dataset's classes are split: published splits of cifar100, or a seeded shuffle.
TFDS_CLASS_SPLITS = {"seeded": None, "cifar_fs": "cifar100", "fc100": "cifar100"}


@dataclass
class TfdsConfig(EpisodicDataConfig):
    """Any tensorflow-datasets image-classification dataset as N-way K-shot tasks (data/tfds.py).

    name is the TFDS catalogue name (cifar100, or name/config:version), prepared as array_record.
    Its classes go to meta-train/val/test by a published split (classes=cifar_fs: 64/16/20
    classes; fc100: 12/4/4 superclasses) or by a seeded shuffle cut by fractions or sizes.
    """

    name: str = MISSING  # the TFDS catalogue name, e.g. cifar100
    source: str = "tfds"  # marks a TFDS dataset in a saved config, whatever its name
    data_dir: str | None = None  # TFDS data folder; None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    splits: list[str] = field(default_factory=list)  # TFDS splits pooled; empty: all of them
    classes: str = "seeded"  # seeded | cifar_fs | fc100
    split_seed: int = 0  # seeded: the shuffle of the classes
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # seeded: train/val/test
    split_sizes: list[int] = field(default_factory=list)  # seeded: class counts, over fractions
    image_size: int = 84  # images are resized to image_size x image_size
    channels: int = 3  # 3: RGB; 1: grayscale
    invert: bool = False  # 255 - pixel: dark ink on white (Omniglot) becomes bright ink
    max_per_class: int = 0  # keep the first this many examples of each class; 0: all
    image_key: str = "image"  # the TFDS feature holding the image
    label_key: str = "label"  # the TFDS ClassLabel feature holding the class

    def __post_init__(self) -> None:
        super().__post_init__()
        _seed("data.split_seed", self.split_seed)
        _require(
            self.source == "tfds",
            f"data.source={self.source!r} is not allowed: a TFDS dataset has source 'tfds'.",
        )
        _choice("data.classes", self.classes, tuple(TFDS_CLASS_SPLITS))
        needs = TFDS_CLASS_SPLITS[self.classes]
        base = self.name.split("/")[0].split(":")[0]
        _require(
            needs is None or base == needs,
            f"data.classes={self.classes} is a published split of {needs}, not of "
            f"data.name={self.name}; use data.classes=seeded for other datasets.",
        )
        fractions = tuple(self.split_fractions)
        _require(
            len(fractions) == 3
            and min(fractions) >= 0
            and fractions[0] > 0
            and abs(sum(fractions) - 1) < 1e-6,
            f"data.split_fractions={list(fractions)} is not allowed: give three train/val/test "
            "fractions of the classes, each >= 0 (train > 0), that add up to 1, e.g. "
            "[0.7, 0.15, 0.15].",
        )
        sizes = list(self.split_sizes)
        _require(
            not sizes or (len(sizes) == 3 and min(sizes) >= 0),
            f"data.split_sizes={sizes} is not allowed: give [] (use data.split_fractions) or "
            "three non-negative train/val/test class counts.",
        )
        _require(
            8 <= self.image_size <= 512, f"data.image_size={self.image_size} must be in [8, 512]."
        )
        _require(
            self.channels in (1, 3),
            f"data.channels={self.channels} is not allowed: use 3 (RGB) or 1 (grayscale).",
        )
        _require(
            self.max_per_class == 0 or self.max_per_class >= self.k_shot + self.k_query,
            f"data.max_per_class={self.max_per_class} is not allowed: use 0 (every example) or "
            f"at least data.k_shot + data.k_query = {self.k_shot + self.k_query}, since support "
            "and query examples of a class are distinct.",
        )


@dataclass
class OmniglotAlphabetsConfig(DataConfig):
    """Multi-task Omniglot: each alphabet is one task over its own characters (labels 0..C_t-1).

    k_shot and k_query count examples per task, not per class: a task's support and query are
    disjoint batches of (character, drawing) pairs of its alphabet from the split's drawings.
    n_way is not used. Train/val/test split the 20 drawings of every character.
    """

    multitask: ClassVar[bool] = True

    name: str = "omniglot_alphabets"
    k_shot: int = 10  # support examples per task
    k_query: int = 10  # query examples per task (disjoint from the support)
    # Alphabet names or indices (0-29 background, 30-49 evaluation, sorted); empty: the 30
    # background alphabets. exclude_alphabets then drops some (e.g. one held out for transfer).
    alphabets: list[str] = field(default_factory=list)
    exclude_alphabets: list[str] = field(default_factory=list)
    drawings: tuple[int, int, int] = (14, 2, 4)  # train/val/test drawings of each character
    split_seed: int = 0  # which drawings of a character go to which split
    root: str | None = None  # folder with images_background.zip and images_evaluation.zip
    image_size: int = 28
    download: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _seed("data.split_seed", self.split_seed)
        drawings = tuple(self.drawings)
        _require(
            len(drawings) == 3 and min(drawings) >= 1 and sum(drawings) == 20,
            f"data.drawings={list(drawings)} is not allowed: give three train/val/test counts, "
            "each >= 1 (every split holds every character), that add up to the 20 drawings of "
            "an Omniglot character, e.g. [14, 2, 4].",
        )
        _require(
            8 <= self.image_size <= 105, f"data.image_size={self.image_size} must be in [8, 105]."
        )


@dataclass
class MultiSinusoidConfig(DataConfig):
    """T fixed sinusoid tasks y = A sin(f x - phase) with controllable relatedness.

    Each task's (A, f, phase) is relatedness * shared + (1 - relatedness) * its own draw, all
    drawn once from task_seed; a fraction `conflict` of the tasks (the last ones) has its sign
    flipped. k_shot and k_query count points per task. Val and test points are fresh x draws;
    train points too, unless train_points fixes a finite training set per task.
    """

    kind: ClassVar[str] = "regression"
    multitask: ClassVar[bool] = True

    name: str = "multi_sinusoid"
    k_shot: int = 10  # support points per task
    k_query: int = 10  # query points per task (disjoint from the support)
    n_tasks: int = 10
    relatedness: float = 0.5  # 1: all tasks identical (before conflict); 0: independent draws
    conflict: float = 0.0  # fraction of tasks whose targets are negated (negative transfer)
    task_seed: int = 0  # draws the tasks' parameters (and train_points)
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    frequency: tuple[float, float] = (0.5, 2.0)
    x_range: tuple[float, float] = (-5.0, 5.0)
    train_points: int = 0  # > 0: a fixed set of this many train x per task; 0: fresh draws

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.n_tasks >= 1, f"data.n_tasks={self.n_tasks} is not allowed: it must be >= 1.")
        _at_most("data.n_tasks", self.n_tasks, MAX_TASKS)
        _at_most("data.train_points", self.train_points, MAX_EXAMPLES)
        _seed("data.task_seed", self.task_seed)
        for key in ("relatedness", "conflict"):
            value = getattr(self, key)
            _require(0 <= value <= 1, f"data.{key}={value} is not allowed: it must be in [0, 1].")
        for key in ("amplitude", "phase", "frequency"):
            lo, hi = getattr(self, key)
            _require(
                lo <= hi,
                f"data.{key}=[{lo}, {hi}] is not allowed: the low end must not exceed the high "
                "end (equal ends fix the value).",
            )
        lo, hi = self.x_range
        _require(
            lo < hi,
            f"data.x_range=[{lo}, {hi}] is not allowed: the low end must be below the high end.",
        )
        _require(
            self.train_points == 0 or self.train_points >= self.k_shot + self.k_query,
            f"data.train_points={self.train_points} is not allowed: a task's support and query are "
            f"disjoint, so it needs 0 (fresh x draws) or at least data.k_shot + data.k_query = "
            f"{self.k_shot + self.k_query} points.",
        )


# ---------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    name: str = MISSING
    hidden: int = 64

    def __post_init__(self) -> None:
        _require(self.hidden >= 1, f"model.hidden={self.hidden} must be >= 1.")
        _at_most("model.hidden", self.hidden, MAX_WIDTH)


@dataclass
class MLPConfig(ModelConfig):
    name: str = "mlp"
    hidden: int = 40
    layers: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.layers >= 1, f"model.layers={self.layers} must be >= 1.")
        _at_most("model.layers", self.layers, MAX_DEPTH)


@dataclass
class Conv4Config(ModelConfig):
    name: str = "conv4"
    downsample: str = "stride"  # stride (MAML's Omniglot net) | maxpool

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("model.downsample", self.downsample, ("stride", "maxpool"))


CONDITIONINGS = ("none", "concat", "additive", "multihead", "film", "mmoe", "separate")
# Conditionings that pick per-task parameters by the task's index (the others read a vector z).
INDEXED_CONDITIONINGS = ("multihead", "mmoe", "separate")


@dataclass
class ConditioningConfig:
    """How a task descriptor z conditions the model f(y | x, z) (metalearn/conditioning.py)."""

    name: str = "none"
    descriptor: str = "onehot"  # onehot task id | embedding (a learned vector per task)
    embedding_dim: int = 8  # size of the learned embedding

    def __post_init__(self) -> None:
        _choice("conditioning.name", self.name, CONDITIONINGS)
        _choice("conditioning.descriptor", self.descriptor, ("onehot", "embedding"))
        _require(
            self.embedding_dim >= 1,
            f"conditioning.embedding_dim={self.embedding_dim} must be >= 1.",
        )
        _at_most("conditioning.embedding_dim", self.embedding_dim, MAX_WIDTH)


@dataclass
class MMoEConfig(ConditioningConfig):
    """Multi-gate mixture of experts: shared expert trunks, one softmax gate and head per task."""

    name: str = "mmoe"
    experts: int = 4  # shared experts
    expert_hidden: int = 0  # width of each expert's trunk; 0 means the model's width

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.experts >= 1, f"conditioning.experts={self.experts} must be >= 1.")
        _at_most("conditioning.experts", self.experts, MAX_WIDTH)
        _require(
            self.expert_hidden >= 0,
            f"conditioning.expert_hidden={self.expert_hidden} must be >= 0.",
        )
        _at_most("conditioning.expert_hidden", self.expert_hidden, MAX_WIDTH)


# ---------------------------------------------------------------------------------------- algos


@dataclass
class AlgoConfig:
    name: str = MISSING

    def __post_init__(self) -> None:
        pass


@dataclass
class MAMLConfig(AlgoConfig):
    name: str = "maml"
    inner_lr: float = 0.4
    inner_steps: int = 1
    first_order: bool = False
    adapt: list[str] = field(
        default_factory=lambda: ["all"]
    )  # parameter groups the inner loop adapts
    learn_inner_lr: bool = False  # Meta-SGD: a meta-learned inner rate per adapted parameter
    remat: bool = False  # recompute inner steps in the backward pass (long inner loops)
    per_step_lr: bool = False  # MAML++: with learn_inner_lr, one learned rate set per inner step
    multi_step_loss: int = (
        0  # MAML++: query loss after every inner step, annealed to the last over N steps
    )
    first_order_until: int = 0  # MAML++: first-order meta-gradients for the first N training steps

    def __post_init__(self) -> None:
        _positive("algo.inner_lr", self.inner_lr)
        _require(self.inner_steps >= 1, f"algo.inner_steps={self.inner_steps} must be >= 1.")
        _at_most("algo.inner_steps", self.inner_steps, MAX_INNER_STEPS)
        _require(
            not self.per_step_lr or self.learn_inner_lr,
            "algo.per_step_lr=true needs algo.learn_inner_lr=true (the rates it learns per step).",
        )
        _require(
            self.multi_step_loss >= 0, f"algo.multi_step_loss={self.multi_step_loss} must be >= 0."
        )
        _require(
            self.first_order_until >= 0,
            f"algo.first_order_until={self.first_order_until} must be >= 0.",
        )


@dataclass
class ANILConfig(MAMLConfig):
    name: str = "anil"
    adapt: list[str] = field(default_factory=lambda: ["head"])


@dataclass
class MetaSGDConfig(MAMLConfig):
    name: str = "metasgd"
    learn_inner_lr: bool = True


@dataclass
class MAMLPPConfig(MAMLConfig):
    name: str = "mamlpp"
    inner_steps: int = 5
    learn_inner_lr: bool = True
    per_step_lr: bool = True
    multi_step_loss: int = 10000
    first_order_until: int = 5000


@dataclass
class CAVIAConfig(AlgoConfig):
    name: str = "cavia"
    inner_lr: float = 1.0  # step size on the context vector
    inner_steps: int = 2
    context_dim: int = 4  # size of the adapted context vector
    first_order: bool = False

    def __post_init__(self) -> None:
        _positive("algo.inner_lr", self.inner_lr)
        _require(self.inner_steps >= 1, f"algo.inner_steps={self.inner_steps} must be >= 1.")
        _at_most("algo.inner_steps", self.inner_steps, MAX_INNER_STEPS)
        _require(self.context_dim >= 1, f"algo.context_dim={self.context_dim} must be >= 1.")
        _at_most("algo.context_dim", self.context_dim, MAX_WIDTH)


@dataclass
class AmortizedConfig(AlgoConfig):
    name: str = "amortized"
    context_dim: int = 32  # size of the task representation h
    encoder_hidden: int = 64  # hidden units of the per-example encoder MLP

    def __post_init__(self) -> None:
        _require(self.context_dim >= 1, f"algo.context_dim={self.context_dim} must be >= 1.")
        _require(
            self.encoder_hidden >= 1, f"algo.encoder_hidden={self.encoder_hidden} must be >= 1."
        )
        _at_most("algo.context_dim", self.context_dim, MAX_WIDTH)
        _at_most("algo.encoder_hidden", self.encoder_hidden, MAX_WIDTH)


@dataclass
class IMAMLConfig(AlgoConfig):
    name: str = "imaml"
    inner_lr: float = 0.1
    inner_steps: int = 16  # gradient steps on the proximal inner problem
    prox_lambda: float = 2.0  # strength of the pull towards the meta-parameters
    cg_steps: int = 5  # conjugate-gradient iterations for the implicit meta-gradient

    def __post_init__(self) -> None:
        _positive("algo.inner_lr", self.inner_lr)
        _positive("algo.prox_lambda", self.prox_lambda)
        _require(self.inner_steps >= 1, f"algo.inner_steps={self.inner_steps} must be >= 1.")
        _require(self.cg_steps >= 1, f"algo.cg_steps={self.cg_steps} must be >= 1.")
        _at_most("algo.inner_steps", self.inner_steps, MAX_INNER_STEPS)
        _at_most("algo.cg_steps", self.cg_steps, MAX_INNER_STEPS)


@dataclass
class ReptileConfig(AlgoConfig):
    name: str = "reptile"
    inner_lr: float = 0.001
    inner_steps: int = 5
    inner_optimizer: str = "adam"  # adam (beta1=0, as in the paper) | sgd

    def __post_init__(self) -> None:
        _positive("algo.inner_lr", self.inner_lr)
        _require(self.inner_steps >= 1, f"algo.inner_steps={self.inner_steps} must be >= 1.")
        _at_most("algo.inner_steps", self.inner_steps, MAX_INNER_STEPS)
        _choice("algo.inner_optimizer", self.inner_optimizer, ("adam", "sgd"))


@dataclass
class FinetuneConfig(AlgoConfig):
    name: str = "finetune"
    inner_lr: float = 0.01  # fine-tuning learning rate at meta-test
    inner_steps: int = 10  # fine-tuning steps at meta-test
    layer_decay: float = 1.0  # layer-wise lr: block i gets inner_lr * layer_decay**(depth - i)
    freeze: int = 0  # freeze the first `freeze` blocks during fine-tuning
    reinit_head: bool = True  # start fine-tuning from a freshly initialised head
    pretrain_batch: int = 0  # examples per pre-training step; 0 means meta_batch * task size

    def __post_init__(self) -> None:
        _positive("algo.inner_lr", self.inner_lr)
        _require(self.inner_steps >= 0, f"algo.inner_steps={self.inner_steps} must be >= 0.")
        _at_most("algo.inner_steps", self.inner_steps, MAX_INNER_STEPS)
        _at_most("algo.pretrain_batch", self.pretrain_batch, MAX_TASKS)
        _require(
            0 < self.layer_decay <= 1, f"algo.layer_decay={self.layer_decay} must be in (0, 1]."
        )
        _require(self.freeze >= 0, f"algo.freeze={self.freeze} must be >= 0.")
        _require(
            self.pretrain_batch >= 0, f"algo.pretrain_batch={self.pretrain_batch} must be >= 0."
        )


@dataclass
class ProtoNetConfig(AlgoConfig):
    name: str = "protonet"


BLACKBOX_CORES = ("lstm", "snail", "transformer")


@dataclass
class BlackBoxConfig(AlgoConfig):
    """A sequence model that reads the labelled support set (metalearn/algorithms/blackbox.py).
    It has no inner loop, so no inner_steps."""

    name: str = "blackbox"
    core: str = "transformer"  # lstm | snail | transformer
    hidden: int = 128  # lstm: state size; transformer: width; snail: filters per dense block
    layers: int = 2  # lstm: stacked cells; transformer: blocks; snail: (TC, attention) pairs
    heads: int = 4  # transformer: attention heads (hidden must be a multiple)
    tc_layers: int = 0  # snail: dense blocks per TC block; 0: ceil(log2(support size + 1))
    shuffle_support: bool = True  # shuffle the (label-sorted) support sequence in every episode

    def __post_init__(self) -> None:
        _choice("algo.core", self.core, BLACKBOX_CORES)
        _require(self.hidden >= 4, f"algo.hidden={self.hidden} must be >= 4.")
        _require(self.layers >= 1, f"algo.layers={self.layers} must be >= 1.")
        _require(self.heads >= 1, f"algo.heads={self.heads} must be >= 1.")
        _at_most("algo.hidden", self.hidden, MAX_WIDTH)
        _at_most("algo.layers", self.layers, MAX_DEPTH)
        _at_most("algo.heads", self.heads, MAX_WIDTH)
        _at_most("algo.tc_layers", self.tc_layers, MAX_DEPTH)
        _require(
            self.core != "transformer" or self.hidden % self.heads == 0,
            f"algo.hidden={self.hidden} with algo.heads={self.heads} is not allowed: the "
            "transformer splits its width evenly over the heads, so hidden must be a multiple "
            "of heads.",
        )
        _require(self.tc_layers >= 0, f"algo.tc_layers={self.tc_layers} must be >= 0.")


WEIGHTINGS = ("uniform", "static", "uncertainty", "dwa", "minmax", "pcgrad")


@dataclass
class MultitaskConfig(AlgoConfig):
    """Multi-task learning: one conditioned model trained on T tasks at once (CS330 lecture 2)."""

    name: str = "multitask"
    weighting: str = "uniform"  # how per-task losses combine: see WEIGHTINGS
    task_weights: list[float] = field(default_factory=list)  # weighting=static: one w_i per task
    dwa_temperature: float = 2.0  # weighting=dwa: softmax temperature over loss ratios
    minmax_temperature: float = 0.0  # weighting=minmax: 0 is the hard max, > 0 a log-sum-exp
    soft_sharing: float = 0.0  # lambda of the pairwise parameter distance (conditioning=separate)
    # Transfer: start the trunk from another multi-task run's best checkpoint (a run directory),
    # then fine-tune with the first `freeze` blocks fixed and block i's steps scaled by
    # layer_decay**(depth - i); the heads and conditioning start fresh.
    init_from: str | None = None
    freeze: int = 0
    layer_decay: float = 1.0

    def __post_init__(self) -> None:
        _choice("algo.weighting", self.weighting, WEIGHTINGS)
        _positive("algo.dwa_temperature", self.dwa_temperature)
        _require(
            self.minmax_temperature >= 0 and math.isfinite(self.minmax_temperature),
            f"algo.minmax_temperature={self.minmax_temperature} must be a finite number >= 0.",
        )
        _require(
            self.soft_sharing >= 0 and math.isfinite(self.soft_sharing),
            f"algo.soft_sharing={self.soft_sharing} must be a finite number >= 0.",
        )
        _require(self.freeze >= 0, f"algo.freeze={self.freeze} must be >= 0.")
        _require(
            0 < self.layer_decay <= 1, f"algo.layer_decay={self.layer_decay} must be in (0, 1]."
        )
        _require(
            self.weighting == "static" or not self.task_weights,
            "algo.task_weights is only used with algo.weighting=static.",
        )
        _require(
            all(w >= 0 and math.isfinite(w) for w in self.task_weights),
            f"algo.task_weights={list(self.task_weights)} is not allowed: weights must be >= 0.",
        )


# ------------------------------------------------------------------------------------ top level


@dataclass
class TrainConfig:
    steps: int = 10000
    meta_batch: int = 32
    outer_lr: float = 0.001
    log_every: int = 100
    checkpoint_every: int = 1000  # also at every validation and on SIGINT/SIGTERM
    # a wall-time budget (training and validation): at the first step past it, validate, save
    # and test as if train.steps had been reached; for comparisons at equal compute
    max_minutes: float | None = None
    # tasks each device processes at once (vmapped); the meta-batch is walked a chunk at a time.
    # None: all at once on accelerators, a chunk of ~160 images on a CPU (metalearn/task_chunks.py)
    task_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.task_chunk is not None:
            _require(
                self.task_chunk >= 1 and self.meta_batch % self.task_chunk == 0,
                f"train.task_chunk={self.task_chunk} must be a divisor of "
                f"train.meta_batch={self.meta_batch} (or null: chosen for the device).",
            )
        if self.max_minutes is not None:
            _positive("train.max_minutes", self.max_minutes)
        _require(
            self.checkpoint_every >= 1,
            f"train.checkpoint_every={self.checkpoint_every} must be >= 1.",
        )
        _require(self.steps >= 1, f"train.steps={self.steps} must be >= 1.")
        _require(self.meta_batch >= 1, f"train.meta_batch={self.meta_batch} must be >= 1.")
        _at_most("train.meta_batch", self.meta_batch, MAX_TASKS)
        _positive("train.outer_lr", self.outer_lr)
        _require(self.log_every >= 1, f"train.log_every={self.log_every} must be >= 1.")


@dataclass
class EvalConfig:
    every: int = 1000  # validate every this many steps (and at the end)
    num_tasks: int = 600  # meta-test tasks, drawn from a fixed key
    val_tasks: int = 100  # meta-val tasks per validation
    inner_steps: int | None = None  # adaptation steps at test time; None: as in training
    batch: int | None = None  # tasks evaluated at once; None: 50, or ~160 images' worth on a CPU
    seed: int = 12345  # the fixed evaluation key; the same tasks for every run

    def __post_init__(self) -> None:
        _require(self.every >= 1, f"eval.every={self.every} must be >= 1.")
        _require(self.num_tasks >= 1, f"eval.num_tasks={self.num_tasks} must be >= 1.")
        _require(self.val_tasks >= 1, f"eval.val_tasks={self.val_tasks} must be >= 1.")
        for key in ("num_tasks", "val_tasks"):
            _at_most(f"eval.{key}", getattr(self, key), MAX_TASKS)
        _seed("eval.seed", self.seed)
        if self.inner_steps is not None:
            _at_most("eval.inner_steps", self.inner_steps, MAX_INNER_STEPS)
        _require(self.batch is None or self.batch >= 1, f"eval.batch={self.batch} must be >= 1.")
        _require(
            self.inner_steps is None or self.inner_steps >= 0,
            f"eval.inner_steps={self.inner_steps} must be >= 0.",
        )


@dataclass
class Config:
    data: Any = MISSING
    model: Any = MISSING
    conditioning: Any = MISSING
    algo: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    progress: bool = True  # a progress bar on a terminal (never in logs or pipes)
    logger: str = (
        "jsonl"  # jsonl | tensorboard (event files in tensorboard/, besides metrics.jsonl)
    )
    # Join a multi-host job (jax.distributed): every process runs the same command.
    distributed: bool = False
    # Continue a run from its latest checkpoint: a run directory, or true for hydra.run.dir.
    resume: Any = None

    def __post_init__(self) -> None:
        _seed("seed", self.seed)


SCHEMAS: dict[str, dict[str, type]] = {
    "data": {
        "sinusoid": SinusoidConfig,
        "omniglot": OmniglotConfig,
        "omniglot_alphabets": OmniglotAlphabetsConfig,
        "multi_sinusoid": MultiSinusoidConfig,
        **{name: TfdsConfig for name in TFDS_DATA},
    },
    "model": {"mlp": MLPConfig, "conv4": Conv4Config},
    "conditioning": {**{name: ConditioningConfig for name in CONDITIONINGS}, "mmoe": MMoEConfig},
    "algo": {
        "maml": MAMLConfig,
        "anil": ANILConfig,
        "metasgd": MetaSGDConfig,
        "mamlpp": MAMLPPConfig,
        "imaml": IMAMLConfig,
        "cavia": CAVIAConfig,
        "amortized": AmortizedConfig,
        "reptile": ReptileConfig,
        "finetune": FinetuneConfig,
        "protonet": ProtoNetConfig,
        "blackbox": BlackBoxConfig,
        "multitask": MultitaskConfig,
    },
}


def register_schemas() -> None:
    """Store every schema; a YAML option extends its own as `/schema/<group>/<option>@_here_`."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, options in SCHEMAS.items():
        for option, schema in options.items():
            cs.store(group=f"schema/{group}", name=option, node=schema)


def to_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> Config:
    """Build (and so validate) the typed config from a composed DictConfig.

    `overrides` are the command line's `key=value` strings: OmegaConf converts a value to its
    field's type where it can (`2` becomes true for a boolean), so their raw types are checked
    against the schema here. The schema is closed: a key it does not define is refused, also
    when `+` or `++` added it.
    """
    _check_against_schema(cfg, "")
    _check_raw_types(cfg, overrides)
    try:
        typed = OmegaConf.to_object(cfg)
    except (TypeError, ValueError) as error:  # a schema's own check that met a malformed value
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"The configuration has a malformed value: {error}.") from None
    _check_integers(typed, "")
    _check_combination(typed)
    return typed


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """`key=value` strings as (key, value) pairs, parsed as Hydra parses the command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parsed = []
    for text in overrides:
        try:
            override = OverridesParser.create().parse_override(text)
        except HydraException as error:
            raise ConfigError(f"The override {text!r} does not parse: {error}") from None
        if override.is_delete() or override.is_sweep_override():
            raise ConfigError(
                f"The override {text!r} is not allowed here: give plain key=value settings."
            )
        parsed.append((override.key_or_group, override.value()))
    return parsed


def from_yaml_with_overrides(saved: DictConfig | dict, overrides: list[str]) -> Config:
    """Rebuild a run's typed config from its saved YAML plus `key=value` overrides (for eval).

    Settings the saved file holds that this version's schema no longer has (written by an older
    metalearn) are dropped with a warning; the overrides must name settings the schema has.
    """
    base = OmegaConf.structured(Config)
    for group, options in SCHEMAS.items():
        node = saved.get(group)
        name = node.get("name") if isinstance(node, (dict, DictConfig)) else None
        if isinstance(node, (dict, DictConfig)) and node.get("source") == "tfds":
            name = "tfds"  # data.name is then a TFDS catalogue name, not a metalearn option
        if name not in options:
            raise ConfigError(
                f"The saved configuration names {group}={name!r}, which is not one of this "
                f"version's options ({sorted(options)}); the run's .hydra/config.yaml is damaged "
                "or from another version."
            )
        base[group] = OmegaConf.structured(options[name])
    if isinstance(saved, DictConfig):
        saved = OmegaConf.to_container(saved, resolve=False)
    try:
        merged = OmegaConf.merge(base, _drop_unknown(base, saved, ""))
        with open_dict(merged):  # unknown keys reach the schema check, which names them
            for key, value in parse_overrides(overrides):
                _require(
                    not isinstance(OmegaConf.select(merged, key), DictConfig),
                    f"{key}={value} is not allowed: {key} is a group of settings, and the run "
                    f"keeps its own choice; set one of its keys instead ({key}.KEY=VALUE).",
                )
                OmegaConf.update(merged, key, value, merge=False, force_add=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"The configuration does not fit the schema: {error}") from None
    return to_config(merged, overrides)


def _drop_unknown(schema: DictConfig, saved: dict, path: str) -> dict:
    kept = {}
    for key, value in saved.items():
        if key not in schema.keys():  # `in` alone is false for a MISSING value
            log.warning("ignoring %s%s: a setting this metalearn no longer has", path, key)
            continue
        child = schema._get_node(key)
        if isinstance(child, DictConfig) and isinstance(value, dict):
            value = _drop_unknown(child, value, f"{path}{key}.")
        kept[key] = value
    return kept


def _schema_of(node: DictConfig) -> type | None:
    kind = OmegaConf.get_type(node)
    return kind if dataclasses.is_dataclass(kind) else None


@functools.cache
def _type_hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _check_against_schema(node: DictConfig, path: str) -> None:
    """Unknown keys and fixed-length tuples of wrong length, before any schema code runs."""
    schema = _schema_of(node)
    if schema is not None:
        known = [f.name for f in dataclasses.fields(schema)]
        for key in node.keys():
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {path}{close[0]}?" if close else "."
                owner = path[:-1] or "the top level"
                if "name" in known:
                    owner = f"{owner}={node.get('name')}"
                raise ConfigError(
                    f"{path}{key} is not a setting of {owner}, so it would be ignored: the "
                    f"settings are {known}{hint}"
                )
        hints = _type_hints(schema)
        for key in known:
            length = _tuple_length(hints.get(key))
            value = node._get_node(key)
            if length is not None and isinstance(value, ListConfig) and len(value) != length:
                raise ConfigError(
                    f"{path}{key}={list(value)} is not allowed: it takes exactly {length} values."
                )
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _check_against_schema(child, f"{path}{key}.")


def _tuple_length(hint: Any) -> int | None:
    """n for tuple[X, Y, ...] of fixed length n (not tuple[X, ...]), else None."""
    if typing.get_origin(hint) is not tuple:
        return None
    args = typing.get_args(hint)
    return None if Ellipsis in args else len(args)


def _check_raw_types(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Booleans take booleans only (OmegaConf would read `2` or `"yes"` as true)."""
    for key, value in parse_overrides([o for o in overrides if "=" in o]):
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig) or leaf not in parent.keys():
            continue  # a config group (data=omniglot), or a key the schema check refuses
        if isinstance(parent._get_node(leaf), BooleanNode):
            _require(
                isinstance(value, bool),
                f"{key}={value} is not allowed: it is a boolean, so give true or false.",
            )


def _check_integers(value: Any, path: str) -> None:
    """Every integer fits JAX's 32-bit integers (2**31 and up would overflow or alias)."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _check_integers(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_integers(item, path)
    elif isinstance(value, int) and not isinstance(value, bool):
        _require(
            -INT32_MAX <= value <= INT32_MAX,
            f"{path}={value} is not allowed: metalearn's integers are 32-bit, so a value must lie "
            f"within ±{INT32_MAX}.",
        )


# Algorithms that feed a task descriptor through the conditioning group.
CONDITIONED_ALGOS = ("multitask", "cavia", "amortized")


def _check_combination(cfg: Config) -> None:
    """Checks that span groups: the data's task type against the algorithm and model."""
    _choice("logger", cfg.logger, ("jsonl", "tensorboard"))
    multitask_algo = cfg.algo.name == "multitask"
    _require(
        multitask_algo == cfg.data.multitask,
        f"algo={cfg.algo.name} with data={cfg.data.name} is not allowed: "
        + (
            "data={0} is a fixed set of tasks for multi-task learning, which algo=multitask "
            "trains; meta-learning algorithms need a task distribution (e.g. data=omniglot)."
            if cfg.data.multitask
            else "algo=multitask needs multi-task data (e.g. data=omniglot_alphabets or "
            "data=multi_sinusoid)."
        ).format(cfg.data.name),
    )
    _require(
        cfg.conditioning.name == "none" or cfg.algo.name in CONDITIONED_ALGOS,
        f"conditioning={cfg.conditioning.name} is not used by algo={cfg.algo.name}; task "
        f"conditioning works with algo in {list(CONDITIONED_ALGOS)} (or use conditioning=none).",
    )
    regression = cfg.data.kind == "regression"
    if regression:
        _require(
            cfg.algo.name != "protonet",
            "algo=protonet needs a classification dataset (data=omniglot); "
            f"data={cfg.data.name} is regression.",
        )
        _require(
            cfg.model.name == "mlp",
            f"model={cfg.model.name} expects images; data={cfg.data.name} needs model=mlp.",
        )
    elif cfg.algo.name == "finetune":
        _require(
            cfg.algo.reinit_head,
            "algo.reinit_head=false is not allowed with classification data: the pre-trained "
            "head predicts the meta-train classes, so a test task needs a new head "
            "(algo.reinit_head=true).",
        )
    if cfg.algo.name == "finetune" and cfg.model.name == "conv4":
        _require(
            cfg.algo.freeze <= 4,
            f"algo.freeze={cfg.algo.freeze} is more blocks than conv4 has (4).",
        )
