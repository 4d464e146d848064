"""`metalearn compare`: one row per run below the given paths, sorted by the test metric."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from metalearn.rundir import RunDirError, find_runs


def load_run(path: Path) -> dict:
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    overrides_path = path / ".hydra" / "overrides.yaml"
    if "overrides" not in summary and overrides_path.exists():
        summary["overrides"] = list(OmegaConf.load(overrides_path))
    summary.setdefault("status", "running or killed")
    summary["path"] = str(path)
    return summary


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
    """Run indices, best test metric first; runs without a test metric last."""

    def sort_key(run):
        test = run.get("test") or {}
        value = test.get(objective)
        if value is None:
            return (1, 0.0)
        return (0, -value if objective == "accuracy" else value)

    return sorted(range(len(runs)), key=lambda i: sort_key(runs[i]))


def task_names(runs: list[dict]) -> list[str]:
    """Multi-task runs' task names, in first-seen order (empty for meta-learning runs)."""
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys((run.get("test") or {}).get("per_task", {})))
    return list(names)


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
                run.get("status", "")
                if run.get("status") != "failed"
                else "failed: " + run.get("error", "")[:60],
            ]
        )
    return header, rows


def render_text(header, rows) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header, *rows]]
    return "\n".join(lines)


def render_markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_csv(header, rows) -> str:
    out = io.StringIO()
    csv.writer(out).writerows([header, *rows])
    return out.getvalue()


def compare_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="metalearn compare", description=__doc__)
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
        runs = [load_run(p) for p in find_runs(args.paths)]
    except RunDirError as error:
        print(f"metalearn: error: {error}", file=sys.stderr)
        sys.exit(2)
    if not runs:
        print(f"metalearn: error: no runs found below {' '.join(args.paths)}.", file=sys.stderr)
        sys.exit(2)
    header, rows = table(runs)
    print(render_text(header, rows))
    if args.csv:
        Path(args.csv).write_text(render_csv(header, rows))
    if args.md:
        Path(args.md).write_text(render_markdown(header, rows) + "\n")
    if args.plot:
        from metalearn.plots import write_plots

        try:
            written = write_plots(runs, Path(args.plot))
        except OSError as error:
            print(
                f"metalearn: error: cannot write the plots to {args.plot}: {error}", file=sys.stderr
            )
            sys.exit(2)
        for path in written:
            print(f"wrote {path}")
    if args.negative_transfer:
        from metalearn.transfer_report import write_report

        try:
            written = write_report(runs, Path(args.negative_transfer))
        except (RunDirError, OSError) as error:
            print(f"metalearn: error: {error}", file=sys.stderr)
            sys.exit(2)
        print(written[0].read_text())
        for path in written:
            print(f"wrote {path}")
