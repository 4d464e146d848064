"""The log-gradient preprocessing of Andrychowicz et al. 2016 (appendix A), shared by the rules
that read gradients through a network: gradients span orders of magnitude across problems and
coordinates, which a network's inputs should not."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def log_and_sign(g: jax.Array, p: float) -> jax.Array:
    """[..., 2]: (log|g| / p, sign g) where |g| >= e^-p, else (-1, e^p g)."""
    big = jnp.abs(g) >= jnp.exp(-p)
    log_mag = jnp.log(jnp.maximum(jnp.abs(g), jnp.exp(-p))) / p  # the max keeps log finite
    first = jnp.where(big, log_mag, -1.0)
    second = jnp.where(big, jnp.sign(g), jnp.exp(p) * g)
    return jnp.stack([first, second], -1)
