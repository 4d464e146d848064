"""Use a trained run on your own data: load its learner without its dataset, prepare images as
its training did, adapt to a support set and predict.

    run = metalearn.load_run("outputs/2026-01-01/12-00-00_protonet_omniglot")
    support = run.preprocess(["a1.png", "b1.png", "c1.png"])  # float32 [3, 28, 28, 1]
    task = run.adapt(support, [0, 1, 2])                      # 3 classes, from the labels
    logits = run.predict(task, run.preprocess(["q1.png", "q2.png"]))  # [2, 3]

The model and learner are rebuilt from the run's config and its data_spec.json (the shapes its
task source had, recorded when the run started), so no dataset is read; a run from before that
file existed is rebuilt with its data (experiment.restore), as `metalearn eval` does. Nothing in the
run directory is written.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from metalearn import registry
from metalearn.algorithms.base import task_loss_fn
from metalearn.config import Config, ConfigError
from metalearn.data.base import DataError, DataSpec, source_of, spec_of
from metalearn.models import make_model, norm
from metalearn.rundir import RunDir, RunDirError
from metalearn.types import Algorithm, Split

log = logging.getLogger("metalearn")

SPEC_FILE = "data_spec.json"
CHECKPOINTS = ("best", "latest")


class TaskParams(NamedTuple):
    """What Run.adapt returns and Run.predict takes: the learner's parameters for one task."""

    params: Any  # the algorithm's task parameters (prototypes, adapted weights, ...)
    n_way: int  # classes of the support set it was adapted to (0 for regression)


def build_algorithm(cfg: Config, model, spec: DataSpec) -> Algorithm:
    """The run's learner, built as experiment.build does, from a spec instead of the dataset."""
    return registry.make_of("algo", cfg.algo)(
        cfg.algo,
        model,
        task_loss_fn(spec.kind),
        n_out=spec.n_out,
        n_train_classes=spec.n_train_classes,
        config=cfg,
        source=source_of(spec),
    )


def read_spec(run: RunDir) -> DataSpec | None:
    """The run's data_spec.json, None when the run has none (it predates the file)."""
    path = run.path / SPEC_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise RunDirError(f"{path} cannot be read ({error}).") from None
    try:
        return DataSpec.from_json(json.loads(text))
    except (ValueError, RecursionError) as error:
        raise RunDirError(
            f"{path} is damaged ({error}): metalearn wrote this file when the run started. "
            "Restore it from a copy of the run, or delete it: the run's data is then loaded to "
            "read the same shapes again."
        ) from None


def load_run(
    run_dir: str | os.PathLike, checkpoint: str = "best", overrides: Sequence[str] = ()
) -> Run:
    """A trained run, ready for new tasks: its config, model, learner and a checkpoint.

    checkpoint: "best" (the best validation step, what the run's test used) or "latest".
    overrides: `key=value` changes of settings that do not shape the model, such as
    eval.inner_steps=10 (the adaptation steps; by default the run's own evaluation's).
    """
    from metalearn.experiment import Experiment, initial_state, load_run_config, restore

    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint={checkpoint!r}: use 'best' or 'latest'.")
    data_overrides = [o for o in overrides if o.lstrip("+~").startswith("data.")]
    if data_overrides:
        raise ConfigError(
            f"{data_overrides}: the data a run was trained on shapes its model and its image "
            "pipeline, so they cannot be changed here (the number of classes comes from the "
            "support labels)."
        )
    run = RunDir(run_dir)
    run.check_folder()
    cfg = load_run_config(run, list(overrides), purpose="evaluate")  # nothing is trained
    spec = read_spec(run)
    if spec is None:
        log.warning(
            "%s has no %s (the run predates it): loading the run's data to rebuild its model.",
            run.path,
            SPEC_FILE,
        )
        exp, params, meta = restore(run.path, list(overrides), checkpoint)
        spec = spec_of(exp.source)
        _warn_if_not_finite(run, checkpoint, params)
        return Run(run.path, exp.cfg, spec, exp.model, exp.algo, params, meta, checkpoint)
    model = make_model(cfg.model, spec.input_shape)
    algo = build_algorithm(cfg, model, spec)
    template = jax.eval_shape(algo.init, jax.random.PRNGKey(cfg.seed))
    if checkpoint == "latest":
        loss_fn, optimizer = task_loss_fn(spec.kind), algo.optimizer(cfg.train)
        exp = Experiment(cfg, source_of(spec), model, algo, loss_fn, optimizer)
        template = jax.eval_shape(lambda p: initial_state(exp, p), template)
    tree, meta = run.load_checkpoint(checkpoint, template)
    params = tree.params if checkpoint == "latest" else tree
    _warn_if_not_finite(run, checkpoint, params)
    return Run(run.path, cfg, spec, model, algo, params, meta, checkpoint)


def _warn_if_not_finite(run: RunDir, checkpoint: str, params) -> None:
    """A checkpoint with NaN or infinite parameters loads, but nothing it returns is a result:
    say so once, naming the file (`metalearn eval` warns the same way)."""
    from metalearn.evaluate import finite_params

    if not finite_params(params):
        log.warning(
            "The checkpoint %s holds NaN or infinite parameters: what adapt, predict and "
            "classify return from it is NaN, not a result.",
            run.path / "checkpoints" / f"{checkpoint}.npz",
        )


class Run:
    """A trained run's learner (see load_run). Inputs to adapt, predict and classify are model
    inputs, float32 [n, *input_shape]: images go through `preprocess` first.

    Models with batch norm (conv4) normalise with the statistics of the examples given together
    (as in training and the MAML reference), so predict a query set in one call, as the
    run's evaluation does.
    """

    def __init__(
        self,
        path,
        cfg: Config,
        spec: DataSpec,
        model,
        algo: Algorithm,
        params,
        meta: dict,
        checkpoint: str,
    ):
        self.path = path
        self.config = cfg
        self.spec = spec
        self.model = model
        self.algo = algo
        self.params = params
        self.checkpoint = checkpoint
        self.checkpoint_step = meta.get("step")
        steps = cfg.eval.inner_steps
        self.inner_steps = getattr(cfg.algo, "inner_steps", 0) if steps is None else steps
        self._shapes = _shapes(jax.eval_shape(algo.init, jax.random.PRNGKey(cfg.seed)))
        self._learners: dict[int, tuple[Any, Any]] = {}

    def __repr__(self) -> str:
        return (
            f"<metalearn run {self.path}: {self.config.algo.name} on {self.config.data.name}, "
            f"{self.checkpoint} checkpoint (step {self.checkpoint_step})>"
        )

    @property
    def classification(self) -> bool:
        return self.spec.kind == "classification"

    @property
    def n_way(self) -> int:
        """The classes per task the run was trained with (the regression dimension otherwise)."""
        return self.spec.n_out

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.spec.input_shape

    # ---------------------------------------------------------------------------------- data

    def preprocess(self, images) -> np.ndarray:
        """Images as the run's data option prepared them for training: file paths, PIL images
        or arrays of any size and mode -> float32 [N, *input_shape] (resized, grayscale or RGB,
        inverted as the data option does, / 255). Vector data is returned as float32."""
        data = self.config.data
        if getattr(data, "inputs", "images") == "vectors":
            return self._inputs(images, "the inputs")
        pipeline = getattr(data, "preprocess", None)
        if pipeline is None:
            raise DataError(
                f"data={data.name} ({type(data).__name__}) has no image pipeline for new images "
                "(no preprocess method), so preprocess cannot prepare them. Give run.adapt and "
                f"run.predict model inputs of shape [n, {', '.join(map(str, self.input_shape))}]"
                " prepared as its training data was."
            )
        return self._inputs(pipeline(images), "the preprocessed images")

    def _inputs(self, x, what: str) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if self.input_shape == (1,) and x.ndim == 1:
            x = x[:, None]  # scalar inputs (sinusoid) as a flat array
        if x.ndim != len(self.input_shape) + 1 or x.shape[1:] != self.input_shape:
            raise DataError(
                f"The shape of {what} is {list(x.shape)}, but the model reads "
                f"[n, {', '.join(map(str, self.input_shape))}]"
                + (": pass images through run.preprocess first." if len(x.shape) > 2 else ".")
            )
        if not len(x):
            raise DataError(f"No examples in {what} (an empty array).")
        return x

    def _targets(self, y, n: int) -> tuple[np.ndarray, int]:
        """Support targets and the number of classes (0 for regression)."""
        if not self.classification:
            y = np.asarray(y, np.float32)
            y = y.reshape(n, -1) if y.ndim == 1 and len(y) == n else y
            if y.shape != (n, self.spec.n_out):
                raise DataError(
                    f"support_y has shape {list(y.shape)}: regression targets for {n} support "
                    f"examples are [{n}, {self.spec.n_out}]."
                )
            return y, 0
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != n:
            raise DataError(
                f"support_y has shape {list(y.shape)}: give one class label per support example "
                f"([{n}])."
            )
        if not np.issubdtype(y.dtype, np.integer):
            if not (np.issubdtype(y.dtype, np.number) and np.all(np.mod(y, 1) == 0)):
                raise DataError(f"support_y must be integer class labels; got {y.dtype} values.")
        y = y.astype(np.int32)
        classes = np.unique(y)
        n_way = len(classes)
        if n_way < 2 or not np.array_equal(classes, np.arange(n_way)):
            raise DataError(
                f"The support labels must be 0..N-1 with every class present and N >= 2; got "
                f"the labels {classes.tolist()[:20]}."
            )
        return y, n_way

    # ------------------------------------------------------------------------------ learner

    def _learner(self, n_way: int):
        """The jitted (adapt, predict) for tasks of n_way classes (the trained one for 0)."""
        if n_way in self._learners:
            return self._learners[n_way]
        algo = self.algo
        if n_way and n_way != self.spec.n_out:
            algo = build_algorithm(self.config, self.model, self.spec._replace(n_out=n_way))
            shapes = _shapes(jax.eval_shape(algo.init, jax.random.PRNGKey(self.config.seed)))
            if shapes != self._shapes:
                raise DataError(
                    f"The support set has {n_way} classes, but this run's {self.config.algo.name} "
                    f"learner has an output of {self.spec.n_out} classes fixed by training "
                    f"(data.n_way={self.spec.n_out}): give support examples of exactly "
                    f"{self.spec.n_out} classes (labels 0..{self.spec.n_out - 1})."
                )
        steps = self.inner_steps

        def adapt(params, support, key):
            with norm.testing():  # inductive batch norm: the running statistics
                return algo.adapt(params, support, key, steps)

        def predict(params, task_params, x):
            with norm.testing():
                return algo.predict(params, task_params, x)

        self._learners[n_way] = (jax.jit(adapt), jax.jit(predict))
        return self._learners[n_way]

    def adapt(self, support_x, support_y, key=None) -> TaskParams:
        """Adapt to a support set: model inputs [S, ...] and labels 0..N-1 (every class present;
        N is read from them) or regression targets. key: a PRNG key or an int seed for learners
        that draw (a fresh head, a shuffled support set); eval.seed by default."""
        if self.spec.n_tasks:
            raise DataError(
                f"{self.path} is a multi-task run (data={self.config.data.name}, "
                f"{self.spec.n_tasks} tasks with ids): its model scores a known task by id and "
                "does not adapt to a new support set."
            )
        x = self._inputs(support_x, "support_x")
        y, n_way = self._targets(support_y, len(x))
        if key is None:
            key = self.config.eval.seed
        if isinstance(key, (int, np.integer)):
            key = jax.random.PRNGKey(int(key))
        adapt, _ = self._learner(n_way)
        return TaskParams(adapt(self.params, Split(x, y), key), n_way)

    def predict(self, task_params: TaskParams, query_x) -> np.ndarray:
        """Outputs for query inputs [Q, ...]: logits [Q, N] for classification (N classes of the
        support set), predictions [Q, d] for regression."""
        if not isinstance(task_params, TaskParams):
            raise TypeError("predict takes what run.adapt returned (a TaskParams).")
        _, predict = self._learner(task_params.n_way)
        x = self._inputs(query_x, "query_x")
        return np.asarray(predict(self.params, task_params.params, x))

    def classify(self, support_x, support_y, query_x, key=None) -> np.ndarray:
        """The predicted class (0..N-1) of each query input: argmax of predict after adapt."""
        if not self.classification:
            raise DataError(
                f"{self.path} was trained on regression data (data={self.config.data.name}): "
                "there are no classes to predict; use run.adapt and run.predict."
            )
        logits = self.predict(self.adapt(support_x, support_y, key), query_x)
        return np.argmax(logits, -1)


def _shapes(tree) -> tuple:
    """A pytree's structure with each leaf's shape and dtype: what a checkpoint must fit."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(a.shape), str(a.dtype)) for a in leaves)
