"""Bandit baselines as pure JAX agents (rl/trial.py's interface), scored by the evaluator on
the same held-out tasks as a learner: random, greedy, epsilon-greedy, UCB1 (Auer et al. 2002)
and Thompson sampling with a Beta(1, 1) prior on each Bernoulli arm.

Each keeps per-arm pull counts and successes, updated from the previous step's action and
reward; ties are broken uniformly at random. greedy and epsilon-greedy rank arms by their
posterior means under a Beta(1, 1) prior (as the RL² paper's greedy baselines); UCB1 pulls every
arm once first, then ranks by mean + sqrt(2 ln t / n).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metalearn.envs.base import Env, env_source
from metalearn.evaluate import make_evaluator
from metalearn.rl.trial import run_trial


class ArmStats(NamedTuple):
    pulls: jax.Array  # [A] float32
    wins: jax.Array  # [A] summed rewards


def _observe(stats: ArmStats, prev_action, prev_reward) -> ArmStats:
    seen = jax.nn.one_hot(prev_action, stats.pulls.shape[0])  # zeros at a trial's start
    return ArmStats(stats.pulls + seen, stats.wins + seen * prev_reward)


def _argmax(key, scores):
    return jnp.argmax(scores + 1e-6 * jax.random.uniform(key, scores.shape))  # random ties


def _empirical(stats: ArmStats):
    """Mean reward per arm; +inf for an arm never pulled, so UCB1 tries each once first."""
    return jnp.where(stats.pulls > 0, stats.wins / jnp.maximum(stats.pulls, 1), jnp.inf)


def random_choice(key, stats):
    return jax.random.randint(key, (), 0, stats.pulls.shape[0])


def greedy_choice(key, stats):
    """The best posterior mean under a Beta(1, 1) prior (an unpulled arm's is 1/2)."""
    return _argmax(key, (stats.wins + 1) / (stats.pulls + 2))


def epsilon_greedy_choice(epsilon: float) -> Callable:
    def choose(key, stats):
        k_explore, k_random, k_tie = jax.random.split(key, 3)
        explore = jax.random.bernoulli(k_explore, epsilon)
        return jnp.where(explore, random_choice(k_random, stats), greedy_choice(k_tie, stats))

    return choose


def ucb1_choice(key, stats):
    t = stats.pulls.sum()
    bonus = jnp.sqrt(2 * jnp.log(jnp.maximum(t, 1)) / jnp.maximum(stats.pulls, 1))
    return _argmax(key, _empirical(stats) + bonus)


def thompson_choice(key, stats):
    k_beta, k_tie = jax.random.split(key)
    draws = jax.random.beta(k_beta, 1 + stats.wins, 1 + stats.pulls - stats.wins)
    return _argmax(k_tie, draws)


POLICIES: dict[str, Callable] = {
    "random": random_choice,
    "greedy": greedy_choice,
    "epsilon_greedy": epsilon_greedy_choice(0.1),
    "ucb1": ucb1_choice,
    "thompson": thompson_choice,
}


def agent(choose: Callable):
    """A trial agent from a choice rule over the arms' statistics."""

    def act(stats, key, obs, prev_action, prev_reward, prev_done):
        stats = _observe(stats, prev_action, prev_reward)
        return stats, choose(key, stats), {}

    return act


def policy_evaluator(env: Env, choose: Callable):
    """evaluate(params, task, key, inner_steps) -> (loss, metrics) for a baseline (params
    unused), the shape the evaluator scores learners by."""
    from metalearn.rl.rl2 import trial_metrics

    start = ArmStats(jnp.zeros(env.n_actions), jnp.zeros(env.n_actions))

    def evaluate(params, task, key, inner_steps=0):
        metrics = trial_metrics(run_trial(env, agent(choose), start, task, key), env)
        return metrics["loss"], metrics

    return evaluate


def evaluate_baselines(
    env: Env, num_tasks: int, seed: int, split: str = "test", policies=None
) -> dict[str, dict]:
    """Each baseline's metrics (return, regret, with 95% CIs) on the num_tasks tasks that
    `metalearn train` tests a learner on with eval.seed=seed (the same draws, key by key)."""
    source = env_source(env)
    out = {}
    for name in policies or POLICIES:
        algo = SimpleNamespace(evaluate=policy_evaluator(env, POLICIES[name]))
        evaluate = make_evaluator(algo, source, None, 0, None)
        out[name] = evaluate(None, split, num_tasks, seed)
    return out
