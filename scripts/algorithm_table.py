"""Every meta-learning algorithm on Omniglot N-way 1-shot at an equal wall-time budget, against
the numbers their papers report (issue 4).

    python scripts/algorithm_table.py --ways 5,20 --minutes 2
    python scripts/algorithm_table.py --ways 5 --algos maml,protonet --minutes 30
    python scripts/algorithm_table.py --report-only    # the table from finished runs

Each run is an ordinary `metalearn train` run under outputs/algorithm_table/<N>w1s/<algo>_<time>
with `train.max_minutes` as its budget (training and validation; the test on the best
validation checkpoint comes after). The table goes to docs/algorithms_omniglot.md with the
steps each algorithm reached. Papers train for hours on a GPU; this table compares the
algorithms under the same small CPU budget, which favours the ones that learn fastest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reproduce import run

# What every run shares: the MAML paper's Omniglot protocol (random 1,100/100/423 character
# split with rotations, stride-2 conv4, 15 queries per class at 5-way, 5 at 20-way).
COMMON = [
    "data=omniglot", "data.k_shot=1", "data.rotations=true", "model.downsample=stride",
    "train.steps=1000000", "eval.every=100", "eval.val_tasks=100", "progress=false",
]  # fmt: skip
WAYS = {
    5: ["data.n_way=5", "data.k_query=15", "train.meta_batch=32"],
    20: ["data.n_way=20", "data.k_query=5", "train.meta_batch=16"],
}

# name -> (overrides, paper's 5-way 1-shot, paper's 20-way 1-shot). The algorithms' own YAMLs
# hold their papers' inner-loop settings; only what differs from them is given here.
ALGORITHMS = {
    "maml": (["algo=maml", "eval.inner_steps=3"], "98.7 ± 0.4", "95.8 ± 0.3 (MAML)"),
    "fomaml": (
        ["algo=maml", "algo.first_order=true", "eval.inner_steps=3"],
        "98.3 ± 0.5",
        "89.4 ± 0.5 (MAML)",
    ),
    "anil": (["algo=anil", "eval.inner_steps=3"], "-", "96.2 ± 0.5 (ANIL)"),
    "metasgd": (["algo=metasgd"], "99.53 ± 0.26", "95.93 ± 0.38 (Meta-SGD)"),
    "mamlpp": (["algo=mamlpp"], "99.47", "97.65 ± 0.05 (MAML++)"),
    "imaml": (["algo=imaml"], "99.50 ± 0.26", "96.18 ± 0.36 (iMAML, Hessian-free)"),
    "cavia": (["algo=cavia"], "-", "- (CAVIA reports no Omniglot)"),
    # Reptile's paper: 5 Adam steps on the support set, 50 at test, meta-batch 5, outer step
    # size 1 decayed linearly over train.steps (so hardly at all under a time budget).
    "reptile": (
        ["algo=reptile", "eval.inner_steps=50", "train.meta_batch=5", "train.outer_lr=1.0"],
        "97.68 ± 0.04",
        "89.43 ± 0.14 (Reptile, transductive)",
    ),
    "protonet": (["algo=protonet"], "98.8", "96.0 (ProtoNets)"),
    "blackbox": (["algo=blackbox"], "99.07 ± 0.16", "97.64 ± 0.30 (SNAIL)"),
    "amortized": (["algo=amortized"], "99.70 ± 0.20", "97.66 ± 0.29 (VERSA)"),
    "finetune": (["algo=finetune"], "-", "- (pre-train + fine-tune baseline)"),
}


def runs_by_budget(out: Path, name: str) -> list[tuple[str, dict, Path]]:
    """The latest finished-or-failed run of `name` for each budget, shortest budget first."""
    latest = {}
    for path in sorted(out.glob(f"{name}_*/summary.json")):  # timestamped: later wins
        summary = json.loads(path.read_text())
        budget = budget_minutes(summary)
        latest[budget] = (budget, summary, path.parent)
    return [latest[b] for b in sorted(latest, key=lambda b: float(b) if b != "-" else 0.0)]


def budget_minutes(summary: dict) -> str:
    """The run's train.max_minutes, from the overrides it was started with."""
    for override in summary.get("overrides", []):
        if override.startswith("train.max_minutes="):
            return override.split("=", 1)[1]
    return "-"


def table(out: Path, ways: list[int]) -> str:
    lines = [
        "| algorithm | N-way | test accuracy (%) ± 95% CI | paper | budget min | steps | "
        "best step | steps/s | wall min | run dir |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in ways:
        for name, (_, paper5, paper20) in ALGORITHMS.items():
            for budget, s, run_dir in runs_by_budget(out / f"{n}w1s", name):
                if "test" not in s:
                    status = s.get("status", "failed")
                    lines.append(f"| {name} | {n} | {status} | | {budget} | | | | | `{run_dir}` |")
                    continue
                t = s["test"]
                lines.append(
                    f"| {name} | {n} | {100 * t['accuracy']:.1f} ± {100 * t['accuracy_ci95']:.1f} "
                    f"| {paper5 if n == 5 else paper20} | {budget} | {s['steps']} | "
                    f"{s['best_step']} | {s['steps_per_s']:.3g} | {s['total_time_s'] / 60:.1f} | "
                    f"`{run_dir}` |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ways", default="5,20", help="comma-separated: 5, 20")
    parser.add_argument("--algos", default=",".join(ALGORITHMS))
    parser.add_argument("--minutes", type=float, default=2.0, help="train.max_minutes per run")
    parser.add_argument("--out", default="outputs/algorithm_table")
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()

    ways = [int(n) for n in args.ways.split(",")]
    unknown = sorted(set(ways) - set(WAYS)) + sorted(set(args.algos.split(",")) - set(ALGORITHMS))
    if unknown:
        sys.exit(f"unknown --ways or --algos: {unknown}; allowed: {list(WAYS)}, {list(ALGORITHMS)}")
    out = Path(args.out)
    if not args.report_only:
        for n in ways:
            for name in args.algos.split(","):
                overrides = [*COMMON, *WAYS[n], *ALGORITHMS[name][0]]
                budget = [f"train.max_minutes={args.minutes}", *args.extra]
                try:
                    run(name, overrides + budget, out / f"{n}w1s")
                except Exception as error:  # one failed algorithm should not stop the table
                    print(f"{name} {n}-way failed: {error}", flush=True)

    text = "\n".join([
        "# Every algorithm on Omniglot N-way 1-shot at equal time budgets",
        "",
        "Command: `python scripts/algorithm_table.py --ways N --algos NAME --minutes BUDGET`; "
        "each row is the latest run of its algorithm at the budget in the budget column "
        "(train.max_minutes: training and validation, the test comes after). "
        f"Shared settings: `{' '.join(COMMON)}`; 5-way: `{' '.join(WAYS[5])}`; "
        f"20-way: `{' '.join(WAYS[20])}`. Test: the best validation checkpoint on 600 meta-test "
        "tasks of the held-out characters. Paper: the number its paper reports after hours of "
        "GPU training (its own architecture where it differs, e.g. SNAIL, VERSA).",
        "",
        table(out, list(WAYS)),
        "",
    ])  # fmt: skip
    path = Path(args.docs) / "algorithms_omniglot.md"
    path.write_text(text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
