"""What `metalearn compare` says below its table: the protocol fields that differ between the
runs, and a paired test of each run against the best one when both were evaluated on the same
test tasks.

Runs with equal protocol["test_tasks"] (metalearn/protocol.py) drew the very same test tasks, so
their per-task results (test_tasks.json) pair up: the difference of the two runs on task i
removes what makes task i easy or hard for both, and its mean has a much tighter confidence
interval than the two runs' own intervals suggest. The interval and the two-sided p-value are
Student's t for the mean paired difference (a paired t-test; scipy's t distribution, which JAX
already depends on).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

from metalearn.protocol import TEST_TASKS_FILE
from metalearn.reports.runs import Unreadable, number, read_run_file

IGNORED_DIFFERENCES = ("budget.",)  # budgets differ by design between compared runs


def protocol_differences(runs: list[dict]) -> list[str]:
    """One line per protocol field whose value differs between the runs that have a card."""
    cards = [(Path(r["path"]).name, r["protocol"]) for r in runs if "protocol" in r]
    if len(cards) < 2:
        return []
    keys = sorted({k for _, card in cards for k in card})
    lines = []
    for key in keys:
        if key == "test_tasks" or key.startswith(IGNORED_DIFFERENCES):
            continue
        values: dict[str, list[str]] = {}
        for name, card in cards:
            values.setdefault(json.dumps(card.get(key), sort_keys=True), []).append(name)
        if len(values) > 1:
            parts = [f"{value} ({', '.join(names)})" for value, names in values.items()]
            lines.append(f"  {key}: " + "; ".join(parts))
    return lines


class Tasks(NamedTuple):
    """A run's per-task test results (test_tasks.json): the test tasks' key, the metrics whose
    values are all finite numbers, and the names of those that are not."""

    key: str
    metrics: dict[str, list[float]]
    non_finite: tuple[str, ...]


def read_tasks(run: dict) -> Tasks | str:
    """A run's per-task test results, or why it has none (a phrase: "test_tasks.json is ...")."""
    try:
        data = read_run_file(Path(run["path"]), TEST_TASKS_FILE)
    except Unreadable as error:
        return str(error)
    if data is None:
        return (
            f"there is no {TEST_TASKS_FILE} (the run was not tested, or was trained before "
            "metalearn wrote one)"
        )
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        return f"{TEST_TASKS_FILE} is not valid JSON"
    if not isinstance(record, dict) or not isinstance(record.get("test_tasks"), str):
        return f"{TEST_TASKS_FILE} has no test_tasks key (a string)"
    metrics = record.get("metrics")
    if not isinstance(metrics, dict):
        return f"{TEST_TASKS_FILE} has no metrics (an object)"
    clean, non_finite = {}, []
    for name, values in metrics.items():
        if isinstance(values, list) and values:
            floats = [number(v) for v in values]
            if all(v is not None and math.isfinite(v) for v in floats):
                clean[name] = floats
            else:
                non_finite.append(name)
    return Tasks(record["test_tasks"], clean, tuple(non_finite))


def why_unpaired(tasks: Tasks | str, objective: str) -> str | None:
    """Why these per-task results have nothing to pair on `objective`, else None."""
    if isinstance(tasks, str):
        return f"no per-task test results ({tasks})"
    if objective in tasks.non_finite:
        return f"its per-task test {objective} holds values that are not finite numbers (NaN)"
    if objective not in tasks.metrics:
        has = ", ".join(sorted(tasks.metrics)) or "no metric"
        return f"no per-task test {objective} in its {TEST_TASKS_FILE} (it has {has})"
    return None


def other_tasks(run: dict, best: dict) -> str:
    """How a run's test tasks differ from the best's: the protocol fields that decide them."""
    a, b = run.get("protocol", {}), best.get("protocol", {})
    fields = [
        k
        for k in sorted(set(a) | set(b))
        if k.startswith(("data.", "test.", "input_shape")) and a.get(k) != b.get(k)
    ]
    if not fields:
        return "not on the same test tasks (drawn under another protocol)"
    shown = "; ".join(
        f"{k}: {json.dumps(a.get(k))} against {json.dumps(b.get(k))}" for k in fields[:3]
    )
    more = f" and {len(fields) - 3} more" if len(fields) > 3 else ""
    return f"not on the same test tasks (other protocol: {shown}{more})"


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of a - b over paired tasks, its 95% CI half-width and the two-sided p-value of
    'no difference' (paired t-test; n >= 2)."""
    from scipy import stats

    n = len(a)
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    if se == 0.0:  # every task differs by the same amount
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean / se), n - 1))
    return {"mean": mean, "ci95": float(stats.t.ppf(0.975, n - 1)) * se, "p": p, "n": n}


def paired_report(runs: list[dict], order: list[int], objective: str) -> list[str]:
    """Each run against the best (the table's first row) on the same test tasks, task by task;
    a run that cannot be paired is named with the reason."""
    if len(runs) < 2:
        return []
    best = runs[order[0]]
    best_name = Path(best["path"]).name
    best_tasks = read_tasks(best)
    why = why_unpaired(best_tasks, objective)
    if why is not None:
        return [f"Paired test: {best_name} (the best run) cannot be paired: {why}."]
    scale, unit = (100.0, " points") if objective == "accuracy" else (1.0, "")
    lines = [f"Paired test against {best_name}, task by task ({objective}, other - best):"]
    best_values = best_tasks.metrics[objective]
    for i in order[1:]:
        name = Path(runs[i]["path"]).name
        tasks = read_tasks(runs[i])
        why = why_unpaired(tasks, objective)
        if why is not None:
            lines.append(f"  {name}: {why}")
        elif tasks.key != best_tasks.key:
            lines.append(f"  {name}: {other_tasks(runs[i], best)}")
        elif len(tasks.metrics[objective]) != len(best_values):
            lines.append(
                f"  {name}: {len(tasks.metrics[objective])} per-task results against "
                f"{len(best_values)} for the same test tasks: a {TEST_TASKS_FILE} is damaged"
            )
        elif len(best_values) < 2:
            lines.append(f"  {name}: one test task, nothing to pair")
        else:
            d = paired_difference(tasks.metrics[objective], best_values)
            lines.append(
                f"  {name}: {d['mean'] * scale:+.3g} ± {d['ci95'] * scale:.2g}{unit} (95% CI), "
                f"p = {d['p']:.2g}, {d['n']} tasks"
            )
    return lines
