"""algo.init_from: start some parameter groups from another run's best checkpoint.

Any algorithm, from any run of the same model: the checkpoint's arrays are read by tree path
(RunDir.read_arrays), so the other run's dataset is never rebuilt. A leaf of this run is
matched to a stored array through its path below the model: the model's own parameter paths
(with their group labels) are suffixes of the full paths (['init']['blocks'][0]['w'] in
Meta-SGD, ['model']['model']['blocks'][0]['w'] in a multi-task run, ['blocks'][0]['w'] in a
fine-tuning run), so pre-training with one algorithm and meta-training with another works.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.checks import ConfigError
from metalearn.models import Model
from metalearn.models.groups import select
from metalearn.rundir import RunDir, RunDirError


def model_labels(model: Model) -> dict[str, str]:
    """The model's own parameter paths (jax.tree_util.keystr) and their group labels."""
    template = jax.eval_shape(lambda key: model.init(key, 1), jax.random.PRNGKey(0))
    flat = jax.tree_util.tree_flatten_with_path(model.groups(template))[0]
    return {jax.tree_util.keystr(path): label for path, label in flat}


def _ends_with(key: str, tail: str) -> bool:
    """Whether the path `key` ends with the whole path components `tail` ("...]['w']")."""
    return key.endswith(tail) and (len(key) == len(tail) or key[-len(tail) - 1] == "]")


def _model_path(key: str, model_paths) -> str | None:
    """The longest model path that ends `key` (None: the leaf is not a model parameter)."""
    tails = [tail for tail in model_paths if _ends_with(key, tail)]
    return max(tails, key=len) if tails else None


def load_pretrained(params, model: Model, run_dir: str, groups: list[str]):
    """params with the leaves of the model groups `groups` taken from run_dir's best checkpoint.

    Every selected leaf must be found there exactly once, with its shape; otherwise a
    ConfigError names the leaf.
    """
    try:
        stored = RunDir(run_dir).read_arrays("best")
    except RunDirError as error:
        raise ConfigError(f"algo.init_from={run_dir} cannot be read: {error}") from None
    labels = model_labels(model)
    wanted = select(labels, groups, "algo.init_groups")  # rejects groups the model lacks
    loaded = 0

    def take(path, leaf):
        nonlocal loaded
        name = jax.tree_util.keystr(path)
        below = _model_path(name, labels)
        if below is None or not wanted[below]:
            return leaf
        matches = [key for key in stored if _ends_with(key, below)]
        if len(matches) != 1:
            raise ConfigError(
                f"algo.init_from={run_dir} cannot initialise this model: {name} has "
                f"{'no counterpart' if not matches else f'{len(matches)} candidates'} in its "
                f"best checkpoint{'' if not matches else ' (' + ', '.join(matches[:3]) + ')'}. "
                "It needs a run of the same model whose parameters include those groups "
                f"(algo.init_groups={list(groups)})."
            )
        have = stored[matches[0]]
        if have.shape != tuple(np.shape(leaf)):
            raise ConfigError(
                f"algo.init_from={run_dir} cannot initialise this model: {name} is "
                f"{list(np.shape(leaf))} here but {matches[0]} is {list(have.shape)} there "
                "(another model size, or per-task parameters stacked over tasks)."
            )
        loaded += 1
        return jnp.asarray(have, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(take, params)
    if not loaded:
        raise ConfigError(
            f"algo.init_from={run_dir} cannot initialise this model: none of its parameters is "
            f"in the groups algo.init_groups={list(groups)}."
        )
    return params
