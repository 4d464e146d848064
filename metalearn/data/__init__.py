"""Task sources: a dataset as device arrays per split plus a pure, jittable episode sampler."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metalearn.config import ConfigError, DataConfig, TfdsConfig
from metalearn.data.episodic import sample_episode
from metalearn.data.sinusoid import sample_sinusoid
from metalearn.types import Task

SPLITS = ("train", "val", "test")


class TaskSource(NamedTuple):
    """What the train loop needs from a dataset.

    splits[name] is a pytree of device arrays passed to `sample` as an argument (not closed
    over, so the jitted step does not embed the dataset as a constant).
    sample(key, split_arrays, global_labels) -> Task draws one task.
    """

    kind: str  # "classification" | "regression"
    n_out: int  # outputs of the per-task predictor (n_way, or the regression dimension)
    n_train_classes: int  # outputs of a classifier pre-trained on all meta-train classes
    input_shape: tuple[int, ...]
    splits: dict[str, Any]
    sample: Callable[[jax.Array, Any, bool], Task]
    # Multi-task sources (a fixed set of T tasks, e.g. one per Omniglot alphabet) also have:
    n_tasks: int = 0  # T; 0 for a task distribution (meta-learning)
    task_names: tuple[str, ...] = ()  # one per task, for reports
    classes_per_task: tuple[int, ...] = ()  # classification: task t's labels are < this (<= n_out)
    # sample_task(key, split_arrays, task_id) -> Task: a batch of task `task_id`'s examples of the
    # split (support and query disjoint), task_id set. `sample` draws the task id uniformly.
    sample_task: Callable[[jax.Array, Any, jax.Array], Task] | None = None


def make_task_source(cfg: DataConfig) -> TaskSource:
    if isinstance(cfg, TfdsConfig):  # before the names: data.name is then a TFDS catalogue name
        from metalearn.data import tfds

        return tfds.make_source(cfg)
    if cfg.name == "sinusoid":
        return _sinusoid_source(cfg)
    if cfg.name == "omniglot":
        return _omniglot_source(cfg)
    if cfg.name == "omniglot_alphabets":
        from metalearn.data import omniglot_alphabets

        return omniglot_alphabets.make_source(cfg)
    if cfg.name == "multi_sinusoid":
        from metalearn.data import multi_sinusoid

        return multi_sinusoid.make_source(cfg)
    raise ConfigError(
        f"data={cfg.name!r} has no task source; known: sinusoid, omniglot, omniglot_alphabets, "
        "multi_sinusoid."
    )


def _sinusoid_source(cfg) -> TaskSource:
    sample = partial(
        sample_sinusoid,
        k_shot=cfg.k_shot,
        k_query=cfg.k_query,
        amplitude=tuple(cfg.amplitude),
        phase=tuple(cfg.phase),
        x_range=tuple(cfg.x_range),
    )
    # One task distribution: splits differ only by the keys that draw from it.
    return TaskSource(
        kind="regression",
        n_out=1,
        n_train_classes=1,
        input_shape=(1,),
        splits={name: () for name in SPLITS},
        sample=lambda key, arrays, global_labels=False: sample(key),
    )


def _omniglot_source(cfg) -> TaskSource:
    from metalearn.data.omniglot import load_omniglot, split_classes, with_rotations

    data = load_omniglot(cfg.root, image_size=cfg.image_size, download=cfg.download)
    classes = split_classes(
        data,
        split=cfg.split,
        seed=cfg.split_seed,
        sizes=tuple(cfg.split_sizes),
        val_alphabets=cfg.val_alphabets,
    )
    images = {name: data.images[classes[name]] for name in SPLITS}
    if cfg.rotations:
        images["train"] = with_rotations(images["train"])
    for name in SPLITS:
        n = images[name].shape[0]
        if cfg.n_way > n:
            raise ConfigError(
                f"data.n_way={cfg.n_way} is more classes than the meta-{name} split holds ({n} "
                f"characters with data.split={cfg.split}); use data.n_way <= {n}."
            )

    def sample(key, split_images, global_labels=False):
        return sample_episode(
            key,
            split_images,
            n_way=cfg.n_way,
            k_shot=cfg.k_shot,
            k_query=cfg.k_query,
            global_labels=global_labels,
        )

    return TaskSource(
        kind="classification",
        n_out=cfg.n_way,
        n_train_classes=int(images["train"].shape[0]),
        input_shape=(cfg.image_size, cfg.image_size, 1),
        splits={name: jnp.asarray(images[name]) for name in SPLITS},
        sample=sample,
    )
