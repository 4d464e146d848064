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


def read_tasks(run: dict) -> tuple[str, dict[str, list[float]]] | None:
    """(test_tasks key, {metric: per-task values}) of a run, None if it has none readable."""
    try:
        data = read_run_file(Path(run["path"]), TEST_TASKS_FILE)
        record = None if data is None else json.loads(data)
    except (Unreadable, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("test_tasks"), str):
        return None
    metrics = record.get("metrics")
    if not isinstance(metrics, dict):
        return None
    clean = {}
    for name, values in metrics.items():
        if isinstance(values, list) and values:
            floats = [number(v) for v in values]
            if all(v is not None and math.isfinite(v) for v in floats):
                clean[name] = floats
    return record["test_tasks"], clean


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
    """Each run against the best (the table's first row) on the same test tasks, task by task."""
    if len(runs) < 2:
        return []
    best = runs[order[0]]
    best_name = Path(best["path"]).name
    best_tasks = read_tasks(best)
    if best_tasks is None or objective not in best_tasks[1]:
        return [f"Paired test: {best_name} has no per-task test results ({TEST_TASKS_FILE})."]
    scale, unit = (100.0, " points") if objective == "accuracy" else (1.0, "")
    lines = [f"Paired test against {best_name}, task by task ({objective}, other - best):"]
    for i in order[1:]:
        name = Path(runs[i]["path"]).name
        tasks = read_tasks(runs[i])
        if tasks is None or objective not in tasks[1]:
            lines.append(f"  {name}: no per-task test results ({TEST_TASKS_FILE})")
        elif tasks[0] != best_tasks[0] or len(tasks[1][objective]) != len(best_tasks[1][objective]):
            lines.append(f"  {name}: not on the same test tasks (its protocol differs)")
        elif len(tasks[1][objective]) < 2:
            lines.append(f"  {name}: one test task, nothing to pair")
        else:
            d = paired_difference(tasks[1][objective], best_tasks[1][objective])
            lines.append(
                f"  {name}: {d['mean'] * scale:+.3g} ± {d['ci95'] * scale:.2g}{unit} (95% CI), "
                f"p = {d['p']:.2g}, {d['n']} tasks"
            )
    return lines
