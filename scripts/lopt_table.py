"""The README's learned-optimizer table: meta-train the LSTM optimizer, then compare it on
held-out (meta-test) inner problems with Adam, SGD, RMSprop and Nesterov momentum, each at the
learning rate of a sweep that scores best on meta-validation problems.

    python scripts/lopt_table.py quadratic STEPS [key=value ...]
    python scripts/lopt_table.py mlp_tasks STEPS data.root=DIR [key=value ...]

key=value settings are the data's (data.*), the learned optimizer's (algo.*), train.meta_batch /
train.outer_lr, eval.val_tasks / eval.num_tasks (the sweep's and the table's problems, 100 / 500)
and rates=[...] (the sweep's learning rates, RATES). Prints one JSON record: the budget, the
chosen rates and, per rule, the mean inner loss over the run and the final loss on the test
problems with 95% CIs, over the training horizon T and over 2T.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import optax

from metalearn.conditioning import ConditioningConfig
from metalearn.config import Config, TrainConfig
from metalearn.evaluate import make_evaluator
from metalearn.experiment import Experiment, initial_state
from metalearn.learned_optimizers.algorithm import BASELINES, LearnedOptimizerConfig, make
from metalearn.models.mlp import MLPConfig
from metalearn.train_step import make_train_step

RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def measure(family: str, steps: int, settings: dict):
    from metalearn import registry

    n_val, n_test = settings.get("eval.val_tasks", 100), settings.get("eval.num_tasks", 500)
    sweep = tuple(settings.get("rates", RATES))

    option = registry.options("data")[family]
    data = option.schema(**{k[5:]: v for k, v in settings.items() if k.startswith("data.")})
    algo_settings = {k[5:]: v for k, v in settings.items() if k.startswith("algo.")}
    meta_batch = settings.get("train.meta_batch", 16)
    outer_lr = settings.get("train.outer_lr", 1e-2)
    source = option.make(data)

    def learner(baselines):
        cfg = Config(
            data=data,
            model=MLPConfig(),
            conditioning=ConditioningConfig(name="none"),
            algo=LearnedOptimizerConfig(**{**algo_settings, "baselines": baselines}),
            train=TrainConfig(meta_batch=meta_batch),
        )
        return cfg, make(cfg.algo, None, None, source.n_out, config=cfg, source=source)

    cfg, algo = learner({})
    exp = Experiment(cfg, source, None, algo, None, optax.adam(outer_lr))
    key = jax.random.PRNGKey(0)
    state = initial_state(exp, algo.init(key))
    step = make_train_step(exp, meta_batch)
    started = time.perf_counter()
    for i in range(1, steps + 1):
        state, metrics = step(state, source.splits["train"], jax.random.fold_in(key, i), i)
    float(metrics["loss"])
    train_s = time.perf_counter() - started

    unroll_steps = cfg.algo.unroll
    # the sweep: every baseline at every rate, scored on meta-validation problems
    best = {name: (float("inf"), None) for name in BASELINES}
    for lr in sweep:
        _, swept = learner({name: lr for name in BASELINES})
        val = make_evaluator(swept, source, None, unroll_steps, None)(state.params, "val", n_val, 1)
        for name in BASELINES:
            loss = val[f"{name}_loss"]
            if loss == loss and loss < best[name][0]:  # NaN (a diverged rate) never wins
                best[name] = (loss, lr)
    rates = {name: lr for name, (_, lr) in best.items() if lr is not None}
    _, final = learner(rates)
    test = make_evaluator(final, source, None, unroll_steps, None)(state.params, "test", n_test, 2)
    twice = make_evaluator(final, source, None, 2 * unroll_steps, None)(
        state.params, "test", n_test, 2
    )  # the generalisation to a horizon twice the training unroll, same rates
    rules = {"lstm": ""} | {name: f"{name}_" for name in rates}

    def table(result):
        return {
            rule: {
                "mean_loss": result[f"{p}loss"],
                "mean_loss_ci95": result[f"{p}loss_ci95"],
                "final_loss": result[f"{p}final_loss"],
                "final_loss_ci95": result[f"{p}final_loss_ci95"],
            }
            for rule, p in rules.items()
        }

    return {
        "family": family,
        "data": {k: v for k, v in vars(data).items() if k not in ("root",)},
        "budget": {
            "outer_steps": steps,
            "meta_batch": meta_batch,
            "outer_lr": outer_lr,
            "unroll": unroll_steps,
            "truncation": cfg.algo.truncation,
            "train_s": round(train_s, 1),
        },
        "swept": list(sweep),
        "rates": rates,
        "test_problems": n_test,
        "initial_loss": test["initial_loss"],
        "rules": table(test),
        "rules_at_2T": table(twice),
    }


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    family, steps, *rest = argv
    settings = dict(arg.split("=", 1) for arg in rest)
    print(json.dumps(measure(family, int(steps), {k: _value(v) for k, v in settings.items()})))


if __name__ == "__main__":
    main(sys.argv[1:])
