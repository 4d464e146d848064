"""PPO's maths for one batch of trajectories (Schulman et al. 2017): generalised advantage
estimation (Schulman et al. 2016) and the clipped surrogate with value loss and entropy bonus."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from metalearn.checks import positive, require


def gae(rewards, values, dones, last_value, gamma: float, lam: float):
    """Advantages and returns [T] of one trajectory. dones[t] marks that step t ended the
    trajectory (no bootstrap past it); last_value is V of the state after the last step.

    delta_t = r_t + gamma V_{t+1} (1 - d_t) - V_t,  A_t = delta_t + gamma lam (1 - d_t) A_{t+1}.
    """
    next_values = jnp.append(values[1:], last_value)
    live = 1.0 - dones.astype(values.dtype)
    deltas = rewards + gamma * next_values * live - values

    def back(advantage, x):
        delta, alive = x
        advantage = delta + gamma * lam * alive * advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(back, jnp.zeros((), values.dtype), (deltas, live), reverse=True)
    return advantages, advantages + values


def ppo_loss(logp, old_logp, advantages, values, returns, entropy, *, clip: float,
             value_coef: float, entropy_coef: float):  # fmt: skip
    """(loss, metrics) over a batch of steps (any shape, all arrays alike): the negative clipped
    surrogate min(rho A, clip(rho, 1 - eps, 1 + eps) A), plus value_coef times half the squared
    value error, minus entropy_coef times the mean entropy."""
    ratio = jnp.exp(logp - old_logp)
    surrogate = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - clip, 1 + clip) * advantages)
    policy_loss = -surrogate.mean()
    value_loss = 0.5 * jnp.square(values - returns).mean()
    mean_entropy = entropy.mean()
    loss = policy_loss + value_coef * value_loss - entropy_coef * mean_entropy
    return loss, {
        "loss": loss,
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "entropy": mean_entropy,
        "approx_kl": (old_logp - logp).mean(),
        "clip_fraction": (jnp.abs(ratio - 1) > clip).mean(),
    }


def ppo_epochs(loss, optimizer, params, opt_state, batch, n: int, key, *, epochs: int,
               minibatches: int):  # fmt: skip
    """PPO's update: `epochs` passes over the n examples of `batch` (each leaf's leading axis),
    each in `minibatches` random minibatches, one `optimizer` step on `loss(params, minibatch)`
    (which returns (loss, metrics)) per minibatch, all in lax.scan.

    Returns (params, opt_state, the last pass's metrics averaged over its minibatches).
    """
    size = n // minibatches

    def epoch(carry, key):
        order = jax.random.permutation(key, n).reshape(minibatches, size)

        def minibatch(carry, idx):
            p, s = carry
            (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(
                p, jax.tree.map(lambda a: a[idx], batch)
            )
            updates, s = optimizer.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), metrics

        return jax.lax.scan(minibatch, carry, order)

    keys = jax.random.split(key, epochs)
    (params, opt_state), metrics = jax.lax.scan(epoch, (params, opt_state), keys)
    return params, opt_state, jax.tree.map(lambda m: m[-1].mean(), metrics)


def check_ppo_settings(cfg) -> None:
    """The PPO settings a learner's schema shares (gamma, gae_lambda, clip, max_grad_norm,
    epochs, minibatches, value_coef, entropy_coef), each refused by name when out of range."""
    require(0 <= cfg.gamma <= 1, f"algo.gamma={cfg.gamma} must lie in [0, 1].")
    require(0 <= cfg.gae_lambda <= 1, f"algo.gae_lambda={cfg.gae_lambda} must lie in [0, 1].")
    positive("algo.clip", cfg.clip)
    positive("algo.max_grad_norm", cfg.max_grad_norm)
    for key in ("epochs", "minibatches"):
        value = getattr(cfg, key)
        require(1 <= value <= 1000, f"algo.{key}={value} is not allowed: give 1 to 1000.")
    for key in ("value_coef", "entropy_coef"):
        value = getattr(cfg, key)
        require(value >= 0, f"algo.{key}={value} must be >= 0.")
