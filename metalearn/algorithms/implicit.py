"""Implicit differentiation of an inner solution: d x*/d theta from the optimality condition.

A learner whose task solution x* = argmin_x g(x, theta) comes from an iterative solver (iMAML's
proximal inner loop, MetaOptNet's QP) need not backpropagate through the solver's iterations:
at a root of its optimality condition F(x*, theta) = 0 the implicit function theorem gives
d x*/d theta = -(dF/dx)^-1 dF/dtheta. `root` wraps jax.lax.custom_root, which applies that rule
in forward and reverse mode, so memory does not grow with the solver's iterations and the
solver itself may be anything (even non-differentiable). The linear system with dF/dx is solved
by conjugate gradients when dF/dx is symmetric positive definite (the Hessian of a strongly convex
objective) or GMRES otherwise (the fixed-point map of a projected solver).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.flatten_util
import jax.numpy as jnp

LINEAR_SOLVERS = ("cg", "gmres")


def root(
    optimality: Callable,
    solve: Callable,
    init,
    *,
    linear_solver: str = "cg",
    maxiter: int = 20,
    tol: float = 1e-5,
):
    """solve(init), an approximate root of optimality (a function of x alone, closing over the
    parameters it depends on), differentiable with respect to those parameters by the implicit
    function theorem; solve is never differentiated."""
    if linear_solver not in LINEAR_SOLVERS:
        raise ValueError(f"linear_solver={linear_solver!r}: one of {LINEAR_SOLVERS}")

    def tangent_solve(jvp, rhs):  # the tangent system (dF/dx) u = rhs, and its transpose
        if linear_solver == "cg":
            cg = lambda matvec, b: conjugate_gradients(matvec, b, maxiter, tol)  # noqa: E731
            return jax.lax.custom_linear_solve(jvp, rhs, cg, symmetric=True)
        gm = lambda matvec, b: gmres(matvec, b, maxiter)  # noqa: E731
        return jax.lax.custom_linear_solve(jvp, rhs, gm, transpose_solve=gm)

    return jax.lax.custom_root(optimality, init, lambda _, x0: solve(x0), tangent_solve)


def gmres(matvec, b, steps: int):
    """x minimising |matvec(x) - b| over the Krylov space of min(steps, size of b) dimensions
    from x = 0 (one cycle of GMRES), on pytrees. Written out because jax.scipy's gmres cannot be
    transposed inside custom_root's reverse mode; a fixed number of Arnoldi steps (classical
    Gram-Schmidt, twice, for orthogonality in float32) and a least-squares solve of the small
    Hessenberg system, so it vmaps over tasks without a while loop."""
    flat_b, unravel = jax.flatten_util.ravel_pytree(b)
    steps = min(steps, flat_b.size)

    def flat_matvec(v):
        return jax.flatten_util.ravel_pytree(matvec(unravel(v)))[0]

    beta = jnp.linalg.norm(flat_b)
    basis = jnp.zeros((steps + 1, flat_b.size), flat_b.dtype)
    basis = basis.at[0].set(flat_b / jnp.where(beta > 0, beta, 1))
    hessenberg = jnp.zeros((steps + 1, steps), flat_b.dtype)

    def arnoldi(carry, k):
        basis, hessenberg = carry
        w = flat_matvec(basis[k])
        earlier = (jnp.arange(steps + 1) <= k).astype(w.dtype)
        for _ in range(2):
            h = (basis @ w) * earlier
            w = w - h @ basis
            hessenberg = hessenberg.at[:, k].add(h)
        norm = jnp.linalg.norm(w)
        hessenberg = hessenberg.at[k + 1, k].set(norm)
        # after an exact solution (norm 0) the basis stops growing: zero rows, zero columns
        basis = basis.at[k + 1].set(w / jnp.where(norm > 1e-30, norm, 1))
        return (basis, hessenberg), None

    (basis, hessenberg), _ = jax.lax.scan(arnoldi, (basis, hessenberg), jnp.arange(steps))
    rhs = jnp.zeros(steps + 1, flat_b.dtype).at[0].set(beta)
    coefficients = jnp.linalg.lstsq(hessenberg, rhs)[0]
    return unravel(coefficients @ basis[:steps])


def conjugate_gradients(matvec, b, maxiter: int, tol: float = 1e-5):
    """x with matvec(x) = b for a symmetric positive definite map, on pytrees, from x = 0.

    The iteration and stopping rule of jax.scipy.sparse.linalg.cg (stop at maxiter or when
    |r| <= tol |b|), written out because that function, vmapped over tasks, fails in JAX's
    device_put batching rule when the leaves carry the task axis at different positions (as
    Flax modules' parameters do).
    """

    def vdot(x, y):
        return sum(jnp.vdot(a, c) for a, c in zip(jax.tree.leaves(x), jax.tree.leaves(y)))

    def axpy(a, x, y):
        return jax.tree.map(lambda x, y: a * x + y, x, y)

    threshold = tol**2 * vdot(b, b)

    def unfinished(value):
        _, _, gamma, _, k = value
        return (gamma > threshold) & (k < maxiter)

    def step(value):
        x, r, gamma, p, k = value
        ap = matvec(p)
        alpha = gamma / vdot(p, ap)
        x, r = axpy(alpha, p, x), axpy(-alpha, ap, r)
        gamma_next = vdot(r, r)
        return x, r, gamma_next, axpy(gamma_next / gamma, p, r), k + 1

    x0 = jax.tree.map(jnp.zeros_like, b)
    r0 = b  # b - matvec(0)
    value = (x0, r0, vdot(r0, r0), r0, 0)
    return jax.lax.while_loop(unfinished, step, value)[0]
