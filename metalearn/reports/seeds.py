"""Several seeds of one configuration as one row of `metalearn compare`.

Runs whose overrides are the same but for `seed` (`-m seed=0,1,2`) are one configuration: its
row holds the mean over seeds of each test metric, the spread over seeds (their standard
deviation), and each run's own 95% CI. The spread says how much the number depends on the seed,
which a single run's CI (over test tasks) does not; `--each-run` lists the runs one by one.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from metalearn.reports.runs import finite


def merge_seeds(runs: list[dict], objective: str) -> list[dict]:
    """The runs with each group of >= 2 completed seeds of one configuration merged into one."""
    groups: dict[tuple, list[dict]] = {}
    rest = []
    for run in runs:
        overrides = dict(o.split("=", 1) for o in run.get("overrides", []) if "=" in o)
        value = (run.get("test") or {}).get(objective)
        mergeable = run.get("status") == "completed" and finite(value) and not run["problems"]
        if "seed" not in overrides or not mergeable:
            rest.append(run)
            continue
        key = tuple(sorted((k, v) for k, v in overrides.items() if k != "seed"))
        groups.setdefault(key, []).append(run)
    merged = []
    for group in groups.values():
        seeds = [dict(o.split("=", 1) for o in r["overrides"] if "=" in o)["seed"] for r in group]
        if len(group) < 2 or len(set(seeds)) < len(seeds):
            merged.extend(group)
        else:
            merged.append(_merged(group, seeds, objective))
    return merged + rest


def _merged(group: list[dict], seeds: list[str], objective: str) -> dict:
    tests = [r["test"] for r in group]
    values = [t[objective] for t in tests]
    test = {}
    for metric in tests[0]:
        numbers = [t.get(metric) for t in tests]
        if all(finite(v) for v in numbers) and not metric.endswith("_ci95"):
            test[metric] = statistics.fmean(numbers)
    first = group[0]
    overrides = [o for o in first["overrides"] if not o.startswith("seed=")]
    return {
        "path": str(Path(first["path"]).parent / f"{Path(first['path']).name} +{len(group) - 1}"),
        "overrides": [*overrides, "seed=" + ",".join(seeds)],
        "test": test,
        "seeds": {
            "sd": statistics.stdev(values),
            "ci95": [t.get(f"{objective}_ci95") for t in tests],
        },
        "status": "completed",
        "problems": [p for r in group for p in r.get("problems", [])],
        "steps": first.get("steps", ""),
        "train_time_s": round(statistics.fmean(r.get("train_time_s") or 0 for r in group), 3),
        **({"objective": first["objective"]} if "objective" in first else {}),
    }
