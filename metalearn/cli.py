"""`metalearn train | eval | compare`: compose the config, open the run directory, call the library.

User mistakes (bad values, missing data, an occupied run directory) end with a one-paragraph
message and exit code 2, never a traceback; in a multirun the failed job is recorded in its own
run directory and the sweep goes on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

from metalearn import run_plan
from metalearn.config import ConfigError, register_schemas
from metalearn.errors import ArgumentParser, fail

USAGE = """usage: metalearn COMMAND ...

commands:
  train [key=value ...] [-m]    train a run (Hydra overrides; -m sweeps comma-separated values)
  eval RUN_DIR [key=value ...]  re-evaluate a run's best checkpoint (e.g. eval.num_tasks=2000)
  compare PATH [PATH ...]       one row per run found below the paths

`metalearn train --help` lists the config groups and their options."""

log = logging.getLogger("metalearn")


def user_errors() -> tuple[type[BaseException], ...]:
    from metalearn.data.omniglot import DataError
    from metalearn.rundir import RunDirError
    from metalearn.train import Interrupted, TrainingError

    errors = (ConfigError, DataError, RunDirError, TrainingError, Interrupted)
    return errors + (OmegaConfBaseException,)


def machine_error(error: BaseException) -> str | None:
    """The message for a failure of the machine rather than of the input (a full or read-only
    disk, memory XLA could not get); None for anything else, which is a bug to report."""
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        return (
            f"A file could not be written or read{where}: {error.strerror or error}. Free disk "
            "space or fix the folder's permissions and run the same command again: every file "
            "metalearn replaces is written atomically, so the run's last checkpoint is intact "
            "and `resume=` continues from it."
        )
    if isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error):
        return (
            "The machine ran out of memory. Lower the sizes that set it (train.meta_batch, "
            "train.task_chunk, data.k_shot, data.k_query, model.hidden, eval.batch) and run "
            "again."
        )
    return None


def quiet_jax_probe() -> None:
    # JAX probes for a TPU on import and logs its absence as a warning; that is noise on a CPU.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


def main() -> None:
    try:
        _main()
    except BrokenPipeError:  # `metalearn compare ... | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and says how)
        print("metalearn: interrupted.", file=sys.stderr)
        sys.exit(130)


def _main() -> None:
    quiet_jax_probe()
    if len(sys.argv) < 2:
        fail("give a command: train, eval or compare (`metalearn --help` says more).")
    if sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "train":
        sys.argv = [f"{sys.argv[0]} train"] + rest
        register_schemas()
        hydra_train()
    elif command == "eval":
        eval_command(rest)
    elif command == "compare":
        from metalearn.reports.compare import compare_command

        compare_command(rest)
    else:
        fail(f"unknown command {command!r}; the commands are train, eval and compare.")


# ------------------------------------------------------------------------------------- train


def _hydra_train_task(dcfg) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from metalearn.rundir import RunDir

    quiet_jax_probe()  # again: launchers may run this job in a fresh worker process
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    run = RunDir(hydra_cfg.runtime.output_dir)
    written = False  # from the moment this command has written the run, failures are recorded
    try:
        primary = _join_hosts(dcfg)
        run = RunDir(run.path, primary=primary)
        run, cfg, resume = run_plan.plan(dcfg, hydra_cfg, run, overrides)
        from metalearn.train import prepare, train

        session = prepare(cfg, run, resume)  # every check, before anything is written
        run.remove_stale_temps()  # what a killed write left behind
        if resume and run_plan.already_complete(run, session):
            log.info("%s is complete; nothing to do (raise train.steps to go on)", run.path)
            return _objective(json.loads((run.path / "summary.json").read_text()))
        run_plan.write_run_config(run, hydra_cfg, cfg, overrides)
        written = True
        handler = _log_handler(run)
        logging.getLogger().addHandler(handler)
        try:
            summary = train(session, run)
            if run.primary:  # the other processes of a multi-host job write nothing
                summary.update(overrides=run_plan.run_overrides(run), status="completed")
            run.write_summary(summary)
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
        return _objective(summary)
    except Exception as error:
        message = _message(error)
        if written or (multirun and run.locked and not run.holds_run()):
            # A multirun job records its failure in its own (new) run directory.
            from metalearn.train import Interrupted

            status = "interrupted" if isinstance(error, Interrupted) else "failed"
            _record_failure(run, status, message, overrides)
        elif not multirun and run.primary:
            run_plan.remove_empty_folders(
                run.path
            )  # leave no empty folder behind a rejected command
        if multirun:
            log.error("job failed: %s", message)
            return None
        fail(message)
    finally:
        run.unlock()


def _message(error: Exception) -> str:
    """The one paragraph shown for `error`; re-raises what is not a user's or machine's error."""
    if isinstance(error, user_errors()):
        return str(error).strip()
    message = machine_error(error)
    if message is None:
        raise error
    return message


def _record_failure(run, status: str, message: str, overrides: list[str]) -> None:
    try:
        run.write_summary({"status": status, "error": message, "overrides": overrides})
    except (OSError, ValueError):
        pass  # the disk that failed the run may refuse this too; the error is printed anyway


def _objective(summary: dict) -> float:
    return summary["best_val"][summary["objective"]]  # what a sweeper optimises


def _join_hosts(dcfg) -> bool:
    """Join a multi-host job if asked; True for the process that writes the run directory."""
    if not dcfg.get("distributed"):
        return True
    from metalearn.distributed import initialize, is_primary

    initialize()
    if not is_primary():
        logging.getLogger().setLevel(logging.WARNING)
        return False
    return True


class _RunLogHandler(logging.StreamHandler):
    """train.log. A line that cannot be written (a full disk) is dropped instead of printing
    logging's traceback: the next checkpoint write fails with the one-paragraph error."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)

    def close(self) -> None:
        try:
            self.stream.close()
        except OSError:
            pass
        super().close()


def _log_handler(run) -> logging.Handler:
    if not run.primary:
        return logging.NullHandler()
    handler = _RunLogHandler(run.open_append("train.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    return handler


def hydra_train() -> None:
    import hydra
    from hydra.errors import HydraException

    config_dir = str(Path(__file__).resolve().parent.parent / "conf")
    # Hydra prints its own errors (composition, unknown options) and exits 1; let them reach
    # us instead, to be reported as every metalearn error is.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(version_base="1.3", config_path=config_dir, config_name="config")(
            _hydra_train_task
        )()
    except (HydraException, OmegaConfBaseException) as error:
        fail(_hydra_message(error))
    except FileExistsError as error:  # Hydra makes the run directory before metalearn runs
        fail(
            f"The run directory {error.filename} exists and is not a folder: give a folder "
            "with hydra.run.dir=PATH (or leave it out for a new timestamped one)."
        )
    except OSError as error:
        fail(machine_error(error))


def _hydra_message(error: Exception) -> str:
    message = str(error).strip().split("Config search path")[0].strip()
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause).strip() not in message:
        message += f" ({str(cause).strip().splitlines()[0]})"
    if message.startswith("Could not override"):
        # Hydra suggests `+key=value`, which metalearn refuses too: its settings are closed.
        key = message.split("'")[1] if "'" in message else "this key"
        message = (
            f"{key} is not a setting of the chosen options, so it cannot be set. "
            "`metalearn train --cfg job` (with the same group choices) prints every setting."
        )
        if any(a.startswith("resume=") for a in sys.argv):
            message += (
                " With resume=, the command's own group choices are composed first: repeat the "
                "run's (e.g. data=omniglot) to set one of their settings."
            )
    return message


# -------------------------------------------------------------------------------------- eval


def eval_command(argv: list[str]) -> None:
    parser = ArgumentParser(
        prog="metalearn eval",
        description="Re-evaluate a run's best checkpoint on meta-test tasks, with overrides "
        "such as eval.num_tasks=2000, data.k_shot=5 or eval.inner_steps=10.",
    )
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run's config")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--checkpoint", default="best", choices=["best", "latest"])
    parser.add_argument(
        "--no-save",
        dest="save",
        action="store_false",
        help="print the result without writing it to RUN_DIR/evals/ (nothing in RUN_DIR is "
        "written, so a read-only run can be evaluated)",
    )
    args = parser.parse_args(argv)
    try:
        result = evaluate_run(
            args.run_dir, args.overrides, args.split, args.checkpoint, save=args.save
        )
    except Exception as error:
        fail(_message(error))
    print(json.dumps(result, indent=2, sort_keys=True))


def evaluate_run(
    run_dir: str, overrides: list[str], split: str, checkpoint: str, save: bool = True
) -> dict:
    """Evaluate a checkpoint and write the result to RUN_DIR/evals/, nothing else; with
    save=False nothing at all is written, so the run directory may be read-only."""
    from metalearn.evaluate import make_evaluator
    from metalearn.rundir import RunDir
    from metalearn.train import restore

    run = RunDir(run_dir)
    run.check_folder()
    exp, params, meta = restore(run_dir, overrides, checkpoint)
    if save:
        run.check_writable("evals")  # before the work, so a result is never computed and lost
    cfg = exp.cfg
    evaluate = make_evaluator(
        exp.algo, exp.source, exp.loss_fn, exp.eval_inner_steps, cfg.eval.batch
    )
    started = time.perf_counter()
    metrics = evaluate(params, split, cfg.eval.num_tasks, cfg.eval.seed + (split == "val"))
    result = {
        "run_dir": str(run_dir),
        "checkpoint": checkpoint,
        "checkpoint_step": meta.get("step"),
        "split": split,
        "overrides": overrides,
        "eval_inner_steps": exp.eval_inner_steps,
        split: metrics,
        "eval_time_s": round(time.perf_counter() - started, 3),
    }
    if not save:
        return result
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    name, n = f"{stamp}_{split}", 1
    while (run.path / "evals" / f"{name}.json").exists():  # two evals in the same second
        n += 1
        name = f"{stamp}_{split}_{n}"
    run.write_json(f"evals/{name}.json", result)
    return result
