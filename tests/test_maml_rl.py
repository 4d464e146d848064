"""2D point navigation (metalearn/envs/point_nav.py) and MAML-RL (metalearn/rl/maml_rl.py): the
environment against hand-checked transitions, the inner REINFORCE step against a hand-computed
one, the baseline against numpy, the DiCE meta-gradient against a finite difference of the exact
expected post-adaptation return of a bandit, the config checks and one CLI run."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compose_config

from metalearn.api import load_run
from metalearn.checks import ConfigError
from metalearn.data.base import DataSpec, spec_of
from metalearn.envs import make_env
from metalearn.envs.bandit import BanditConfig
from metalearn.envs.base import env_source
from metalearn.envs.point_nav import PointNavConfig
from metalearn.envs.tabular_mdp import TabularMDPConfig
from metalearn.evaluate import make_evaluator
from metalearn.rl.maml_rl import (
    Learner,
    MAMLRLConfig,
    Policy,
    baseline_features,
    discounted_returns,
    linear_baseline,
)
from metalearn.rl.trial import run_trial, transition_input

KEY = jax.random.PRNGKey(0)


def test_point_nav_steps_clip_the_velocity_and_pay_minus_the_distance():
    env = make_env(PointNavConfig(episode_steps=3))
    goal = jnp.array([0.2, 0.1])
    obs, state = env.reset(KEY, goal)
    np.testing.assert_array_equal(obs, [0.0, 0.0])
    obs, state, reward, done = env.step(KEY, state, jnp.array([0.3, -0.05]), goal)
    np.testing.assert_allclose(obs, [0.1, -0.05], rtol=1e-6)  # x clipped to 0.1
    np.testing.assert_allclose(reward, -np.sqrt(0.1**2 + 0.15**2), rtol=1e-6)
    assert not bool(done)
    obs, state, reward, done = env.step(KEY, state, jnp.array([0.1, 0.15]), goal)
    np.testing.assert_allclose(obs, [0.2, 0.05], rtol=1e-6)  # y clipped to 0.1
    np.testing.assert_allclose(reward, -0.05, rtol=1e-5)
    _, _, _, done = env.step(KEY, state, jnp.zeros(2), goal)
    assert bool(done)  # episode_steps=3
    goals = jax.vmap(env.sample_task)(jax.random.split(KEY, 2000))
    assert goals.shape == (2000, 2) and float(jnp.abs(goals).max()) <= 0.5
    assert float(jnp.abs(goals).max()) > 0.49 and abs(float(goals.mean())) < 0.02


def test_point_nav_trial_resets_to_the_origin_and_records_continuous_actions():
    env = make_env(PointNavConfig(episode_steps=4, episodes=2))
    goal = jnp.array([-0.3, 0.25])
    push = jnp.array([-0.25, 0.05])  # clipped to (-0.1, 0.05)

    def agent(state, key, obs, prev_action, prev_reward, prev_done):
        return state, push, {}

    steps = run_trial(env, agent, (), goal, KEY)
    position, positions, rewards = np.zeros(2), [], []
    for t in range(8):
        positions.append(position.copy())
        position = position + np.array([-0.1, 0.05])
        rewards.append(-np.linalg.norm(position - np.array([-0.3, 0.25])))
        if t == 3:
            position = np.zeros(2)  # the episode ends: back to the origin
    np.testing.assert_allclose(steps["obs"], positions, atol=1e-6)
    np.testing.assert_allclose(steps["reward"], rewards, rtol=1e-5)
    np.testing.assert_array_equal(steps["prev_action"][0], [0.0, 0.0])
    record = transition_input(env, steps["obs"][1], steps["prev_action"][1], 0.5, False)
    np.testing.assert_allclose(record, [-0.1, 0.05, -0.25, 0.05, 0.5, 0.0], atol=1e-6)


def tabular_learner(gamma, baseline="none", inner_lr=0.1):
    env = make_env(TabularMDPConfig(states=3, actions=2, episode_steps=2))
    policy = Policy(env, lambda net, x: x @ net["table"])  # logits table [S, A]
    cfg = MAMLRLConfig(inner_lr=inner_lr, gamma=gamma, baseline=baseline, trajectories=1)
    return Learner(env, policy, cfg)


def test_inner_step_is_a_hand_computed_reinforce_step():
    learner = tabular_learner(gamma=0.5)
    params = {"net": {"table": jnp.zeros((3, 2))}}  # uniform: grad log pi(a|s) = e_a - 1/2
    steps = {"obs": jnp.array([[0, 1]]), "action": jnp.array([[0, 1]]),
             "reward": jnp.array([[1.0, 2.0]]), "baseline": jnp.zeros((1, 2))}  # fmt: skip
    # G = (1 + 0.5 * 2, 2); weights gamma^t G_t = (2, 1); a mean over T = 2 steps, lr 0.1
    new = learner.inner_step(params, steps)["net"]["table"]
    np.testing.assert_allclose(new, [[0.05, -0.05], [-0.025, 0.025], [0, 0]], atol=1e-7)
    np.testing.assert_allclose(learner.surrogate(params, steps), (1 + 0.5 * 2) / 2, rtol=1e-6)
    # a baseline of 1 at both steps: weights (G_t - b_t) gamma^t = (1, 0.5)
    new = learner.inner_step(params, {**steps, "baseline": jnp.ones((1, 2))})["net"]["table"]
    np.testing.assert_allclose(new, [[0.025, -0.025], [-0.0125, 0.0125], [0, 0]], atol=1e-7)


def test_inner_step_against_a_numpy_policy_gradient_on_random_trajectories():
    learner = tabular_learner(gamma=0.9)
    rng = np.random.default_rng(0)
    n, t_len = 5, 2
    table = rng.normal(size=(3, 2)).astype(np.float32)
    obs, actions = rng.integers(0, 3, (n, t_len)), rng.integers(0, 2, (n, t_len))
    rewards, base = rng.normal(size=(n, t_len)), rng.normal(size=(n, t_len))
    steps = {"obs": jnp.asarray(obs), "action": jnp.asarray(actions),
             "reward": jnp.asarray(rewards, jnp.float32),
             "baseline": jnp.asarray(base, jnp.float32)}  # fmt: skip
    grad = np.zeros((3, 2))
    for i in range(n):
        for t in range(t_len):
            g_t = sum(0.9 ** (u - t) * rewards[i, u] for u in range(t, t_len))
            s, a = obs[i, t], actions[i, t]
            pi = np.exp(table[s]) / np.exp(table[s]).sum()
            grad[s] += 0.9**t * (g_t - base[i, t]) * (np.eye(2)[a] - pi)
    new = learner.inner_step({"net": {"table": jnp.asarray(table)}}, steps)["net"]["table"]
    np.testing.assert_allclose(new, table + 0.1 * grad / (n * t_len), rtol=1e-5, atol=1e-6)


def test_linear_baseline_and_returns_against_numpy():
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(4, 6, 2)).astype(np.float32)
    rewards = rng.normal(size=(4, 6)).astype(np.float32)
    returns = discounted_returns(jnp.asarray(rewards), 0.9)
    ref = np.zeros_like(rewards)
    for t in reversed(range(6)):
        ref[:, t] = rewards[:, t] + (0.9 * ref[:, t + 1] if t < 5 else 0.0)
    np.testing.assert_allclose(returns, ref, rtol=1e-5, atol=1e-6)
    t = np.broadcast_to(np.arange(6)[None, :, None] / 100, (4, 6, 1))
    features = np.concatenate([obs, obs**2, t, t**2, t**3, np.ones_like(t)], -1).reshape(-1, 8)
    np.testing.assert_allclose(baseline_features(jnp.asarray(obs)).reshape(-1, 8), features,
                               rtol=1e-6)  # fmt: skip
    f = features.astype(np.float64)
    w = np.linalg.solve(f.T @ f + 1e-5 * np.eye(8), f.T @ ref.reshape(-1))
    np.testing.assert_allclose(linear_baseline(jnp.asarray(obs), returns), (f @ w).reshape(4, 6),
                               rtol=2e-3, atol=2e-3)  # fmt: skip


def test_gaussian_policy_log_prob_is_the_diagonal_normal_density():
    env = make_env(PointNavConfig())
    policy = Policy(env, lambda net, x: x @ net["w"])
    params = {"net": {"w": jnp.array([[1.0, 0.0], [0.5, -1.0]])}, "log_std": jnp.array([0.0, -1.0])}
    x, a = jnp.array([[0.2, 0.4]]), jnp.array([[0.1, -0.3]])
    mean, std = np.array([0.4, -0.4]), np.exp([0.0, -1.0])
    ref = (-0.5 * ((a[0] - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum()
    np.testing.assert_allclose(policy.log_prob(params, x, a), [ref], rtol=1e-6)
    draws = jax.vmap(lambda k: policy.sample(params, k, x)[0])(jax.random.split(KEY, 4000))
    np.testing.assert_allclose(draws.mean(0), mean, atol=0.05)  # 4000 draws: ~3 std errors
    np.testing.assert_allclose(draws.std(0), std, rtol=0.05)


# A 2-armed Bernoulli bandit with a softmax policy over two logits: one pull per episode, so
# E[return] = V(theta) = softmax(theta) . P in closed form. MAML-RL's objective, the return
# after the expected inner update, is J(theta) = V(theta + ALPHA grad V(theta)).
P, ALPHA, THETA = np.array([0.2, 0.9]), 2.0, np.array([0.3, -0.4])


def value(theta):
    e = np.exp(theta - theta.max())
    return e / e.sum() @ P


def central_difference(f, theta, eps):
    return np.array([(f(theta + eps * e) - f(theta - eps * e)) / (2 * eps) for e in np.eye(2)])


def meta_gradients(learner, params, keys):
    """MAML-RL's ascent direction on the bandit for each key [n, 2]."""
    ascent = jax.grad(lambda p, k: -learner.meta_loss(p, jnp.asarray(P), k)[0])
    return jax.jit(jax.vmap(lambda k: ascent(params, k)["net"]["logits"]))(keys)


def test_dice_meta_gradient_matches_the_exact_gradient_and_first_order_misses_it():
    """Exact gradient: a central difference (float64) of J. DiCE's estimate is averaged over
    4000 independent (inner batch, outer batch) draws of 200 pulls each; its tolerance is 4
    standard errors of that mean plus the O(ALPHA^2 / trajectories) bias of the sampled inner
    update theta' (MAML-RL's own: J is taken at the expected update), measured at 4e-4 with
    20,000 draws (2 standard errors). First order drops ALPHA Hess V grad V(theta'): it lands
    on grad V(theta') instead, 0.036 away (about 80 standard errors), on the side it predicts."""
    grad_value = lambda t: central_difference(value, t, 1e-5)  # noqa: E731
    exact = central_difference(lambda t: value(t + ALPHA * grad_value(t)), THETA, 1e-4)
    first_order_exact = grad_value(THETA + ALPHA * grad_value(THETA))
    env = make_env(BanditConfig(arms=2, episodes=1))
    policy = Policy(env, lambda net, x: jnp.broadcast_to(net["logits"], (x.shape[0], 2)))
    params = {"net": {"logits": jnp.asarray(THETA, jnp.float32)}}
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    estimates = {}
    for first_order in (False, True):
        cfg = MAMLRLConfig(inner_lr=ALPHA, trajectories=200, gamma=1.0, baseline="none",
                           first_order=first_order)  # fmt: skip
        grads = np.asarray(meta_gradients(Learner(env, policy, cfg), params, keys), np.float64)
        estimates[first_order] = (grads.mean(0), grads.std(0) / np.sqrt(len(keys)))
    (dice, se), (fo, fo_se) = estimates[False], estimates[True]
    assert np.all(np.abs(dice - exact) < 4 * se + 1e-3), (dice, se, exact)
    assert np.all(np.abs(fo - first_order_exact) < 4 * fo_se + 1e-3), (fo, first_order_exact)
    gap = exact - first_order_exact  # the second-order term first order leaves out
    assert np.all(np.abs(gap) > 30 * se)
    np.testing.assert_allclose(dice - fo, gap, rtol=0.15)  # the same direction and size


def test_maml_rl_configs_and_refusals(tmp_path, monkeypatch):
    cfg = compose_config(["algo=maml_rl", "data=point_nav"], tmp_path, monkeypatch)
    assert cfg.model.name == "policy_mlp" and cfg.model.hidden == 100
    assert cfg.data.episode_steps == 100 and cfg.algo.baseline == "linear"
    with pytest.raises(ConfigError, match="algo.baseline"):
        compose_config(["algo=maml_rl", "data=point_nav", "algo.baseline=mlp"], tmp_path,
                       monkeypatch)  # fmt: skip
    with pytest.raises(ConfigError, match=r"models that take transitions: \[.*'policy_mlp'"):
        compose_config(["algo=maml_rl", "data=point_nav", "model=mlp"], tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match=r"algo=rl2 cannot act on data=point_nav.*'maml_rl'"):
        compose_config(["algo=rl2", "data=point_nav", "model=gru"], tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match="model=gru is not allowed with algo=maml_rl"):
        compose_config(["algo=maml_rl", "data=bandit"], tmp_path, monkeypatch)
    cfg = compose_config(["algo=maml_rl", "data=tabular_mdp", "model=policy_mlp"], tmp_path,
                         monkeypatch)  # fmt: skip
    assert cfg.data.states == 10
    with pytest.raises(ConfigError, match="algo=maml_rl needs a reinforcement dataset"):
        compose_config(["algo=maml_rl", "data=sinusoid"], tmp_path, monkeypatch)


@pytest.mark.slow
def test_cli_trains_maml_rl_on_point_nav(tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "metalearn", "train", "algo=maml_rl", "data=point_nav",
        "data.episode_steps=20", "model.hidden=16", "algo.trajectories=4", "train.steps=4",
        "train.meta_batch=2", "train.log_every=2", "eval.every=2", "eval.num_tasks=10",
        "eval.val_tasks=4", "progress=false", f"hydra.run.dir={run}",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=300, cwd=tmp_path)
    test = json.loads((run / "summary.json").read_text())["test"]
    assert test["num_tasks"] == 10 and test["return"] == test["return_1"]
    for i in range(4):  # 20 steps, each at most (0.5 + 20 * 0.1) sqrt(2) from the goal
        assert -20 * 2.5 * np.sqrt(2) <= test[f"return_{i}"] < 0 and test[f"return_{i}_ci95"] > 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("return_pre" in line for line in lines if line["split"] == "train")
    # load_run rebuilds the learner from the run's data_spec.json: its best checkpoint's scores
    # on the test tasks (the same draws, key by key) are the run's own test
    loaded = load_run(run)
    assert loaded.spec.kind == "reinforcement" and loaded.checkpoint_step in (2, 4)
    source = env_source(make_env(loaded.config.data))
    evaluate = make_evaluator(loaded.algo, source, None, loaded.inner_steps, None)
    again = evaluate(loaded.params, "test", 10, loaded.config.eval.seed)
    for key in ("return", "return_0", "return_3"):
        np.testing.assert_allclose(again[key], test[key], rtol=1e-5)


def test_data_spec_of_an_environment_round_trips():
    """A run's data_spec.json for an RL run (load_run reads it back)."""
    spec = spec_of(env_source(make_env(PointNavConfig())))
    record = json.loads(json.dumps(spec.to_json()))
    assert DataSpec.from_json(record) == spec and spec.kind == "reinforcement"
    with pytest.raises(ValueError, match="kind='bandits' is not one of classification, regr"):
        DataSpec.from_json({**record, "kind": "bandits"})
