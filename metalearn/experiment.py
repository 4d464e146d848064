"""Assembling a run from its config: the experiment (data, model, algorithm, optimizer), a
saved run's config and checkpoint, and a run checked and compiled before any file is written."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, NamedTuple

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from metalearn import registry
from metalearn.algorithms.base import LossFn, task_loss_fn
from metalearn.config import Config, ConfigError, check_purpose, training_shape
from metalearn.data import TaskSource, make_task_source
from metalearn.data.augment import augmenting, default_padding
from metalearn.evaluate import make_evaluator
from metalearn.init_from import load_pretrained
from metalearn.memory import check_fits, compiled_bytes, tree_bytes
from metalearn.models import Model, make_model
from metalearn.models.groups import path_name
from metalearn.models.norm import is_state
from metalearn.models.precision import mixed
from metalearn.rundir import RunDir
from metalearn.train_step import TrainState, make_train_step, task_mesh
from metalearn.types import Algorithm, Task

log = logging.getLogger("metalearn")


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
    # what the train step runs: the algorithm and episode sampler for training episodes, which
    # are `algo` and `source.sample` unless train.n_way / k_shot / k_query reshape them
    train_algo: Algorithm | None = None
    train_sample: Any = None

    @property
    def classification(self) -> bool:
        # scored by accuracy; tasks that are inner problems (data/problems.py) are losses to
        # minimise, scored by the loss even where the problem classifies (data=mlp_tasks)
        inner = getattr(type(self.cfg.data), "inner_problems", False)
        return self.source.kind == "classification" and not inner

    @property
    def eval_inner_steps(self) -> int:
        steps = self.cfg.eval.inner_steps
        return getattr(self.cfg.algo, "inner_steps", 0) if steps is None else steps


def build(cfg: Config, purpose: str = "train") -> Experiment:
    """The experiment of `cfg`; purpose="evaluate" (config.PURPOSES) leaves out the training
    episodes (train_algo and train_sample are then `algo` and the test episodes' sample), so
    that nothing only training reads is built or checked."""
    check_purpose(purpose)
    source = make_task_source(cfg.data)
    model = make_model(cfg.model, source.input_shape)
    if cfg.train.precision == "bf16":
        model = mixed(model)
    loss_fn = task_loss_fn(source.kind)

    def make_algo(n_out: int) -> Algorithm:
        return registry.make_of("algo", cfg.algo)(
            cfg.algo,
            model,
            loss_fn,
            n_out=n_out,
            n_train_classes=source.n_train_classes,
            config=cfg,
            source=source,
        )

    algo, train_algo, train_sample = make_algo(source.n_out), None, source.sample
    shape = training_shape(cfg) if purpose == "train" else None
    if shape is not None:  # an any_way algorithm's parameters fit episodes of every way
        if source.episodes is None:
            raise ConfigError(
                f"data={cfg.data.name} cannot draw training episodes of another shape than its "
                "test episodes; leave train.n_way / train.k_shot / train.k_query unset."
            )
        train_sample = source.episodes(*shape)
        train_algo = make_algo(shape[0]) if shape[0] != source.n_out else algo
    if purpose == "train":
        train_sample = _augmented(train_sample, cfg.data, source)
    optimizer = algo.optimizer(cfg.train)
    template = jax.eval_shape(algo.init, jax.random.PRNGKey(0))
    if any(is_state(path_name(p)) for p, _ in jax.tree_util.tree_flatten_with_path(template)[0]):
        optimizer = with_running_statistics(optimizer)
    return Experiment(
        cfg, source, model, algo, loss_fn, optimizer, train_algo or algo, train_sample
    )


def _augmented(sample, data_cfg, source: TaskSource):
    """Training episodes augmented as data.augment says (none unless set; episodic data only)."""
    recipe = getattr(data_cfg, "augment", "none")
    if recipe == "none":
        return sample
    padding = data_cfg.augment_padding
    if padding is None:
        padding = default_padding(min(source.input_shape[:2]))
    return augmenting(sample, recipe, padding)


def _state_labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "state" if is_state(path_name(path)) else "trained", params
    )


def with_running_statistics(optimizer) -> optax.GradientTransformation:
    """The algorithm's optimizer for the parameters, SGD with rate 1 for running statistics,
    whose 'gradient' is already their moving-average step (metalearn/models/norm.py)."""
    return optax.multi_transform({"trained": optimizer, "state": optax.sgd(1.0)}, _state_labels)


def load_run_config(run: RunDir, overrides: list[str] = (), purpose: str = "train") -> Config:
    """A run's saved config (never resolving what its author wrote) plus `key=value` overrides,
    checked for `purpose` (config.PURPOSES: "train" to resume it, "evaluate" to evaluate it)."""

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
        return from_yaml_with_overrides(data, list(overrides), purpose)
    except ConfigError as error:
        raise ConfigError(f"{error} (in {saved} with the overrides {list(overrides)})") from None


def restore(run_dir, overrides: list[str], checkpoint: str = "best"):
    """Rebuild a finished run's experiment (with `key=value` overrides) and load a checkpoint,
    for evaluation: what only training reads is neither checked nor built (config.PURPOSES).

    Returns (experiment, params, checkpoint metadata).
    """
    run = RunDir(run_dir)
    exp = build(load_run_config(run, overrides, "evaluate"), "evaluate")
    template = jax.eval_shape(exp.algo.init, jax.random.PRNGKey(exp.cfg.seed))
    if checkpoint == "latest":
        template = jax.eval_shape(lambda p: initial_state(exp, p), template)
    tree, meta = run.load_checkpoint(checkpoint, template)
    return exp, (tree.params if checkpoint == "latest" else tree), meta


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


def build_checked(cfg: Config) -> tuple[Experiment, int]:
    """build(cfg) for training, and that the model with its optimiser state fits in memory: the
    checks of prepare that need no compiled program, so also a cheap check of a `metalearn
    train` command (tests/test_documented_commands.py). Returns (experiment, its parameters)."""
    exp = build(cfg)
    shapes = jax.eval_shape(exp.algo.init, jax.random.split(jax.random.PRNGKey(cfg.seed))[0])
    n_params = sum(x.size for x in jax.tree.leaves(shapes))
    check_fits(
        3 * tree_bytes(shapes), "The model with its optimiser state", f"{n_params:,} parameters"
    )
    return exp, n_params


def prepare(cfg: Config, run: RunDir, resume: bool = False) -> Session:
    """Everything that can refuse a run, before any of its files is written: the data, the
    model, the memory the step needs, and (resume) that the checkpoints fit the config.

    Step s draws its tasks from fold_in(train_key, s), so a run resumed from its latest
    checkpoint (resume=True) replays exactly what an uninterrupted run would have done.
    """
    exp, n_params = build_checked(cfg)
    init_key, train_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
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
    sizes = _step_sizes(exp, n_params)
    check_fits(compiled_bytes(compiled), "One training step", sizes, cfg.data.size_settings)
    if progress["step"] == 0:  # as the first step's time counted it before compiling ahead
        progress["compile_time_s"] = time.perf_counter() - started
        progress["train_time_s"] = progress["compile_time_s"]
    evaluate = make_evaluator(
        exp.algo, exp.source, exp.loss_fn, exp.eval_inner_steps, cfg.eval.batch
    )
    check_evaluation_fits(exp, evaluate, state.params)
    return Session(exp, state, progress, compiled, evaluate, train_arrays, train_key, n_params)


def check_evaluation_fits(exp: Experiment, evaluate, params, evaluations=None) -> None:
    """Refuse evaluations that cannot fit, as the training step's check does: eval.batch and
    eval.inner_steps can ask far more than training. `evaluations`: (split, tasks, what) of
    each, by default a run's validation and meta-test. Compiling them here costs nothing
    extra: jit keeps the programs for the evaluations that follow."""
    cfg = exp.cfg
    n_params = sum(x.size for x in jax.tree.leaves(params))
    if evaluations is None:
        evaluations = (
            ("val", cfg.eval.val_tasks, "One validation"),
            ("test", cfg.eval.num_tasks, "The meta-test"),
        )
    for split, num_tasks, what in evaluations:
        needed = compiled_bytes(evaluate.lower(params, split, num_tasks).compile())
        at_once = evaluate.batch_size(split, num_tasks)
        batch = (
            "eval.batch=null picks that many"
            if cfg.eval.batch is None
            else f"eval.batch={cfg.eval.batch}"
        )
        sizes = (
            f"{at_once:,} {split} tasks at once ({batch}){_examples(exp, split)}, adapted in "
            f"{exp.eval_inner_steps} steps (eval.inner_steps), and {n_params:,} parameters"
        )
        lower = "Lower eval.batch (it changes no result), eval.inner_steps, {data} or model.hidden"
        check_fits(needed, what, sizes, cfg.data.size_settings, lower)


def _examples(exp: Experiment, split: str) -> str:
    """' of S support and Q query examples of shape X' for a task of `split` (for memory
    errors); empty for an environment's task (metalearn/envs/), which holds no examples."""
    arrays = exp.source.splits[split]
    task = jax.eval_shape(lambda k: exp.source.sample(k, arrays, False), jax.random.PRNGKey(0))
    if not isinstance(task, Task):
        return ""
    support, query = task.support.x.shape, task.query.x.shape
    return (
        f" of {support[0]:,} support and {query[0]:,} query examples of shape {tuple(support[1:])}"
    )


def _step_sizes(exp: Experiment, n_params: int) -> str:
    """What a training step holds, from the shapes of one task (for memory errors)."""
    arrays = exp.source.splits["train"]
    task = jax.eval_shape(lambda k: exp.source.sample(k, arrays, False), jax.random.PRNGKey(0))
    if not isinstance(task, Task):  # an environment's task (metalearn/envs/): no examples
        return f"{exp.cfg.train.meta_batch} tasks and {n_params:,} parameters"
    support, query = task.support.x.shape, task.query.x.shape
    return (
        f"{exp.cfg.train.meta_batch} tasks of {support[0]:,} support and {query[0]:,} query "
        f"examples of shape {tuple(support[1:])}, and {n_params:,} parameters"
    )
