"""Reading run directories for the reports: a run's summary.json, overrides and metrics.jsonl.

Run directories are shared and can be damaged, so reading one never raises and never does
anything its author chose: a file is only read if it is a regular file inside the run, YAML is
plain data (`read_run_yaml`), and a field of a type metalearn would not have written is left
out. A damaged run is still listed, its status naming what could not be read.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import yaml

from metalearn.protocol import flatten
from metalearn.rundir import RunDirError, read_run_yaml

OBJECTIVES = ("accuracy", "loss")
# summary.json and the YAML files are a few kB; a larger one is damaged, not worth the memory.
MAX_RUN_FILE_BYTES = 16 * 2**20


class Unreadable(ValueError):
    """A file of a run that cannot be used; the message is a short reason, e.g. for a status."""


def read_run_file(run: Path, relative: str, limit: int | None = MAX_RUN_FILE_BYTES) -> bytes | None:
    """The bytes of `run/relative`, None if there is no such file, Unreadable if it cannot be read.

    Only a regular file inside the run directory is read: a link out of it (to the reader's own
    files) or a FIFO or device (which blocks or never ends) would do what the author chose.
    """
    path = Path(run) / relative
    if not path.exists() and not path.is_symlink():
        return None
    try:
        real = path.resolve(strict=True)
        if not real.is_relative_to(Path(run).resolve()):
            raise Unreadable(f"{relative} links outside the run directory")
        if not stat.S_ISREG(real.stat().st_mode):
            raise Unreadable(f"{relative} is not a regular file")
        # Non-blocking, and checked again once open: the file may have been swapped meanwhile.
        with os.fdopen(os.open(real, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise Unreadable(f"{relative} is not a regular file")
            data = f.read(-1 if limit is None else limit + 1)
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        raise Unreadable(f"{relative} cannot be read ({error_reason(error)})") from None
    if limit is not None and len(data) > limit:
        raise Unreadable(f"{relative} is larger than {limit // 2**20} MB")
    return data


def read_yaml_file(run: Path, relative: str):
    """A YAML file of the run as plain data, None if there is none, else Unreadable (also for a
    file that holds no value: null, or only comments, which metalearn never writes)."""
    data = read_run_file(run, relative)
    if data is None:
        return None
    if not data.strip():
        raise Unreadable(f"{relative} is empty")
    try:  # plain YAML: no tags, and no aliases (metalearn writes none; nested ones explode)
        value = read_run_yaml(Path(run) / relative)
    except RunDirError as error:
        raise Unreadable(f"{relative} is not valid YAML ({_cause(error)})") from None
    if value is None:
        raise Unreadable(f"{relative} holds no value (null or only comments)")
    return value


def _cause(error: RunDirError) -> str:
    """The parenthesised reason of read_run_yaml's message."""
    text = str(error)
    return text[text.find("(") + 1 : text.find(")")] if "(" in text else "unreadable"


def error_reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def load_run(path: Path) -> dict:
    """A run as the table and the plots use it; never raises.

    The fields of summary.json that compare reads, each of the type metalearn writes (test
    metrics as floats, NaN included); a field of another type is left out and named in
    run["problems"], as is a file that cannot be read. Without overrides in the summary, they
    come from .hydra/overrides.yaml.
    """
    path = Path(path)
    run: dict = {"path": str(path), "problems": []}
    problems = run["problems"]
    try:
        data = read_run_file(path, "summary.json")
        summary = None if data is None else _parse_summary(data)
    except Unreadable as error:
        problems.append(str(error))
        summary = {}
    if summary is None:
        run["status"] = "running or killed"
    else:
        run.update(_clean_summary(summary, problems))
    # Read even when the summary has the overrides, so that a damaged file is named.
    overrides = _read_overrides(path, problems, needed="overrides" not in run)
    if overrides is not None and "overrides" not in run:
        run["overrides"] = overrides
    _check_config(path, problems)
    return run


def _parse_summary(data: bytes) -> dict:
    if not data.strip():
        raise Unreadable("summary.json is empty")
    try:
        summary = json.loads(data)
    except (ValueError, RecursionError):  # ValueError: also bytes that are not UTF-8
        raise Unreadable("summary.json is not valid JSON") from None
    if not isinstance(summary, dict):
        raise Unreadable("summary.json is not a JSON object")
    return summary


def _read_overrides(path: Path, problems: list[str], needed: bool) -> list[str] | None:
    """The run's command-line overrides; a damaged file, or a missing one where the summary has
    none (the run's settings would look like the defaults), is named in problems."""
    relative = ".hydra/overrides.yaml"
    try:
        overrides = read_yaml_file(path, relative)
    except Unreadable as error:
        problems.append(str(error))
        return None
    if overrides is None:
        if needed and (path / CONFIG_FILE).exists():  # Hydra writes both at the start
            problems.append(f"{relative} is missing")
        return None
    return _strings(overrides, relative, problems)


CONFIG_FILE = ".hydra/config.yaml"


def _check_config(path: Path, problems: list[str]) -> None:
    """.hydra/config.yaml, when there is one, must be a YAML mapping: compare shows none of its
    values, but a damaged config means the run cannot be resumed or evaluated, so it is named.
    Only parsed into events (libyaml's, where installed), which is fast and builds nothing."""
    try:
        data = read_run_file(path, CONFIG_FILE)
        if data is None:
            return
        if not data.strip():
            raise Unreadable(f"{CONFIG_FILE} is empty")
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        events = (e for e in yaml.parse(data.decode(), Loader=loader) if not _framing(e))
        first = next(events, None)
        if not isinstance(first, yaml.MappingStartEvent):
            raise Unreadable(f"{CONFIG_FILE} is not a mapping of settings")
        if any(isinstance(e, yaml.AliasEvent) for e in events):
            raise Unreadable(f"{CONFIG_FILE} uses YAML aliases, which metalearn never writes")
    except Unreadable as error:
        problems.append(str(error))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as error:
        reason = type(error).__name__
        problems.append(f"{CONFIG_FILE} is not valid YAML ({reason})")


def _framing(event) -> bool:
    return isinstance(event, (yaml.StreamStartEvent, yaml.DocumentStartEvent))


def _strings(value, where: str, problems: list[str]) -> list[str] | None:
    if not isinstance(value, list):
        problems.append(f"{where} is not a list")
        return None
    strings = [v for v in value if isinstance(v, str)]
    if len(strings) < len(value):
        problems.append(f"{where} holds items that are not strings")
    return strings


def number(value) -> float | None:
    """A JSON number as a float (NaN and inf included), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer with hundreds of digits
        return None


def finite(value) -> bool:
    value = number(value)
    return value is not None and math.isfinite(value)


def _clean_summary(summary: dict, problems: list[str]) -> dict:
    clean = {}

    def bad(key: str, what: str) -> None:
        problems.append(f"summary.json: {key} is not {what}")

    for key in ("status", "error", "conditioning"):
        if key in summary:
            if isinstance(summary[key], str):
                clean[key] = summary[key]
            else:
                bad(key, "a string")
    if "objective" in summary:
        if summary["objective"] in OBJECTIVES:
            clean["objective"] = summary["objective"]
        else:
            bad("objective", " or ".join(OBJECTIVES))
    steps = summary.get("steps")
    if isinstance(steps, int) and not isinstance(steps, bool):
        clean["steps"] = steps
    elif "steps" in summary:
        bad("steps", "a whole number")
    if "train_time_s" in summary:
        if number(summary["train_time_s"]) is not None:
            clean["train_time_s"] = summary["train_time_s"]
        else:
            bad("train_time_s", "a number")
    if "overrides" in summary:
        overrides = _strings(summary["overrides"], "summary.json: overrides", problems)
        if overrides is not None:
            clean["overrides"] = overrides
    if "protocol" in summary:  # kept as dotted keys of plain JSON values (metalearn/protocol.py)
        if isinstance(summary["protocol"], dict):
            clean["protocol"] = flatten(summary["protocol"])
        else:
            bad("protocol", "an object")
    if "test" in summary:
        test = _clean_test(summary["test"], problems)
        if test is not None:
            clean["test"] = test
    return clean


def _clean_test(test, problems: list[str]) -> dict | None:
    """The test metrics as floats, per_task as {task: {metric: float}}, worst as {"task": name,
    metric: float}; anything else is left out."""
    if not isinstance(test, dict):
        problems.append("summary.json: test is not an object")
        return None
    clean = _numbers(test, "test", problems, skip=("per_task", "worst"))
    if "per_task" in test:
        per_task = test["per_task"]
        if isinstance(per_task, dict):
            clean["per_task"] = {}
            for task, metrics in per_task.items():
                where = f"test.per_task.{_short(task)}"
                if isinstance(metrics, dict):
                    clean["per_task"][task] = _numbers(metrics, where, problems)
                else:
                    problems.append(f"summary.json: {where} is not an object")
        else:
            problems.append("summary.json: test.per_task is not an object")
    if "worst" in test:
        worst = test["worst"]
        if isinstance(worst, dict) and isinstance(worst.get("task"), str):
            clean["worst"] = {"task": worst["task"]}
            clean["worst"].update(_numbers(worst, "test.worst", problems, skip=("task",)))
        else:
            problems.append("summary.json: test.worst is not an object with a task")
    return clean


def _numbers(values: dict, where: str, problems: list[str], skip=()) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if key in skip:
            continue
        if number(value) is None:
            problems.append(f"summary.json: {where}.{_short(key)} is not a number")
        else:
            out[key] = number(value)
    return out


def _short(text: str, width: int = 30) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def load_metrics(run: dict) -> list[dict]:
    """The run's metrics.jsonl records, read once and kept in run["metrics"]."""
    if "metrics" not in run:
        run["metrics"] = read_records(Path(run["path"]))
    return run["metrics"]


def read_records(run_path: Path) -> list[dict]:
    """metrics.jsonl's JSON objects. A line that is not one (cut short by a kill, garbage, bytes
    that are not UTF-8) is skipped, and a file that cannot be read safely gives none."""
    try:
        data = read_run_file(run_path, "metrics.jsonl", limit=None)
    except Unreadable:
        return []
    records = []
    for line in (data or b"").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
