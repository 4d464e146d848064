"""The negative-transfer report: each task's gain from sharing, against one network per task.

For every multi-task run that is not the baseline (conditioning=separate by default), each
task's test metric minus the baseline's on the same task, in points: positive means the task
gains from sharing, negative means negative transfer. A run is compared with the baseline run
whose other overrides (e.g. the weighting) match, else with the first baseline run. A task
without a finite metric in both runs (a damaged summary, a NaN) is left out of that comparison.
"""

from __future__ import annotations

from pathlib import Path

from metalearn.reports.plots import MAX_INCHES, plain_text, save_png
from metalearn.reports.runs import finite
from metalearn.reports.table import differing_overrides, objective_of, render_markdown, task_names
from metalearn.rundir import RunDirError, atomic_write_bytes


def gains(runs: list[dict], baseline: str = "separate") -> tuple[list[str], list[str], dict]:
    """(run labels, task names, {label: {task: gain}}): accuracy gains in points (x 100), or
    baseline loss - run loss for regression, so that positive is always better."""
    runs = [r for r in runs if (r.get("test") or {}).get("per_task")]
    base = [r for r in runs if r.get("conditioning") == baseline]
    others = [r for r in runs if r.get("conditioning") != baseline]
    if not base or not others:
        raise RunDirError(
            f"the negative-transfer report needs finished multi-task runs with "
            f"conditioning={baseline} (the baseline) and with other conditionings; found "
            f"{len(base)} baseline and {len(others)} other runs."
        )
    objective = objective_of(runs)
    maps, differing = differing_overrides(runs)
    keys = [k for k in differing if k != "conditioning"]
    by_path = {r["path"]: m for r, m in zip(runs, maps)}

    def matching_baseline(run):
        want = {k: by_path[run["path"]].get(k) for k in keys}
        return next(
            (b for b in base if all(by_path[b["path"]].get(k) == v for k, v in want.items())),
            base[0],
        )

    tasks = task_names(runs)
    table = {}
    for run in others:
        label = ", ".join(
            [f"conditioning={run.get('conditioning')}"]
            + [f"{k}={by_path[run['path']][k]}" for k in keys if k in by_path[run["path"]]]
        )
        if label in table:  # runs that differ only in their folder (a rerun)
            label += f" ({Path(run['path']).name})"
        ref = matching_baseline(run)["test"]["per_task"]
        own = run["test"]["per_task"]
        sign, scale = (1.0, 100.0) if objective == "accuracy" else (-1.0, 1.0)
        table[label] = {
            t: sign * scale * (own[t][objective] - ref[t][objective])
            for t in tasks
            if finite(own.get(t, {}).get(objective)) and finite(ref.get(t, {}).get(objective))
        }
    return list(table), tasks, table


def render(labels, tasks, table) -> str:
    header = ["task", *labels]
    rows = [[t, *(f"{table[label].get(t, float('nan')):+.2f}" for label in labels)] for t in tasks]
    rows.append(
        ["tasks that lose", *(str(sum(v < 0 for v in table[label].values())) for label in labels)]
    )
    rows.append(
        [
            "mean gain",
            *(f"{sum(table[lb].values()) / max(len(table[lb]), 1):+.2f}" for lb in labels),
        ]
    )
    return render_markdown(header, rows)


def plot(labels, tasks, table, path: Path, objective: str) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = 0.8 / len(labels)
    inches = min(max(8, 0.45 * len(tasks) * max(1, len(labels) / 3)), MAX_INCHES)
    fig = Figure(figsize=(inches, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(tasks))
    for i, label in enumerate(labels):
        values = [table[label].get(t, np.nan) for t in tasks]
        offset = (i - (len(labels) - 1) / 2) * width
        ax.bar(x + offset, values, width, label=plain_text(label))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [plain_text(t) for t in tasks], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(
        "accuracy gain over separate (points)"
        if objective == "accuracy"
        else "loss reduction vs separate"
    )
    ax.set_title("Negative transfer: below zero, the task is worse off sharing")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def write_report(runs: list[dict], out_dir: Path, baseline: str = "separate") -> list[Path]:
    labels, tasks, table = gains(runs, baseline)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "negative_transfer.md"
    atomic_write_bytes(md, (render(labels, tasks, table) + "\n").encode())
    png = out_dir / "negative_transfer.png"
    plot(labels, tasks, table, png, objective_of(runs))
    return [md, png]
