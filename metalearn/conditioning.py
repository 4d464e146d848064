"""Task conditioning: one model f(y | x, z) for many tasks, z a task descriptor (CS330 lecture 2).

A conditioned model wraps any registered model through two seams it already has: the input
(concat) and a hook on each block's output (additive, film); the per-task options (multihead,
mmoe, separate) select parameters by the task's index. Nothing model-specific lives here.

- none: one shared network; z is ignored.
- concat: z concatenated to the input (tiled over the image for convolutional models).
  Concatenating z to a hidden layer's input is the same map as adding a projection of z to the
  layer (W [h; z] = W_h h + W_z z), which is what `additive` does, so concat stays at the input.
- additive: a learned projection of z added to every block's output.
- film: every block's output scaled and shifted per channel by projections of z (Perez et al.
  2018): h * (1 + z G) + z B, the identity at z = 0.
- multihead: a shared trunk and one linear head per task.
- mmoe: shared expert trunks mixed by one softmax gate per task, read by one head per task (Ma
  et al. 2018, multi-gate mixture of experts).
- separate: one independent network per task (no sharing).

The descriptor z is a one-hot task id or a learned embedding per task (conditioning.descriptor);
algorithms that make their own z (CAVIA's context, an amortised encoder) call apply_vector.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metalearn import registry
from metalearn.checks import ConfigError, choice, width
from metalearn.models import ModelConfig, make_model
from metalearn.models.groups import HEAD, OTHER, partition, prune

CONDITIONINGS = ("none", "concat", "additive", "multihead", "film", "mmoe", "separate")


# Conditionings that pick per-task parameters by the task's index (the others read a vector z).
INDEXED_CONDITIONINGS = ("multihead", "mmoe", "separate")


@dataclass
class ConditioningConfig:
    """How a task descriptor z conditions the model f(y | x, z) (metalearn/conditioning.py)."""

    name: str = "none"
    descriptor: str = "onehot"  # onehot task id | embedding (a learned vector per task)
    embedding_dim: int = 8  # size of the learned embedding

    def __post_init__(self) -> None:
        choice("conditioning.name", self.name, CONDITIONINGS)
        choice("conditioning.descriptor", self.descriptor, ("onehot", "embedding"))
        width("conditioning.embedding_dim", self.embedding_dim)


@dataclass
class MMoEConfig(ConditioningConfig):
    """Multi-gate mixture of experts: shared expert trunks, one softmax gate and head per task."""

    name: str = "mmoe"
    experts: int = 4  # shared experts
    expert_hidden: int = 0  # width of each expert's trunk; 0 means the model's width

    def __post_init__(self) -> None:
        super().__post_init__()
        width("conditioning.experts", self.experts)
        width("conditioning.expert_hidden", self.expert_hidden, minimum=0)


VECTOR_CONDITIONINGS = ("none", "concat", "additive", "film")


class ConditionedModel(NamedTuple):
    init: Callable[[jax.Array, int], dict]  # (key, n_out) -> params
    apply: Callable[[dict, jax.Array, jax.Array], jax.Array]  # (params, x, task_id) -> outputs
    # (params, x, z [z_dim]) -> outputs, for a descriptor the caller computes; None when the
    # conditioning picks parameters by task index (multihead, mmoe, separate).
    apply_vector: Callable[[dict, jax.Array, jax.Array], jax.Array] | None
    # params -> group labels: the shared trunk's leaves get the model's own labels ("blocks.<i>",
    # "head"), every per-task or conditioning leaf "other" (all "other" without a shared trunk).
    groups: Callable[[dict], Any]


def make_conditioned_model(
    cfg: ConditioningConfig,
    model_cfg: ModelConfig,
    input_shape: tuple[int, ...],
    *,
    n_tasks: int = 0,
    z_dim: int | None = None,
) -> ConditionedModel:
    """n_tasks: tasks with ids (0: none); z_dim: size of a caller-made descriptor (apply_vector).

    Without z_dim, z is the task descriptor (a one-hot id, or an embedding when
    cfg.descriptor == "embedding").
    """
    if cfg.name in INDEXED_CONDITIONINGS and n_tasks < 1:
        raise ConfigError(
            f"conditioning={cfg.name} picks parameters by task id, but this data has no task "
            f"ids; use it with multi-task data (e.g. data=omniglot_alphabets) or choose one of "
            f"{list(VECTOR_CONDITIONINGS)}."
        )
    if z_dim is None:
        if n_tasks < 1 and cfg.name != "none":
            raise ConfigError(
                f"conditioning={cfg.name} needs a task descriptor, but this data has no task "
                "ids; use multi-task data (e.g. data=omniglot_alphabets) or conditioning=none."
            )
        z_dim = cfg.embedding_dim if cfg.descriptor == "embedding" else max(n_tasks, 1)
    learned_descriptor = cfg.descriptor == "embedding" and n_tasks >= 1

    def descriptor(params, task_id):
        if learned_descriptor:
            return params["task_embedding"][task_id]
        return jax.nn.one_hot(task_id, z_dim)

    build = _BUILDERS[cfg.name]
    init_core, apply_core, by_index = build(cfg, model_cfg, input_shape, n_tasks, z_dim)

    def init(key, n_out):
        k_core, k_emb = jax.random.split(key)
        params = init_core(k_core, n_out)
        if learned_descriptor and not by_index:
            params["task_embedding"] = 0.1 * jax.random.normal(k_emb, (n_tasks, z_dim))
        return params

    def apply(params, x, task_id):
        if by_index:
            return apply_core(params, x, task_id)
        return apply_core(params, x, descriptor(params, task_id))

    trunk_groups = make_model(model_cfg, input_shape).groups

    def groups(params):
        labels = jax.tree.map(lambda _: OTHER, params)
        if isinstance(params, dict) and "model" in params:  # the builders' shared trunk
            labels = {**labels, "model": trunk_groups(params["model"])}
        return labels

    return ConditionedModel(init, apply, None if by_index else apply_core, groups)


def make_vector_conditioned_model(
    cfg: ConditioningConfig,
    model_cfg: ModelConfig,
    input_shape: tuple[int, ...],
    *,
    z_dim: int,
    algo: str,
    default: str,
) -> ConditionedModel:
    """The model for an algorithm that computes its own descriptor z (CAVIA's context, an
    amortised encoder's output): conditioning=none means `default`; options that pick
    parameters by task id are refused."""
    if cfg.name == "none":
        cfg = dataclasses.replace(cfg, name=default)
    if cfg.name not in VECTOR_CONDITIONINGS:
        raise ConfigError(
            f"algo={algo} feeds its own vector through the conditioning; conditioning={cfg.name} "
            f"picks parameters by task id instead. Use one of "
            f"{[c for c in VECTOR_CONDITIONINGS if c != 'none']} (none means {default})."
        )
    return make_conditioned_model(cfg, model_cfg, input_shape, z_dim=z_dim)


def _none(cfg, model_cfg, input_shape, n_tasks, z_dim):
    model = make_model(model_cfg, input_shape)
    return (
        lambda key, n_out: {"model": model.init(key, n_out)},
        lambda params, x, z: model.apply(params["model"], x),
        False,
    )


def _concat(cfg, model_cfg, input_shape, n_tasks, z_dim):
    model = make_model(model_cfg, (*input_shape[:-1], input_shape[-1] + z_dim))

    def apply(params, x, z):
        tiled = jnp.broadcast_to(z, (*x.shape[:-1], z_dim)).astype(x.dtype)
        return model.apply(params["model"], jnp.concatenate([x, tiled], -1))

    return lambda key, n_out: {"model": model.init(key, n_out)}, apply, False


def _block_widths(model, input_shape) -> list[int]:
    """Channels of each block's output, read from an abstract forward pass."""
    widths = []

    def record(i, h):
        widths.append(h.shape[-1])
        return h

    params = jax.eval_shape(lambda key: model.init(key, 1), jax.random.PRNGKey(0))
    jax.eval_shape(lambda p: model.embed(p, jnp.zeros((1, *input_shape)), record), params)
    return widths


def _hooked(cfg, model_cfg, input_shape, n_tasks, z_dim, film: bool):
    model = make_model(model_cfg, input_shape)
    widths = _block_widths(model, input_shape)

    def init(key, n_out):
        k_model, *ks = jax.random.split(key, len(widths) + 1)
        # Small random projections, so tasks differ from the first step and a context vector
        # starting at zero (CAVIA) gets a gradient; z = 0 gives the unconditioned network.
        scale = (0.1 if film else 1.0) / np.sqrt(z_dim)
        proj = [
            scale * jax.random.normal(k, (z_dim, (2 if film else 1) * w))
            for k, w in zip(ks, widths)
        ]
        return {"model": model.init(k_model, n_out), "cond": proj}

    def apply(params, x, z):
        def hook(i, h):
            shift = z @ params["cond"][i]
            if film:
                gamma, beta = jnp.split(shift, 2)
                return h * (1.0 + gamma) + beta
            return h + shift

        return model.head(params["model"], model.embed(params["model"], x, hook))

    return init, apply, False


def _additive(*args):
    return _hooked(*args, film=False)


def _film(*args):
    return _hooked(*args, film=True)


def _multihead(cfg, model_cfg, input_shape, n_tasks, z_dim):
    model = make_model(model_cfg, input_shape)

    def split_head(params):
        return partition(params, jax.tree.map(lambda g: g == HEAD, model.groups(params)))

    def init(key, n_out):
        trunk = prune(split_head(model.init(key, n_out))[1])
        heads = jax.vmap(lambda k: prune(split_head(model.init(k, n_out))[0]))(
            jax.random.split(key, n_tasks)
        )
        return {"model": trunk, "heads": heads}

    def apply(params, x, task_id):
        head = jax.tree.map(lambda h: h[task_id], params["heads"])
        return model.head(head, model.embed(params["model"], x))

    return init, apply, True


def _separate(cfg, model_cfg, input_shape, n_tasks, z_dim):
    model = make_model(model_cfg, input_shape)

    def init(key, n_out):
        keys = jax.random.split(key, n_tasks)
        return {"tasks": jax.vmap(lambda k: model.init(k, n_out))(keys)}

    def apply(params, x, task_id):
        return model.apply(jax.tree.map(lambda p: p[task_id], params["tasks"]), x)

    return init, apply, True


def _mmoe(cfg, model_cfg, input_shape, n_tasks, z_dim):
    if cfg.expert_hidden:
        if not hasattr(model_cfg, "hidden"):
            raise ConfigError(
                f"conditioning.expert_hidden={cfg.expert_hidden} sets the width of model="
                f"{model_cfg.name}, which has no model.hidden; use conditioning.expert_hidden=0."
            )
        model_cfg = dataclasses.replace(model_cfg, hidden=cfg.expert_hidden)
    model = make_model(model_cfg, input_shape)
    in_features = int(np.prod(input_shape))

    def split_head(params):
        return partition(params, jax.tree.map(lambda g: g == HEAD, model.groups(params)))

    def init(key, n_out):
        k_exp, k_gate, k_head = jax.random.split(key, 3)
        experts = jax.vmap(lambda k: model.init(k, None))(jax.random.split(k_exp, cfg.experts))
        heads = jax.vmap(lambda k: prune(split_head(model.init(k, n_out))[0]))(
            jax.random.split(k_head, n_tasks)
        )
        gates = jax.nn.initializers.lecun_normal()(k_gate, (n_tasks, in_features, cfg.experts))
        return {"experts": experts, "gates": gates, "heads": heads}

    def apply(params, x, task_id):
        feats = jax.vmap(lambda p: model.embed(p, x))(params["experts"])  # [E, B, D]
        gate = jax.nn.softmax(x.reshape(x.shape[0], -1) @ params["gates"][task_id], -1)  # [B, E]
        mixed = jnp.einsum("be,ebd->bd", gate, feats)
        head = jax.tree.map(lambda h: h[task_id], params["heads"])
        return model.head(head, mixed)

    return init, apply, True


_BUILDERS = {
    "none": _none,
    "concat": _concat,
    "additive": _additive,
    "film": _film,
    "multihead": _multihead,
    "separate": _separate,
    "mmoe": _mmoe,
}


for _name in CONDITIONINGS:
    registry.register(
        "conditioning",
        _name,
        MMoEConfig if _name == "mmoe" else ConditioningConfig,
        _BUILDERS[_name],
    )
