"""Sinusoid regression tasks (MAML paper, section 5.1), sampled on the device from a key."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.checks import require
from metalearn.data.base import SPLITS, DataConfig, TaskSource
from metalearn.types import Split, Task


@dataclass
class SinusoidConfig(DataConfig):
    kind: ClassVar[str] = "regression"
    inputs: ClassVar[str] = "vectors"

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
            require(
                lo < hi,
                f"data.{key}=[{lo}, {hi}] is not allowed: the low end must be below the high end.",
            )


def sample_sinusoid(
    key: jax.Array,
    *,
    k_shot: int,
    k_query: int,
    amplitude: tuple[float, float],
    phase: tuple[float, float],
    x_range: tuple[float, float],
) -> Task:
    """One task y = A sin(x - phase): K support and Q query points, x uniform in x_range."""
    k_amp, k_phase, k_x = jax.random.split(key, 3)
    amp = jax.random.uniform(k_amp, (), minval=amplitude[0], maxval=amplitude[1])
    ph = jax.random.uniform(k_phase, (), minval=phase[0], maxval=phase[1])
    x = jax.random.uniform(k_x, (k_shot + k_query, 1), minval=x_range[0], maxval=x_range[1])
    y = amp * jnp.sin(x - ph)
    return Task(
        support=Split(x[:k_shot], y[:k_shot]),
        query=Split(x[k_shot:], y[k_shot:]),
        task_id=jnp.zeros((), jnp.int32),
    )


def sinusoid_curve(key: jax.Array, amplitude, phase, x: jax.Array) -> jax.Array:
    """The true function of the task drawn from `key` by sample_sinusoid, at points x (plots)."""
    k_amp, k_phase, _ = jax.random.split(key, 3)
    amp = jax.random.uniform(k_amp, (), minval=amplitude[0], maxval=amplitude[1])
    ph = jax.random.uniform(k_phase, (), minval=phase[0], maxval=phase[1])
    return amp * jnp.sin(x - ph)


def make_source(cfg: SinusoidConfig) -> TaskSource:
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


registry.register("data", "sinusoid", SinusoidConfig, make_source)
