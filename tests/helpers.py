"""Small builders shared by the tests: configs, a linear model, and a fixed-task source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms.base import regression_loss
from metalearn.algorithms.maml import MAMLConfig
from metalearn.data import TaskSource
from metalearn.experiment import Experiment
from metalearn.models import Model
from metalearn.models.groups import label_by_names
from metalearn.types import Split, Task

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str], tmp_path: Path, monkeypatch):
    """The typed Config `metalearn train <overrides>` runs, with a private dataset cache."""
    from hydra import compose, initialize_config_dir

    from metalearn.config import register_schemas, to_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    register_schemas()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return to_config(compose("config", overrides=overrides), overrides)


LINEAR = Model(
    init=lambda key, n_out: {"blocks": [], "head": {"w": jax.random.normal(key, (3, n_out))}},
    apply=lambda p, x: x @ p["head"]["w"],
    embed=lambda p, x, hook=None: x,
    head=lambda p, feats: feats @ p["head"]["w"],
    groups=label_by_names,
    input_shape=(3,),
)


def linear_task(key, n_support=4, n_query=6, dim=3) -> Task:
    kx, kw, kq = jax.random.split(key, 3)
    w_true = jax.random.normal(kw, (dim, 1))
    xs = jax.random.normal(kx, (n_support, dim))
    xq = jax.random.normal(kq, (n_query, dim))
    return Task(Split(xs, xs @ w_true), Split(xq, xq @ w_true + 0.1), jnp.zeros((), jnp.int32))


def fixed_source(task: Task) -> TaskSource:
    """Every draw returns `task`: isolates the maths from sampling."""
    return TaskSource(
        kind="regression",
        n_out=1,
        n_train_classes=1,
        input_shape=(3,),
        splits={"train": (), "val": (), "test": ()},
        sample=lambda key, arrays, global_labels=False: task,
    )


def linear_maml_experiment(task: Task, *, lr=0.1, steps=1, first_order=False) -> Experiment:
    cfg = MAMLConfig(inner_lr=lr, inner_steps=steps, first_order=first_order)
    algo = ALGORITHMS["maml"](cfg, LINEAR, regression_loss, n_out=1, n_train_classes=1)
    # SGD with rate 1 turns the step's update into minus the meta-gradient.
    return Experiment(None, fixed_source(task), LINEAR, algo, regression_loss, optax.sgd(1.0))


def metalearn(args, env, cwd, check=False) -> subprocess.CompletedProcess:
    """Run the `metalearn` command as a user would; with check, fail the test on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, "-m", "metalearn", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"metalearn {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        )
    return result
