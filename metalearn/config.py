"""Typed configuration: one dataclass schema per config group, registered in Hydra's ConfigStore.

The YAML files in conf/ extend these schemas (each lists its schema first in `defaults`), so an
unknown key or a wrong type is rejected by OmegaConf, and `__post_init__` runs the semantic checks
when `OmegaConf.to_object` builds the dataclasses. JAX code only ever sees these dataclasses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


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


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{name}={value!r} is not allowed; choose one of {list(allowed)}.")


# ----------------------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    name: str = MISSING
    n_way: int = 5  # classes per task (classification only)
    k_shot: int = 1  # support examples per class (per task for regression)
    k_query: int = 15  # query examples per class (per task for regression)

    def __post_init__(self) -> None:
        _require(self.k_shot >= 1, f"data.k_shot={self.k_shot} is not allowed: it must be >= 1.")
        _require(self.k_query >= 1, f"data.k_query={self.k_query} is not allowed: it must be >= 1.")


@dataclass
class SinusoidConfig(DataConfig):
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
class OmniglotConfig(DataConfig):
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
        _require(self.n_way >= 2, f"data.n_way={self.n_way} is not allowed: it must be >= 2.")
        _choice("data.split", self.split, ("random", "alphabet"))
        _require(
            self.k_shot + self.k_query <= 20,
            f"data.k_shot + data.k_query = {self.k_shot + self.k_query} is not allowed: Omniglot "
            "has 20 drawings per character, and support and query drawings must be distinct.",
        )
        _require(
            8 <= self.image_size <= 105, f"data.image_size={self.image_size} must be in [8, 105]."
        )


# ---------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    name: str = MISSING
    hidden: int = 64

    def __post_init__(self) -> None:
        _require(self.hidden >= 1, f"model.hidden={self.hidden} must be >= 1.")


@dataclass
class MLPConfig(ModelConfig):
    name: str = "mlp"
    hidden: int = 40
    layers: int = 2


@dataclass
class Conv4Config(ModelConfig):
    name: str = "conv4"
    downsample: str = "stride"  # stride (MAML's Omniglot net) | maxpool

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("model.downsample", self.downsample, ("stride", "maxpool"))


@dataclass
class ConditioningConfig:
    name: str = "none"

    def __post_init__(self) -> None:
        _choice("conditioning.name", self.name, ("none",))


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


@dataclass
class ReptileConfig(AlgoConfig):
    name: str = "reptile"
    inner_lr: float = 0.001
    inner_steps: int = 5
    inner_optimizer: str = "adam"  # adam (beta1=0, as in the paper) | sgd

    def __post_init__(self) -> None:
        _positive("algo.inner_lr", self.inner_lr)
        _require(self.inner_steps >= 1, f"algo.inner_steps={self.inner_steps} must be >= 1.")
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


# ------------------------------------------------------------------------------------ top level


@dataclass
class TrainConfig:
    steps: int = 10000
    meta_batch: int = 32
    outer_lr: float = 0.001
    log_every: int = 100
    checkpoint_every: int = 1000  # also at every validation and on SIGINT/SIGTERM

    def __post_init__(self) -> None:
        _require(
            self.checkpoint_every >= 1,
            f"train.checkpoint_every={self.checkpoint_every} must be >= 1.",
        )
        _require(self.steps >= 1, f"train.steps={self.steps} must be >= 1.")
        _require(self.meta_batch >= 1, f"train.meta_batch={self.meta_batch} must be >= 1.")
        _positive("train.outer_lr", self.outer_lr)
        _require(self.log_every >= 1, f"train.log_every={self.log_every} must be >= 1.")


@dataclass
class EvalConfig:
    every: int = 500  # validate every this many steps (and at the end)
    num_tasks: int = 600  # meta-test tasks, drawn from a fixed key
    val_tasks: int = 100  # meta-val tasks per validation
    inner_steps: int | None = None  # adaptation steps at test time; None: as in training
    batch: int = 50  # tasks evaluated at once
    seed: int = 12345  # the fixed evaluation key; the same tasks for every run

    def __post_init__(self) -> None:
        _require(self.every >= 1, f"eval.every={self.every} must be >= 1.")
        _require(self.num_tasks >= 1, f"eval.num_tasks={self.num_tasks} must be >= 1.")
        _require(self.val_tasks >= 1, f"eval.val_tasks={self.val_tasks} must be >= 1.")
        _require(self.batch >= 1, f"eval.batch={self.batch} must be >= 1.")
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


SCHEMAS: dict[str, dict[str, type]] = {
    "data": {"sinusoid": SinusoidConfig, "omniglot": OmniglotConfig},
    "model": {"mlp": MLPConfig, "conv4": Conv4Config},
    "conditioning": {"none": ConditioningConfig},
    "algo": {
        "maml": MAMLConfig,
        "anil": ANILConfig,
        "metasgd": MetaSGDConfig,
        "mamlpp": MAMLPPConfig,
        "imaml": IMAMLConfig,
        "reptile": ReptileConfig,
        "finetune": FinetuneConfig,
        "protonet": ProtoNetConfig,
    },
}


def register_schemas() -> None:
    """Store every schema; a YAML option extends its own as `/schema/<group>/<option>@_here_`."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, options in SCHEMAS.items():
        for option, schema in options.items():
            cs.store(group=f"schema/{group}", name=option, node=schema)


def to_config(cfg: DictConfig) -> Config:
    """Build (and so validate) the typed config from a composed DictConfig."""
    typed = OmegaConf.to_object(cfg)
    _check_combination(typed)
    return typed


def from_yaml_with_overrides(saved: DictConfig, overrides: list[str]) -> Config:
    """Rebuild a run's typed config from its saved YAML plus `key=value` overrides (for eval)."""
    base = OmegaConf.structured(Config)
    for group, options in SCHEMAS.items():
        name = saved[group]["name"]
        base[group] = OmegaConf.structured(options[name])
    merged = OmegaConf.merge(base, saved, OmegaConf.from_dotlist(overrides))
    return to_config(merged)


def _check_combination(cfg: Config) -> None:
    """Checks that span groups: the data's task type against the algorithm and model."""
    _choice("logger", cfg.logger, ("jsonl", "tensorboard"))
    regression = cfg.data.name == "sinusoid"
    if regression:
        _require(
            cfg.algo.name != "protonet",
            "algo=protonet needs a classification dataset (data=omniglot); "
            f"data={cfg.data.name} is regression.",
        )
        _require(
            cfg.model.name == "mlp",
            f"model={cfg.model.name} expects images; data=sinusoid needs model=mlp.",
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
