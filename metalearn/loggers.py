"""Where a run's metrics go besides metrics.jsonl: one self-registering backend per `logger=`.

metrics.jsonl is the contract and is always written (by `progress.Reporter`); `logger=NAME`
adds one backend. A backend is a subclass of `Logger` that names itself and the pip extra it
needs in its class statement, and so registers itself:

    class MyLogger(Logger, name="mine", extra="mine", module="mypackage"):
        @classmethod
        def open(cls, run, config): ...  # -> an instance; run is the RunDir, config a dict
        def log(self, step, split, metrics): ...
        def close(self, failed=False): ...

`metrics` is what `Reporter.record` received: scalars, plus for multi-task runs "per_task"
({task: {metric: value}}) and "worst"; `scalars()` gives every backend the same tags:
"<split>/<metric>" and "<split>_tasks/<metric>/<task>". Nothing outside this module tests a
logger's name.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from typing import Any, ClassVar

from metalearn.checks import ConfigError

LOGGERS: dict[str, type[Logger]] = {}


class Logger:
    """A metrics backend; subclasses register under `name` when their class is defined."""

    name: ClassVar[str]
    extra: ClassVar[str | None]  # metalearn's pip extra that installs `module`
    module: ClassVar[str | None]  # the package the backend imports

    def __init_subclass__(cls, *, name: str, extra: str | None = None, module: str | None = None):
        super().__init_subclass__()
        known = LOGGERS.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"logger={name} is registered twice ({known} and {cls}).")
        cls.name, cls.extra, cls.module = name, extra, module
        LOGGERS[name] = cls

    @classmethod
    def open(cls, run, config: dict) -> Logger:
        return cls()

    def log(self, step: int, split: str, metrics: dict) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def check_logger(name: str) -> None:
    """Refuse an unknown logger, or one whose package is not installed, before any work."""
    backend = LOGGERS.get(name)
    if backend is None:
        raise ConfigError(
            f"logger={name!r} is not allowed; choose one of {sorted(LOGGERS)} (metrics.jsonl "
            "is written whatever the logger)."
        )
    if backend.module is not None and importlib.util.find_spec(backend.module) is None:
        raise ConfigError(
            f"logger={name} needs the {backend.module} package, which is not installed: "
            f"pip install 'metalearn[{backend.extra}]' (or, in a clone, "
            f"pip install -e '.[{backend.extra}]'), or choose another of {sorted(LOGGERS)}."
        )


def scalars(split: str, metrics: dict) -> dict[str, float]:
    """The tags and values of one record, the same for every backend."""
    tags = {
        f"{split}/{key}": float(value)
        for key, value in metrics.items()
        if not isinstance(value, dict)
    }
    for task, values in metrics.get("per_task", {}).items():
        for key, value in values.items():
            tags[f"{split}_tasks/{key}/{task}"] = float(value)
    return tags


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"train.steps": 3, ...}."""
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return flat


# -------------------------------------------------------------------------------- backends


class JsonlOnly(Logger, name="jsonl"):
    """metrics.jsonl alone (the Reporter writes it for every logger)."""


class TensorBoardLogger(Logger, name="tensorboard", extra="tensorboard", module="tensorboardX"):
    """Event files in <run>/tensorboard/, written with tensorboardX."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, run, config: dict) -> TensorBoardLogger:
        from tensorboardX import SummaryWriter

        return cls(SummaryWriter(str(run.inside("tensorboard"))))

    def log(self, step: int, split: str, metrics: dict) -> None:
        for tag, value in scalars(split, metrics).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbLogger(Logger, name="wandb", extra="wandb", module="wandb"):
    """A Weights & Biases run, offline unless WANDB_MODE says otherwise; its files go in
    <run>/wandb/ (`wandb sync <run>/wandb/offline-run-*` uploads them later).

    Every metric is plotted against "step", the training step: the test record is logged at
    the best checkpoint's step, before the last one, which wandb's own step must not do.
    """

    def __init__(self, wandb_run):
        self.wandb_run = wandb_run
        self.splits: set[str] = set()

    @classmethod
    def open(cls, run, config: dict) -> WandbLogger:
        import wandb

        run.inside("wandb")  # refuses a wandb/ that is a symlink out of the run
        wandb_run = wandb.init(
            dir=str(run.path.absolute()),  # wandb writes in <dir>/wandb/
            name=run.path.resolve().name,
            project=os.environ.get("WANDB_PROJECT") or "metalearn",
            config=config,
            mode=None if os.environ.get("WANDB_MODE") else "offline",
        )
        wandb_run.define_metric("step")
        return cls(wandb_run)

    def log(self, step: int, split: str, metrics: dict) -> None:
        if split not in self.splits:
            self.splits.add(split)
            for prefix in (f"{split}/*", f"{split}_tasks/*"):
                self.wandb_run.define_metric(prefix, step_metric="step")
        self.wandb_run.log({"step": step, **scalars(split, metrics)})

    def close(self, failed: bool = False) -> None:
        self.wandb_run.finish(exit_code=1 if failed else 0)


class MlflowLogger(Logger, name="mlflow", extra="mlflow", module="mlflow"):
    """An MLflow run in a file store in <run>/mlruns/, or on MLFLOW_TRACKING_URI when it is set
    (experiment MLFLOW_EXPERIMENT_NAME, default "metalearn"). Its params are the flattened
    config. Read it with `mlflow ui --backend-store-uri <run>/mlruns` (full mlflow package)."""

    BAD_CHARACTER = re.compile(r"[^\w\-. /]")  # MLflow's metric and param names allow these

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, run, config: dict) -> MlflowLogger:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = run.inside("mlruns").absolute().as_uri()
            # MLflow 3 keeps the file store in maintenance mode and refuses it unless told.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "metalearn"
        experiment = client.get_experiment_by_name(name)
        experiment_id = (
            client.create_experiment(name) if experiment is None else experiment.experiment_id
        )
        mlflow_run = client.create_run(experiment_id, run_name=run.path.resolve().name)
        params = [
            Param(cls.key(key), "None" if value is None else str(value)[:6000])
            for key, value in flatten(config).items()
        ]
        logger = cls(client, mlflow_run.info.run_id)
        try:
            client.log_batch(logger.run_id, params=params)
        except BaseException:
            logger.close(failed=True)
            raise
        return logger

    @classmethod
    def key(cls, name: str) -> str:
        return cls.BAD_CHARACTER.sub("_", name)[:250]

    def log(self, step: int, split: str, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(self.key(tag), value, now, step)
            for tag, value in scalars(split, metrics).items()
        ]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
