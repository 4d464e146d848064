"""The table of `metalearn compare`: one row per run, best test metric first, and its renderings
(text, Markdown, CSV). Every cell is made printable before it reaches a terminal or a file.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from metalearn.reports.runs import finite


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
    # classifiers' calibration: the query NLL (their loss) and the expected calibration error
    calibrated = objective == "accuracy" and any("ece" in (r.get("test") or {}) for r in runs)
    calibration = ["test nll", "test ece"] if calibrated else []
    seeded = any("seeds" in r for r in runs)  # rows of several seeds (reports/seeds.py)
    spread = ["sd over seeds"] if seeded else []
    header = ["run", *differing, f"test {objective}", "±ci95", *spread, *calibration]
    header += per_task_header
    header += ["steps", "train s", "status"]
    scale = 100.0 if objective == "accuracy" else 1.0

    def fmt(value):
        return "" if value is None else f"{value * scale:.4g}"

    def ci_cell(run, test):
        if "seeds" in run:  # each seed's own CI
            return "/".join("" if c is None else f"{c * scale:.2g}" for c in run["seeds"]["ci95"])
        return f"{test.get(objective + '_ci95', 0) * scale:.2g}"

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
                "" if value is None else ci_cell(run, test),
                *(
                    [f"{run['seeds']['sd'] * scale:.2g}" if "seeds" in run else ""]
                    if seeded
                    else []
                ),
                *([_cell(test.get("loss")), _cell(test.get("ece"))] if calibrated else []),
                *per_task,
                str(run.get("steps", "")),
                str(run.get("train_time_s", "")),
                status_cell(run, objective),
            ]
        )
    return header, rows


def _cell(value) -> str:
    return "" if value is None else f"{value:.3g}"


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
