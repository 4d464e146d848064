"""Random tabular MDPs (RL² paper, section 4.2): S states, A actions, rewards Gaussian with
means ~ N(1, 1) and unit variance, next-state distributions ~ Dirichlet(1, ..., 1), episodes of
a fixed number of steps. Each episode starts in a state drawn uniformly (the paper does not pin
the start; a uniform start makes every state's rewards matter)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from metalearn.checks import require
from metalearn.envs.base import Env, EnvConfig, register_env


@dataclass
class TabularMDPConfig(EnvConfig):
    size_settings: ClassVar[tuple[str, ...]] = ("episodes", "episode_steps")

    name: str = "tabular_mdp"
    states: int = 10
    actions: int = 5
    episode_steps: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("states", "actions"):
            value = getattr(self, key)
            require(2 <= value <= 1000, f"data.{key}={value} is not allowed: give 2 to 1000.")
        require(
            1 <= self.episode_steps <= 10_000,
            f"data.episode_steps={self.episode_steps} is not allowed: give 1 to 10,000.",
        )


class MDP(NamedTuple):
    reward_mean: jax.Array  # [S, A]
    transitions: jax.Array  # [S, A, S], each row a distribution over next states


class MDPState(NamedTuple):
    state: jax.Array  # int32 scalar
    t: jax.Array  # steps taken in this episode


def sample_task(key: jax.Array, states: int, actions: int) -> MDP:
    k_r, k_p = jax.random.split(key)
    mean = 1.0 + jax.random.normal(k_r, (states, actions))
    p = jax.random.dirichlet(k_p, jnp.ones(states), (states, actions))
    return MDP(mean, p)


def reset(key: jax.Array, task: MDP):
    s = jax.random.randint(key, (), 0, task.reward_mean.shape[0])
    return s, MDPState(s, jnp.zeros((), jnp.int32))


def step(key: jax.Array, state: MDPState, action: jax.Array, task: MDP, *, episode_steps: int):
    k_r, k_s = jax.random.split(key)
    reward = task.reward_mean[state.state, action] + jax.random.normal(k_r)
    s = jax.random.categorical(k_s, jnp.log(task.transitions[state.state, action]))
    t = state.t + 1
    return s, MDPState(s, t), reward, t >= episode_steps


def make(cfg: TabularMDPConfig) -> Env:
    return Env(
        sample_task=lambda key: sample_task(key, cfg.states, cfg.actions),
        reset=reset,
        step=lambda key, state, action, task: step(
            key, state, action, task, episode_steps=cfg.episode_steps
        ),
        n_obs=cfg.states,
        n_actions=cfg.actions,
        episode_steps=cfg.episode_steps,
        episodes=cfg.episodes,
    )


register_env("tabular_mdp", TabularMDPConfig, make)
