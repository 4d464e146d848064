"""Task weighting for multi-task learning: how T per-task losses become one parameter gradient.

`make_weighting(cfg, n_tasks)` returns a `Weighting`, a bundle of pure, jittable functions:

    init_params(n_tasks) -> wparams     learned weighting parameters ({} unless uncertainty),
                                        trained by the outer optimizer together with the model
    init_state(n_tasks)  -> state       carried, non-learned state ({} unless dwa)
    gradient(task_losses, params, wparams, state, present, step, draw_gradients=None)
        -> (grads, wgrads, new_state, metrics)

`task_losses(params) -> (losses [T], aux)` gives each task's mean loss; `present` (bool [T]) marks
the tasks in this step's batch. Entries of absent tasks are ignored (masked with `where`, so even
NaN does no harm in the forward pass; keep them finite, e.g. 0, so their zero cotangent cannot
meet an infinite derivative). Only pcgrad needs each task's own gradient; the optional
`draw_gradients(params) -> (losses [T], grads with a leading [B] axis, task id of each of the B
draws, aux)` gives them cheaply (per-draw gradients from one vmapped backward pass, averaged per
task here); without it pcgrad takes one backward pass through the whole batch per present task.
With P the present tasks and |P| their number, the objectives are:

- uniform:     (1/|P|) sum_{i in P} L_i.
- static:      sum_{i in P} w_i L_i / sum_{i in P} w_i, with w = cfg.task_weights.
- uncertainty: Kendall, Gal & Cipolla, CVPR 2018, with learned s_i = log sigma_i^2:
               (1/|P|) sum_{i in P} [exp(-s_i) L_i + s_i].
               Each term is twice the paper's Gaussian (regression) term 1/(2 sigma_i^2) L_i
               + log sigma_i of its Eq. 7, written in s_i as the paper advises ("in practice, we
               train the network to predict the log variance, s := log sigma^2"). It is not the
               classification form of Eq. 10 (1/sigma^2 L + log sigma, i.e. exp(-s) L + s/2).
               For fixed L_i it is minimised at s_i = log L_i; s starts at 0 (weights 1).
- dwa:         Liu, Johns & Davison, CVPR 2019 (Dynamic Weight Average):
               lambda_i = |P| exp(r_i / Temp) / sum_{j in P} exp(r_j / Temp),
               r_i = L_i(t-1) / L_i(t-2), objective (1/|P|) sum_{i in P} lambda_i L_i, with
               lambda constant (stop_gradient). The paper's K (number of tasks) becomes |P| and
               its sum is divided by |P|, so equal ratios give exactly the uniform objective.
               Under task sampling, "t-1" and "t-2" are the last two steps in which task i was
               present: the state keeps each task's last two observed losses and how many it
               has seen (0, 1 or 2); absent tasks keep their history. A task seen fewer than
               twice gets r_i = 1, so every weight is 1 for the first two steps when all tasks
               are present, as in the paper. The paper averages losses over an epoch; here one
               step is one "t". A zero previous loss also gives r_i = 1.
- minmax:      max_{i in P} L_i when cfg.minmax_temperature == 0 (tied worst tasks share the
               gradient equally); otherwise the smooth upper bound
               Temp * log sum_{i in P} exp(L_i / Temp), at most Temp log|P| above the max.
- pcgrad:      Yu et al., NeurIPS 2020 (gradient surgery, Algorithm 1) on the flattened parameter
               vector: per-task gradients g_i; for each present i, g'_i starts at g_i and visits
               the other present tasks j in a random order; if g'_i . g_j < 0 (g_j the original
               gradient), g'_i -= (g'_i . g_j) / |g_j|^2 g_j. The update is the mean of g'_i over
               P (the paper sums; the mean keeps the scale of uniform, which it equals when no
               gradients conflict). The random order is deterministic: task i's order is
               permutation(split(fold_in(key(0), step), T)[i]), see `pcgrad_orders`.

For every mode but pcgrad, grads is exactly jax.grad of the objective above. metrics holds
"objective", "weights" (d objective / d L_i, zero for absent tasks; 1/|P| per present task for
pcgrad), "losses" (absent tasks 0), "aux" (task_losses' aux), and per mode "log_var"
(uncertainty), "dwa_weights" (dwa's lambda) or "conflicts" (pcgrad: the fraction of ordered
pairs of present tasks whose gradients conflict).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from metalearn.checks import ConfigError
from metalearn.types import Params

WEIGHTINGS = ("uniform", "static", "uncertainty", "dwa", "minmax", "pcgrad")

State = Any  # a pytree of arrays


class Weighting(NamedTuple):
    """A task weighting as pure functions; see the module docstring for `gradient`."""

    init_params: Callable[[int], Params]  # n_tasks -> learned weighting parameters ({} if none)
    init_state: Callable[[int], State]  # n_tasks -> state carried between steps ({} if none)
    # (task_losses, params, wparams, state, present, step, draw_gradients=None) -> ...
    gradient: Callable[..., tuple]


# A combine function maps (losses [T], wparams, state, present [T]) to
# (objective, (new_state, extra metrics)); `gradient` differentiates it.
Combine = Callable[..., tuple[jax.Array, tuple[State, dict]]]


def _count(present: jax.Array) -> jax.Array:
    """|P|, at least 1 so a step without tasks gives 0 rather than 0/0."""
    return jnp.maximum(jnp.sum(present), 1).astype(jnp.float32)


def _present_mean(values: jax.Array, present: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(present, values, 0.0)) / _count(present)


def _uniform(losses, wparams, state, present):
    return _present_mean(losses, present), (state, {})


def _static(weights: jax.Array) -> Combine:
    def combine(losses, wparams, state, present):
        w = jnp.where(present, weights, 0.0)
        total = jnp.sum(w)
        weighted = jnp.sum(jnp.where(present, w * losses, 0.0))
        return jnp.where(total > 0, weighted / jnp.where(total > 0, total, 1.0), 0.0), (state, {})

    return combine


def _uncertainty(losses, wparams, state, present):
    log_var = wparams["log_var"]  # s_i = log sigma_i^2
    objective = _present_mean(jnp.exp(-log_var) * losses + log_var, present)
    return objective, (state, {"log_var": log_var})


def dwa_weights(state: State, present: jax.Array, temperature: float) -> jax.Array:
    """lambda_i [T] of Dynamic Weight Average from the loss history; 0 for absent tasks."""
    last, prev, seen = state["last"], state["prev"], state["seen"]
    known = (seen >= 2) & (prev > 0)
    ratio = jnp.where(known, last / jnp.where(known, prev, 1.0), 1.0)
    softmax = jax.nn.softmax(ratio / temperature, where=present)
    return jnp.where(present, _count(present) * softmax, 0.0)


def _dwa(temperature: float) -> Combine:
    def combine(losses, wparams, state, present):
        weights = jax.lax.stop_gradient(dwa_weights(state, present, temperature))
        objective = jnp.sum(jnp.where(present, weights * losses, 0.0)) / _count(present)
        observed = jax.lax.stop_gradient(losses)
        new_state = {
            "last": jnp.where(present, observed, state["last"]),
            "prev": jnp.where(present, state["last"], state["prev"]),
            "seen": jnp.where(present, jnp.minimum(state["seen"] + 1, 2), state["seen"]),
        }
        return objective, (new_state, {"dwa_weights": weights})

    return combine


def _minmax(temperature: float) -> Combine:
    def combine(losses, wparams, state, present):
        if temperature == 0:
            worst = jnp.max(jnp.where(present, losses, -jnp.inf))
        else:
            worst = temperature * jax.nn.logsumexp(
                jnp.where(present, losses / temperature, -jnp.inf)
            )
        return jnp.where(jnp.any(present), worst, 0.0), (state, {})

    return combine


def _combined_gradient(combine: Combine) -> Callable[..., tuple]:
    """The gradient of combine(task_losses(params)) by one backward pass through the model."""

    def gradient(task_losses, params, wparams, state, present, step, draw_gradients=None):
        present = jnp.asarray(present, bool)
        losses, pullback, aux = jax.vjp(task_losses, params, has_aux=True)

        def masked(losses, wparams):  # absent entries may be NaN: keep them out of every term
            return combine(jnp.where(present, losses, 0.0), wparams, state, present)

        value_and_grad = jax.value_and_grad(masked, argnums=(0, 1), has_aux=True)
        (objective, (new_state, extra)), (weights, wgrads) = value_and_grad(losses, wparams)
        (grads,) = pullback(weights)  # chain rule: sum_i (d objective / d L_i) grad L_i
        metrics = {
            "objective": objective,
            "weights": weights,
            "losses": jnp.where(present, losses, 0.0),
            **extra,
            "aux": aux,
        }
        return grads, wgrads, new_state, metrics

    return gradient


def pcgrad_orders(step: jax.Array | int, n_tasks: int) -> jax.Array:
    """int32 [T, T]: row i is the order in which task i visits the tasks (itself is skipped)."""
    keys = jax.random.split(jax.random.fold_in(jax.random.key(0), step), n_tasks)
    return jax.vmap(lambda k: jax.random.permutation(k, n_tasks))(keys)


def project_conflicting(
    grads: jax.Array, present: jax.Array, orders: jax.Array, tasks: jax.Array | None = None
) -> jax.Array:
    """PCGrad's surgery. grads [S, P] holds the gradients of tasks[s] (default: every task in
    order, S = T); an entry of tasks equal to T is padding. Returns the projected [S, P], with
    padding and absent tasks zeroed."""
    valid, slot_orders = _slots(present, orders, tasks, grads.shape[0])
    return _surgery_coefficients(grads @ grads.T, valid, slot_orders) @ grads


def _slots(present, orders, tasks, n_slots):
    """Which slots hold a present task, and each slot's visiting order over the slots (its
    task's order restricted to the slots' tasks; the others last)."""
    n_tasks = present.shape[0]
    tasks = jnp.arange(n_tasks) if tasks is None else tasks
    task = jnp.minimum(tasks, n_tasks - 1)
    valid = (tasks < n_tasks) & present[task]
    position = jnp.argsort(orders, axis=1)  # position[i, j]: when task i's order visits task j
    slot_position = jnp.where(valid[None, :], position[task][:, task], n_tasks)
    return valid, jnp.argsort(slot_position, axis=1)


def _surgery_coefficients(gram: jax.Array, valid: jax.Array, slot_orders: jax.Array) -> jax.Array:
    """PCGrad in the span of the task gradients: every projected g'_s is sum_k C[s, k] g_k, so
    the surgery needs only the Gram matrix [S, S], never a pass over the parameters."""
    n_slots = gram.shape[0]

    def project_one(s, order):
        def visit(c, k):
            dot = c @ gram[:, k]  # g'_s . g_k
            conflict = (k != s) & valid[k] & (dot < 0)  # dot < 0 implies |g_k| > 0
            coef = jnp.where(conflict, dot / jnp.where(conflict, gram[k, k], 1.0), 0.0)
            return c.at[k].add(-coef), None

        coefficients, _ = jax.lax.scan(visit, jax.nn.one_hot(s, n_slots, dtype=gram.dtype), order)
        return coefficients

    coefficients = jax.vmap(project_one)(jnp.arange(n_slots), slot_orders)
    return jnp.where(valid[:, None], coefficients, 0.0)


def _pcgrad(max_present: int | None) -> Callable[..., tuple]:
    """PCGrad needs each present task's own gradient. With task sampling at most max_present
    tasks (the meta-batch) are in a step, so only that many are computed: from per-draw
    gradients when the caller gives draw_gradients, else by one backward pass per task."""

    def gradient(task_losses, params, wparams, state, present, step, draw_gradients=None):
        present = jnp.asarray(present, bool)
        flat, unravel = ravel_pytree(params)
        if draw_gradients is None:
            losses, pullback, aux = jax.vjp(lambda f: task_losses(unravel(f)), flat, has_aux=True)
        else:
            losses, draw_grads, draw_task, aux = draw_gradients(params)
        n_tasks = losses.shape[0]
        n_slots = n_tasks if max_present is None else min(max_present, n_tasks)
        # the present task ids, padded with n_tasks (whose one-hot row is all zeros)
        (tasks,) = jnp.nonzero(present, size=n_slots, fill_value=n_tasks)
        if draw_gradients is None:  # one backward pass through the whole batch per slot
            (per_task,) = jax.vmap(pullback)(jax.nn.one_hot(tasks, n_tasks, dtype=losses.dtype))
        else:  # each slot's task: the mean gradient of its draws
            rows = jax.vmap(lambda g: ravel_pytree(g)[0])(draw_grads)  # [B, P]
            slot = jnp.argmax(draw_task[:, None] == tasks[None, :], axis=1)
            draws = jax.ops.segment_sum(jnp.ones_like(slot), slot, n_slots)
            per_task = jax.ops.segment_sum(rows, slot, n_slots) / jnp.maximum(draws, 1)[:, None]
        valid, slot_orders = _slots(present, pcgrad_orders(step, n_tasks), tasks, n_slots)
        gram = per_task @ per_task.T
        total = jnp.sum(_surgery_coefficients(gram, valid, slot_orders), axis=0) @ per_task
        grads = unravel(total / _count(present))

        pairs = valid[:, None] & valid[None, :] & ~jnp.eye(n_slots, dtype=bool)
        conflicts = pairs & (gram < 0)
        metrics = {
            "objective": _present_mean(losses, present),  # PCGrad follows no objective; for logs
            "weights": jnp.where(present, 1.0 / _count(present), 0.0),
            "losses": jnp.where(present, losses, 0.0),
            "conflicts": jnp.sum(conflicts) / jnp.maximum(jnp.sum(pairs), 1),  # fraction of pairs
            "aux": aux,
        }
        return grads, {}, state, metrics

    return gradient


def make_weighting(cfg, n_tasks: int, max_present: int | None = None) -> Weighting:
    """The weighting cfg.weighting over n_tasks tasks, of which at most max_present (default all)
    are in one step; bad task_weights raise ConfigError here."""

    def empty(n: int) -> dict:
        _check_count(n, n_tasks)
        return {}

    init_params, init_state = empty, empty
    if cfg.weighting == "uniform":
        gradient = _combined_gradient(_uniform)
    elif cfg.weighting == "static":
        weights = list(cfg.task_weights)
        if len(weights) != n_tasks:
            example = ",".join(["1"] * n_tasks)
            raise ConfigError(
                f"algo.task_weights has {len(weights)} entries but the data has {n_tasks} tasks; "
                f"give one weight per task, for example algo.task_weights=[{example}]."
            )
        if sum(weights) <= 0:
            raise ConfigError(
                f"algo.task_weights={weights} is not allowed: at least one weight must be > 0."
            )
        gradient = _combined_gradient(_static(jnp.asarray(weights, jnp.float32)))
    elif cfg.weighting == "uncertainty":

        def init_params(n: int) -> dict:
            _check_count(n, n_tasks)
            return {"log_var": jnp.zeros((n,), jnp.float32)}

        gradient = _combined_gradient(_uncertainty)
    elif cfg.weighting == "dwa":

        def init_state(n: int) -> dict:
            _check_count(n, n_tasks)
            # distinct buffers: the train step donates its state, and one buffer cannot be
            # donated twice
            return {
                "last": jnp.zeros((n,), jnp.float32),
                "prev": jnp.zeros((n,), jnp.float32),
                "seen": jnp.zeros((n,), jnp.int32),
            }

        gradient = _combined_gradient(_dwa(cfg.dwa_temperature))
    elif cfg.weighting == "minmax":
        gradient = _combined_gradient(_minmax(cfg.minmax_temperature))
    elif cfg.weighting == "pcgrad":
        gradient = _pcgrad(max_present)
    else:  # MultitaskConfig rejects other names; this guards direct construction
        raise ConfigError(f"algo.weighting={cfg.weighting!r} is not a known weighting.")
    return Weighting(init_params, init_state, gradient)


def _check_count(n: int, expected: int) -> None:
    if n != expected:
        raise ValueError(f"this weighting was built for {expected} tasks, not {n}.")


def pairwise_distance_penalty(stacked_params: Params) -> jax.Array:
    """sum_{i<j} |theta_i - theta_j|^2 over tasks, for leaves with a leading task axis [T, ...].

    Computed in O(T) by sum_{i<j} |a_i - a_j|^2 = T sum_i |a_i|^2 - |sum_i a_i|^2, applied to
    the centred a_i - mean(a) (pairwise distances do not change under a shift, and the centred
    sum is 0): T sum_i |a_i - mean(a)|^2. Centring avoids the cancellation of two large, nearly
    equal terms when the task parameters are close, which is where soft sharing drives them.
    """
    total = jnp.zeros((), jnp.float32)
    for leaf in jax.tree.leaves(stacked_params):
        a = leaf.reshape(leaf.shape[0], -1)
        total = total + a.shape[0] * jnp.sum((a - jnp.mean(a, axis=0)) ** 2)
    return total
