"""A run's protocol card: what its test number was measured under, in summary.json.

Two accuracies are only comparable when they were measured on the same kind of test tasks with
the same model family and a comparable budget. The card records what decides that (the data
settings, the training episodes' shape, the test tasks, the model's settings with its batch-norm
mode, the input shape and the budget), and `metalearn compare` names the fields that differ
between the runs it puts side by side. `test_tasks` identifies the test tasks themselves: runs
with equal values were evaluated on the very same tasks, so their per-task results pair up.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

TEST_TASKS_FILE = "test_tasks.json"  # a run's per-task test metrics, by train.py


def protocol_card(exp, steps: int) -> dict[str, Any]:
    """The card of a run of experiment `exp` (metalearn/experiment.py) trained `steps` steps."""
    from metalearn.config import training_shape

    cfg, input_shape = exp.cfg, tuple(exp.source.input_shape)  # (the learner is what differs)
    data_cls = type(cfg.data)
    data = {k: v for k, v in asdict(cfg.data).items() if k not in data_cls.locations}
    tested = {k: v for k, v in data.items() if k not in data_cls.training_only}
    shape = training_shape(cfg)
    return {
        "data": data,
        "train_episodes": None
        if shape is None
        else dict(zip(("n_way", "k_shot", "k_query"), shape)),
        "test": {"num_tasks": cfg.eval.num_tasks, "seed": cfg.eval.seed},
        "model": asdict(cfg.model),
        "input_shape": list(input_shape),
        "precision": cfg.train.precision,
        "budget": {
            "steps": steps,
            "train_steps": cfg.train.steps,
            "max_minutes": cfg.train.max_minutes,
            "meta_batch": cfg.train.meta_batch,
        },
        "test_tasks": tasks_key(tested, cfg.eval.num_tasks, cfg.eval.seed, input_shape),
    }


def tasks_key(data: dict, num_tasks: int, seed: int, input_shape) -> str:
    """Equal for runs whose test tasks are the same draws: the same task distribution (the data
    settings that are not about training), the same number of tasks and evaluation seed."""
    text = json.dumps([data, num_tasks, seed, list(input_shape)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(card: dict, prefix: str = "") -> dict[str, Any]:
    """The card's leaves as dotted keys (data.n_way, budget.steps, ...)."""
    out = {}
    for key, value in card.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
