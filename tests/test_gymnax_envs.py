"""The gymnax adapter (metalearn/envs/gymnax_envs.py): for the same keys, our sample_task/reset
and step equal gymnax's reset and step (without its auto-reset, which would redraw the task), a
trial keeps one task, and without gymnax the data options refuse with the install command."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.checks import ConfigError
from metalearn.envs import gymnax_envs, make_env
from metalearn.envs.gymnax_envs import GymnaxBanditConfig, GymnaxMetaMazeConfig
from metalearn.rl.trial import run_trial

KEY = jax.random.PRNGKey(0)
CASES = [
    ("BernoulliBandit-misc", GymnaxBanditConfig(episodes=2, episode_steps=6)),
    ("MetaMaze-misc", GymnaxMetaMazeConfig(episodes=2, episode_steps=40, maze_size=5)),
]


def gymnax_pair(name: str, cfg):
    gymnax = pytest.importorskip("gymnax")
    kwargs = {"maze_size": cfg.maze_size, "rf_size": cfg.rf_size} if "Maze" in name else {}
    env, params = gymnax.make(name, **kwargs)
    if "Bandit" in name:
        params = params.replace(
            reward_prob=cfg.reward_prob,
            max_steps_in_episode=float(cfg.episode_steps),
            t_max=cfg.episode_steps,
        )
    else:
        params = params.replace(max_steps_in_episode=cfg.episode_steps)
    return env, params


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=["bandit", "metamaze"])
def test_steps_equal_gymnax_steps_for_the_same_keys(name, cfg):
    genv, params = gymnax_pair(name, cfg)
    env = make_env(cfg)
    assert env.n_actions == genv.num_actions
    assert env.n_obs == genv.observation_space(params).shape[0] and env.continuous_obs

    g_obs, g_state = genv.reset(KEY, params)
    task = env.sample_task(KEY)  # the task is the state gymnax's reset draws
    obs, state = env.reset(jax.random.PRNGKey(99), task)  # restarting ignores the key
    assert_trees_equal(task, g_state)
    np.testing.assert_array_equal(obs, g_obs)

    step = jax.jit(env.step)
    gymnax_ends = 0
    for t in range(cfg.episode_steps):
        key = jax.random.fold_in(KEY, t + 1)
        action = jax.random.randint(jax.random.fold_in(key, 7), (), 0, env.n_actions)
        obs, state, reward, done = step(key, state, action, task)
        g_obs, g_next, g_reward, terminated, truncated, info = genv.step(
            key, g_state, action, params
        )
        # Before gymnax's auto-reset, its step is ours: the same observation and reward.
        # (the bandit's time stamp 2t/T - 1 may round 1 ulp apart as XLA fuses it differently)
        np.testing.assert_allclose(obs, info["final_observation"], rtol=0, atol=2e-7)
        np.testing.assert_allclose(reward, g_reward, rtol=0, atol=0)
        assert reward.dtype == jnp.float32 and bool(done) == bool(truncated)
        assert bool(done) == (t == cfg.episode_steps - 1)  # episodes end at episode_steps only
        if bool(terminated) or bool(truncated):
            gymnax_ends += 1
            g_state = state  # gymnax reset (a new task); we carry on from our state
        else:
            assert_trees_equal(state, g_next)
            g_state = g_next
    assert gymnax_ends >= 1


def test_bandit_regret_and_a_trial_keeps_its_task():
    pytest.importorskip("gymnax")
    env = make_env(GymnaxBanditConfig(episodes=3, episode_steps=4, reward_prob=0.2))
    tasks = jax.vmap(env.sample_task)(jax.random.split(KEY, 200))
    probs = np.asarray(tasks.reward_probs)
    # p is 0.2 or 0.8 and the other arm pays 1 - p, the best pays 0.8
    np.testing.assert_allclose(np.sort(probs, axis=1), np.tile([0.2, 0.8], (200, 1)), atol=1e-6)
    assert 50 < (probs[:, 0] > 0.5).sum() < 150  # both draws happen (binomial(200, 1/2))
    task = jax.tree.map(lambda a: a[0], tasks)
    worse = jnp.int32(int(np.argmin(probs[0])))
    np.testing.assert_allclose(env.regret(task, worse), 0.6, atol=1e-6)
    np.testing.assert_allclose(env.regret(task, 1 - worse), 0.0, atol=1e-6)

    def pull_worse(s, key, obs, prev_action, prev_reward, prev_done):
        return s, worse, {}

    steps = run_trial(env, pull_worse, (), task, KEY)
    assert steps["done"].tolist() == [False, False, False, True] * 3
    np.testing.assert_allclose(steps["regret"], 0.6, atol=1e-6)  # the same arms all trial
    times = np.asarray(steps["obs"][:, -1])  # gymnax's time stamp restarts each episode
    np.testing.assert_allclose(times, np.tile([-1.0, -0.5, 0.0, 0.5], 3), atol=1e-6)


def test_metamaze_trial_keeps_its_goal_and_equals_a_python_loop():
    pytest.importorskip("gymnax")
    env = make_env(GymnaxMetaMazeConfig(episodes=2, episode_steps=30, maze_size=5))
    task = env.sample_task(KEY)

    def agent(s, key, obs, prev_action, prev_reward, prev_done):
        return s, jax.random.randint(key, (), 0, env.n_actions), {}

    steps = jax.jit(lambda k: run_trial(env, agent, (), task, k))(KEY)
    # The same trial by hand, with run_trial's key schedule (rl/trial.py::run_trial).
    k_start, k_steps = jax.random.split(KEY)
    obs, state = env.reset(k_start, task)
    rewards = []
    for t in range(env.trial_steps):
        k_act, k_step, k_reset = jax.random.split(jax.random.fold_in(k_steps, t), 3)
        np.testing.assert_array_equal(steps["obs"][t], obs)
        action = agent((), k_act, obs, None, None, None)[1]
        obs, state, reward, done = env.step(k_step, state, action, task)
        np.testing.assert_array_equal(state.goal, task.goal)  # one goal for the whole trial
        rewards.append(float(reward))
        if bool(done):
            obs, state = env.reset(k_reset, task)
    np.testing.assert_array_equal(steps["reward"], rewards)
    assert set(rewards) <= {0.0, 10.0} and int(steps["done"].sum()) == 2


def test_missing_gymnax_gives_the_install_command(monkeypatch):
    real = importlib.import_module

    def without_gymnax(name, *args, **kwargs):
        if name == "gymnax" or name.startswith("gymnax."):
            raise ModuleNotFoundError("No module named 'gymnax'", name="gymnax")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(gymnax_envs.importlib, "import_module", without_gymnax)
    for cfg in (GymnaxBanditConfig(), GymnaxMetaMazeConfig()):
        with pytest.raises(ConfigError) as error:
            make_env(cfg)
        message = str(error.value)
        assert message.startswith(f"data={cfg.name} needs the gymnax package")
        assert "pip install -e '.[rl]'" in message
        assert "\n" not in message


def test_settings_are_checked_without_gymnax():
    with pytest.raises(ConfigError, match="data.maze_size=4"):
        GymnaxMetaMazeConfig(maze_size=4)
    with pytest.raises(ConfigError, match="data.reward_prob=1.5"):
        GymnaxBanditConfig(reward_prob=1.5)
    with pytest.raises(ConfigError, match="data.episode_steps=0"):
        GymnaxBanditConfig(episode_steps=0)
