"""Sinusoid regression tasks (MAML paper, section 5.1), sampled on the device from a key."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metalearn.types import Split, Task


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
