"""Bernoulli multi-armed bandits with arm means drawn from U(0, 1) (RL² paper, section 4.1).

An episode is one pull, so a trial of data.episodes episodes is that many pulls of one bandit;
the observation carries nothing (always 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from metalearn.checks import require
from metalearn.envs.base import Env, EnvConfig, register_env


@dataclass
class BanditConfig(EnvConfig):
    name: str = "bandit"
    arms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.arms >= 2, f"data.arms={self.arms} is not allowed: it must be >= 2.")
        require(self.arms <= 10_000, f"data.arms={self.arms} is not allowed: at most 10,000.")


def sample_task(key: jax.Array, arms: int) -> jax.Array:
    """The arms' success probabilities [arms]."""
    return jax.random.uniform(key, (arms,))


def reset(key: jax.Array, task: jax.Array):
    return jnp.zeros((), jnp.int32), ()


def step(key: jax.Array, state, action: jax.Array, task: jax.Array):
    reward = jax.random.bernoulli(key, task[action]).astype(jnp.float32)
    return jnp.zeros((), jnp.int32), state, reward, jnp.ones((), bool)


def regret(task: jax.Array, action: jax.Array) -> jax.Array:
    """Expected regret of one pull: the best arm's mean minus the pulled arm's."""
    return task.max() - task[action]


def make(cfg: BanditConfig) -> Env:
    return Env(
        sample_task=lambda key: sample_task(key, cfg.arms),
        reset=reset,
        step=step,
        n_obs=1,
        n_actions=cfg.arms,
        episode_steps=1,
        episodes=cfg.episodes,
        regret=regret,
    )


register_env("bandit", BanditConfig, make)
