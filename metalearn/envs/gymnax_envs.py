"""gymnax's meta-RL environments as data options (the `rl` extra): data=gymnax_bandit is
gymnax's BernoulliBandit-misc (Wang et al. 2017: two arms paying p and 1 - p, p drawn from
{reward_prob, 1 - reward_prob}) and data=gymnax_metamaze its MetaMaze-misc (Miconi et al. 2019: a
maze whose goal is drawn per task; reaching it teleports the agent to a random cell).

gymnax draws the task inside its reset, so here a task is the state gymnax's reset returns
(sample_task(key) = reset_env(key)'s state) and our reset restarts from that state: the arms'
probabilities, or the goal with the agent at the centre, stay fixed for the whole trial. Our step
is gymnax's `step` without its auto-reset (which would draw a new task in mid-trial): the same
key split, the same step_env, so for the same keys its observation, state and reward equal
gymnax's (tests/test_gymnax_envs.py). An episode ends only at data.episode_steps (gymnax's
max_steps_in_episode); MetaMaze's goal-reached termination is its teleport, not an episode's end.

gymnax is imported when an environment is built, never when this module is (the registry imports
every module, and the core install has no gymnax).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from metalearn.checks import ConfigError, require
from metalearn.envs.base import Env, EnvConfig, register_env


def import_gymnax(option: str) -> Any:
    try:
        return importlib.import_module("gymnax")
    except ImportError as error:
        raise ConfigError(
            f"data={option} needs the gymnax package, which is not installed ({error}): "
            "pip install 'metalearn[rl]' (or, in a clone, "
            "pip install -e '.[rl]'), or choose one of metalearn's own environments, "
            "data=bandit, data=tabular_mdp or data=point_nav."
        ) from None


@dataclass
class GymnaxBanditConfig(EnvConfig):
    size_settings: ClassVar[tuple[str, ...]] = ("episodes", "episode_steps")

    name: str = "gymnax_bandit"
    episodes: int = 1  # Wang et al.: one episode of pulls per bandit
    episode_steps: int = 100  # gymnax's max_steps_in_episode (and the time stamp's t_max)
    reward_prob: float = 0.1  # the arms pay p and 1 - p, p drawn from {reward_prob, 1 - it}

    def __post_init__(self) -> None:
        super().__post_init__()
        steps(self.episode_steps)
        require(
            0 <= self.reward_prob <= 1,
            f"data.reward_prob={self.reward_prob} is not allowed: give a probability in [0, 1].",
        )


@dataclass
class GymnaxMetaMazeConfig(EnvConfig):
    size_settings: ClassVar[tuple[str, ...]] = ("episodes", "episode_steps")

    name: str = "gymnax_metamaze"
    episodes: int = 1  # Miconi et al.: one long episode, the goal found again and again
    episode_steps: int = 200  # gymnax's max_steps_in_episode
    maze_size: int = 9
    rf_size: int = 3  # the agent sees the rf_size x rf_size cells around it
    reward: float = 10.0  # for reaching the goal
    punishment: float = 0.0  # added for walking into a wall

    def __post_init__(self) -> None:
        super().__post_init__()
        steps(self.episode_steps)
        require(
            self.maze_size % 2 == 1 and 3 <= self.maze_size <= 99,
            f"data.maze_size={self.maze_size} is not allowed: give an odd size from 3 to 99.",
        )
        require(
            self.rf_size % 2 == 1 and 3 <= self.rf_size <= 15,
            f"data.rf_size={self.rf_size} is not allowed: give an odd size from 3 to 15.",
        )


def steps(value: int) -> None:
    require(
        1 <= value <= 10_000,
        f"data.episode_steps={value} is not allowed: give 1 to 10,000.",
    )


def adapt(env, params, *, episode_steps: int, episodes: int, regret=None) -> Env:
    """Our Env over a gymnax environment and its parameters (see the module's docstring)."""

    def sample_task(key):
        return env.reset_env(key, params)[1]

    def sample_obs(key):
        return env.reset_env(key, params)[0]

    def reset(key, task):
        return env.get_obs(task, params), task

    def step(key, state, action, task):
        key_step, _ = jax.random.split(key)  # gymnax's step keeps the other half for its reset
        obs, state, reward, _, _ = env.step_env(key_step, state, action, params)
        done = env.is_truncated(state, params)
        return obs, state, jnp.asarray(reward, jnp.float32), jnp.asarray(done, bool)

    return Env(
        sample_task=sample_task,
        reset=reset,
        step=step,
        n_obs=jax.eval_shape(sample_obs, jax.random.PRNGKey(0)).shape[0],
        n_actions=int(env.num_actions),
        episode_steps=episode_steps,
        episodes=episodes,
        regret=regret,
        continuous_obs=True,
    )


def bandit_regret(task, action):
    """Expected regret of one pull: the better arm's probability minus the pulled one's."""
    return task.exp_reward_best - task.reward_probs[action]


def make_bandit(cfg: GymnaxBanditConfig) -> Env:
    gymnax = import_gymnax("gymnax_bandit")
    env, params = gymnax.make("BernoulliBandit-misc")
    params = params.replace(
        reward_prob=cfg.reward_prob,
        max_steps_in_episode=float(cfg.episode_steps),  # a float in gymnax's bandit
        t_max=cfg.episode_steps,
    )
    return adapt(
        env, params, episode_steps=cfg.episode_steps, episodes=cfg.episodes, regret=bandit_regret
    )


def make_metamaze(cfg: GymnaxMetaMazeConfig) -> Env:
    gymnax = import_gymnax("gymnax_metamaze")
    env, params = gymnax.make("MetaMaze-misc", maze_size=cfg.maze_size, rf_size=cfg.rf_size)
    params = params.replace(
        reward=cfg.reward, punishment=cfg.punishment, max_steps_in_episode=cfg.episode_steps
    )
    return adapt(env, params, episode_steps=cfg.episode_steps, episodes=cfg.episodes)


register_env("gymnax_bandit", GymnaxBanditConfig, make_bandit)
register_env("gymnax_metamaze", GymnaxMetaMazeConfig, make_metamaze)
