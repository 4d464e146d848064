"""The environments (metalearn/envs/) and the trial rollout (metalearn/rl/trial.py): transitions
and rewards against hand-checked values, a vmapped rollout against a Python loop, and the
bandit baselines against random play."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.checks import ConfigError
from metalearn.envs import make_env
from metalearn.envs.bandit import BanditConfig
from metalearn.envs.tabular_mdp import MDP, MDPState, TabularMDPConfig
from metalearn.rl.baselines import evaluate_baselines
from metalearn.rl.trial import run_trial, transition_input

KEY = jax.random.PRNGKey(0)


def test_bandit_rewards_are_bernoulli_draws_of_the_pulled_arm():
    env = make_env(BanditConfig(arms=3, episodes=4))
    means = jnp.array([0.0, 1.0, 0.5])
    obs, state = env.reset(KEY, means)
    assert int(obs) == 0 and env.n_obs == 1 and env.trial_steps == 4
    for arm, expected in ((0, 0.0), (1, 1.0)):  # certain arms pay exactly their mean
        obs, _, reward, done = env.step(KEY, state, jnp.int32(arm), means)
        assert float(reward) == expected and bool(done) and int(obs) == 0
    keys = jax.random.split(KEY, 4000)
    rewards = jax.vmap(lambda k: env.step(k, state, jnp.int32(2), means)[2])(keys)
    assert abs(float(rewards.mean()) - 0.5) < 0.03  # 4 standard errors of 4000 draws
    np.testing.assert_allclose(env.regret(means, jnp.int32(2)), 0.5)
    task = env.sample_task(KEY)
    assert task.shape == (3,) and bool(jnp.all((task >= 0) & (task <= 1)))


def test_tabular_mdp_steps_follow_its_tables():
    env = make_env(TabularMDPConfig(states=3, actions=2, episode_steps=2))
    # state 0, action 1 moves to state 2 for sure; action 0 stays; reward means by hand
    p = np.zeros((3, 2, 3), np.float32)
    p[:, 0, :] = np.eye(3)
    p[:, 1, 2] = 1.0
    means = jnp.array([[1.0, -2.0], [0.0, 0.0], [3.0, 0.5]])
    mdp = MDP(means, jnp.asarray(p))
    state = MDPState(jnp.int32(0), jnp.int32(0))
    obs, state, reward, done = env.step(KEY, state, jnp.int32(1), mdp)
    noise = jax.random.normal(jax.random.split(KEY)[0])  # the step's reward noise, unit variance
    assert int(obs) == 2 and int(state.t) == 1 and not bool(done)
    np.testing.assert_allclose(reward, -2.0 + noise, rtol=1e-6)
    obs, state, reward, done = env.step(KEY, state, jnp.int32(0), mdp)
    assert int(obs) == 2 and bool(done)  # episode_steps=2
    np.testing.assert_allclose(reward, 3.0 + noise, rtol=1e-6)


def test_tabular_mdp_task_distribution_matches_the_paper():
    env = make_env(TabularMDPConfig())
    tasks = jax.vmap(env.sample_task)(jax.random.split(KEY, 400))
    assert tasks.reward_mean.shape == (400, 10, 5) and tasks.transitions.shape == (400, 10, 5, 10)
    np.testing.assert_allclose(tasks.transitions.sum(-1), 1.0, atol=1e-5)
    means = np.asarray(tasks.reward_mean)
    assert abs(means.mean() - 1.0) < 0.02 and abs(means.std() - 1.0) < 0.02  # N(1, 1), 20000 draws
    # Dirichlet(1) over 10 states: each probability has mean 1/10 and variance 9/1100
    probs = np.asarray(tasks.transitions)
    assert abs(probs.mean() - 0.1) < 1e-3 and abs(probs.var() - 9 / 1100) < 5e-4


def random_agent(n_actions):
    def act(state, key, obs, prev_action, prev_reward, prev_done):
        return state, jax.random.randint(key, (), 0, n_actions), {}

    return act


@pytest.mark.parametrize("cfg", [BanditConfig(arms=4, episodes=5), TabularMDPConfig(episodes=3)])
def test_vmapped_trials_equal_a_python_loop(cfg):
    env = make_env(cfg)
    keys = jax.random.split(KEY, 3)
    tasks = jax.vmap(env.sample_task)(jax.random.split(jax.random.PRNGKey(1), 3))
    agent = random_agent(env.n_actions)
    batch = jax.jit(jax.vmap(lambda t, k: run_trial(env, agent, (), t, k)))(tasks, keys)
    for i in range(3):
        task = jax.tree.map(lambda a, i=i: a[i], tasks)
        k_start, k_steps = jax.random.split(keys[i])
        obs, state = env.reset(k_start, task)
        prev = (-1, 0.0, False)
        for t in range(env.trial_steps):
            k_act, k_step, k_reset = jax.random.split(jax.random.fold_in(k_steps, t), 3)
            action = jax.random.randint(k_act, (), 0, env.n_actions)
            assert int(batch["obs"][i, t]) == int(obs)
            assert int(batch["prev_action"][i, t]) == prev[0]
            np.testing.assert_allclose(batch["prev_reward"][i, t], prev[1], rtol=1e-6)
            obs, state, reward, done = env.step(k_step, state, action, task)
            assert int(batch["action"][i, t]) == int(action)
            np.testing.assert_allclose(batch["reward"][i, t], reward, rtol=1e-6)
            assert bool(batch["done"][i, t]) == bool(done)
            if done:
                obs, state = env.reset(k_reset, task)
            prev = (int(action), float(reward), bool(done))
    # every episode ends after episode_steps steps, so the trial holds `episodes` of them
    assert int(batch["done"].sum()) == 3 * cfg.episodes


def test_transition_input_layout():
    env = make_env(TabularMDPConfig(states=3, actions=2))
    x = transition_input(env, jnp.int32(1), jnp.int32(-1), 0.0, False)
    np.testing.assert_array_equal(x, [0, 1, 0, 0, 0, 0, 0])  # no previous action: zeros
    x = transition_input(env, jnp.int32(2), jnp.int32(1), 1.5, True)
    np.testing.assert_array_equal(x, [0, 0, 1, 0, 1, 1.5, 1])


def test_ucb1_and_thompson_have_less_regret_than_random():
    env = make_env(BanditConfig(arms=5, episodes=20))
    results = evaluate_baselines(env, 300, 7, policies=("random", "ucb1", "thompson"))
    random = results["random"]
    # random's expected regret per pull is E[max of 5 U(0,1)] - 1/2 = 1/3
    assert abs(random["regret"] - 20 / 3) < 3 * random["regret_ci95"]
    for name in ("ucb1", "thompson"):
        gap = random["regret"] - results[name]["regret"]
        margin = random["regret_ci95"] + results[name]["regret_ci95"]
        assert gap > margin, (name, results)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: BanditConfig(arms=1), "data.arms=1"),
        (lambda: BanditConfig(episodes=0), "data.episodes=0"),
        (lambda: TabularMDPConfig(states=1), "data.states=1"),
    ],
)
def test_bad_env_settings_are_refused(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
