"""train.precision: the dtype models compute in. float32 (default), or bf16: parameters, their
optimizer state and gradients stay float32, and every call of the model casts its parameters and
inputs to bfloat16 (matmuls, convolutions and activations in bf16) and its outputs back to
float32, so losses, inner-loop updates and metrics are float32. The casts' transposes return
gradients in float32. This is the usual mixed precision of accelerators (bf16 halves activation
memory and runs on the matrix units of TPUs and recent GPUs); on a CPU it saves some memory but
costs time (the MAML conv4 step took 1.85x float32's here; README).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metalearn.models import Model

PRECISIONS = ("float32", "bf16")


def _to(dtype):
    def cast(tree):
        return jax.tree.map(
            lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a,
            tree,
        )

    return cast


def mixed(model: Model, dtype=jnp.bfloat16) -> Model:
    """`model` computing in `dtype`, with float32 parameters and float32 outputs."""
    down, up = _to(dtype), _to(jnp.float32)
    return model._replace(
        apply=lambda params, x: up(model.apply(down(params), down(x))),
        embed=lambda params, x, hook=None: up(model.embed(down(params), down(x), hook)),
        head=lambda params, features: up(model.head(down(params), down(features))),
    )
