"""Model state and randomness: dropout keys from the task's stream (metalearn/models/randomness.py)
and inductive batch norm for Flax modules (their own batch_stats as "state" parameters), checked
against Flax itself: the module's own moving-average update and its train=False outputs."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import compose_config, metalearn

from metalearn import load_run
from metalearn.algorithms.base import classification_loss, sgd_adapt
from metalearn.algorithms.maml import MAMLConfig
from metalearn.algorithms.maml import make as make_maml
from metalearn.algorithms.reptile import ReptileConfig
from metalearn.algorithms.reptile import make as make_reptile
from metalearn.checks import ConfigError
from metalearn.experiment import build, initial_state
from metalearn.models import Model, make_model, norm, randomness
from metalearn.models.flax_module import FlaxConfig
from metalearn.models.groups import STATE
from metalearn.train_step import make_train_step
from metalearn.types import Split, Task

HERE = __name__
KEY = jax.random.PRNGKey(0)
RATE = 0.5

# ------------------------------------------------------------------ the user's modules


class NNXDropMLP(nnx.Module):
    def __init__(self, in_features=4, hidden=64, num_classes=2, rate=RATE, *, rngs: nnx.Rngs):
        self.layer = nnx.Linear(in_features, hidden, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def embed(self, x):
        return self.drop(jax.nn.relu(self.layer(x)))

    def __call__(self, x):
        return self.head(self.embed(x))


class LinenDropMLP(nn.Module):
    hidden: int = 64
    num_classes: int = 2
    rate: float = RATE

    def setup(self):
        self.layer = nn.Dense(self.hidden)
        self.drop = nn.Dropout(self.rate)
        self.head = nn.Dense(self.num_classes)

    def embed(self, x, deterministic: bool = False):
        return self.drop(nn.relu(self.layer(x)), deterministic=deterministic)

    def __call__(self, x, deterministic: bool = False):
        return self.head(self.embed(x, deterministic))


class LinenTrainSwitch(nn.Module):
    """One `train` switch for batch norm and dropout, as many Linen examples are written."""

    num_classes: int = 2

    @nn.compact
    def __call__(self, x, train: bool = True):
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm")(nn.Dense(16)(x))
        h = nn.Dropout(RATE, deterministic=not train)(nn.relu(h))
        return nn.Dense(self.num_classes, name="head")(h)


class LinenBNNet(nn.Module):
    hidden: int = 8
    num_classes: int = 3

    def setup(self):
        self.conv = nn.Conv(self.hidden, (3, 3), strides=2)
        self.norm = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
        self.head = nn.Dense(self.num_classes)

    def embed(self, x, train: bool = True):
        return nn.relu(self.norm(self.conv(x), use_running_average=not train)).mean((1, 2))

    def __call__(self, x, train: bool = True):
        return self.head(self.embed(x, train))


class NNXBNDropNet(nnx.Module):
    """conv -> batch norm -> ReLU -> mean over space -> dropout -> head."""

    def __init__(self, hidden=8, num_classes=3, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, hidden, (3, 3), strides=2, rngs=rngs)
        self.norm = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def embed(self, x):
        return self.drop(jax.nn.relu(self.norm(self.conv(x))).mean((1, 2)))

    def __call__(self, x):
        return self.head(self.embed(x))


class NNXBNNet(nnx.Module):
    def __init__(self, hidden=8, num_classes=3, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, hidden, (3, 3), strides=2, rngs=rngs)
        self.norm = nnx.BatchNorm(hidden, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def embed(self, x):
        return jax.nn.relu(self.norm(self.conv(x))).mean((1, 2))

    def __call__(self, x):
        return self.head(self.embed(x))


def flax_model(cls: str, shape, **cfg):
    return make_model(FlaxConfig(module=f"{HERE}:{cls}", **cfg), shape)


# ------------------------------------------------------------------ the key stream


def test_keys_exist_only_in_a_training_scope_and_never_at_test():
    assert randomness.next_key() is None
    with randomness.training(KEY):
        a, b = randomness.next_key(), randomness.next_key()
        with norm.testing():
            assert randomness.next_key() is None
    assert not np.array_equal(a, b)  # every call its own key
    with randomness.training(KEY):
        np.testing.assert_array_equal(randomness.next_key(), a)  # the same key, the same stream


def test_an_inner_loop_draws_new_masks_at_every_step():
    """sgd_adapt on loss(w) = sum(w * mask): after two steps of rate 1, w - m1 - m2 holds entries
    -1 (dropped once), so the two steps' masks differ; with one mask, none would be."""

    def loss(w, split):
        mask = jax.random.bernoulli(randomness.next_key(), 0.5, w.shape).astype(w.dtype)
        return jnp.sum(w * mask)

    @jax.jit
    def adapt(key):
        with randomness.training(key):
            return sgd_adapt(loss, jnp.zeros(256), Split(jnp.zeros(1), jnp.zeros(1)), lr=1.0,
                             steps=2)  # fmt: skip

    values = set(np.unique(adapt(KEY)).tolist())
    assert values == {-2.0, -1.0, 0.0}


def test_reptile_inner_steps_draw_new_masks():
    dropped = Model(
        init=lambda key, n: {"w": jnp.zeros(256)},
        apply=lambda p, x: p["w"] * jax.random.bernoulli(randomness.next_key(), 0.5, (256,)),
        embed=None,
        head=None,
        groups=lambda p: jax.tree.map(lambda _: "blocks.0", p),
    )
    algo = make_reptile(ReptileConfig(inner_lr=1.0, inner_steps=2, inner_optimizer="sgd"),
                        dropped, lambda out, y: (out.sum(), {}), 1)  # fmt: skip
    with randomness.training(KEY):
        adapted = jax.jit(lambda p: algo.adapt(p, Split(jnp.zeros(1), jnp.zeros(1)), KEY))(
            {"w": jnp.zeros(256)}
        )
    assert set(np.unique(adapted["w"]).tolist()) == {-2.0, -1.0, 0.0}


# ------------------------------------------------------------------ dropout in Flax modules


@pytest.mark.parametrize("cls", ["NNXDropMLP", "LinenDropMLP"])
def test_flax_dropout_draws_from_the_task_stream_and_is_off_at_test(cls):
    model = flax_model(cls, (4,))
    params = model.init(KEY, 2)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 4))

    @partial(jax.jit, static_argnums=2)
    def features(params, key, testing=False):
        with randomness.training(key), norm.testing() if testing else contextlib.nullcontext():
            return model.embed(params, x), model.embed(params, x)

    plain = jax.jit(model.embed)(params, x)  # no training scope: deterministic
    support, query = features(params, KEY)
    kept = support != 0
    # a dropped unit is 0; a kept one is the deterministic value / (1 - rate)
    np.testing.assert_allclose(support[kept], plain[kept] / (1 - RATE), rtol=1e-6)
    live = plain > 0
    assert 0.4 < 1 - kept[live].mean() < 0.6  # about `rate` of the live units dropped
    assert not np.array_equal(support, query)  # each call its own mask
    np.testing.assert_array_equal(features(params, KEY)[0], support)  # same key, same masks
    assert not np.array_equal(features(params, jax.random.PRNGKey(9))[0], support)
    at_test = features(params, KEY, testing=True)[0]
    np.testing.assert_allclose(at_test, plain, rtol=1e-6)
    rate0 = flax_model(cls, (4,), kwargs={"rate": 0.0})  # the same net without dropout
    rate0.init(KEY, 2)
    np.testing.assert_allclose(jax.jit(rate0.embed)(params, x), plain, rtol=1e-6)


def test_maml_evaluation_with_a_dropout_module_equals_the_net_without_dropout():
    x = jax.random.normal(jax.random.PRNGKey(1), (10, 4))
    y = jnp.arange(10) % 2
    task = _task(x, y)
    dropout, plain = flax_model("NNXDropMLP", (4,)), flax_model("NNXDropMLP", (4,),
                                                                 kwargs={"rate": 0.0})  # fmt: skip
    cfg = MAMLConfig(inner_steps=2)
    loss_fn = classification_loss
    algo, ref = make_maml(cfg, dropout, loss_fn, 2), make_maml(cfg, plain, loss_fn, 2)
    params = algo.init(KEY)
    ref.init(KEY)

    @jax.jit
    def evaluate(params, key):
        with randomness.training(key), norm.testing():  # the evaluator's mode wins
            return algo.evaluate(params, task, key, 2)[1]

    got = evaluate(params, KEY)
    want = jax.jit(lambda p: ref.evaluate(p, task, KEY, 2)[1])(params)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    train_loss = jax.jit(lambda p, k: _scoped(lambda: algo.meta_loss(p, task, k)[0], k))
    assert abs(float(train_loss(params, KEY)) - float(want["loss"])) > 1e-4  # dropout in training


def test_a_linen_train_switch_with_dropout_needs_inductive_batch_norm():
    with pytest.raises(ConfigError, match="train=True.*deterministic.*model.norm=inductive"):
        flax_model("LinenTrainSwitch", (4,))
    model = flax_model("LinenTrainSwitch", (4,), norm="inductive")
    params = model.init(KEY, 2)
    x = jax.random.normal(KEY, (8, 4))
    with norm.testing():
        got = jax.jit(lambda p, x: _scoped(lambda: model.apply(p, x), KEY))(params, x)
    variables = {"params": {k: v for k, v in params.items() if k != "norm"} | {
        "norm": {k: v for k, v in params["norm"].items() if not k.startswith("running_")}},
        "batch_stats": {"norm": {"mean": params["norm"]["running_mean"],
                                 "var": params["norm"]["running_var"]}}}  # fmt: skip
    want = LinenTrainSwitch().apply(variables, x, train=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ inductive batch norm


def config(omniglot, tmp_path, monkeypatch, overrides):
    overrides = ["data=omniglot", f"data.root={omniglot}", "data.split_sizes=[12,4,4]",
                 "data.n_way=3", "data.k_query=2", "data.image_size=14", "model=flax",
                 *overrides]  # fmt: skip
    return compose_config(overrides, tmp_path, monkeypatch)


def linen_update(params, x):
    """Flax's own batch-norm update of LinenBNNet on x: the new (mean, var) of its statistics."""
    variables = {
        "params": {k: {n: v for n, v in p.items() if not n.startswith("running_")}
                   for k, p in params.items()},
        "batch_stats": {"norm": {"mean": params["norm"]["running_mean"],
                                 "var": params["norm"]["running_var"]}},
    }  # fmt: skip
    _, new = LinenBNNet(num_classes=params["head"]["kernel"].shape[1]).apply(
        variables, x, mutable=["batch_stats"]
    )
    return new["batch_stats"]["norm"]["mean"], new["batch_stats"]["norm"]["var"]


def nnx_update(params, x):
    """The same for NNXBNNet, by nnx: the module's BatchStat after one call in training."""
    module = NNXBNNet(num_classes=params["head"]["kernel"].shape[1], rngs=nnx.Rngs(0))
    norm_params = {n: v for n, v in params["norm"].items() if not n.startswith("running_")}
    nnx.update(module, nnx.State({"conv": params["conv"], "norm": norm_params,
                                  "head": params["head"]}))  # fmt: skip
    module.norm.mean[...] = params["norm"]["running_mean"]
    module.norm.var[...] = params["norm"]["running_var"]
    module(x)
    return module.norm.mean[...], module.norm.var[...]


@pytest.mark.parametrize("cls, update", [("LinenBNNet", linen_update), ("NNXBNNet", nnx_update)])
def test_a_pretraining_step_moves_flax_statistics_as_flax_would(
    omniglot, tmp_path, monkeypatch, cls, update
):
    """One algo=finetune step on 2 tasks: the running statistics become the mean over the tasks
    of what the module's own batch norm update gives on each task's batch (support and query,
    one forward pass); they are "state" and the other parameters take Adam's step."""
    overrides = ["algo=finetune", f"model.module={HERE}:{cls}", "model.norm=inductive"]
    cfg = config(omniglot, tmp_path, monkeypatch, overrides)
    exp = build(cfg)
    params = exp.algo.init(KEY)
    assert exp.model.groups(params)["norm"]["running_mean"] == STATE
    arrays = exp.source.splits["train"]
    step = make_train_step(exp, meta_batch=2)
    new, _ = step(initial_state(exp, jax.tree.map(jnp.copy, params)), arrays, KEY, 1)

    k_tasks, _ = jax.random.split(KEY)  # the tasks the step draws (train_step.make_train_step)
    tasks = jax.vmap(lambda k: exp.source.sample(k, arrays, True))(jax.random.split(k_tasks, 2))
    updates = [update(params, jnp.concatenate([tasks.support.x[t], tasks.query.x[t]]))
               for t in range(2)]  # fmt: skip
    want_mean, want_var = (np.mean([u[i] for u in updates], 0) for i in (0, 1))
    np.testing.assert_allclose(new.params["norm"]["running_mean"], want_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new.params["norm"]["running_var"], want_var, rtol=1e-4)
    assert not np.allclose(new.params["conv"]["kernel"], params["conv"]["kernel"])


def test_at_test_a_flax_module_uses_its_running_statistics(omniglot, tmp_path, monkeypatch):
    overrides = ["algo=protonet", f"model.module={HERE}:LinenBNNet", "model.norm=inductive"]
    cfg = config(omniglot, tmp_path, monkeypatch, overrides)
    model = build(cfg).model
    params = model.init(KEY, 3)
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    params["norm"]["running_mean"] = 0.1 * jax.random.normal(k1, (8,))
    params["norm"]["running_var"] = jnp.exp(0.2 * jax.random.normal(k2, (8,)))
    x = jax.random.uniform(KEY, (6, 14, 14, 1))

    @jax.jit
    def apply_at_test(params, x):
        with norm.testing():
            return model.apply(params, x)

    together = apply_at_test(params, x)
    np.testing.assert_allclose(apply_at_test(params, x[:2]), together[:2], rtol=1e-5, atol=1e-6)
    variables = {
        "params": {k: {n: v for n, v in p.items() if not n.startswith("running_")}
                   for k, p in params.items()},
        "batch_stats": {"norm": {"mean": params["norm"]["running_mean"],
                                 "var": params["norm"]["running_var"]}},
    }  # fmt: skip
    want = LinenBNNet(num_classes=3).apply(variables, x, train=False)
    np.testing.assert_allclose(together, want, rtol=1e-5, atol=1e-6)
    in_training = jax.jit(model.apply)  # batch statistics: a query depends on the others
    assert float(jnp.abs(in_training(params, x[:2]) - in_training(params, x)[:2]).max()) > 1e-3


def test_inductive_needs_statistics_and_running_names_are_reserved():
    with pytest.raises(ConfigError, match="norm=inductive.*keeps no batch-norm statistics"):
        flax_model("NNXDropMLP", (4,), norm="inductive").init(KEY, 2)
    with pytest.raises(ConfigError, match="model.norm='batch' is not allowed"):
        FlaxConfig(module=f"{HERE}:LinenBNNet", norm="batch")


# ------------------------------------------------------------------ the command line


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["protonet"])  # finetune's path: the in-process tests above
def test_training_a_flax_module_with_dropout_and_inductive_norm(
    env, omniglot, tmp_path, monkeypatch, algo
):
    """From the command line: the running statistics are trained, checkpointed and loaded
    again by `metalearn eval` (the same test loss) and by the API."""
    folder = tmp_path / "user"
    folder.mkdir()
    source = inspect.getsource(NNXBNDropNet)
    (folder / "mynets.py").write_text(f"import jax\nfrom flax import nnx\n\n\n{source}")
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))}
    run = tmp_path / "run"
    args = ["train", f"algo={algo}", "data=omniglot", f"data.root={omniglot}", "data.n_way=3",
            "data.k_shot=1", "data.k_query=2", "data.image_size=14", "data.split_sizes=[12,4,4]",
            "model=flax", "model.module=mynets:NNXBNDropNet", "model.norm=inductive",
            "train.steps=3", "train.meta_batch=2", "eval.every=3", "eval.num_tasks=4",
            "eval.val_tasks=4", f"hydra.run.dir={run}"]  # fmt: skip
    metalearn(args, env, tmp_path, check=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and np.isfinite(summary["test"]["loss"])
    evaluated = metalearn(["eval", str(run), "--no-save"], env, tmp_path, check=True).stdout
    assert json.loads(evaluated)["test"]["loss"] == pytest.approx(summary["test"]["loss"])
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    params = load_run(run).params
    params = params.get("embed", params)  # protonet's parameters are the embedding's
    assert params["norm"]["running_mean"].shape == (8,)
    assert float(np.abs(params["norm"]["running_mean"]).max()) > 0  # moved from 0


# ------------------------------------------------------------------ helpers


def _scoped(fn, key):
    with randomness.training(key):
        return fn()


def _task(x, y):
    return Task(Split(x[:6], y[:6]), Split(x[6:], y[6:]), jnp.int32(0))
