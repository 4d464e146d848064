"""The outer loop: the only Python loop and the only place with side effects (logs, checkpoints)."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metalearn import registry
from metalearn.algorithms.base import LossFn, task_loss_fn
from metalearn.config import Config, ConfigError
from metalearn.data import TaskSource, make_task_source
from metalearn.evaluate import make_evaluator
from metalearn.init_from import load_pretrained
from metalearn.memory import check_fits, compiled_bytes, tree_bytes
from metalearn.models import Model, make_model
from metalearn.models.groups import path_name
from metalearn.models.norm import is_state
from metalearn.progress import Reporter
from metalearn.rundir import RunDir
from metalearn.task_chunks import auto_chunk_for, mean_over_chunks
from metalearn.types import Algorithm

log = logging.getLogger("metalearn")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message is shown to the user as is."""


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    algo_state: Any = ()  # what an algorithm's objective carries between steps (e.g. DWA)


def initial_state(exp: Experiment, params) -> TrainState:
    return TrainState(params, exp.optimizer.init(params), exp.algo.objective.init_state())


class Experiment(NamedTuple):
    """Everything built from a config: the pieces train, eval and scripts share."""

    cfg: Config
    source: TaskSource
    model: Model
    algo: Algorithm
    loss_fn: LossFn
    optimizer: optax.GradientTransformation

    @property
    def classification(self) -> bool:
        return self.source.kind == "classification"

    @property
    def eval_inner_steps(self) -> int:
        steps = self.cfg.eval.inner_steps
        return getattr(self.cfg.algo, "inner_steps", 0) if steps is None else steps


def build(cfg: Config) -> Experiment:
    source = make_task_source(cfg.data)
    model = make_model(cfg.model, source.input_shape)
    loss_fn = task_loss_fn(source.kind)
    algo = registry.make_of("algo", cfg.algo)(
        cfg.algo,
        model,
        loss_fn,
        n_out=source.n_out,
        n_train_classes=source.n_train_classes,
        config=cfg,
        source=source,
    )
    optimizer = algo.optimizer(cfg.train)
    template = jax.eval_shape(algo.init, jax.random.PRNGKey(0))
    if any(is_state(path_name(p)) for p, _ in jax.tree_util.tree_flatten_with_path(template)[0]):
        optimizer = with_running_statistics(optimizer)
    return Experiment(cfg, source, model, algo, loss_fn, optimizer)


def _state_labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "state" if is_state(path_name(path)) else "trained", params
    )


def with_running_statistics(optimizer) -> optax.GradientTransformation:
    """The algorithm's optimizer for the parameters, SGD with rate 1 for running statistics,
    whose 'gradient' is already their moving-average step (metalearn/models/norm.py)."""
    return optax.multi_transform({"trained": optimizer, "state": optax.sgd(1.0)}, _state_labels)


def _per_task_state_steps(grads, n_tasks: int):
    """A chunk's running-statistics steps are summed over its tasks (norm.track ignores the
    loss's 1/n weighting); divide them so they are the mean over tasks like every gradient."""
    return jax.tree_util.tree_map_with_path(
        lambda path, g: g / n_tasks if is_state(path_name(path)) else g, grads
    )


def task_mesh(meta_batch: int) -> Mesh | None:
    """A 1-D mesh over all devices for the meta-batch's task axis; None on one device.

    Tasks are independent until the mean over the meta-batch, so sharding them needs nothing
    but an all-reduce of the gradients, which XLA inserts. The same code runs on 1 CPU, several
    GPUs or a TPU slice (all processes' devices, after jax.distributed.initialize).
    """
    n = jax.device_count()
    if n == 1:
        return None
    if meta_batch % n:
        log.warning(
            "train.meta_batch=%d does not divide over %d devices; running unsharded.", meta_batch, n
        )
        return None
    return jax.make_mesh((n,), ("tasks",), axis_types=(jax.sharding.AxisType.Auto,))


def make_train_step(
    exp: Experiment,
    meta_batch: int,
    mesh: Mesh | None = None,
    task_chunk: int | None = None,
):
    """One jitted (state, split arrays, key) -> (state, metrics); the state's buffers are donated.

    This is the single place where the per-task maths is vmapped over the meta-batch; with a
    mesh, the task axis is sharded over its devices. Each device walks its tasks in chunks of
    `task_chunk` (None: auto_task_chunk), a chunk at a time. Every algorithm takes this one path:
    its objective gets the batch and `task_mean`, the chunked mean gradient of a per-task loss.
    """
    algo = exp.algo
    n_devices = 1 if mesh is None else mesh.size
    if task_chunk is not None and (meta_batch // n_devices) % task_chunk:
        raise ConfigError(
            f"train.task_chunk={task_chunk} must divide the tasks each device gets "
            f"(train.meta_batch={meta_batch} over {n_devices} device(s): "
            f"{meta_batch // n_devices})."
        )

    def over_tasks(tree):
        if mesh is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P("tasks")))

    def task_mean_gradient(params, tasks, keys):
        """task_mean for the objective: the mean gradient of loss(params, task, key) over the
        batch, walked in chunks of tasks."""
        per_device = meta_batch // n_devices
        one_task = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tasks)
        chunk = task_chunk or auto_chunk_for(per_device, one_task)

        def task_mean(loss):
            def chunk_gradient(p, chunk_batch):
                chunk_tasks, chunk_keys = chunk_batch

                def mean_loss(p):
                    losses, metrics = jax.vmap(loss, (None, 0, 0))(p, chunk_tasks, chunk_keys)
                    return losses.mean(), metrics

                (_, metrics), grads = jax.value_and_grad(mean_loss, has_aux=True)(p)
                n_tasks = jax.tree.leaves(chunk_tasks)[0].shape[0]
                return _per_task_state_steps(grads, n_tasks), metrics

            return mean_over_chunks(chunk_gradient, params, (tasks, keys), chunk * n_devices)

        return task_mean

    def train_step(state: TrainState, arrays, key, step=0):
        """`step` (the 1-based training step) is for algorithms whose objective has a schedule."""
        k_tasks, k_algo = jax.random.split(key)
        task_keys = over_tasks(jax.random.split(k_tasks, meta_batch))
        tasks = over_tasks(
            jax.vmap(lambda k: exp.source.sample(k, arrays, algo.global_labels))(task_keys)
        )
        algo_keys = over_tasks(jax.random.split(k_algo, meta_batch))
        grads, algo_state, metrics = algo.objective.gradient(
            state.params,
            state.algo_state,
            tasks,
            algo_keys,
            step,
            task_mean_gradient(state.params, tasks, algo_keys),
        )
        updates, opt_state = exp.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, algo_state), jax.tree.map(jnp.mean, metrics)

    return jax.jit(train_step, donate_argnums=0)


def load_run_config(run: RunDir, overrides: list[str] = ()) -> Config:
    """A run's saved config (never resolving what its author wrote) plus `key=value` overrides."""

    from metalearn.config import from_yaml_with_overrides
    from metalearn.rundir import RunDirError, literal, read_run_yaml

    saved = run.path / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise RunDirError(
            f"{run.path} is not a metalearn run directory (no .hydra/config.yaml); give a "
            "directory that `metalearn train` wrote."
        )
    data = read_run_yaml(saved)
    if not isinstance(data, dict):
        raise RunDirError(
            f"{saved} does not hold a configuration (a YAML mapping): the run directory is "
            "damaged. Restore the file from a copy of the run."
        )
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value; got {bad}.")
    data = literal(data)
    if isinstance(data.get("logger"), str):
        data["logger"] = "jsonl"  # a saved run is read, never logged to: no backend is needed
    try:
        return from_yaml_with_overrides(data, list(overrides))
    except ConfigError as error:
        raise ConfigError(f"{error} (in {saved} with the overrides {list(overrides)})") from None


def restore(run_dir, overrides: list[str], checkpoint: str = "best"):
    """Rebuild a finished run's experiment (with `key=value` overrides) and load a checkpoint.

    Returns (experiment, params, checkpoint metadata).
    """
    run = RunDir(run_dir)
    exp = build(load_run_config(run, overrides))
    template = jax.eval_shape(exp.algo.init, jax.random.PRNGKey(exp.cfg.seed))
    if checkpoint == "latest":
        template = jax.eval_shape(lambda p: initial_state(exp, p), template)
    tree, meta = run.load_checkpoint(checkpoint, template)
    return exp, (tree.params if checkpoint == "latest" else tree), meta


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


class Session(NamedTuple):
    """A run ready to train: built, checked and compiled, with nothing written yet."""

    exp: Experiment
    state: TrainState
    progress: dict  # step, best-so-far and times: what the latest checkpoint carries
    train_step: Any  # the compiled step
    evaluate: Any
    train_arrays: Any
    train_key: jax.Array
    n_params: int


def prepare(cfg: Config, run: RunDir, resume: bool = False) -> Session:
    """Everything that can refuse a run, before any of its files is written: the data, the
    model, the memory the step needs, and (resume) that the checkpoints fit the config.

    Step s draws its tasks from fold_in(train_key, s), so a run resumed from its latest
    checkpoint (resume=True) replays exactly what an uninterrupted run would have done.
    """
    exp = build(cfg)
    init_key, train_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    shapes = jax.eval_shape(exp.algo.init, init_key)
    n_params = sum(x.size for x in jax.tree.leaves(shapes))
    check_fits(
        3 * tree_bytes(shapes), "The model with its optimiser state", f"{n_params:,} parameters"
    )
    params = exp.algo.init(init_key)
    if cfg.algo.init_from and not resume:
        params = load_pretrained(params, exp.model, cfg.algo.init_from, cfg.algo.init_groups)
    state = initial_state(exp, params)
    progress = {"step": 0, "best": {"score": -math.inf, "step": 0, "metrics": None},
                "train_time_s": 0.0, "compile_time_s": 0.0, "elapsed_s": 0.0}  # fmt: skip
    if resume:
        state, progress = run.load_checkpoint("latest", state)
        if progress["best"]["metrics"] is not None:  # the best checkpoint is tested at the end
            run.load_checkpoint("best", state.params)
    mesh = task_mesh(cfg.train.meta_batch)
    train_arrays = exp.source.splits["train"]
    if mesh is not None:  # parameters, optimiser state and data are replicated on every device
        state, train_arrays = jax.device_put((state, train_arrays), NamedSharding(mesh, P()))
    step_fn = make_train_step(exp, cfg.train.meta_batch, mesh, cfg.train.task_chunk)
    started = time.perf_counter()
    compiled = step_fn.lower(state, train_arrays, train_key, 1).compile()
    check_fits(compiled_bytes(compiled), "One training step", _step_sizes(exp, n_params))
    if progress["step"] == 0:  # as the first step's time counted it before compiling ahead
        progress["compile_time_s"] = time.perf_counter() - started
        progress["train_time_s"] = progress["compile_time_s"]
    evaluate = make_evaluator(
        exp.algo, exp.source, exp.loss_fn, exp.eval_inner_steps, cfg.eval.batch
    )
    return Session(exp, state, progress, compiled, evaluate, train_arrays, train_key, n_params)


def _step_sizes(exp: Experiment, n_params: int) -> str:
    """What a training step holds, from the shapes of one task (for memory errors)."""
    arrays = exp.source.splits["train"]
    task = jax.eval_shape(lambda k: exp.source.sample(k, arrays, False), jax.random.PRNGKey(0))
    support, query = task.support.x.shape, task.query.x.shape
    return (
        f"{exp.cfg.train.meta_batch} tasks of {support[0]:,} support and {query[0]:,} query "
        f"examples of shape {tuple(support[1:])}, and {n_params:,} parameters"
    )


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
    with _stop_on_signals() as stop, report.active():
        for step in range(progress["step"] + 1, cfg.train.steps + 1):
            t = time.perf_counter()
            state, metrics = train_step(
                state, train_arrays, jax.random.fold_in(train_key, step), step
            )
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
    test = evaluate(best_params, "test", cfg.eval.num_tasks, cfg.eval.seed)
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
