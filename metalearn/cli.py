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
from metalearn.errors import ArgumentParser, fail, path_argument

USAGE = """usage: metalearn COMMAND ...

commands:
  train [key=value ...] [-m]    train a run (Hydra overrides; -m sweeps comma-separated values)
  eval RUN_DIR [key=value ...]  re-evaluate a run's best checkpoint (e.g. eval.num_tasks=2000)
  predict RUN_DIR --support DIR --query DIR [--output FILE.csv]
                                classify your own images with a trained run: one subfolder
                                of images per class in --support, images to label in --query
  compare PATH [PATH ...]       one row per run found below the paths

`metalearn train --help` lists the config groups and their options; `metalearn COMMAND
--help` the arguments of the others."""

log = logging.getLogger("metalearn")


def user_errors() -> tuple[type[BaseException], ...]:
    from metalearn.data.omniglot import DataError
    from metalearn.rundir import RunDirError
    from metalearn.train import Interrupted, TrainingError

    errors = (ConfigError, DataError, RunDirError, TrainingError, Interrupted)
    return errors + (OmegaConfBaseException,)


def machine_error(
    error: BaseException, data_sizes: tuple[str, ...] = ("k_shot", "k_query")
) -> str | None:
    """The message for a failure of the machine rather than of the input (a full or read-only
    disk, memory XLA could not get); None for anything else, which is a bug to report.
    data_sizes: the data settings that size a task (DataConfig.size_settings)."""
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
            f"train.task_chunk, {', '.join(f'data.{k}' for k in data_sizes)}, model.hidden, "
            "eval.batch) and run again."
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
        fail("give a command: train, eval, predict or compare (`metalearn --help` says more).")
    if sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "train":
        check_train_arguments(rest)
        sys.argv = [f"{sys.argv[0]} train"] + rest
        register_schemas()
        hydra_train()
    elif command == "eval":
        eval_command(rest)
    elif command == "predict":
        predict_command(rest)
    elif command == "compare":
        from metalearn.reports.compare import compare_command

        compare_command(rest)
    elif command.startswith("-"):
        fail(
            f"metalearn: unrecognized arguments: {command}. Give a command first: train, eval, "
            "predict or compare (`metalearn --help` says more)."
        )
    else:
        fail(f"unknown command {command!r}; the commands are train, eval, predict and compare.")


def check_train_arguments(argv: list[str]) -> None:
    """`metalearn train`'s flags, parsed as Hydra parses them, so that an unknown flag gets the
    one-paragraph error of every command (Hydra's parser prints its usage and exits 1)."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.prog = "metalearn train"
    parser.error = ArgumentParser.error.__get__(parser)  # metalearn's one paragraph
    parser.parse_args(argv)  # Hydra parses them again; this only refuses what it would refuse


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
    cfg = None
    try:
        primary = _join_hosts(dcfg)
        run = RunDir(run.path, primary=primary)
        run, cfg, resume = run_plan.plan(dcfg, hydra_cfg, run, overrides)
        from metalearn.api import SPEC_FILE
        from metalearn.data.base import spec_of
        from metalearn.experiment import prepare
        from metalearn.train import train

        session = prepare(cfg, run, resume)  # every check, before anything is written
        run.remove_stale_temps()  # what a killed write left behind
        if resume and run_plan.already_complete(run, session):
            log.info("%s is complete; nothing to do (raise train.steps to go on)", run.path)
            return _objective(json.loads((run.path / "summary.json").read_text()))
        run_plan.write_run_config(run, hydra_cfg, cfg, overrides)
        written = True
        # What the model and learner are built from, so that they load without the data.
        run.write_json(SPEC_FILE, spec_of(session.exp.source).to_json())
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
        message = _message(error, cfg)
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


def _message(error: Exception, cfg=None) -> str:
    """The one paragraph shown for `error` (in a run of `cfg`, when known); re-raises what is
    not a user's or machine's error."""
    if isinstance(error, user_errors()):
        return str(error).strip()
    sizes = ("k_shot", "k_query") if cfg is None else cfg.data.size_settings
    message = machine_error(error, sizes)
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
    parser.add_argument("run_dir", type=path_argument)
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
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
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
    from metalearn.eval_overrides import check_eval_overrides
    from metalearn.evaluate import make_evaluator, warn_if_not_finite
    from metalearn.experiment import check_evaluation_fits, restore
    from metalearn.rundir import RunDir

    run = RunDir(run_dir)
    run.check_folder()
    check_eval_overrides(run, overrides, split)  # settings eval would ignore are refused
    exp, params, meta = restore(run_dir, overrides, checkpoint)
    if save:
        run.check_writable("evals")  # before the work, so a result is never computed and lost
    cfg = exp.cfg
    evaluate = make_evaluator(
        exp.algo, exp.source, exp.loss_fn, exp.eval_inner_steps, cfg.eval.batch
    )
    started = time.perf_counter()
    what = f"Evaluating the {checkpoint} checkpoint on {cfg.eval.num_tasks:,} {split} tasks"
    check_evaluation_fits(exp, evaluate, params, [(split, cfg.eval.num_tasks, what)])
    metrics = evaluate(params, split, cfg.eval.num_tasks, cfg.eval.seed + (split == "val"))
    checkpoint_file = run.path / "checkpoints" / f"{checkpoint}.npz"
    warn_if_not_finite(metrics, checkpoint_file, params, exp.eval_inner_steps)
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


# ----------------------------------------------------------------------------------- predict

# The files `metalearn predict` reads as images (by suffix, any case); others are left alone.
IMAGE_SUFFIXES = frozenset(
    ".png .jpg .jpeg .bmp .gif .tif .tiff .webp .ppm .pgm .pbm".split()
)  # fmt: skip


def predict_command(argv: list[str]) -> None:
    parser = ArgumentParser(
        prog="metalearn predict",
        description="Classify your own images with a trained run, without its dataset: adapt "
        "to the labelled images in --support (one subfolder per class; the classes are the "
        "subfolder names, sorted, and their number is the task's N) and print "
        "`path,predicted_class` for each image below --query. The images go through the "
        "pipeline of the run's data (resizing, grayscale or RGB, inversion, / 255). Nothing "
        "in RUN_DIR is written.",
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", type=path_argument,
        help="a run directory `metalearn train` wrote",
    )  # fmt: skip
    parser.add_argument(
        "--support", required=True, metavar="DIR", type=path_argument,
        help="a folder with one subfolder of images per class",
    )  # fmt: skip
    parser.add_argument(
        "--query", required=True, metavar="DIR", type=path_argument,
        help="a folder of images to classify (subfolders included)",
    )  # fmt: skip
    parser.add_argument(
        "--output", metavar="FILE.csv", type=path_argument,
        help="also write the predictions (with a header line) to this CSV file, atomically; "
        "never inside a run directory",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint", default="best", choices=["best", "latest"],
        help="the run's best validation checkpoint (default) or its latest",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        output = None if args.output is None else _output_path(Path(args.output), args.run_dir)
        rows = predict_folders(args.run_dir, args.support, args.query, args.checkpoint)
        if output is not None:
            from metalearn.rundir import atomic_write_bytes

            atomic_write_bytes(output, _csv([("path", "predicted_class"), *rows]).encode())
    except Exception as error:
        fail(_message(error))
    sys.stdout.write(_csv(rows))


def predict_folders(
    run_dir: str, support: str, query: str, checkpoint: str = "best"
) -> list[tuple[str, str]]:
    """(query image path, predicted class name) for every image below `query`, by the run's
    learner adapted to the images of `support` (one subfolder per class)."""
    from metalearn.api import load_run
    from metalearn.data.base import DataError

    classes = _support_classes(Path(support))
    queries = _images_below(Path(query), "--query")
    if not queries:
        raise DataError(
            f"--query {query} holds no images (files ending in "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}): nothing to classify."
        )
    run = load_run(run_dir, checkpoint)
    if not run.classification:
        raise DataError(
            f"{run_dir} was trained on regression data (data={run.config.data.name}): "
            "`metalearn predict` classifies images, with a run trained on classification data."
        )
    support_files = [file for _, files in classes for file in files]
    labels = [label for label, (_, files) in enumerate(classes) for _ in files]
    # The query set is classified in one call, as an evaluation task's query set is.
    predicted = run.classify(run.preprocess(support_files), labels, run.preprocess(queries))
    return [(str(path), classes[int(c)][0]) for path, c in zip(queries, predicted, strict=True)]


def _support_classes(folder: Path) -> list[tuple[str, list[Path]]]:
    """(class name, its images) for each subfolder of the support folder, sorted by name."""
    from metalearn.data.base import DataError

    _check_folder(folder, "--support")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    loose = [p.name for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise DataError(
            f"--support {folder} holds images outside class subfolders ({', '.join(loose[:3])}"
            f"{', ...' if len(loose) > 3 else ''}): put each class's images in a subfolder "
            "named after the class."
        )
    classes = [(p.name, _images_below(p, "--support")) for p in entries if p.is_dir()]
    if len(classes) < 2:
        raise DataError(
            f"--support {folder} holds {len(classes)} class subfolder(s): give one subfolder of "
            "images per class, at least 2 classes."
        )
    empty = [name for name, files in classes if not files]
    if empty:
        raise DataError(
            f"The class folder {folder / empty[0]} holds no images (files ending in "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}): every class needs at least one support "
            "image."
        )
    return classes


def _check_folder(folder: Path, option: str) -> None:
    from metalearn.data.base import DataError

    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DataError(f"{option} {folder} {what}: give a folder of images.")


def _images_below(folder: Path, option: str) -> list[Path]:
    """The image files below `folder` (hidden files and folders left out), sorted by path."""
    from metalearn.data.base import DataError

    _check_folder(folder, option)

    def unlistable(error: OSError) -> None:
        raise DataError(f"{option}: {error.filename} cannot be listed ({error.strerror or error}).")

    found = []
    for parent, dirs, files in os.walk(folder, onerror=unlistable, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            Path(parent, name)
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
        ]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def _output_path(path: Path, run_dir: str) -> Path:
    """--output, checked before any work: a file path outside every run directory."""
    from metalearn.rundir import RunDirError

    if path.is_dir():
        raise RunDirError(f"--output {path} is a folder: give the path of a CSV file.")
    target = path.resolve()
    for folder in target.parents:
        if folder == Path(run_dir).resolve() or any(
            (folder / marker).is_file() for marker in (".hydra/config.yaml", "summary.json")
        ):
            raise RunDirError(
                f"--output {path} is inside the run directory {folder}: `metalearn predict` "
                "never writes into a run, so that its files stay what training wrote. Give a "
                "path outside it."
            )
    return path


def _csv(rows) -> str:
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()
