"""Issue 28's last cases: a signal stops training within one step and the run resumes exactly;
a checkpoint that evaluates to NaN is named in a warning; the memory check covers evaluation."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compose_config
from helpers import metalearn as run_metalearn
from test_resume import metric_values

from metalearn import run_plan
from metalearn.api import SPEC_FILE, load_run
from metalearn.cli import evaluate_run
from metalearn.config import ConfigError
from metalearn.data.base import spec_of
from metalearn.evaluate import warn_if_not_finite
from metalearn.experiment import prepare
from metalearn.rundir import RunDir
from metalearn.train import Interrupted, train

# Steps are logged (a host sync) only every 50 steps: before the fix, a signal took effect only
# at the next sync, as Python had dispatched every step up to it.
SINE = [
    "train.steps=60",
    "train.log_every=50",
    "eval.every=60",
    "train.checkpoint_every=1000",
    "eval.num_tasks=20",
    "eval.val_tasks=10",
    "progress=false",
]
SIGNAL_AT = 10


def slowed(train_step, seconds: float, signal_at: int):
    """The compiled step, followed on the device by a host callback that sleeps (so the device,
    not Python, is the bottleneck, as in a real run) and, while step `signal_at` runs, sends
    SIGTERM as a scheduler would. The state passes through untouched (donated, not computed
    on) and the metrics get + 0.0, so the run's numbers are the real step's."""

    def pause(step):
        if int(step) == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(seconds)
        return np.zeros((), np.float32)

    @functools.partial(jax.jit, donate_argnums=0)
    def after(state, metrics, step):
        zero = jax.pure_callback(pause, jax.ShapeDtypeStruct((), jnp.float32), step)
        return state, {k: v + zero for k, v in metrics.items()}

    def step_fn(state, arrays, key, step):
        return after(*train_step(state, arrays, key, step), step)

    return step_fn


@pytest.fixture(scope="module")
def sine_cfg(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    yield compose_config(SINE, tmp_path_factory.mktemp("cfg"), monkeypatch)
    monkeypatch.undo()


@pytest.fixture(scope="module")
def uninterrupted(sine_cfg, tmp_path_factory):
    """A finished run, with the files `metalearn train` writes beside its checkpoints (so that
    `metalearn eval` and load_run read it)."""
    run = RunDir(tmp_path_factory.mktemp("runs") / "full")
    session = prepare(sine_cfg, run)
    run_plan.write_run_config(run, {}, sine_cfg, SINE)
    run.write_json(SPEC_FILE, spec_of(session.exp.source).to_json())
    return run, train(session, run)


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers are installed only in the main thread",
)
def test_a_signal_stops_within_one_step_and_the_run_resumes_exactly(
    sine_cfg, uninterrupted, tmp_path
):
    run = RunDir(tmp_path / "run")
    session = prepare(sine_cfg, run)
    session = session._replace(train_step=slowed(session.train_step, 0.02, SIGNAL_AT))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="Stopped by SIGTERM") as stopped:
        train(session, run)
    assert signal.getsignal(signal.SIGTERM) is handler, "the handler is restored"
    _, meta = run._read_checkpoint("latest")
    step = meta["step"]
    # The handler runs once step SIGNAL_AT is done; the loop has dispatched at most one more.
    assert SIGNAL_AT <= step <= SIGNAL_AT + 1, (step, str(stopped.value))
    assert f"at step {step}" in str(stopped.value)

    summary = train(prepare(sine_cfg, run, resume=True), run)
    full_run, full = uninterrupted
    assert metric_values(run.path) == metric_values(full_run.path)
    assert summary["test"] == full["test"] and summary["best_step"] == full["best_step"]


def nan_copy(run: RunDir, dest) -> RunDir:
    """A copy of a finished run whose best checkpoint's parameters are all NaN."""
    shutil.copytree(run.path, dest)
    copy = RunDir(dest)
    arrays, meta = copy._read_checkpoint("best")
    arrays = {k: np.full_like(v, np.nan) for k, v in arrays.items()}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(dest / "checkpoints" / "best.npz", **arrays)
    return copy


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_nan_checkpoint_is_named_by_eval_and_load_run(uninterrupted, tmp_path, caplog):
    run = nan_copy(uninterrupted[0], tmp_path / "nan")
    best = str(run.path / "checkpoints" / "best.npz")
    with caplog.at_level(logging.WARNING, logger="metalearn"):
        result = evaluate_run(str(run.path), [], "test", "best", save=False)
    assert np.isnan(result["test"]["loss"])
    (warning,) = warnings_of(caplog)  # once
    assert best in warning and "loss=nan" in warning and "parameters hold NaN" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metalearn"):
        load_run(run.path)
    (warning,) = warnings_of(caplog)
    assert best in warning and "NaN" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metalearn"):
        load_run(uninterrupted[0].path)  # a finite checkpoint loads without a word
        evaluate_run(str(uninterrupted[0].path), [], "test", "best", save=False)
    assert warnings_of(caplog) == []


def test_training_warns_when_its_best_checkpoint_tests_to_nan(sine_cfg, tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    session = prepare(sine_cfg, run)
    real = session.evaluate

    def evaluate(params, split, *args):  # the meta-test of the best checkpoint diverges
        metrics = real(params, split, *args)
        return {**metrics, "loss": math.nan} if split == "test" else metrics

    with caplog.at_level(logging.WARNING, logger="metalearn"):
        summary = train(session._replace(evaluate=evaluate), run)
    assert math.isnan(summary["test"]["loss"])
    (warning,) = warnings_of(caplog)
    assert str(run.path / "checkpoints" / "best.npz") in warning and "loss=nan" in warning
    assert "the adaptation diverges" in warning  # its parameters are finite


def test_finite_parameters_that_evaluate_to_nan_blame_the_adaptation(caplog):
    params = {"w": jnp.ones(3)}
    with caplog.at_level(logging.WARNING, logger="metalearn"):
        assert not warn_if_not_finite({"loss": 0.5, "num_tasks": 3}, "ck.npz", params, 5)
        warned = warn_if_not_finite(
            {"loss": 0.5, "per_task": {"a": {"loss": math.inf}}}, "ck.npz", params, 5
        )
    assert warned
    (warning,) = warnings_of(caplog)
    assert "ck.npz" in warning and "per_task.a.loss=inf" in warning
    assert "eval.inner_steps=5" in warning


# k_query=100,000 of one task in training is small; 100,000 of them at once in the meta-test is
# terabytes: the training step's check passes, the evaluation's must refuse.
HUGE_EVAL = [
    "data.k_query=100000",
    "train.meta_batch=1",
    "eval.num_tasks=100000",
    "eval.batch=100000",
    "eval.val_tasks=10",
]


def test_an_evaluation_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    cfg = compose_config(HUGE_EVAL, tmp_path, monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as refused:
        prepare(cfg, RunDir(run))
    message = str(refused.value)
    assert message.startswith("The meta-test needs about"), message
    assert "eval.batch=100000" in message and "Lower eval.batch" in message
    assert "100,000 query examples" in message
    assert not run.exists()


def test_metalearn_eval_checks_the_evaluation_too(uninterrupted, tmp_path):
    run = shutil.copytree(uninterrupted[0].path, tmp_path / "run")
    huge = ["data.k_query=100000", "eval.num_tasks=100000", "eval.batch=100000"]
    with pytest.raises(ConfigError, match="Evaluating the best checkpoint on 100,000 test tasks"):
        evaluate_run(str(run), huge, "test", "best")
    assert not list(run.glob("evals/*")), "nothing is written"


@pytest.mark.slow
def test_the_command_refuses_it_in_one_paragraph(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    result = run_metalearn(["train", *HUGE_EVAL], env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("metalearn: error: The meta-test needs about")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "eval.batch" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_damaged_overrides_record_is_rewritten_with_a_warning(sine_cfg, tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    run_plan.write_run_config(run, {}, sine_cfg, SINE)
    (run.path / ".hydra" / "overrides.yaml").write_text("{not: a list}\n")
    with caplog.at_level("WARNING", logger="metalearn"):
        run_plan.write_run_config(run, {}, sine_cfg, ["train.steps=9"])
    assert "overrides.yaml is damaged" in caplog.text
    assert run_plan.run_overrides(run) == ["train.steps=9"]
