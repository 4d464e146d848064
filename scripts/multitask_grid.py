"""Every conditioning x every weighting on a multi-task dataset, as a table and a negative-transfer
report (issue 3's results).

    python scripts/multitask_grid.py multi_sinusoid --steps 3000 --static-weights [1,1,2] \
        data.n_tasks=3 data.conflict=0.3
    python scripts/multitask_grid.py omniglot_alphabets --steps 1000 train.meta_batch=8
    python scripts/multitask_grid.py multi_sinusoid --report-only   # tables from finished runs

The runs are ordinary Hydra multiruns under outputs/multitask_grid/<data>/<sweep> (every
weighting but static) and <sweep>_static (static, whose weights are given per task), so
`metalearn compare` works on them. Writes docs/multitask_<data>.md (the grid: mean test metric over
tasks and the worst task, training time) and docs/multitask_<data>_negative_transfer.{md,png}
(uniform weighting: each conditioning's per-task gain over conditioning=separate).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from metalearn.conditioning import CONDITIONINGS  # noqa: E402
from metalearn.reports.runs import load_run  # noqa: E402
from metalearn.reports.transfer import write_report  # noqa: E402
from metalearn.weighting import WEIGHTINGS  # noqa: E402


def multirun(out: Path, data: str, steps: int, conditionings, weightings, extra) -> None:
    command = [
        sys.executable, "-m", "metalearn", "train", "-m", "algo=multitask", f"data={data}",
        f"train.steps={steps}", "progress=false", f"conditioning={','.join(conditionings)}",
        f"algo.weighting={','.join(weightings)}", *extra, f"hydra.sweep.dir={out}",
    ]  # fmt: skip
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def grid_table(runs: list[dict]) -> tuple[str, dict]:
    objective = runs[0]["objective"]
    scale = 100.0 if objective == "accuracy" else 1.0
    cells: dict[tuple[str, str], dict] = {}
    for run in runs:
        weighting = dict(o.split("=", 1) for o in run["overrides"]).get("algo.weighting")
        cells[(run["conditioning"], weighting)] = run
    conds = [c for c in CONDITIONINGS if any(k[0] == c for k in cells)]
    weights = [w for w in WEIGHTINGS if any(k[1] == w for k in cells)]
    lines = [
        f"Test {objective} (mean over tasks ± 95% CI across tasks; worst task's value in brackets)",
        "",
        "| conditioning | " + " | ".join(weights) + " |",
        "|---|" + "---|" * len(weights),
    ]
    for c in conds:
        row = []
        for w in weights:
            run = cells.get((c, w))
            if run is None or "test" not in run:
                row.append("failed" if run else "")
                continue
            t = run["test"]
            worst = t["worst"][objective]
            row.append(
                f"{t[objective] * scale:.4g} ± {t[objective + '_ci95'] * scale:.2g} "
                f"[{worst * scale:.3g}]"
            )
        lines.append(f"| {c} | " + " | ".join(row) + " |")
    finished = [r for r in runs if "test" in r]
    best = (max if objective == "accuracy" else min)(finished, key=lambda r: r["test"][objective])
    best_worst = (max if objective == "accuracy" else min)(
        finished, key=lambda r: r["test"]["worst"][objective]
    )
    return "\n".join(lines), {"best": best, "best_worst": best_worst, "cells": cells}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", choices=["multi_sinusoid", "omniglot_alphabets"])
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--conditionings", default=",".join(CONDITIONINGS))
    parser.add_argument("--weightings", default=",".join(WEIGHTINGS))
    parser.add_argument(
        "--static-weights",
        default=None,
        help="algo.task_weights for weighting=static, e.g. [1,1,2]; default: no static runs",
    )
    parser.add_argument("--out", default="outputs/multitask_grid")
    parser.add_argument(
        "--sweep", default="a", help="sub-folder for this call's multirun (a partial grid in parts)"
    )
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_intermixed_args()

    out = Path(args.out) / args.data
    conds = args.conditionings.split(",")
    weightings = [w for w in args.weightings.split(",") if w != "static"]
    if not args.report_only:
        if weightings:
            multirun(out / args.sweep, args.data, args.steps, conds, weightings, args.overrides)
        if args.static_weights:
            extra = [*args.overrides, f"algo.task_weights={args.static_weights}"]
            multirun(out / f"{args.sweep}_static", args.data, args.steps, conds, ["static"], extra)

    runs = [load_run(p.parent) for p in sorted(out.glob("*/*/summary.json"))]
    table, picks = grid_table(runs)
    objective = runs[0]["objective"]
    hours = sum(r.get("total_time_s", 0) for r in runs) / 3600
    uniform = [r for r in runs if ("algo.weighting=uniform" in r.get("overrides", []))]
    docs = Path(args.docs)
    written = write_report(uniform, docs / f"multitask_{args.data}_report")
    best, best_worst = picks["best"], picks["best_worst"]
    text = "\n".join(
        [
            f"# Multi-task grid on {args.data}",
            "",
            f"Command: `python scripts/multitask_grid.py {args.data} --steps {args.steps} "
            + " ".join(args.overrides)
            + (f" --static-weights {args.static_weights}" if args.static_weights else "")
            + "`",
            f"{len(runs)} runs, {hours:.2f} h of wall time in total on this machine (2 shared "
            f"CPU cores). Runs: `{out}`.",
            "",
            table,
            "",
            f"Best mean {objective}: conditioning={best['conditioning']} with "
            f"{[o for o in best['overrides'] if o.startswith('algo.weighting')][0]}. "
            f"Best worst task: conditioning={best_worst['conditioning']} with "
            f"{[o for o in best_worst['overrides'] if o.startswith('algo.weighting')][0]}.",
            "",
            "## Negative transfer",
            "",
            "Uniform weighting: each task's gain over one network per task (separate).",
            "",
            written[0].read_text(),
            f"![negative transfer]({written[1].relative_to(docs)})",
        ]
    )
    path = docs / f"multitask_{args.data}.md"
    path.write_text(text + "\n")
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
