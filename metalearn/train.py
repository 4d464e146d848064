"""The outer loop: the only Python loop and the only place with side effects (logs, checkpoints)."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time

import jax
import jax.numpy as jnp

from metalearn.evaluate import warn_if_not_finite
from metalearn.experiment import Session
from metalearn.progress import Reporter
from metalearn.protocol import TEST_TASKS_FILE, protocol_card
from metalearn.rundir import RunDir

log = logging.getLogger("metalearn")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message is shown to the user as is."""


def all_finite(metrics: dict) -> bool:
    """Every number in metrics (nested per-task metrics included) is finite."""
    return all(
        all_finite(v) if isinstance(v, dict) else math.isfinite(v)
        for v in metrics.values()
        if not isinstance(v, str)
    )


def validation_score(metrics: dict, classification: bool) -> float:
    """Higher is better: accuracy for classification, minus the loss for regression."""
    return metrics["accuracy"] if classification else -metrics["loss"]


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; the latest checkpoint was saved first."""


def train(session: Session, run: RunDir) -> dict:
    """Train, validate every eval.every steps, test the best checkpoint; return the summary."""
    exp, state, progress = session.exp, session.state, session.progress
    cfg, evaluate, train_step = exp.cfg, session.evaluate, session.train_step
    train_arrays, train_key, n_params = session.train_arrays, session.train_key, session.n_params
    if progress["step"]:
        run.truncate_metrics(progress["step"])
        log.info("resuming %s from step %d", run.path, progress["step"])
    else:
        run.truncate_metrics(0)  # a run killed before its first checkpoint starts over
    log.info(
        "%s on %s with %s: %d parameters, %d steps -> %s",
        cfg.algo.name, cfg.data.name, cfg.model.name, n_params, cfg.train.steps, run.path,
    )  # fmt: skip

    best = progress["best"]
    best_params = None
    report = Reporter(
        run,
        total_steps=cfg.train.steps,
        start_step=progress["step"],
        elapsed_s=progress["elapsed_s"],
        progress=cfg.progress,
        logger=cfg.logger,
        config=cfg,  # the Reporter makes it a dict (dataclasses.asdict) for the logger
    )

    def save_latest(step: int) -> None:
        progress.update(step=step, best=best, elapsed_s=report.elapsed_s)
        run.save_checkpoint("latest", state, progress)

    budget_s = None if cfg.train.max_minutes is None else 60 * cfg.train.max_minutes
    last_step = progress["step"]
    previous = None  # the step before's metrics, for the bound on running ahead
    with _stop_on_signals() as stop, report.active():
        for step in range(progress["step"] + 1, cfg.train.steps + 1):
            t = time.perf_counter()
            state, metrics = train_step(
                state, train_arrays, jax.random.fold_in(train_key, step), step
            )
            previous = _wait_for(previous, metrics)
            report.advance()
            out_of_time = budget_s is not None and report.elapsed_s >= budget_s
            last = step == cfg.train.steps or out_of_time
            if step == 1 or step % cfg.train.log_every == 0 or last:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all_finite(metrics):
                    raise TrainingError(
                        f"The training loss became non-finite at step {step} (checked every "
                        f"train.log_every={cfg.train.log_every} steps; {metrics}). "
                        f"{_last_good(run, progress)} Lower train.outer_lr or algo.inner_lr."
                    )
                report.record(step, "train", metrics)
            progress["train_time_s"] += time.perf_counter() - t
            last_step = step

            if step % cfg.eval.every == 0 or last:
                val = evaluate(state.params, "val", cfg.eval.val_tasks, cfg.eval.seed + 1)
                if not all_finite(val):
                    raise TrainingError(
                        f"The validation metrics became non-finite at step {step} ({val}): the "
                        f"adaptation diverges. {_last_good(run, progress)} Lower algo.inner_lr "
                        "or use fewer algo.inner_steps."
                    )
                score = validation_score(val, exp.classification)
                if score > best["score"]:
                    best = {"score": score, "step": step, "metrics": val}
                    best_params = jax.tree.map(jnp.copy, state.params)  # state gets donated
                    run.save_checkpoint("best", best_params, {"step": step, "val": val})
                report.record(step, "val", val, f"(best at step {best['step']})")
                save_latest(step)
                report.restart_clock()
            elif step % cfg.train.checkpoint_every == 0:
                save_latest(step)
            if stop.signal is not None:
                save_latest(step)
                raise Interrupted(
                    f"Stopped by {stop.signal} at step {step}; the checkpoint is saved. Continue "
                    f"with: metalearn train resume={run.path}"
                )
            if out_of_time:
                log.info("train.max_minutes=%s reached at step %d", cfg.train.max_minutes, step)
                break

    if best_params is None:  # resumed after the last validation: the best is on disk
        best_params, _ = run.load_checkpoint("best", state.params)
    per_task: dict = {}
    test = evaluate(best_params, "test", cfg.eval.num_tasks, cfg.eval.seed, per_task)
    best_file = run.path / "checkpoints" / "best.npz"
    warn_if_not_finite(test, best_file, best_params, exp.eval_inner_steps)
    protocol = protocol_card(exp, last_step)
    # each test task's metrics, for paired comparisons of runs on the same tasks (compare)
    run.write_json(TEST_TASKS_FILE, {"test_tasks": protocol["test_tasks"], "metrics": per_task})
    report.record(best["step"], "test", test, "(the best checkpoint)")
    report.close()
    timed_steps = max(last_step, 1)
    return {
        "algo": cfg.algo.name,
        "data": cfg.data.name,
        "model": cfg.model.name,
        "conditioning": cfg.conditioning.name,
        "seed": cfg.seed,
        "steps": last_step,  # fewer than train.steps when train.max_minutes ran out
        "test": test,
        "best_val": best["metrics"],
        "best_step": best["step"],
        "objective": "accuracy" if exp.classification else "loss",
        "train_time_s": round(progress["train_time_s"], 3),
        "compile_time_s": round(progress["compile_time_s"], 3),
        "steps_per_s": round(
            timed_steps / max(progress["train_time_s"] - progress["compile_time_s"], 1e-9), 3
        ),
        "total_time_s": round(report.elapsed_s, 3),
        "num_params": n_params,
        "jax_version": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "eval_inner_steps": exp.eval_inner_steps,
        "protocol": protocol,
    }


def _last_good(run: RunDir, progress: dict) -> str:
    """Where the run can be resumed from, as the error of a stopped run should say."""
    if not run.started():
        return (
            "No checkpoint was saved before (the first is at train.checkpoint_every or "
            "eval.every), so the run holds nothing to resume."
        )
    latest = run.path / "checkpoints" / "latest.npz"
    return f"The last good checkpoint is {latest} (step {progress['step']})."


def _wait_for(previous, metrics):
    """Wait until the step before this one is done; return this step's metrics for the next.

    Dispatch is asynchronous: unbounded, Python runs ahead of the device (7 steps in
    tests/test_stop_and_eval_checks.py on a CPU, up to the next logged step at most) and then
    waits inside XLA, where no signal handler runs, so a SIGTERM was handled steps late and
    the checkpoint then waited for every step queued. Waiting for step s-1 after dispatching
    step s keeps the device busy (step s is queued) and bounds a stop to one step: the
    handler runs when the step in flight ends, and the loop stops after the next.
    """
    if previous is not None:
        jax.block_until_ready(previous)
    return metrics


class _SignalFlag:
    signal: str | None = None


@contextlib.contextmanager
def _stop_on_signals():
    """Turn SIGINT/SIGTERM/SIGUSR2 into a flag the loop checks after each step, then saves."""
    flag = _SignalFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.signal = signal.Signals(signum).name

    # SIGUSR2 is what Slurm (through submitit) sends before a job's time limit.
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
