"""Which run directory a `metalearn train` command uses, and with which config: decided and
checked before anything of the run is written, so that a refused command changes nothing.

A run directory is taken by locking it (RunDir.lock), so no two processes share one. A requeued
job may run its very same command again: `resume=true` accepts every override that equals the
run's own and refuses real changes of its experiment, naming them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from metalearn.config import ConfigError, parse_overrides, to_config
from metalearn.rundir import RUN_MARKERS, RunDir, RunDirError, read_run_yaml

log = logging.getLogger("metalearn")


def plan(dcfg, hydra_cfg, run, overrides: list[str]):
    """(run directory, typed config, resume?) for this command, checking without writing.

    A directory that holds a run killed before its first checkpoint is restarted from step 0,
    by `resume=` or by the command that started it.
    """
    resume = dcfg.get("resume")
    requeue = str(resume).lower() == "true"  # resume=true: this command's own directory
    if isinstance(resume, str) and not resume.strip():  # Path("") would be the current folder
        raise ConfigError(
            f"resume={resume!r} is an empty path. Give resume=true (this command's own run "
            "directory) or resume=RUN_DIR, the directory of a run `metalearn train` started."
        )
    if resume is not None and resume is not False:
        target = run.path if requeue else Path(str(resume))
        if target.resolve() != run.path.resolve() and run.primary:
            remove_empty_folders(run.path)  # Hydra's new folder for this command is unused
        run = RunDir(target, primary=run.primary)
        run.check_folder()
        if (run.path / ".hydra" / "config.yaml").is_file():
            run.lock()
            return run, resumed_config(run, hydra_cfg, overrides), run.started()
        if not requeue or run.holds_run():
            raise RunDirError(
                f"resume={resume}: {run.path} holds no run to resume (no .hydra/config.yaml). "
                "Give the directory of a run that `metalearn train` started."
            )
        # A job that always passes resume=true (as requeued cluster jobs do) and has not
        # started yet, or was killed before writing anything: start it.

    chosen = any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in overrides)
    chosen = chosen or any(
        o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in hydra_cfg.overrides.hydra
    )
    for attempt in range(1, 100):
        run.check_folder()
        try:
            run.lock()
        except RunDirError:
            if chosen:
                raise
        else:
            if not run.holds_run():
                return run, to_config(dcfg, overrides), False
            if not run.started() and same_experiment(run, dcfg):
                # Killed before its first checkpoint: start it again.
                return run, to_config(dcfg, overrides), False
            run.unlock()
            if chosen:
                raise RunDirError(
                    f"The run directory {run.path} already holds a run (found "
                    f"{', '.join(m for m in RUN_MARKERS if (run.path / m).exists())}). "
                    "metalearn never writes over an earlier run: add resume=true to continue "
                    "it, choose another directory with hydra.run.dir=PATH, or leave "
                    "hydra.run.dir out to get a new timestamped one."
                )
        # The default, timestamped directory is taken by a run started in the same second.
        base = Path(hydra_cfg.runtime.output_dir)
        run = RunDir(base.with_name(f"{base.name}_{attempt}"), primary=run.primary)
    raise RunDirError(f"No free run directory next to {hydra_cfg.runtime.output_dir}.")


# A resumed run keeps these; train.*, eval.* and the top-level display settings may change.
EXPERIMENT_KEYS = ("data", "model", "conditioning", "algo", "seed")


def resumed_config(run, hydra_cfg, overrides: list[str]):
    """The run's saved config plus this command's overrides, which may repeat the run's own
    settings (a requeued job runs the very same command again) but not change its experiment."""
    from metalearn.experiment import load_run_config

    saved = read_run_yaml(run.path / ".hydra" / "config.yaml")
    choices = saved_choices(run, saved)
    groups = set(hydra_cfg.runtime.choices)
    values, changes = [], []
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra.") or key == "resume" or "=" not in text:
            continue
        if key in groups:  # a config group: must be the run's own choice
            choice = text.split("=", 1)[1]
            if choice not in ("null", choices.get(key)):
                changes.append(f"{key}={choice} (the run's is {choices.get(key)})")
            continue
        ((_, value),) = parse_overrides([text])
        have = _select(saved, key)
        if key.split(".")[0] in EXPERIMENT_KEYS and have != value:
            changes.append(f"{key}={value} (the run's is {have})")
        elif have != value:
            values.append(text)
    if changes:
        raise ConfigError(
            f"resume continues the run in {run.path} with its own data, model, conditioning, "
            f"algorithm and seed, and this command changes them: {'; '.join(changes)}. Drop "
            "these overrides (train.* and eval.* may change), or start a new run without resume."
        )
    return load_run_config(run, values)


def saved_choices(run, saved: dict) -> dict:
    """The group options the run was composed from (Hydra's record; else the configs' names)."""
    try:
        hydra = read_run_yaml(run.path / ".hydra" / "hydra.yaml")
        choices = dict(hydra["hydra"]["runtime"]["choices"])
    except (RunDirError, KeyError, TypeError, ValueError):
        choices = {}
    for group in EXPERIMENT_KEYS[:-1]:
        node = saved.get(group) if isinstance(saved, dict) else None
        if group not in choices and isinstance(node, dict):
            choices[group] = node.get("name")
    return {k: (None if v is None else str(v)) for k, v in choices.items()}


def _select(tree, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def same_experiment(run, dcfg) -> bool:
    """Whether the run in `run` was started with the experiment `dcfg` describes."""
    try:
        saved = read_run_yaml(run.path / ".hydra" / "config.yaml")
    except RunDirError:
        return False
    mine = OmegaConf.to_container(dcfg, resolve=True)
    return isinstance(saved, dict) and all(saved.get(k) == mine.get(k) for k in EXPERIMENT_KEYS)


def already_complete(run, session) -> bool:
    """A completed run that this command would not extend (a requeued job finished before)."""
    try:
        summary = json.loads((run.path / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    cfg, progress = session.exp.cfg, session.progress
    budget = cfg.train.max_minutes
    done = progress["step"] >= cfg.train.steps or (
        budget is not None and progress["elapsed_s"] >= 60 * budget
    )
    return isinstance(summary, dict) and summary.get("status") == "completed" and done


def write_run_config(run, hydra_cfg, cfg, overrides: list[str]) -> None:
    """.hydra/: the config the run trains with, Hydra's record and the command-line overrides
    (for a run that goes on, the ones it was started with plus this command's new ones)."""
    config = asdict(cfg)
    config["resume"] = None  # how this command found the run is no setting of the run
    saved = run.path / ".hydra" / "overrides.yaml"
    if (run.path / ".hydra" / "config.yaml").is_file() and saved.is_file():
        previous = read_run_yaml(saved)
        if not (isinstance(previous, list) and all(isinstance(o, str) for o in previous)):
            log.warning(
                "%s is damaged (not a list of overrides): it is rewritten with this command's "
                "overrides, so the record of the command that started the run is lost (the "
                "run's settings are in .hydra/config.yaml, which is intact).",
                saved,
            )
            previous = []
        skip = ("resume=", "hydra.")
        overrides = previous + [
            o for o in overrides if not o.startswith(skip) and o not in previous
        ]
    else:
        run.write_text(".hydra/hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
    run.write_text(".hydra/config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    run.write_text(".hydra/overrides.yaml", OmegaConf.to_yaml(overrides))


def remove_empty_folders(path: Path) -> None:
    """Remove `path` and its parents while they are empty, up to the working directory."""
    cwd = Path.cwd().resolve()
    for folder in (path.resolve(), *path.resolve().parents):
        if folder == cwd or not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()


def run_overrides(run) -> list[str]:
    return list(read_run_yaml(run.path / ".hydra" / "overrides.yaml") or [])
