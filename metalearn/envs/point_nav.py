"""2D point navigation (MAML paper, section 5.3; its reference code's point_env_randgoal): a
point starts at the origin, the task's goal is drawn uniformly from [-0.5, 0.5]^2, an action is
a velocity clipped to [-0.1, 0.1] per axis, the observation is the position and the reward is
minus the distance to the goal after the move. Episodes last data.episode_steps steps (the
paper's horizon, 100); the reference code's early stop within 0.01 of the goal is left out,
since every episode of an Env lasts exactly episode_steps (after reaching the goal the agent
earns about 0 per step by staying, so the returns hardly differ)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from metalearn.checks import require
from metalearn.envs.base import Env, EnvConfig, register_env

MAX_SPEED = 0.1  # the action's clip per axis
GOAL_RANGE = 0.5  # goals ~ U(-GOAL_RANGE, GOAL_RANGE)^2


@dataclass
class PointNavConfig(EnvConfig):
    size_settings: ClassVar[tuple[str, ...]] = ("episodes", "episode_steps")

    name: str = "point_nav"
    episodes: int = 1  # per trial (RL²'s unit); MAML-RL samples algo.trajectories episodes
    episode_steps: int = 100  # the MAML paper's horizon

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            1 <= self.episode_steps <= 10_000,
            f"data.episode_steps={self.episode_steps} is not allowed: give 1 to 10,000.",
        )

    def check_with(self, config) -> None:
        """Only learners with continuous-action policies (their schema's continuous_actions)."""
        from metalearn.config import schemas

        able = sorted(n for n, s in schemas("algo").items() if getattr(s, "continuous_actions", 0))
        require(
            getattr(config.algo, "continuous_actions", False),
            f"algo={config.algo.name} cannot act on data=point_nav: its actions are continuous "
            f"velocities and this learner's policy picks among discrete actions. Learners with "
            f"continuous-action policies: algo in {able}.",
        )


class PointState(NamedTuple):
    position: jax.Array  # [2]
    t: jax.Array  # steps taken in this episode


def sample_task(key: jax.Array) -> jax.Array:
    """The goal [2]."""
    return jax.random.uniform(key, (2,), minval=-GOAL_RANGE, maxval=GOAL_RANGE)


def reset(key: jax.Array, task: jax.Array):
    position = jnp.zeros(2)
    return position, PointState(position, jnp.zeros((), jnp.int32))


def step(key, state: PointState, action, task, *, episode_steps: int):
    position = state.position + jnp.clip(action, -MAX_SPEED, MAX_SPEED)
    reward = -jnp.linalg.norm(position - task)
    t = state.t + 1
    return position, PointState(position, t), reward, t >= episode_steps


def make(cfg: PointNavConfig) -> Env:
    return Env(
        sample_task=sample_task,
        reset=reset,
        step=lambda key, state, action, task: step(
            key, state, action, task, episode_steps=cfg.episode_steps
        ),
        n_obs=2,
        n_actions=2,
        episode_steps=cfg.episode_steps,
        episodes=cfg.episodes,
        continuous_obs=True,
        continuous_actions=True,
    )


register_env("point_nav", PointNavConfig, make)
