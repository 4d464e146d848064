"""T fixed sinusoid regression tasks whose relatedness (and conflict) is set on purpose.

Task t is y = A_t sin(f_t x - phase_t). Its parameters are
    (A, f, phase)_t = relatedness * shared + (1 - relatedness) * own_t,
with `shared` and every `own_t` drawn once, uniformly from the configured ranges, by
numpy's default_rng(task_seed). The draws do not depend on relatedness, so a sweep over it
changes only the interpolation. Then the last conflict * T tasks (rounded half up) are negated
(A_t -> -A_t), which no shared, unconditioned model can fit at once: negative transfer on purpose.

Splits: the functions are the same in every split; x differs. Val and test x are fresh uniform
draws, with the split's index folded into the key so the same key never gives two splits the
same points. Train x are fresh draws too, or, with train_points = N > 0, drawn without
replacement from a fixed set of N points per task (a finite training set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metalearn import registry
from metalearn.checks import MAX_EXAMPLES, MAX_TASKS, at_most, check_seed, require
from metalearn.data import SPLITS, TaskSource
from metalearn.data.base import DataConfig
from metalearn.types import Split, Task


@dataclass
class MultiSinusoidConfig(DataConfig):
    """T fixed sinusoid tasks y = A sin(f x - phase) with controllable relatedness.

    Each task's (A, f, phase) is relatedness * shared + (1 - relatedness) * its own draw, all
    drawn once from task_seed; a fraction `conflict` of the tasks (the last ones) has its sign
    flipped. k_shot and k_query count points per task. Val and test points are fresh x draws;
    train points too, unless train_points fixes a finite training set per task.
    """

    kind: ClassVar[str] = "regression"
    inputs: ClassVar[str] = "vectors"
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
        require(self.n_tasks >= 1, f"data.n_tasks={self.n_tasks} is not allowed: it must be >= 1.")
        at_most("data.n_tasks", self.n_tasks, MAX_TASKS)
        at_most("data.train_points", self.train_points, MAX_EXAMPLES)
        check_seed("data.task_seed", self.task_seed)
        for key in ("relatedness", "conflict"):
            value = getattr(self, key)
            require(0 <= value <= 1, f"data.{key}={value} is not allowed: it must be in [0, 1].")
        for key in ("amplitude", "phase", "frequency"):
            lo, hi = getattr(self, key)
            require(
                lo <= hi,
                f"data.{key}=[{lo}, {hi}] is not allowed: the low end must not exceed the high "
                "end (equal ends fix the value).",
            )
        lo, hi = self.x_range
        require(
            lo < hi,
            f"data.x_range=[{lo}, {hi}] is not allowed: the low end must be below the high end.",
        )
        require(
            self.train_points == 0 or self.train_points >= self.k_shot + self.k_query,
            f"data.train_points={self.train_points} is not allowed: a task's support and query are "
            f"disjoint, so it needs 0 (fresh x draws) or at least data.k_shot + data.k_query = "
            f"{self.k_shot + self.k_query} points.",
        )


class SinusoidTasks(NamedTuple):
    """One split of T sinusoid tasks."""

    amplitude: jax.Array  # float32 [T], negative for the conflicting tasks
    frequency: jax.Array  # float32 [T]
    phase: jax.Array  # float32 [T]
    points: jax.Array  # float32 [T, N]: the fixed train x per task; N = 0 for fresh draws
    split: jax.Array  # int32 scalar, folded into the key


def task_parameters(cfg: MultiSinusoidConfig) -> dict[str, np.ndarray]:
    """{"amplitude", "frequency", "phase"} -> float64 [T], as described in the module doc."""
    rng = np.random.default_rng(cfg.task_seed)
    ranges = {"amplitude": cfg.amplitude, "frequency": cfg.frequency, "phase": cfg.phase}
    shared = {k: rng.uniform(*r) for k, r in ranges.items()}
    own = {k: rng.uniform(*r, size=cfg.n_tasks) for k, r in ranges.items()}
    r = cfg.relatedness
    params = {k: r * shared[k] + (1 - r) * own[k] for k in ranges}
    params["amplitude"] = np.where(flipped_tasks(cfg), -params["amplitude"], params["amplitude"])
    return params


def flipped_tasks(cfg: MultiSinusoidConfig) -> np.ndarray:
    """bool [T]: the last conflict * T tasks (rounded half up) have negated targets."""
    n_flipped = math.floor(cfg.conflict * cfg.n_tasks + 0.5)
    return np.arange(cfg.n_tasks) >= cfg.n_tasks - n_flipped


def sinusoid_targets(amplitude, frequency, phase, x):
    """The closed form y = A sin(f x - phase)."""
    return amplitude * jnp.sin(frequency * x - phase)


def sample_sinusoid_task(
    key: jax.Array,
    tasks: SinusoidTasks,
    task_id: jax.Array,
    *,
    k_shot: int,
    k_query: int,
    x_range: tuple[float, float],
) -> Task:
    """k_shot support and k_query query points of task `task_id`, x [n, 1], y [n, 1]."""
    task_id = jnp.asarray(task_id, jnp.int32)
    key = jax.random.fold_in(key, tasks.split)
    n = k_shot + k_query
    if tasks.points.shape[1]:  # a finite set: distinct points, so support and query are disjoint
        pool = tasks.points[task_id]
        x = pool[jax.random.choice(key, pool.shape[0], (n,), replace=False)]
    else:
        x = jax.random.uniform(key, (n,), minval=x_range[0], maxval=x_range[1])
    x = x[:, None]
    y = sinusoid_targets(
        tasks.amplitude[task_id], tasks.frequency[task_id], tasks.phase[task_id], x
    )
    return Task(
        support=Split(x[:k_shot], y[:k_shot]),
        query=Split(x[k_shot:], y[k_shot:]),
        task_id=task_id,
    )


def make_source(cfg: MultiSinusoidConfig) -> TaskSource:
    params = {k: jnp.asarray(v, jnp.float32) for k, v in task_parameters(cfg).items()}
    rng = np.random.default_rng([cfg.task_seed, 1])  # independent of the parameters' stream
    train_points = rng.uniform(*cfg.x_range, size=(cfg.n_tasks, cfg.train_points))
    none = np.zeros((cfg.n_tasks, 0))
    splits = {
        name: SinusoidTasks(
            **params,
            points=jnp.asarray(train_points if name == "train" else none, jnp.float32),
            split=jnp.asarray(i, jnp.int32),
        )
        for i, name in enumerate(SPLITS)
    }
    names = tuple(
        f"task{t}_flipped" if flip else f"task{t}" for t, flip in enumerate(flipped_tasks(cfg))
    )

    def sample_task(key, tasks, task_id):
        return sample_sinusoid_task(
            key,
            tasks,
            task_id,
            k_shot=cfg.k_shot,
            k_query=cfg.k_query,
            x_range=tuple(cfg.x_range),
        )

    def sample(key, tasks, global_labels=False):
        k_task, k_points = jax.random.split(key)
        return sample_task(k_points, tasks, jax.random.randint(k_task, (), 0, cfg.n_tasks))

    return TaskSource(
        kind="regression",
        n_out=1,
        n_train_classes=1,
        input_shape=(1,),
        splits=splits,
        sample=sample,
        n_tasks=cfg.n_tasks,
        task_names=names,
        sample_task=sample_task,
    )


registry.register("data", "multi_sinusoid", MultiSinusoidConfig, make_source)
