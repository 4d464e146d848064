"""Typed configuration: the top-level schema, and the checks every composed config goes through.

Each option of a config group (data, model, conditioning, algo) owns its dataclass schema beside
its code and registers it (metalearn/registry.py); `register_schemas` stores them all in Hydra's
ConfigStore, and the YAML files in conf/ extend them (each lists its schema first in
`defaults`), so an unknown key or a wrong type is rejected, and `__post_init__` runs the
semantic checks when `OmegaConf.to_object` builds the dataclasses. Checks that span groups read
the options' declared capabilities, never their names. JAX code only ever sees dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import BooleanNode

from metalearn import registry
from metalearn.checks import (
    INT32_MAX,
    MAX_EXAMPLES,
    MAX_INNER_STEPS,
    MAX_TASKS,
    ConfigError,
    at_most,
    check_seed,
    choice,
    positive,
    require,
)

log = logging.getLogger("metalearn")

__all__ = ["Config", "ConfigError", "EvalConfig", "TrainConfig", "schemas", "to_config"]


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
    # The shape of training episodes when it differs from the test episodes' (data.n_way,
    # data.k_shot, data.k_query; None: the same), as ProtoNets train 60-way for 20-way tests.
    n_way: int | None = None
    k_shot: int | None = None
    k_query: int | None = None
    # float32 | bf16: models compute in bfloat16 with float32 parameters (models/precision.py)
    precision: str = "float32"

    def __post_init__(self) -> None:
        from metalearn.models.precision import PRECISIONS

        choice("train.precision", self.precision, PRECISIONS)
        if self.n_way is not None:
            require(self.n_way >= 2, f"train.n_way={self.n_way} is not allowed: it must be >= 2.")
        for key in ("k_shot", "k_query"):
            value = getattr(self, key)
            if value is not None:
                require(value >= 1, f"train.{key}={value} is not allowed: it must be >= 1.")
                at_most(f"train.{key}", value, MAX_EXAMPLES)
        if self.task_chunk is not None:
            require(
                self.task_chunk >= 1 and self.meta_batch % self.task_chunk == 0,
                f"train.task_chunk={self.task_chunk} must be a divisor of "
                f"train.meta_batch={self.meta_batch} (or null: chosen for the device).",
            )
        if self.max_minutes is not None:
            positive("train.max_minutes", self.max_minutes)
        require(
            self.checkpoint_every >= 1,
            f"train.checkpoint_every={self.checkpoint_every} must be >= 1.",
        )
        require(self.steps >= 1, f"train.steps={self.steps} must be >= 1.")
        require(self.meta_batch >= 1, f"train.meta_batch={self.meta_batch} must be >= 1.")
        at_most("train.meta_batch", self.meta_batch, MAX_TASKS)
        positive("train.outer_lr", self.outer_lr)
        require(self.log_every >= 1, f"train.log_every={self.log_every} must be >= 1.")


@dataclass
class EvalConfig:
    every: int = 1000  # validate every this many steps (and at the end)
    num_tasks: int = 600  # meta-test tasks, drawn from a fixed key
    val_tasks: int = 100  # meta-val tasks per validation
    inner_steps: int | None = None  # adaptation steps at test time; None: as in training
    batch: int | None = None  # tasks evaluated at once; None: 50, or ~160 images' worth on a CPU
    seed: int = 12345  # the fixed evaluation key; the same tasks for every run

    def __post_init__(self) -> None:
        require(self.every >= 1, f"eval.every={self.every} must be >= 1.")
        require(self.num_tasks >= 1, f"eval.num_tasks={self.num_tasks} must be >= 1.")
        require(self.val_tasks >= 1, f"eval.val_tasks={self.val_tasks} must be >= 1.")
        for key in ("num_tasks", "val_tasks"):
            at_most(f"eval.{key}", getattr(self, key), MAX_TASKS)
        check_seed("eval.seed", self.seed)
        if self.inner_steps is not None:
            at_most("eval.inner_steps", self.inner_steps, MAX_INNER_STEPS)
        require(self.batch is None or self.batch >= 1, f"eval.batch={self.batch} must be >= 1.")
        require(
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
    # jsonl (metrics.jsonl only) | tensorboard | wandb | mlflow: metalearn/loggers.py; each
    # writes beside metrics.jsonl, in the run directory
    logger: str = "jsonl"
    # Join a multi-host job (jax.distributed): every process runs the same command.
    distributed: bool = False
    # Continue a run from its latest checkpoint: a run directory, or true for hydra.run.dir.
    resume: Any = None

    def __post_init__(self) -> None:
        check_seed("seed", self.seed)


def schemas(group: str) -> dict[str, type]:
    """Every registered option of a config group and its schema, by option name."""
    return {name: option.schema for name, option in registry.options(group).items()}


def register_schemas() -> None:
    """Store every schema; a YAML option extends its own as `/schema/<group>/<option>@_here_`."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group in registry.GROUPS:
        for option, schema in schemas(group).items():
            cs.store(group=f"schema/{group}", name=option, node=schema)


# What a command does with a config, which decides the checks it needs: "train" checks every
# setting; "evaluate" (`metalearn eval`, load_run: they train nothing) skips the checks declared
# training-only (TRAINING_CHECKS), such as the shape of training episodes, which an evaluation
# never draws; its own settings (data.*, eval.*) are checked as for training.
PURPOSES = ("train", "evaluate")


def check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise ValueError(f"purpose={purpose!r}: use one of {PURPOSES}")  # a caller's bug


def to_config(cfg: DictConfig, overrides: Sequence[str] = (), purpose: str = "train") -> Config:
    """Build (and so validate) the typed config from a composed DictConfig.

    `overrides` are the command line's `key=value` strings: OmegaConf converts a value to its
    field's type where it can (`2` becomes true for a boolean), so their raw types are checked
    against the schema here. The schema is closed: a key it does not define is refused, also
    when `+` or `++` added it. `purpose` (PURPOSES) says which checks apply.
    """
    check_purpose(purpose)
    _check_against_schema(cfg, "")
    _check_raw_types(cfg, overrides)
    try:
        typed = OmegaConf.to_object(cfg)
    except (TypeError, ValueError) as error:  # a schema's own check that met a malformed value
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"The configuration has a malformed value: {error}.") from None
    _check_integers(typed, "")
    _check_combination(typed, purpose)
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


def from_yaml_with_overrides(
    saved: DictConfig | dict, overrides: list[str], purpose: str = "train"
) -> Config:
    """Rebuild a run's typed config from its saved YAML plus `key=value` overrides (to resume
    it, purpose="train", or to evaluate it, purpose="evaluate": see PURPOSES).

    Settings the saved file holds that this version's schema no longer has (written by an older
    metalearn) are dropped with a warning; the overrides must name settings the schema has.
    """
    base = OmegaConf.structured(Config)
    for group in registry.GROUPS:
        options = schemas(group)
        node = saved.get(group)
        name = node.get("name") if isinstance(node, (dict, DictConfig)) else None
        if isinstance(node, (dict, DictConfig)) and node.get("source") in options:
            name = node["source"]  # data.name is then e.g. a TFDS catalogue name, not an option
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
                require(
                    not isinstance(OmegaConf.select(merged, key), DictConfig),
                    f"{key}={value} is not allowed: {key} is a group of settings, and the run "
                    f"keeps its own choice; set one of its keys instead ({key}.KEY=VALUE).",
                )
                OmegaConf.update(merged, key, value, merge=False, force_add=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"The configuration does not fit the schema: {error}") from None
    return to_config(merged, overrides, purpose)


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
            require(
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
        require(
            -INT32_MAX <= value <= INT32_MAX,
            f"{path}={value} is not allowed: metalearn's integers are 32-bit, so a value must lie "
            f"within ±{INT32_MAX}.",
        )


def _check_combination(cfg: Config, purpose: str = "train") -> None:
    """Checks that span groups, from the capabilities the options declare (their schemas'
    class variables: data kind, multitask and inputs; a model's inputs; an algorithm's kinds,
    multitask_data and conditioned), then each option's own `check_with`; the training-only
    checks (TRAINING_CHECKS) for purpose="train" only."""
    from metalearn.loggers import check_logger

    check_logger(cfg.logger)
    _check_paths(cfg, purpose)
    data, model, algo = cfg.data, cfg.model, cfg.algo
    require(
        algo.multitask_data == data.multitask,
        f"algo={algo.name} with data={data.name} is not allowed: "
        + (
            f"data={data.name} is a fixed set of tasks for multi-task learning, which "
            f"{_names_with('multitask_data', bool)} train; meta-learning algorithms need a task "
            "distribution (e.g. data=omniglot)."
            if data.multitask
            else f"algo={algo.name} needs multi-task data, a fixed set of tasks with ids (e.g. "
            "data=omniglot_alphabets or data=multi_sinusoid)."
        ),
    )
    require(
        cfg.conditioning.name == "none" or algo.conditioned,
        f"conditioning={cfg.conditioning.name} is not used by algo={algo.name}; task "
        f"conditioning works with algo in {_names_with('conditioned', bool)} (or use "
        "conditioning=none).",
    )
    require(
        data.kind in algo.kinds,
        f"algo={algo.name} needs a {' or '.join(algo.kinds)} dataset; data={data.name} is "
        f"{data.kind}.",
    )
    require(
        data.inputs in model.inputs,
        f"model={model.name} takes {' or '.join(model.inputs)}; data={data.name} has "
        f"{data.inputs}; models that take {data.inputs}: "
        f"{_names_with('inputs', lambda inputs: data.inputs in inputs, 'model')}.",
    )
    norm = getattr(model, "norm", "transductive")  # models without batch norm have no mode
    require(
        norm in algo.norms,
        f"model.norm={norm} is not allowed with algo={algo.name}, which supports "
        f"{' or '.join(algo.norms)} batch norm; inductive batch norm works with "
        f"algo in {_names_with('norms', lambda norms: 'inductive' in norms)}.",
    )
    if data.padded:
        require(
            algo.reads_padded,
            f"algo={algo.name} cannot train on data={data.name}: its episodes vary in way and "
            "shot and are padded to one shape, and this learner does not read the padding mask "
            f"(types.Split.mask). Learners that do: algo in {_names_with('reads_padded', bool)}.",
        )
        require(
            model.reads_padded,
            f"model={model.name} cannot train on data={data.name}: its episodes are padded to "
            "one shape, and this model's batch statistics would count the padding. Models "
            f"that leave it out: model in {_names_with('reads_padded', bool, 'model')}.",
        )
    if purpose == "train":
        for check in TRAINING_CHECKS:
            check(cfg)
    for group in (cfg.data, cfg.model, cfg.conditioning, cfg.algo):
        check_with = getattr(group, "check_with", None)
        if check_with is not None:
            check_with(cfg)


def _check_paths(cfg: Config, purpose: str = "train") -> None:
    """A path setting that is empty (or only spaces) is refused: the system would read it as the
    current folder, which the user did not name. Data options name theirs in `locations`;
    algo.init_from is read by training only."""
    paths = {f"data.{key}": getattr(cfg.data, key) for key in type(cfg.data).locations}
    if purpose == "train":
        paths["algo.init_from"] = cfg.algo.init_from
    for name, value in paths.items():
        default = "start from scratch" if name == "algo.init_from" else "metalearn looks for it"
        require(
            not isinstance(value, str) or value.strip() != "",
            f"{name}={value!r} is not allowed: an empty path would be taken as the current "
            f"folder. Give the path itself (. for the current folder), or null ({default}).",
        )


def training_shape(cfg: Config) -> tuple[int, int, int] | None:
    """(n_way, k_shot, k_query) of training episodes when train.* sets them; None otherwise."""
    train = cfg.train
    if train.n_way is None and train.k_shot is None and train.k_query is None:
        return None
    data = cfg.data
    return (
        data.n_way if train.n_way is None else train.n_way,
        data.k_shot if train.k_shot is None else train.k_shot,
        data.k_query if train.k_query is None else train.k_query,
    )


def _check_training_shape(cfg: Config) -> None:
    from metalearn.data.base import EpisodicDataConfig

    if all(getattr(cfg.train, k) is None for k in ("n_way", "k_shot", "k_query")):
        return
    data, algo = cfg.data, cfg.algo
    require(
        isinstance(data, EpisodicDataConfig),
        f"train.n_way / train.k_shot / train.k_query set the shape of training episodes, which "
        f"only N-way K-shot classification data have; data={data.name} has no episodes (leave "
        "them unset).",
    )
    n_way = cfg.train.n_way
    require(
        n_way is None or n_way == data.n_way or algo.any_way,
        f"train.n_way={n_way} differs from data.n_way={data.n_way}, which algo={algo.name} "
        f"cannot do: its outputs are sized for data.n_way classes. Training with another number "
        f"of classes works with algo in {_names_with('any_way', bool)}.",
    )


# Checks of settings that only training reads: skipped for purpose="evaluate" (PURPOSES).
TRAINING_CHECKS = (_check_training_shape,)


def _names_with(capability: str, holds, group: str = "algo") -> list[str]:
    """The options of `group` whose declared `capability` satisfies `holds`."""
    return sorted(
        name for name, schema in schemas(group).items() if holds(getattr(schema, capability))
    )
