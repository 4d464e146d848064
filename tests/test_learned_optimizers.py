"""Learned optimizers on random quadratics: the rules against optax, truncated backprop against a
loop-written reference, hypergradients against finite differences, and meta-training that learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import compose_config, metalearn

from metalearn.checks import ConfigError
from metalearn.conditioning import ConditioningConfig
from metalearn.config import Config, TrainConfig
from metalearn.data.quadratic import QuadraticConfig, make_source
from metalearn.evaluate import make_evaluator
from metalearn.experiment import Experiment, initial_state
from metalearn.learned_optimizers import from_optax, optimizers
from metalearn.learned_optimizers._preprocess import log_and_sign
from metalearn.learned_optimizers.algorithm import LearnedOptimizerConfig, make
from metalearn.learned_optimizers.unroll import unroll
from metalearn.models.mlp import MLPConfig
from metalearn.train_step import make_train_step

KEY = jax.random.PRNGKey(0)


def learner(meta_batch=4, **algo):
    cfg = Config(
        data=QuadraticConfig(),
        model=MLPConfig(),
        conditioning=ConditioningConfig(name="none"),
        algo=LearnedOptimizerConfig(**algo),
        train=TrainConfig(meta_batch=meta_batch),
    )
    source = make_source(cfg.data)
    return cfg, source, make(cfg.algo, None, None, cfg.data.dim, config=cfg, source=source)


def batch(source, n, key=KEY, split="train"):
    keys = jax.random.split(key, n)
    return jax.vmap(lambda k: source.sample(k, source.splits[split]))(keys), keys


def test_hyper_rule_is_optax_sgd_with_momentum():
    """hyper at momentum 0 (and 0.9) gives optax.sgd's trajectory, bit for bit, at the same rate."""
    cfg = QuadraticConfig()
    problem, task = cfg.problem(), make_source(cfg).sample(KEY, jnp.uint32(0))
    for momentum in (0.0, 0.9):
        rule = optimizers()["hyper"](LearnedOptimizerConfig(optimizer="hyper", momentum=momentum))
        params = problem.init(KEY)
        theta = rule.init(KEY, params)
        lr = jnp.exp(theta["log_lr"]["theta"])  # the rate the rule applies, to the last bit
        sgd = from_optax(optax.sgd(lr, momentum=momentum))
        runs = [
            unroll(r, problem, th, params, r.init_state(th, params), task.support, 30)
            for r, th in ((rule, theta), (sgd, {}))
        ]
        np.testing.assert_array_equal(runs[0][2], runs[1][2])  # every step's loss
        np.testing.assert_array_equal(runs[0][0]["theta"], runs[1][0]["theta"])
        assert runs[0][2][-1] < runs[0][2][0] / 10  # and it does optimise


def test_log_and_sign_is_the_papers_preprocessing():
    p = 10.0
    g = np.array([3.0, -0.5, 1e-3, -1e-3, 1e-6, -1e-6, 0.0])
    big = np.abs(g) >= np.exp(-p)
    want = np.stack(
        [
            np.where(big, np.log(np.maximum(np.abs(g), 1e-30)) / p, -1.0),
            np.where(big, np.sign(g), np.exp(p) * g),
        ],
        -1,
    )
    np.testing.assert_allclose(log_and_sign(jnp.asarray(g, jnp.float32), p), want, rtol=1e-6)


def reference_losses(rule, problem, theta, params, state, split, steps):
    """An unroll written as a Python loop (not the library's scan): f(theta_1..theta_steps)."""
    losses = []
    for _ in range(steps):
        g = jax.lax.stop_gradient(jax.grad(problem.loss)(params, split))
        u, state = rule.update(theta, g, state, params)
        params = optax.apply_updates(params, u)
        losses.append(problem.loss(params, split))
    return jnp.stack(losses), params, state


@pytest.mark.parametrize("truncation", [pytest.param(4, marks=pytest.mark.slow), 2])
def test_truncated_segments_equal_backprop_through_each_segment(truncation):
    """The objective's gradient for a segment equals the loop reference's full backprop through
    that segment's steps from its (stop-gradient) start; with K = T, through the whole run.
    (float32; the scan and the loop differ only in rounding: rtol 2e-4.)"""
    cfg, source, algo = learner(meta_batch=3, unroll=4, truncation=truncation)
    problem, rule = cfg.data.problem(), optimizers()["lstm"](cfg.algo)
    theta = algo.init(KEY)
    tasks, keys = batch(source, 3)
    state = algo.objective.init_state()

    def reference(th, params, opt_state, split, steps):
        return reference_losses(rule, problem, th, params, opt_state, split, steps)

    run = jax.vmap(reference, (None, 0, 0, 0, None))
    starts = jax.vmap(problem.init)(keys)
    carry = (starts, jax.vmap(rule.init_state, (None, 0))(theta, starts))
    total = jax.tree.map(jnp.zeros_like, theta)
    for segment in range(4 // truncation):
        other_tasks, other_keys = batch(source, 3, jax.random.PRNGKey(9 + segment))
        fed = (tasks, keys) if segment == 0 else (other_tasks, other_keys)  # ignored mid-run
        grads, state, metrics = algo.objective.gradient(theta, state, *fed, segment + 1, None)

        def segment_loss(th, carry=carry):
            losses, params, opt_state = run(th, *carry, tasks.support, truncation)
            return losses.mean(), (params, opt_state)

        segment_grad = jax.jit(jax.value_and_grad(segment_loss, has_aux=True))
        (want_loss, carry), want = segment_grad(theta)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads, want
        )
        np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
        total = jax.tree.map(jnp.add, total, grads)
    assert int(state.t) == 0  # the runs are over: the next step starts new problems

    if truncation < 4:
        # Full backprop through the 4-step run (mean loss = the mean of the two segments'):
        # truncation drops the second segment's dependence on the first, so they differ.
        def full_loss(th):
            opt_state = jax.vmap(rule.init_state, (None, 0))(th, starts)
            return run(th, starts, opt_state, tasks.support, 4)[0].mean()

        full = jax.jit(jax.grad(full_loss))(theta)
        gaps = [jnp.max(jnp.abs(a - b / 2)) for a, b in zip(*map(jax.tree.leaves, (full, total)))]
        assert max(map(float, gaps)) > 1e-4


def test_hypergradients_equal_central_finite_differences():
    """d(mean loss over a 10-step run)/d(log lr, momentum) by backprop through the unroll (second
    order) equals central differences in float64 (h = 1e-5: truncation error ~h^2, rounding
    ~1e-16/h, both far below the rtol of 1e-6); first order (the paper's approximation) differs."""
    with jax.enable_x64(True):
        cfg, source, algo = learner(
            optimizer="hyper", unroll=10, truncation=10, lr=0.005, momentum=0.5, second_order=True
        )
        task = source.sample(KEY, source.splits["train"])
        theta = algo.init(KEY)
        assert theta["log_lr"]["theta"].dtype == jnp.float64

        def loss(th):
            return algo.meta_loss(th, task, KEY)[0]

        grads = jax.grad(loss)(theta)
        h = 1e-5
        for name in ("log_lr", "momentum"):

            def at(delta, name=name):
                moved = {**theta, name: {"theta": theta[name]["theta"] + delta}}
                return float(loss(moved))

            fd = (at(h) - at(-h)) / (2 * h)
            np.testing.assert_allclose(float(grads[name]["theta"]), fd, rtol=1e-6)
        _, _, first = learner(optimizer="hyper", unroll=10, truncation=10, lr=0.005, momentum=0.5)
        approx = jax.grad(lambda th: first.meta_loss(th, task, KEY)[0])(theta)
        assert abs(float(approx["log_lr"]["theta"] - grads["log_lr"]["theta"])) > 1e-3


# lstm's step is the learning test's; hyper's maths is tested against optax and differences
@pytest.mark.parametrize(
    "name", ["mlp", *(pytest.param(n, marks=pytest.mark.slow) for n in ("lstm", "hyper"))]
)
def test_every_rule_trains_and_evaluates(name):
    cfg, source, algo = learner(
        meta_batch=2, optimizer=name, unroll=2, truncation=1, baselines={"nesterov": 0.01}
    )
    exp = Experiment(cfg, source, None, algo, None, optax.adam(1e-3))
    state = initial_state(exp, algo.init(KEY))
    step = make_train_step(exp, 2)
    for i in (1, 2, 3):
        state, metrics = step(state, source.splits["train"], jax.random.fold_in(KEY, i), i)
        assert np.isfinite(float(metrics["loss"]))
    assert int(state.algo_state.t) == 1  # steps 1 and 3 start runs, step 2 continues one
    result = make_evaluator(algo, source, None, 3, None)(state.params, "test", 4, 0)
    for key in ("loss", "final_loss", "initial_loss", "nesterov_loss", "nesterov_final_loss"):
        assert np.isfinite(result[key]) and f"{key}_ci95" in result


def test_meta_trained_lstm_beats_its_start_and_sgd_on_held_out_quadratics():
    """100 outer steps (20-step runs in 2 segments, 16 problems a step, Adam at 0.1) on
    meta-train quadratics. Measured on 100 held-out (test-split) quadratics, mean loss over 20
    steps: 104.0 at the start, 5.66 +- 0.72 after, SGD at its fixed rate 0.01: 8.87 +- 0.79 (a
    margin of 3.2, twice the two 95% CIs together; 5.95 and 6.09 with other step keys)."""
    cfg, source, algo = learner(meta_batch=16, unroll=20, truncation=10, baselines={"sgd": 0.01})
    exp = Experiment(cfg, source, None, algo, None, optax.adam(0.1))
    state = initial_state(exp, algo.init(KEY))
    step = make_train_step(exp, 16)
    evaluate = make_evaluator(algo, source, None, 20, None)
    before = evaluate(state.params, "test", 100, 1)
    for i in range(1, 101):
        state, _ = step(state, source.splits["train"], jax.random.fold_in(KEY, i), i)
    after = evaluate(state.params, "test", 100, 1)
    assert after["loss"] + after["loss_ci95"] < before["loss"] - before["loss_ci95"]
    assert after["loss"] + after["loss_ci95"] + after["sgd_loss_ci95"] < after["sgd_loss"], after


def test_splits_draw_different_quadratics():
    source = make_source(QuadraticConfig())
    draws = [source.sample(KEY, source.splits[s]).support.x for s in ("train", "val", "test")]
    assert all(not np.allclose(a, b) for i, a in enumerate(draws) for b in draws[i + 1 :])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["algo=learned_optimizer", "data=sinusoid"],
            "provides none. Use data in ['mlp_tasks', 'quadratic']",
        ),
        (["algo=maml", "data=quadratic"], "only learners of optimizers train on"),
        (["algo=learned_optimizer", "data=quadratic", "algo.truncation=30"], "must divide"),
        (["algo=learned_optimizer", "data=quadratic", "algo.optimizer=adam"], "choose one of"),
        (["algo=learned_optimizer", "data=quadratic", "+algo.baselines.lion=0.1"], "baselines are"),
        (["algo=learned_optimizer", "data=quadratic", "algo.estimator=reinforce"], "choose one of"),
        (["algo=learned_optimizer", "data=quadratic", "algo.es_samples=0"], "antithetic pairs"),
        (["algo=learned_optimizer", "data=quadratic", "algo.es_sigma=0"], "algo.es_sigma"),
        (["algo=learned_optimizer", "data=quadratic", "algo.eval_data=omniglot"], "eval_data"),
        (["algo=learned_optimizer", "data=mlp_tasks", "data.batch=500"], "data.batch=500"),
        (["algo=learned_optimizer", "data=mlp_tasks", "data.activation=gelu"], "activation"),
    ],
)
def test_refused_combinations_say_why(overrides, message, tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as error:
        compose_config(overrides, tmp_path, monkeypatch)
    assert message in str(error.value), str(error.value)


def test_defaults_are_the_papers():
    cfg = LearnedOptimizerConfig()
    assert (cfg.optimizer, cfg.hidden, cfg.layers, cfg.inner_steps) == ("lstm", 20, 2, 100)


@pytest.mark.slow  # starts a metalearn process
def test_train_writes_a_run_directory(tmp_path):
    import json
    import os

    run = tmp_path / "run"
    args = ["train", "algo=learned_optimizer", "data=quadratic", "train.steps=6",
            "train.meta_batch=4", "train.log_every=2", "algo.unroll=4", "algo.truncation=2",
            "eval.every=3", "eval.num_tasks=10", "eval.val_tasks=5",
            f"hydra.run.dir={run}"]  # fmt: skip
    metalearn(args, dict(os.environ), tmp_path, check=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "val", "test"}
    assert (run / "checkpoints" / "best.npz").is_file()
    assert (run / "checkpoints" / "latest.npz").is_file()
    test = json.loads((run / "summary.json").read_text())["test"]
    for key in ("loss", "final_loss", "adam_final_loss", "sgd_final_loss", "rmsprop_final_loss",
                "nesterov_final_loss"):  # fmt: skip
        assert np.isfinite(test[key]) and test[f"{key}_ci95"] >= 0


# ------------------------------------------------------------------------ data=mlp_tasks


def mlp_tasks(omniglot, monkeypatch, tmp_path, **settings):
    """data=mlp_tasks on the tiny Omniglot fixture (20 characters of random noise, split 12 / 4 /
    4), 28x28 images (smaller ones average the noise to near-constant pixels), 3-way problems,
    minibatches of 16, its Omniglot cache under tmp_path."""
    from metalearn.data.mlp_tasks import MLPTasksConfig
    from metalearn.data.mlp_tasks import make_source as make_mlp_source

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = MLPTasksConfig(
        root=str(omniglot), download=False, split_sizes=(12, 4, 4), image_size=28, n_way=3,
        batch=16, **settings,
    )  # fmt: skip
    return cfg, make_mlp_source(cfg)


def test_mlp_tasks_splits_hold_disjoint_characters(omniglot, monkeypatch, tmp_path):
    """Every split's characters are data=omniglot's split of them (split_classes), disjoint, and
    a task holds n_way distinct characters of its split, all 20 drawings of each."""
    from metalearn.data.omniglot import load_omniglot, split_classes

    cfg, source = mlp_tasks(omniglot, monkeypatch, tmp_path)
    data = load_omniglot(str(omniglot), image_size=28, download=False)
    classes = split_classes(data, sizes=(12, 4, 4))
    assert not set(classes["train"]) & set(classes["test"])
    assert not set(classes["train"]) & set(classes["val"])
    flat = {s: np.asarray(source.splits[s]).reshape(len(classes[s]), -1) for s in classes}
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(flat[s], data.images[classes[s]].reshape(len(classes[s]), -1))
    rows = {s: {r.tobytes() for r in flat[s]} for s in flat}  # the characters' pixels
    assert not rows["train"] & rows["test"] and not rows["train"] & rows["val"]
    for i in range(5):
        task = source.sample(jax.random.PRNGKey(i), source.splits["test"])
        x = np.asarray(task.support.x).reshape(3, 20, -1)
        assert {c.tobytes() for c in x.reshape(3, -1)} <= {
            r.tobytes() for r in flat["test"]
        }  # its characters come from the test split,
        assert len({c.tobytes() for c in x.reshape(3, -1)}) == 3  # three distinct ones
        np.testing.assert_array_equal(task.support.y, np.repeat(np.arange(3), 20))


def test_mlp_tasks_inner_loss_decreases_under_sgd(omniglot, monkeypatch, tmp_path):
    """200 SGD steps (rate 0.5) on per-step minibatches: the full-batch cross-entropy falls from
    about log 3 (1.19) to below half of it (measured: 0.22; the task's 60 noise drawings are
    separable by the 784 pixels)."""
    cfg, source = mlp_tasks(omniglot, monkeypatch, tmp_path)
    problem = cfg.problem()
    task = source.sample(KEY, source.splits["train"])
    params = problem.init(KEY)
    sgd = from_optax(optax.sgd(0.5))
    start = problem.loss(params, task.support)
    assert abs(float(start) - np.log(3)) < 0.3
    end, _, losses = unroll(sgd, problem, {}, params, sgd.init_state({}, params), task.support,
                            200, key=KEY)  # fmt: skip
    assert float(problem.loss(end, task.support)) < 0.5 * float(start)
    assert losses.shape == (201,) and np.all(np.isfinite(losses))
    # minibatches differ from step to step: the same parameters give different losses
    one = [
        problem.loss(params, problem.minibatch(task.support, jax.random.PRNGKey(i))) for i in (1, 2)
    ]
    assert float(one[0]) != float(one[1])


@pytest.mark.parametrize("estimator", ["backprop", pytest.param("pes", marks=pytest.mark.slow)])
def test_learned_optimizer_meta_trains_on_mlp_tasks_and_evaluates(
    estimator, omniglot, monkeypatch, tmp_path
):
    data, source = mlp_tasks(omniglot, monkeypatch, tmp_path, hidden=4)
    cfg = Config(
        data=data,
        model=MLPConfig(),
        conditioning=ConditioningConfig(name="none"),
        algo=LearnedOptimizerConfig(
            unroll=4, truncation=2, estimator=estimator, es_samples=2, baselines={"adam": 0.01}
        ),
        train=TrainConfig(meta_batch=2),
    )
    algo = make(cfg.algo, None, None, 3, config=cfg, source=source)
    exp = Experiment(cfg, source, None, algo, None, optax.adam(1e-3))
    state = initial_state(exp, algo.init(KEY))
    theta = jax.tree.map(np.array, state.params)  # a copy: the step donates the state
    step = make_train_step(exp, 2)
    for i in (1, 2, 3):
        state, metrics = step(state, source.splits["train"], jax.random.fold_in(KEY, i), i)
        assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, theta)
    assert max(jax.tree.leaves(moved)) > 0  # the outer updates changed the optimizer
    result = make_evaluator(algo, source, None, 4, None)(state.params, "test", 4, 0)
    for key in ("loss", "final_loss", "initial_loss", "adam_loss", "adam_final_loss"):
        assert np.isfinite(result[key]) and f"{key}_ci95" in result


# ------------------------------------------------------ evaluation on another task family


def test_eval_data_evaluates_on_another_family(omniglot, monkeypatch, tmp_path):
    """algo.eval_data=quadratic on an mlp_tasks learner: evaluate runs the same LSTM on a
    held-out quadratic (the one its key draws from the quadratic's test split) beside the
    baselines, and gives the very losses an unroll of the rule on that quadratic gives."""
    data, source = mlp_tasks(omniglot, monkeypatch, tmp_path, hidden=4)
    cfg = Config(
        data=data,
        model=MLPConfig(),
        conditioning=ConditioningConfig(name="none"),
        algo=LearnedOptimizerConfig(
            unroll=6, truncation=3, eval_data="quadratic", baselines={"sgd": 0.01}
        ),
        train=TrainConfig(meta_batch=2),
    )
    algo = make(cfg.algo, None, None, 3, config=cfg, source=source)
    theta = algo.init(KEY)
    own_task = source.sample(KEY, source.splits["test"])
    key = jax.random.PRNGKey(5)
    loss, metrics = jax.jit(algo.evaluate, static_argnums=3)(theta, own_task, key, 6)

    quad = QuadraticConfig()
    qsource, problem = make_source(quad), quad.problem()
    task = qsource.sample(jax.random.fold_in(key, 1), qsource.splits["test"])
    rule = optimizers()["lstm"](cfg.algo)
    params = problem.init(key)
    losses = unroll(rule, problem, theta, params, rule.init_state(theta, params), task.support, 6)[
        2
    ]
    np.testing.assert_allclose(metrics["final_loss"], losses[-1], rtol=1e-5)
    np.testing.assert_allclose(loss, losses[1:].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["initial_loss"], losses[0], rtol=1e-6)
    sgd = from_optax(optax.sgd(0.01))
    want = unroll(sgd, problem, {}, params, sgd.init_state({}, params), task.support, 6)[2]
    np.testing.assert_allclose(metrics["sgd_final_loss"], want[-1], rtol=1e-5)


def test_eval_data_refuses_a_rule_tied_to_the_trained_family(omniglot, monkeypatch, tmp_path):
    data, source = mlp_tasks(omniglot, monkeypatch, tmp_path)
    cfg = Config(
        data=data,
        model=MLPConfig(),
        conditioning=ConditioningConfig(name="none"),
        algo=LearnedOptimizerConfig(optimizer="hyper", eval_data="quadratic"),
        train=TrainConfig(meta_batch=2),
    )
    with pytest.raises(ConfigError, match="Only the coordinatewise rules"):
        make(cfg.algo, None, None, 3, config=cfg, source=source)


@pytest.mark.slow  # starts metalearn processes
def test_eval_of_an_mlp_tasks_run_on_quadratics(omniglot, env, tmp_path):
    """`metalearn eval RUN algo.eval_data=quadratic` on a run meta-trained on mlp_tasks, and
    `eval.inner_steps=2T` (twice the training horizon), and on a wider ReLU network."""
    import json

    run = tmp_path / "run"
    args = ["train", "algo=learned_optimizer", "data=mlp_tasks", f"data.root={omniglot}",
            "data.download=false", "data.split_sizes=[12,4,4]", "data.n_way=3", "data.batch=16",
            "data.hidden=4", "train.steps=4", "train.meta_batch=2", "algo.unroll=4",
            "algo.truncation=2", "eval.every=2", "eval.num_tasks=4", "eval.val_tasks=2",
            f"hydra.run.dir={run}"]  # fmt: skip
    metalearn(args, env, tmp_path, check=True)
    cases = (
        (["algo.eval_data=quadratic"], 4),
        (["eval.inner_steps=8"], 8),
        (["data.hidden=8", "data.activation=relu"], 4),  # a network it was not trained on
    )
    for overrides, steps in cases:
        out = metalearn(["eval", str(run), *overrides, "eval.num_tasks=4", "--no-save"], env,
                        tmp_path, check=True)  # fmt: skip
        result = json.loads(out.stdout)
        assert result["eval_inner_steps"] == steps
        test = result["test"]
        assert np.isfinite(test["loss"]) and np.isfinite(test["adam_final_loss"])
        if overrides[0].startswith("algo.eval_data"):
            assert test["initial_loss"] > 5  # a quadratic's |W theta - y|^2, not log 3
        else:
            assert test["initial_loss"] < 2  # the MLP's cross-entropy, about log 3
