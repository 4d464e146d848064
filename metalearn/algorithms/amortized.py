"""An amortised black-box learner: a support-set encoder computes a task representation h, which
conditions the predictor through the conditioning group (film by default; CS330's "learned
low-dimensional context", as in conditional neural processes and FiLM-based learners).

h = mean over support examples of an MLP of [features(x_i); y_i] (a one-hot label for
classification), so it does not depend on the order of the support set. Regression predicts
with the conditioned network directly. Classification labels are permuted in every episode, so
a fixed head cannot name the classes; as in VERSA and CNAPs, the classifier is amortised too:
the conditioned network maps x to features, and the logits are minus the squared distances to
each class's mean support feature. No gradient steps run at adaptation: reading the support set
is one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms.base import AlgoConfig, LossFn, make_algorithm, masked_mean, split_outputs
from metalearn.algorithms.protonet import prototypes, squared_distance_logits
from metalearn.checks import width
from metalearn.conditioning import make_vector_conditioned_model
from metalearn.models import Model
from metalearn.types import Algorithm


@dataclass
class AmortizedConfig(AlgoConfig):
    conditioned: ClassVar[bool] = True
    reads_padded: ClassVar[bool] = True

    name: str = "amortized"
    context_dim: int = 32  # size of the task representation h
    encoder_hidden: int = 64  # hidden units of the per-example encoder MLP

    def __post_init__(self) -> None:
        width("algo.context_dim", self.context_dim)
        width("algo.encoder_hidden", self.encoder_hidden)


def make(
    cfg: AmortizedConfig, model: Model, loss_fn: LossFn, n_out: int, *, config, source, **_
) -> Algorithm:
    predictor = make_vector_conditioned_model(
        config.conditioning,
        config.model,
        source.input_shape,
        z_dim=cfg.context_dim,
        algo="amortized",
        default="film",
    )
    classification = source.kind == "classification"

    def encode_labels(y):
        return jax.nn.one_hot(y, n_out) if classification else y.reshape(len(y), -1)

    def init(key):
        k_pred, k_trunk, k1, k2 = jax.random.split(key, 4)
        trunk = model.init(k_trunk, None)
        feats = model.embed(trunk, jnp.zeros((1, *source.input_shape))).shape[-1]
        labels = n_out if classification else source.n_out
        dense = jax.nn.initializers.lecun_normal()
        encoder = {
            "trunk": trunk,
            "w1": dense(k1, (feats + labels, cfg.encoder_hidden)),
            "b1": jnp.zeros((cfg.encoder_hidden,)),
            "w2": dense(k2, (cfg.encoder_hidden, cfg.context_dim)),
            "b2": jnp.zeros((cfg.context_dim,)),
        }
        outputs = cfg.encoder_hidden if classification else n_out  # features or predictions
        return {"predictor": predictor.init(k_pred, outputs), "encoder": encoder}

    def adapt(meta_params, support, key, inner_steps=0):
        enc = meta_params["encoder"]
        trunk = split_outputs(lambda x: model.embed(enc["trunk"], x), support)
        h = jnp.concatenate([trunk, encode_labels(support.y)], -1)
        h = masked_mean(
            jax.nn.relu(h @ enc["w1"] + enc["b1"]) @ enc["w2"] + enc["b2"], support.mask
        )
        if not classification:
            return h
        feats = split_outputs(
            lambda x: predictor.apply_vector(meta_params["predictor"], x, h), support
        )
        return h, prototypes(feats, support.y, n_out, support.mask)

    def predict(meta_params, task_params, x):
        if not classification:
            return predictor.apply_vector(meta_params["predictor"], x, task_params)
        h, protos = task_params
        return squared_distance_logits(
            predictor.apply_vector(meta_params["predictor"], x, h), protos
        )

    return make_algorithm(init, adapt, predict, loss_fn)


registry.register("algo", "amortized", AmortizedConfig, make)
