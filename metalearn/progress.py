"""Where metrics go while a run trains: metrics.jsonl, the log, a progress bar, a logger."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from typing import Any

from metalearn.loggers import LOGGERS, Logger
from metalearn.rundir import RunDir

log = logging.getLogger("metalearn")


class Reporter:
    """Records every metric in metrics.jsonl (the contract), and shows it.

    The progress bar (steps/s, ETA, latest train and val metrics) draws only on a terminal and
    with progress=true. `logger` names a backend of metalearn.loggers (TensorBoard, wandb,
    MLflow), opened with `config` (the run's Config, or a dict); one that fails is dropped with
    a warning, and metrics.jsonl goes on.
    """

    def __init__(
        self,
        run: RunDir,
        *,
        total_steps: int,
        start_step: int,
        elapsed_s: float,
        progress: bool = True,
        logger: str = "jsonl",
        config: Any = None,
    ):
        from tqdm import tqdm

        self.run = run
        self.started = time.perf_counter() - elapsed_s
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            disable=not (progress and sys.stderr.isatty()),
        )
        self.postfix: dict[str, str] = {}
        self.window = (time.perf_counter(), 0)
        self.logger_name = logger
        self.logger: Logger | None = None
        if run.primary:  # one process of a multi-host job writes the run
            if dataclasses.is_dataclass(config):
                config = dataclasses.asdict(config)
            self._call_logger("start", lambda: LOGGERS[logger].open(run, dict(config or {})))

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def advance(self) -> None:
        self.bar.update(1)
        self.window = (self.window[0], self.window[1] + 1)

    def restart_clock(self) -> None:
        """Steps/s covers training only: call after evaluation."""
        self.window = (time.perf_counter(), 0)

    def record(self, step: int, split: str, metrics: dict, note: str = "") -> None:
        """metrics: scalars, plus for multi-task runs "per_task" ({task: {metric: value}}) and
        "worst" ({"task": name, metric: value}), kept nested in metrics.jsonl."""
        nested = {k: v for k, v in metrics.items() if isinstance(v, dict)}
        metrics = {k: float(v) for k, v in metrics.items() if k not in nested}
        record = {"step": step, "split": split, "elapsed_s": round(self.elapsed_s, 3)}
        self.run.log_metrics({**record, **metrics, **nested})
        if self.logger is not None:
            self._call_logger("log", lambda: self.logger.log(step, split, {**metrics, **nested}))
        text = format_metrics(metrics)
        if "worst" in nested:
            worst = dict(nested["worst"])
            note = f"worst task {worst.pop('task')}: {format_metrics(worst)}  {note}".strip()
        if split == "train":
            start, steps = self.window
            rate = steps / max(time.perf_counter() - start, 1e-9)
            self.window = (time.perf_counter(), 0)
            note = note or f"{rate:.1f} steps/s"
        self.postfix[split] = text.replace("  ", " ")
        self.bar.set_postfix_str("  ".join(f"{k}: {v}" for k, v in self.postfix.items()))
        log.info("step %6d  %-5s %s  %s", step, split, text, note)

    @contextlib.contextmanager
    def active(self):
        """Log lines print above the bar while it is drawn."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:
            with logging_redirect_tqdm(loggers=[logging.getLogger()]):
                yield self
        except BaseException:
            self.close(failed=True)  # the logger's run ends as failed, not left open
            raise
        finally:
            self.bar.close()

    def close(self, failed: bool = False) -> None:
        logger, self.logger = self.logger, None
        if logger is not None:
            self._call_logger("close", lambda: logger.close(failed))

    def _call_logger(self, action: str, call) -> None:
        """Run a call into the logger's backend; if it fails, warn once and drop the logger."""
        try:
            result = call()
        except Exception as error:  # a third-party package: any failure is possible
            logger, self.logger = self.logger, None
            log.warning(
                "logger=%s failed to %s (%s: %s); this run's metrics go on to metrics.jsonl only.",
                self.logger_name, action, type(error).__name__, " ".join(str(error).split()),
            )  # fmt: skip
            if logger is not None:
                with contextlib.suppress(Exception):
                    logger.close(failed=True)
            return
        if action == "start":
            self.logger = result


def format_metrics(metrics: dict) -> str:
    keys = [k for k in ("loss", "accuracy") if k in metrics]
    return "  ".join(
        f"{k} {metrics[k]:.4f}" + (f"±{metrics[k + '_ci95']:.4f}" if k + "_ci95" in metrics else "")
        for k in keys
    )
