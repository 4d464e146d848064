"""One trial of an agent on one task: a lax.scan over the trial's steps, resetting the
environment after each episode's end while the agent's own state runs on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from metalearn.envs.base import Env

# agent(agent_state, key, obs, prev_action, prev_reward, prev_done)
#   -> (agent_state, action, aux: dict of per-step arrays, e.g. log-probability and value)
# prev_action is -1 at a trial's first step (its one-hot is all zeros; a zero vector for continuous
# actions), prev_reward 0.
Agent = Callable[..., tuple[Any, jax.Array, dict]]


def transition_input(env: Env, obs, prev_action, prev_reward, prev_done) -> jax.Array:
    """What RL² reads each step [n_obs + n_actions + 2]: the observation and previous action
    one-hot, the previous reward and whether the previous step ended an episode."""
    return jnp.concatenate([
        observation_input(env, obs),
        # -1 (no previous action): all zeros; a continuous action is its own vector
        prev_action if env.continuous_actions else jax.nn.one_hot(prev_action, env.n_actions),
        jnp.asarray(prev_reward, jnp.float32)[None],
        jnp.asarray(prev_done, jnp.float32)[None],
    ])  # fmt: skip


def observation_input(env: Env, obs) -> jax.Array:
    """The observation as a float vector [n_obs]: one-hot, or itself where continuous."""
    return jnp.asarray(obs, jnp.float32) if env.continuous_obs else jax.nn.one_hot(obs, env.n_obs)


def no_action(env: Env) -> jax.Array:
    """The previous action at a trial's first step: -1, or a zero vector where continuous."""
    return jnp.zeros(env.n_actions) if env.continuous_actions else jnp.int32(-1)


def run_trial(env: Env, agent: Agent, agent_state, task, key: jax.Array) -> dict:
    """The trial's steps, each field [T, ...]: obs, prev_action, prev_reward, prev_done (what
    the agent saw), action, reward, done, regret (0 where the env has none), and the agent's aux.

    The first reset takes split(key)[0]; step t's keys are fold_in(split(key)[1], t) split into
    (act, step, reset) keys, so a Python loop over the same keys replays the trial
    (tests/test_rl_envs.py).
    """
    k_start, k_steps = jax.random.split(key)
    obs, env_state = env.reset(k_start, task)

    def body(carry, t):
        env_state, obs, prev_a, prev_r, prev_d, agent_state = carry
        k_act, k_step, k_reset = jax.random.split(jax.random.fold_in(k_steps, t), 3)
        agent_state, action, aux = agent(agent_state, k_act, obs, prev_a, prev_r, prev_d)
        next_obs, next_state, reward, done = env.step(k_step, env_state, action, task)
        reset_obs, reset_state = env.reset(k_reset, task)
        next_obs = jnp.where(done, reset_obs, next_obs)
        next_state = jax.tree.map(lambda r, s: jnp.where(done, r, s), reset_state, next_state)
        regret = env.regret(task, action) if env.regret is not None else jnp.zeros(())
        seen = {"obs": obs, "prev_action": prev_a, "prev_reward": prev_r, "prev_done": prev_d}
        out = {**seen, "action": action, "reward": reward, "done": done, "regret": regret, **aux}
        return (next_state, next_obs, action, reward, done, agent_state), out

    start = (env_state, obs, no_action(env), jnp.float32(0.0), jnp.bool_(False), agent_state)
    _, steps = jax.lax.scan(body, start, jnp.arange(env.trial_steps))
    return steps
