"""MetaOptNet (Lee et al. 2019): a multi-class SVM head solved as a QP on the support embeddings.

Per task the head is the Crammer-Singer SVM on the support features X [S, D] with linear kernel
K = X X^T, in its dual: alpha [S, N] minimises

    1/2 tr(alpha^T K alpha) + 1/2 |alpha|^2 - <Y, alpha>
    subject to alpha <= C Y (elementwise) and sum_m alpha[i, m] = 0 for every support example i,

with Y the one-hot support labels (the 1/2 |alpha|^2 term is the paper code's identity added to
the block kernel). Queries get logits scale * (x X^T) alpha, with scale learned. The QP is
solved by accelerated projected gradient (FISTA) with an exact projection onto each example's
constraint set, and differentiated implicitly through the solver's fixed point
(metalearn/algorithms/implicit.py): the embedding learns through the SVM's solution without
backpropagating through its iterations. R2-D2 (metalearn/algorithms/r2d2.py) is the sibling with
a ridge-regression head in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms import implicit
from metalearn.algorithms.base import (
    AlgoConfig,
    LossFn,
    episode_classes,
    make_algorithm,
    split_outputs,
)
from metalearn.checks import MAX_INNER_STEPS, at_most, positive, require
from metalearn.models import Model
from metalearn.types import Algorithm


@dataclass
class MetaOptNetConfig(AlgoConfig):
    norms: ClassVar[tuple[str, ...]] = ("transductive", "inductive")
    any_way: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("classification",)
    reads_padded: ClassVar[bool] = True

    name: str = "metaoptnet"
    c: float = 0.1  # the SVM's C: the bound on the dual variables (the paper's C_reg)
    qp_steps: int = 100  # FISTA iterations on the dual QP
    implicit_steps: int = 30  # GMRES iterations for the implicit gradient of its solution
    scale: float = 1.0  # the logits' learned scale at the start

    def __post_init__(self) -> None:
        positive("algo.c", self.c)
        positive("algo.scale", self.scale)
        for name in ("qp_steps", "implicit_steps"):
            value = getattr(self, name)
            require(value >= 1, f"algo.{name}={value} must be >= 1.")
            at_most(f"algo.{name}", value, MAX_INNER_STEPS)


def project_rows(v: jax.Array, cap: jax.Array, classes: jax.Array | None = None) -> jax.Array:
    """Per row of v [S, N], the nearest a with a <= cap and sum(a) = 0 (cap >= 0), over the
    columns of `classes` (bool [N]; None: all); the other columns are held at 0.

    a = min(v - tau, cap) with tau the root of the decreasing, piecewise-linear
    g(tau) = sum_m min(v_m - tau, cap_m). Its breakpoints are b_m = v_m - cap_m; the root lies
    just above the largest breakpoint where g >= 0, so the coordinates at or below it are free
    and tau follows from them in closed form, which keeps a differentiable in v and cap.
    """
    used = jnp.ones(v.shape[-1], bool) if classes is None else classes
    b = v - cap
    terms = jnp.minimum(v[:, None, :] - b[:, :, None], cap[:, None, :])  # [S, k, m]
    g = jnp.sum(jnp.where(used, terms, 0), -1)  # g(b_k)
    candidates = jnp.where(used & (g >= 0), b, -jnp.inf)
    lowest = jax.lax.stop_gradient(jnp.max(candidates, -1, keepdims=True))
    free = used & (b <= lowest)  # never empty: the breakpoint `lowest` itself is free
    at_bound = jnp.where(used, cap, 0)
    total = jnp.sum(jnp.where(free, v, at_bound), -1, keepdims=True)
    tau = total / jnp.sum(free, -1, keepdims=True)
    return jnp.where(free, v - tau, at_bound)


def step_size(gram: jax.Array) -> jax.Array:
    """1 / a bound on the dual's curvature (Gershgorin's on the largest eigenvalue of K, + 1)."""
    return jax.lax.stop_gradient(1 / (jnp.max(jnp.sum(jnp.abs(gram), -1)) + 1))


def svm_dual(
    gram: jax.Array, targets: jax.Array, c, steps: int, init=None, classes=None
) -> jax.Array:
    """The Crammer-Singer dual's alpha [S, N] after `steps` FISTA iterations from init (0),
    over the columns of `classes` (a padded episode's; None: all)."""
    cap = c * targets
    eta = step_size(gram)

    def gradient(alpha):
        return gram @ alpha + alpha - targets

    def iterate(carry, _):
        alpha, z, t = carry
        alpha_next = project_rows(z - eta * gradient(z), cap, classes)
        t_next = (1 + jnp.sqrt(1 + 4 * t**2)) / 2
        return (alpha_next, alpha_next + (t - 1) / t_next * (alpha_next - alpha), t_next), None

    alpha0 = jnp.zeros_like(targets) if init is None else init
    (alpha, _, _), _ = jax.lax.scan(iterate, (alpha0, alpha0, jnp.ones(())), None, steps)
    return alpha


def svm_head(features, targets, c, qp_steps: int, implicit_steps: int, classes=None):
    """alpha [S, N] of the dual SVM on features [S, D], differentiable implicitly: through the
    fixed point alpha = project(alpha - eta grad(alpha)) of projected gradient, whose root the
    FISTA solve approximates (any step size eta > 0 has the same fixed points)."""
    gram = features @ features.T
    cap = c * targets
    eta = step_size(gram)

    def optimality(alpha):
        step = alpha - eta * (gram @ alpha + alpha - targets)
        return alpha - project_rows(step, cap, classes)

    def solve(alpha0):
        return svm_dual(gram, targets, c, qp_steps, alpha0, classes)

    return implicit.root(
        optimality,
        solve,
        jnp.zeros_like(targets),
        linear_solver="gmres",
        maxiter=implicit_steps,
    )


def make(cfg: MetaOptNetConfig, model: Model, loss_fn: LossFn, n_out: int, **_) -> Algorithm:
    def init(key):
        return {"embed": model.init(key, None), "scale": jnp.asarray(cfg.scale, jnp.float32)}

    def adapt(meta_params, support, key, inner_steps=0):
        features = split_outputs(lambda x: model.embed(meta_params["embed"], x), support)
        targets = jax.nn.one_hot(support.y, n_out)
        if support.mask is not None:
            # A zero row of padding has a zero row and column of the kernel and a zero bound:
            # its dual variables solve to zero and leave the real rows' solution as it is.
            real = support.mask[:, None]
            features, targets = features * real, targets * real
        # the QP over the episode's classes only: a column of a class without support examples
        # would still take a share of each row's sum constraint and change the solution
        classes = episode_classes(support, n_out)
        alpha = svm_head(features, targets, cfg.c, cfg.qp_steps, cfg.implicit_steps, classes)
        return {"support": features, "alpha": alpha}

    def predict(meta_params, head, x):
        features = model.embed(meta_params["embed"], x)
        return meta_params["scale"] * (features @ head["support"].T) @ head["alpha"]

    return make_algorithm(init, adapt, predict, loss_fn)


registry.register("algo", "metaoptnet", MetaOptNetConfig, make)
