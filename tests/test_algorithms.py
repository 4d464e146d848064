"""Every registered algorithm through init -> train steps -> evaluate, and the finetune options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn import registry
from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms.base import classification_loss
from metalearn.algorithms.finetune import FinetuneConfig, layerwise_lrs
from metalearn.conditioning import ConditioningConfig
from metalearn.config import Config, EvalConfig, TrainConfig, schemas
from metalearn.data import TaskSource
from metalearn.data.episodic import sample_episode
from metalearn.data.sinusoid import SinusoidConfig
from metalearn.evaluate import make_evaluator
from metalearn.experiment import Experiment, build
from metalearn.models import make_model
from metalearn.models.conv4 import Conv4Config
from metalearn.models.mlp import MLPConfig
from metalearn.train_step import TrainState, make_train_step

KEY = jax.random.PRNGKey(0)


def image_source(n_classes=10, size=12, n_way=3) -> TaskSource:
    """Classes are distinguishable: class c's images are noise around a class-specific pattern."""
    rng = np.random.default_rng(0)
    # Faint class patterns under strong per-drawing noise: hard enough that an untrained network
    # does not solve the tasks by fine-tuning alone.
    patterns = rng.integers(0, 100, (n_classes, 1, size, size))
    noise = rng.integers(0, 200, (n_classes, 20, size, size))
    images = jnp.asarray(np.clip(patterns + noise, 0, 255).astype(np.uint8))

    def sample(key, arrays, global_labels=False):
        return sample_episode(
            key, arrays, n_way=n_way, k_shot=2, k_query=3, global_labels=global_labels
        )

    return TaskSource(
        "classification",
        n_way,
        n_classes,
        (size, size, 1),
        dict.fromkeys(("train", "val", "test"), images),
        sample,
    )


def image_experiment(algo_name: str, model_cfg=None) -> Experiment:
    source = image_source()
    model_cfg = model_cfg or Conv4Config(hidden=8)
    model = make_model(model_cfg, source.input_shape)
    algo_cfg = schemas("algo")[algo_name]()
    if algo_name == "reptile":
        algo_cfg.inner_optimizer, algo_cfg.inner_lr = "sgd", 0.1
    elif algo_name in ("mamlpp", "imaml"):  # fewer inner steps than the papers: a quick test
        algo_cfg.inner_lr, algo_cfg.inner_steps = (0.4, 2) if algo_name == "mamlpp" else (0.1, 4)
    elif algo_name == "cavia":  # a context large enough to name the classes, through FiLM
        algo_cfg.context_dim, algo_cfg.inner_steps = 16, 2
    elif hasattr(algo_cfg, "inner_lr"):
        algo_cfg.inner_lr = 0.4 if algo_name in ("maml", "anil", "metasgd") else 0.1
    conditioning = ConditioningConfig(name="film" if algo_name == "cavia" else "none")
    config = Config(
        data=None, model=model_cfg, conditioning=conditioning, algo=algo_cfg
    )  # for algorithms that build their own conditioned model (cavia)
    algo = ALGORITHMS[algo_name](
        algo_cfg, model, classification_loss, n_out=3, n_train_classes=10, config=config,
        source=source,
    )  # fmt: skip
    import optax

    optimizer = (
        optax.sgd(optax.linear_schedule(1.0, 0.0, 150))
        if algo_name == "reptile"
        else optax.adam(3e-3)
    )
    return Experiment(None, source, model, algo, classification_loss, optimizer)


# multitask trains on a fixed set of tasks, not a task distribution: tests/test_multitask.py.
# Reptile, iMAML and CAVIA (whose context must learn to name the classes through FiLM) need far
# more steps on images than a test can take; their learning is checked on sinusoids (below, and
# CAVIA in tests/test_cavia.py), their image maths in tests/test_padding.py. Meta-SGD and MAML++
# are MAML with learned inner rates (and MAML++'s schedules and per-step batch-norm weights),
# which start as MAML's: tests/test_maml_variants.py and tests/test_mamlpp_norm.py check that
# maths, and MAML's learning here stands for theirs (each would add 25-50 s to the suite).
NEEDS_MORE_STEPS = {"multitask", "reptile", "imaml", "cavia"}
LEARNING_CHECKED_AS_MAML = {"metasgd", "mamlpp"}
# learners of other task families (reinforcement, inner optimisation problems) have their own tests
IMAGE_LEARNERS = {
    name for name, option in registry.options("algo").items()
    if "classification" in option.schema.kinds
    and not getattr(option.schema, "needs_inner_problems", False)
}  # fmt: skip
LEARN_STEPS = 100


@pytest.mark.slow
@pytest.mark.parametrize(
    "algo_name", sorted(IMAGE_LEARNERS - NEEDS_MORE_STEPS - LEARNING_CHECKED_AS_MAML)
)
def test_every_algorithm_learns_a_tiny_image_task(algo_name):
    exp = image_experiment(algo_name)
    params = exp.algo.init(KEY)
    state = TrainState(params, exp.optimizer.init(params))
    inner = getattr(schemas("algo")[algo_name](), "inner_steps", 0)
    inner = 2 if algo_name == "mamlpp" else inner  # as image_experiment trains it
    step = make_train_step(exp, meta_batch=4)
    evaluate = make_evaluator(exp.algo, exp.source, exp.loss_fn, min(inner, 5), batch=20)
    before = evaluate(state.params, "test", 200, 1)
    losses = []
    for i in range(LEARN_STEPS):
        state, metrics = step(state, exp.source.splits["train"], jax.random.fold_in(KEY, i))
        losses.append(float(metrics["loss"]))
    after = evaluate(state.params, "test", 200, 1)
    assert np.all(np.isfinite(losses))
    assert after["num_tasks"] == 200 and 0 <= after["accuracy"] <= 1
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    margin = before["accuracy_ci95"] + after["accuracy_ci95"]
    assert after["accuracy"] > before["accuracy"] + margin, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("algo_name", ["maml", "reptile", "finetune", "imaml"])
def test_regression_algorithms_run_on_sinusoid(algo_name):
    tuned = {
        "maml": {"inner_lr": 0.01},
        "reptile": {"inner_optimizer": "sgd", "inner_lr": 0.01},
        "finetune": {"inner_lr": 0.002},
        "imaml": {"inner_lr": 0.01},
    }
    algo_cfg = schemas("algo")[algo_name](**tuned.get(algo_name, {}))
    if algo_name == "finetune":
        algo_cfg.reinit_head = False
    cfg = Config(
        data=SinusoidConfig(),
        model=MLPConfig(),
        conditioning=None,
        algo=algo_cfg,
        train=TrainConfig(
            steps=2000, meta_batch=8, outer_lr=1.0 if algo_name == "reptile" else 1e-3
        ),
        eval=EvalConfig(),
    )
    exp = build(cfg)
    params = exp.algo.init(KEY)
    state = TrainState(params, exp.optimizer.init(params))
    step = make_train_step(exp, meta_batch=8)
    evaluate = make_evaluator(exp.algo, exp.source, exp.loss_fn, 5, batch=50)
    before = evaluate(state.params, "test", 100, 1)["loss"]
    for i in range(2000):
        state, _ = step(state, (), jax.random.fold_in(KEY, i))
    after = evaluate(state.params, "test", 100, 1)["loss"]
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow
def test_finetune_freeze_and_layer_decay():
    exp = image_experiment("finetune", MLPConfig(hidden=16, layers=3))
    cfg = FinetuneConfig(inner_lr=0.1, inner_steps=3, layer_decay=0.5, freeze=1, reinit_head=True)
    algo = ALGORITHMS["finetune"](cfg, exp.model, classification_loss, n_out=3, n_train_classes=10)
    params = algo.init(KEY)
    lrs = layerwise_lrs(exp.model.groups(params), cfg)
    assert [float(b["w"]) for b in lrs["blocks"]] == [0.0, 0.1 * 0.5**2, 0.1 * 0.5]
    assert float(lrs["head"]["w"]) == 0.1

    task = exp.source.sample(KEY, exp.source.splits["test"], False)
    adapted = algo.adapt(params, task.support, KEY, 3)
    np.testing.assert_array_equal(adapted["blocks"][0]["w"], params["blocks"][0]["w"])  # frozen
    assert not np.allclose(adapted["blocks"][1]["w"], params["blocks"][1]["w"])
    assert adapted["head"]["w"].shape == (16, 3) and params["head"]["w"].shape == (16, 10)
