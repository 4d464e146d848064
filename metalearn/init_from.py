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

# A path as its components: "['blocks'][0]['w']" -> ("['blocks']", "[0]", "['w']").
_split = jax.tree_util.keystr


def _parts(path) -> tuple[str, ...]:
    return tuple(_split((key,)) for key in path)


def model_labels(model: Model) -> dict[tuple[str, ...], str]:
    """The model's own parameter paths (as components) and their group labels."""
    template = jax.eval_shape(lambda key: model.init(key, 1), jax.random.PRNGKey(0))
    labels = model.groups(template)
    flat = jax.tree_util.tree_flatten_with_path(labels)[0]
    return {_parts(path): label for path, label in flat}


def _model_path(parts: tuple[str, ...], model_paths) -> tuple[str, ...] | None:
    """The longest model path that ends `parts` (None: the leaf is not a model parameter)."""
    for start in range(len(parts)):
        if parts[start:] in model_paths:
            return parts[start:]
    return None


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
    stored_parts = {tuple(_split_key(key)): key for key in stored}
    loaded = 0

    def take(path, leaf):
        nonlocal loaded
        below = _model_path(_parts(path), labels)
        if below is None or not wanted[below]:
            return leaf
        matches = [key for parts, key in stored_parts.items() if parts[-len(below) :] == below]
        name = _split(path)
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


def _split_key(key: str) -> list[str]:
    """A stored keystr as components: "['a'][0]" -> ["['a']", "[0]"]."""
    parts, depth, current = [], 0, ""
    for char in key:
        current += char
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth == 0:
                parts.append(current)
                current = ""
    return parts
