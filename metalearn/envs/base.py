"""The environment interface (gymnax's shape, with the task as an argument) and its data option.

An Env is a bundle of pure functions, jittable and vmappable:

    sample_task(key) -> task                      the task's parameters (a pytree)
    reset(key, task) -> (obs, state)              obs: int32 scalar in [0, n_obs) (or a float
                                                  vector [n_obs] where continuous_obs)
    step(key, state, action, task) -> (obs, state, reward, done)

A trial is `episodes` episodes of `episode_steps` steps each on one task (RL²'s unit); the agent
runs the trial (metalearn/rl/trial.py), resetting the environment after each `done`. As a data
option, an Env is a TaskSource whose `sample` draws task parameters, not support/query
examples; its schema declares kind "reinforcement" and inputs "transitions", so the shared
checks pair it only with learners and models that declare them (config.py::_check_combination).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
from omegaconf import MISSING

from metalearn import registry
from metalearn.checks import MAX_INNER_STEPS, at_most, require
from metalearn.data.base import SPLITS, TaskSource

KIND = "reinforcement"


class Env(NamedTuple):
    sample_task: Callable[[jax.Array], Any]
    reset: Callable[[jax.Array, Any], tuple[jax.Array, Any]]
    step: Callable[..., tuple[jax.Array, Any, jax.Array, jax.Array]]
    n_obs: int  # observations are integers below this (one-hot for the agent)
    n_actions: int
    episode_steps: int  # steps of one episode (every episode ends after exactly this many)
    episodes: int  # episodes per trial
    # (task, action) -> the step's expected regret, best arm's mean minus the action's; None
    # where the optimum is not cheap to compute (tabular MDPs)
    regret: Callable[[Any, jax.Array], jax.Array] | None = None
    # Continuous spaces (point navigation): the observation is a float vector [n_obs] and the
    # action a float vector [n_actions] instead of integers below them.
    continuous_obs: bool = False
    continuous_actions: bool = False

    @property
    def trial_steps(self) -> int:
        return self.episodes * self.episode_steps

    @property
    def transition_size(self) -> int:
        """Width of what an agent reads each step: one-hot observation, one-hot previous action,
        previous reward and done flag (rl/trial.py::transition_input)."""
        return self.n_obs + self.n_actions + 2


@dataclass
class EnvConfig:
    """Base of every environment's schema: the capabilities a data option declares (as
    data/base.py::DataConfig does), without the support/query sizes, which RL has not."""

    kind: ClassVar[str] = KIND
    multitask: ClassVar[bool] = False
    inputs: ClassVar[str] = "transitions"
    padded: ClassVar[bool] = False
    size_settings: ClassVar[tuple[str, ...]] = ("episodes",)
    locations: ClassVar[tuple[str, ...]] = ()
    training_only: ClassVar[tuple[str, ...]] = ()

    name: str = MISSING
    episodes: int = 10  # episodes per trial: the agent's hidden state lives this long

    def __post_init__(self) -> None:
        require(self.episodes >= 1, f"data.episodes={self.episodes} must be >= 1.")
        at_most("data.episodes", self.episodes, MAX_INNER_STEPS)


_ENVS: dict[type, Callable[[Any], Env]] = {}


def make_env(cfg: EnvConfig) -> Env:
    """The Env of a typed environment config (any registered environment schema)."""
    make = _ENVS.get(type(cfg))
    if make is None:
        raise ValueError(f"no environment is registered for {type(cfg).__name__}")
    return make(cfg)


def env_source(env: Env) -> TaskSource:
    """The Env as a TaskSource: each split is the same task distribution, told apart by the
    keys that draw from it (the evaluator's fixed eval.seed gives the held-out tasks)."""
    return TaskSource(
        kind=KIND,
        n_out=env.n_actions,
        n_train_classes=0,
        input_shape=(env.transition_size,),
        splits={name: () for name in SPLITS},
        sample=lambda key, arrays, global_labels=False: env.sample_task(key),
    )


def register_env(name: str, schema: type, make: Callable[[Any], Env]) -> None:
    """Make an environment a data option: data=<name> with the schema's settings."""
    _ENVS[schema] = make
    registry.register("data", name, schema, lambda cfg: env_source(make(cfg)))
