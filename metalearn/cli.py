"""`metalearn train | eval | compare`: compose the config, open the run directory, call the library.

User mistakes (bad values, missing data, an occupied run directory) end with a one-paragraph
message and exit code 2, never a traceback; in a multirun the failed job is recorded in its own
run directory and the sweep goes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metalearn.config import ConfigError, register_schemas

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


def fail(message: str) -> None:
    print(f"metalearn: error: {message}", file=sys.stderr)
    sys.exit(2)


def quiet_jax_probe() -> None:
    # JAX probes for a TPU on import and logs its absence as a warning; that is noise on a CPU.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


def main() -> None:
    quiet_jax_probe()
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "train":
        sys.argv = [f"{sys.argv[0]} train"] + rest
        register_schemas()
        hydra_train()
    elif command == "eval":
        eval_command(rest)
    elif command == "compare":
        from metalearn.compare import compare_command

        compare_command(rest)
    else:
        fail(f"unknown command {command!r}; the commands are train, eval and compare.")


# ------------------------------------------------------------------------------------- train


def _hydra_train_task(dcfg) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from metalearn.config import to_config
    from metalearn.rundir import RunDir

    quiet_jax_probe()  # again: launchers may run this job in a fresh worker process
    hydra_cfg = HydraConfig.get()
    primary = True
    if dcfg.get("distributed"):
        from metalearn.distributed import initialize, is_primary

        initialize()
        primary = is_primary()
        if not primary:
            logging.getLogger().setLevel(logging.WARNING)
    run = RunDir(hydra_cfg.runtime.output_dir, primary=primary)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    owns_dir = False
    try:
        resume = dcfg.get("resume")
        resuming = resume is not None and resume is not False
        if resuming:
            run, cfg = _resume_target(run, resume, overrides)
            owns_dir = True
        else:
            cfg = to_config(dcfg)
            run.ensure_fresh()
            owns_dir = True
            run.write_text(".hydra/config.yaml", OmegaConf.to_yaml(dcfg))
            run.write_text(".hydra/hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
            run.write_text(".hydra/overrides.yaml", OmegaConf.to_yaml(overrides))
        handler = logging.FileHandler(run.path / "train.log") if primary else logging.NullHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            from metalearn.train import train

            summary = train(cfg, run, resume=resuming)
            if run.primary:  # the other processes of a multi-host job write nothing
                summary.update(overrides=_run_overrides(run), status="completed")
            run.write_summary(summary)
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
        return summary["best_val"][summary["objective"]]  # what a sweeper optimises
    except user_errors() as error:
        message = str(error).strip()
        if owns_dir or (multirun and not any(run.path.iterdir())):
            from metalearn.train import Interrupted

            status = "interrupted" if isinstance(error, Interrupted) else "failed"
            run.write_summary({"status": status, "error": message, "overrides": overrides})
        elif not multirun and run.primary:
            _remove_empty_folders(run.path)  # leave no empty folder behind a rejected command
        if multirun:
            log.error("job failed: %s", message)
            return None
        fail(message)


def _resume_target(fresh_run, resume, overrides: list[str]):
    """The run to continue and its config: the saved config plus this command's overrides."""
    from metalearn.config import from_yaml_with_overrides
    from metalearn.rundir import RunDir, RunDirError

    target = fresh_run.path if str(resume).lower() == "true" else Path(str(resume))
    if target.resolve() != fresh_run.path.resolve() and fresh_run.primary:
        _remove_empty_folders(fresh_run.path)  # Hydra's new folder for this command is unused
    run = RunDir(target, primary=fresh_run.primary)
    saved = run.path / ".hydra" / "config.yaml"
    if not saved.exists() or not (run.path / "checkpoints" / "latest.npz").exists():
        raise RunDirError(
            f"resume={resume}: {run.path} holds no run to resume (it needs .hydra/config.yaml "
            "and checkpoints/latest.npz). Give the directory of a run that saved a checkpoint."
        )
    values = [o for o in overrides if not o.startswith(("resume=", "hydra."))]
    groups = [o for o in values if "." not in o.split("=", 1)[0]]
    if groups:
        raise ConfigError(
            f"resume takes value overrides only (such as train.steps=N), not {groups}: the run "
            "keeps the data, model and algorithm it was started with."
        )
    cfg = from_yaml_with_overrides(OmegaConf.load(saved), values)
    merged = OmegaConf.merge(OmegaConf.load(saved), OmegaConf.from_dotlist(values))
    run.write_text(".hydra/config.yaml", OmegaConf.to_yaml(merged))
    if values:
        previous = OmegaConf.load(run.path / ".hydra" / "overrides.yaml")
        run.write_text(".hydra/overrides.yaml", OmegaConf.to_yaml(list(previous) + values))
    return run, cfg


def _remove_empty_folders(path: Path) -> None:
    """Remove `path` and its parents while they are empty, up to the working directory."""
    cwd = Path.cwd().resolve()
    for folder in (path.resolve(), *path.resolve().parents):
        if folder == cwd or not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()


def _run_overrides(run) -> list[str]:
    return list(OmegaConf.load(run.path / ".hydra" / "overrides.yaml"))


def hydra_train() -> None:
    import hydra

    config_dir = str(Path(__file__).resolve().parent.parent / "conf")
    hydra.main(version_base="1.3", config_path=config_dir, config_name="config")(
        _hydra_train_task
    )()


# -------------------------------------------------------------------------------------- eval


def eval_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="metalearn eval",
        description="Re-evaluate a run's best checkpoint on meta-test tasks, with overrides "
        "such as eval.num_tasks=2000, data.k_shot=5 or eval.inner_steps=10.",
    )
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run's config")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--checkpoint", default="best", choices=["best", "latest"])
    args = parser.parse_args(argv)
    try:
        result = evaluate_run(args.run_dir, args.overrides, args.split, args.checkpoint)
    except user_errors() as error:
        fail(str(error).strip())
    print(json.dumps(result, indent=2, sort_keys=True))


def evaluate_run(run_dir: str, overrides: list[str], split: str, checkpoint: str) -> dict:
    from metalearn.evaluate import make_evaluator
    from metalearn.rundir import atomic_write_json
    from metalearn.train import restore

    exp, params, meta = restore(run_dir, overrides, checkpoint)
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
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    atomic_write_json(Path(run_dir) / "evals" / f"{stamp}_{split}.json", result)
    return result
