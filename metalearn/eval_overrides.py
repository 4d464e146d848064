"""Which `key=value` overrides `metalearn eval` accepts: those that change what it evaluates.

eval rebuilds a run from its saved config and re-tests one of its checkpoints; it trains
nothing. A setting that only training reads (train.steps, eval.every, algo.init_from,
data.augment, ...) would be accepted and change nothing, so it is refused, naming the setting
that eval reads instead where there is one (train.k_shot -> data.k_shot).

What counts as training-only: every train.* setting but train.precision (the model computes in
it at test time too); eval.every and eval.val_tasks (validation during training); the top-level
settings of a training process (seed only draws the initial parameters, which the checkpoint
replaces); the settings an option declares in its schema's `training_only` class variable
(data options do: augmentation, Omniglot's rotations and background), and algo.init_from /
algo.init_groups, which every algorithm has.
"""

from __future__ import annotations

from collections.abc import Sequence

from metalearn.checks import ConfigError

READ_BY_EVAL = {"train": ("precision",)}
TRAINING_ONLY = {
    "eval": ("every", "val_tasks"),
    "algo": ("init_from", "init_groups"),
}
TOP_LEVEL_TRAINING_ONLY = ("seed", "progress", "logger", "distributed", "resume")
# the setting eval reads for what a training-only one sets for training
INSTEAD = {
    "train.n_way": "data.n_way",
    "train.k_shot": "data.k_shot",
    "train.k_query": "data.k_query",
    "train.task_chunk": "eval.batch",
    "eval.val_tasks": "eval.num_tasks",
    "seed": "eval.seed",
}


def check_eval_overrides(run, overrides: Sequence[str], split: str = "test") -> None:
    """Refuse (ConfigError) the first override of `run` (a RunDir) that eval would ignore.
    A run whose saved config cannot be read is left to the loader, which names the damage."""
    from metalearn.config import parse_overrides

    settings = [o for o in overrides if "=" in o]  # the loader refuses the others
    parsed = parse_overrides(settings)
    options = _schemas(run) if parsed else {}
    for text, (key, _) in zip(settings, parsed, strict=True):
        if _training_only(key, options):
            instead = INSTEAD.get(key)
            raise ConfigError(
                f"{text} is not allowed with `metalearn eval`: {key} only affects training, and "
                "eval re-tests the trained checkpoint without training, so it would be ignored. "
                + (
                    f"The setting eval reads for this is {instead} (e.g. {instead}=VALUE)."
                    if instead
                    else "Leave it out (it takes effect in `metalearn train`)."
                )
            )


def _training_only(key: str, schemas: dict[str, type]) -> bool:
    group, _, setting = key.partition(".")
    if not setting:
        return group in TOP_LEVEL_TRAINING_ONLY
    name = setting.split(".")[0]
    if group == "train":
        return name not in READ_BY_EVAL["train"]
    declared = getattr(schemas.get(group), "training_only", ())
    return name in TRAINING_ONLY.get(group, ()) or name in declared


def _schemas(run) -> dict[str, type]:
    """The schema of each group option the run's saved config names ({} where unreadable)."""
    from metalearn.config import schemas
    from metalearn.registry import GROUPS
    from metalearn.rundir import RunDirError, read_run_yaml

    try:
        saved = read_run_yaml(run.path / ".hydra" / "config.yaml")
    except RunDirError:
        return {}
    found = {}
    for group in GROUPS:
        node = saved.get(group) if isinstance(saved, dict) else None
        if not isinstance(node, dict):
            continue
        options = schemas(group)
        # a TFDS dataset's data.name is its catalogue name; data.source names the option
        name = node.get("source") if node.get("source") in options else node.get("name")
        if isinstance(name, str) and name in options:
            found[group] = options[name]
    return found
