"""model=policy_mlp: the fully connected ReLU network (models/mlp.py) as a feed-forward policy
over an environment's observations (the MAML paper's RL policy: two hidden layers of 100).

It declares the "transitions" input that environments give, so the shared checks pair it with
RL data; a feed-forward learner (rl/maml_rl.py) feeds it only the observation of each step
(rl/trial.py::observation_input), not the whole transition record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metalearn import registry
from metalearn.checks import require
from metalearn.models import mlp

# the models a feed-forward learner (maml_rl, multitask_rl) reads observations with
FEEDFORWARD = ("policy_mlp",)


@dataclass
class PolicyMLPConfig(mlp.MLPConfig):
    inputs: ClassVar[tuple[str, ...]] = ("transitions",)
    name: str = "policy_mlp"
    hidden: int = 100
    layers: int = 2


registry.register("model", "policy_mlp", PolicyMLPConfig, mlp.make)


def check_feedforward(config) -> None:
    """A feed-forward learner's model: the recurrent GRU (RL²'s, data=bandit's default) is not."""
    name = config.model.name
    require(
        name in FEEDFORWARD,
        f"model={name} is not allowed with algo={config.algo.name}: it takes a feed-forward "
        f"policy over the observation, model in {list(FEEDFORWARD)} (add model=policy_mlp; "
        "data=bandit and data=tabular_mdp default to RL²'s recurrent model=gru).",
    )
