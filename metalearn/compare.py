"""`metalearn compare`: one row per run below the given paths, sorted by the test metric.

Run directories are shared and can be damaged, so reading one never raises and never does
anything its author chose: a file is only read if it is a regular file inside the run, YAML is
plain data (`read_run_yaml`), and a field of a type metalearn would not have written is left
out. A damaged run is still listed, its status naming what could not be read. Every cell is
made printable before it reaches a terminal or a file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import stat
import sys
from pathlib import Path

from metalearn.cli import ArgumentParser, fail
from metalearn.rundir import RunDirError, atomic_write_bytes, find_runs, read_run_yaml

OBJECTIVES = ("accuracy", "loss")
# summary.json and the YAML files are a few kB; a larger one is damaged, not worth the memory.
MAX_RUN_FILE_BYTES = 16 * 2**20


class Unreadable(ValueError):
    """A file of a run that cannot be used; the message is a short reason, e.g. for a status."""


# ------------------------------------------------------------------------------- reading runs


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
        raise Unreadable(f"{relative} cannot be read ({_reason(error)})") from None
    if limit is not None and len(data) > limit:
        raise Unreadable(f"{relative} is larger than {limit // 2**20} MB")
    return data


def read_yaml_file(run: Path, relative: str):
    """A YAML file of the run as plain data, None if there is none, else Unreadable."""
    data = read_run_file(run, relative)
    if data is None:
        return None
    if not data.strip():
        raise Unreadable(f"{relative} is empty")
    try:  # plain YAML: no tags, and no aliases (metalearn writes none; nested ones explode)
        return read_run_yaml(Path(run) / relative)
    except RunDirError as error:
        raise Unreadable(f"{relative} is not valid YAML ({_cause(error)})") from None


def _cause(error: RunDirError) -> str:
    """The parenthesised reason of read_run_yaml's message."""
    text = str(error)
    return text[text.find("(") + 1 : text.find(")")] if "(" in text else "unreadable"


def _reason(error: BaseException) -> str:
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
    if "overrides" not in run:
        overrides = _read_overrides(path, problems)
        if overrides is not None:
            run["overrides"] = overrides
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


def _read_overrides(path: Path, problems: list[str]) -> list[str] | None:
    relative = ".hydra/overrides.yaml"
    try:
        overrides = read_yaml_file(path, relative)
    except Unreadable as error:
        problems.append(str(error))
        return None
    if overrides is None:
        return None
    return _strings(overrides, relative, problems)


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


# ------------------------------------------------------------------------------------- table


def _override_map(run: dict) -> dict[str, str]:
    return dict(o.split("=", 1) for o in run.get("overrides", []) if "=" in o)


def differing_overrides(runs: list[dict]) -> tuple[list[dict[str, str]], list[str]]:
    """Each run's overrides as a key -> value map, and the keys whose values differ between runs."""
    maps = [_override_map(r) for r in runs]
    keys = sorted({k for m in maps for k in m})
    return maps, [k for k in keys if len({m.get(k) for m in maps}) > 1]


def objective_of(runs: list[dict]) -> str:
    """The metric runs are ranked by: the first run's `objective`, else accuracy."""
    return next((r["objective"] for r in runs if "objective" in r), "accuracy")


def table_order(runs: list[dict], objective: str) -> list[int]:
    """Run indices, best test metric first; runs without a finite test metric (missing, NaN,
    inf) last, in their given order."""

    def sort_key(run):
        value = (run.get("test") or {}).get(objective)
        if not finite(value):
            return (1, 0.0)
        return (0, -value if objective == "accuracy" else value)

    return sorted(range(len(runs)), key=lambda i: sort_key(runs[i]))


def task_names(runs: list[dict]) -> list[str]:
    """Multi-task runs' task names, in first-seen order (empty for meta-learning runs)."""
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys((run.get("test") or {}).get("per_task", {})))
    return list(names)


def status_cell(run: dict, objective: str) -> str:
    """The run's status, what of it could not be read, and a test metric that is not finite."""
    status = run.get("status", "")
    parts = ["failed: " + run.get("error", "")[:60] if status == "failed" else status[:60]]
    problems = run.get("problems", [])
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        parts.append(f"unreadable: {problems[0]}{more}")
    value = (run.get("test") or {}).get(objective)
    if value is not None and not finite(value):
        parts.append(f"test {objective} is {value}")
    elif value is None and status == "completed":
        parts.append(f"no test {objective}")
    return "; ".join(p for p in parts if p)


def table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Columns: the overrides that differ between runs, then the test metric (for multi-task
    runs: the mean over tasks, the worst task and every task's metric), steps and time."""
    maps, differing = differing_overrides(runs)
    objective = objective_of(runs)
    order = table_order(runs, objective)
    tasks = task_names(runs)
    per_task_header = ["worst task", f"worst {objective}", *tasks] if tasks else []
    header = ["run", *differing, f"test {objective}", "±ci95", *per_task_header]
    header += ["steps", "train s", "status"]
    scale = 100.0 if objective == "accuracy" else 1.0

    def fmt(value):
        return "" if value is None else f"{value * scale:.4g}"

    rows = []
    for i in order:
        run, test = runs[i], runs[i].get("test") or {}
        value = test.get(objective)
        per_task = []
        if tasks:
            worst = test.get("worst", {})
            per_task = [worst.get("task", ""), fmt(worst.get(objective))]
            per_task += [fmt(test.get("per_task", {}).get(t, {}).get(objective)) for t in tasks]
        rows.append(
            [
                Path(run["path"]).name,
                *(maps[i].get(k, "") for k in differing),
                fmt(value),
                "" if value is None else f"{test.get(objective + '_ci95', 0) * scale:.2g}",
                *per_task,
                str(run.get("steps", "")),
                str(run.get("train_time_s", "")),
                status_cell(run, objective),
            ]
        )
    return header, rows


def printable(text) -> str:
    """`text` on one line, with every control or formatting character escaped (\\x1b, \\n):
    cells come from files anyone may have written, and a terminal obeys escape sequences."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def render_text(header, rows) -> str:
    lines = [[printable(c) for c in line] for line in [header, *rows]]
    widths = [max(len(c) for c in col) for col in zip(*lines)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def render_markdown(header, rows) -> str:
    def cells(line):
        return " | ".join(printable(c).replace("|", "\\|") for c in line)

    lines = ["| " + cells(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + cells(row) + " |" for row in rows]
    return "\n".join(lines)


def render_csv(header, rows) -> str:
    out = io.StringIO()
    csv.writer(out).writerows([[_csv_cell(c) for c in line] for line in [header, *rows]])
    return out.getvalue()


def _csv_cell(value) -> str:
    # A spreadsheet runs a cell starting with = + - @ as a formula; numbers stay numbers.
    text = printable(value)
    if text[:1] in ("=", "+", "-", "@"):
        try:
            float(text)
        except ValueError:
            return "'" + text
    return text


# ----------------------------------------------------------------------------------- command

OUTPUTS = {
    "csv": "the CSV table",
    "md": "the Markdown table",
    "plot": "the plots",
    "negative_transfer": "the negative-transfer report",
}


def fail_to_write(option: str, path, reason: str) -> None:
    fail(
        f"cannot write {OUTPUTS[option]} to {path} ({reason}). Give a path in a folder you can "
        "write to; missing folders are created."
    )


def output_problem(path: Path, folder: bool) -> str | None:
    """Why `path` (a file, or a folder with folder=True) cannot be written, else None.
    Nothing is created: the missing folders are made when the file is written."""
    if folder and path.exists() and not path.is_dir():
        return "it is a file, not a folder"
    if not folder and path.is_dir():
        return "it is a folder"
    existing = path if folder else path.parent
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is {'a file' if existing.exists() else 'a broken link'}, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def write_table(option: str, path: Path, text: str) -> None:
    try:
        atomic_write_bytes(path, text.encode())
    except OSError as error:
        fail_to_write(option, path, _reason(error))


def run_paths(paths: list[str]) -> list[Path]:
    """The run directories below the paths, or a one-paragraph error."""
    for path in map(Path, paths):
        if path.exists() and not path.is_dir():
            fail(f"{path} is a file, not a run: give a run directory or a folder of runs.")
    try:
        return find_runs(paths)
    except RunDirError as error:
        fail(str(error))


def compare_command(argv: list[str]) -> None:
    description = __doc__.splitlines()[0]

    parser = ArgumentParser(prog="metalearn compare", description=description)
    parser.add_argument("paths", nargs="+", help="run directories or folders holding runs")
    parser.add_argument("--csv", help="also write the table as CSV to this file")
    parser.add_argument("--md", help="also write the table as Markdown to this file")
    parser.add_argument(
        "--plot",
        metavar="DIR",
        help="also write learning_curves.png and test_metrics.png to this folder",
    )
    parser.add_argument(
        "--negative-transfer",
        metavar="DIR",
        help="multi-task runs: write negative_transfer.md and .png (each task's gain against "
        "conditioning=separate) to this folder",
    )
    args = parser.parse_args(argv)
    try:
        compare(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of the table went away (`| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def compare(args: argparse.Namespace) -> None:
    outputs = {k: Path(getattr(args, k)) for k in OUTPUTS if getattr(args, k) is not None}
    for option, path in outputs.items():  # before any work, so that a bad path fails fast
        reason = output_problem(path, folder=option in ("plot", "negative_transfer"))
        if reason:
            fail_to_write(option, path, reason)
    runs = [load_run(p) for p in run_paths(args.paths)]
    if not runs:
        fail(f"no runs found below {' '.join(args.paths)}.")
    header, rows = table(runs)
    print(render_text(header, rows))
    if "csv" in outputs:
        write_table("csv", outputs["csv"], render_csv(header, rows))
    if "md" in outputs:
        write_table("md", outputs["md"], render_markdown(header, rows) + "\n")
    if "plot" in outputs:
        from metalearn.plots import write_plots

        try:
            written = write_plots(runs, outputs["plot"])
        except OSError as error:
            fail_to_write("plot", outputs["plot"], _reason(error))
        for path in written:
            print(f"wrote {path}")
    if "negative_transfer" in outputs:
        from metalearn.transfer_report import write_report

        try:
            written = write_report(runs, outputs["negative_transfer"])
        except RunDirError as error:
            fail(str(error))
        except OSError as error:
            fail_to_write("negative_transfer", outputs["negative_transfer"], _reason(error))
        print(written[0].read_text())
        for path in written:
            print(f"wrote {path}")
