"""Neural processes on the 1-D GP benchmark (data=gp) beside the exact GP oracle (issue 29).

    python scripts/gp_table.py --algos cnp,np --kernels eq,matern52 --steps 3000

Each learner is an ordinary `metalearn train` run (under --out) with the given steps and
meta-batch; its test metrics are the evaluator's on eval.num_tasks tasks drawn from eval.seed,
and the oracle row is the true GP on those same tasks (algorithms/gp_oracle.py). The table
(markdown) goes to stdout: held-out log-likelihood per target point with its 95% CI, the
oracle's marginal and joint log-likelihoods, MSE and the coverage of the central 90% interval.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SEED = 12345  # eval.seed's default: the test tasks of every run


def train(algo: str, kernel: str, args) -> dict:
    run = Path(args.out) / f"{algo}_{kernel}"
    command = [
        sys.executable, "-m", "metalearn", "train", f"algo={algo}", "data=gp",
        f"data.kernel={kernel}", f"train.steps={args.steps}", f"train.meta_batch={args.meta_batch}",
        f"eval.every={args.steps}", f"eval.num_tasks={args.tasks}", "eval.val_tasks=100",
        f"train.log_every={args.steps}", f"hydra.run.dir={run}",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    test = json.loads((run / "summary.json").read_text())["test"]
    return {**test, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", default="cnp,np")
    parser.add_argument("--kernels", default="eq,matern52,weakly_periodic")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--out", default="/tmp/gp_table")
    args = parser.parse_args()

    from metalearn.algorithms.gp_oracle import oracle_metrics
    from metalearn.data.gp import GPConfig

    print("| kernel | learner | log-lik. | joint log-lik. | MSE | 90% coverage | budget |")
    print("|---|---|---|---|---|---|---|")
    for kernel in args.kernels.split(","):
        rows = {a: train(a, kernel, args) for a in args.algos.split(",")}
        rows["GP oracle"] = oracle_metrics(GPConfig(kernel=kernel), "test", args.tasks, SEED)
        for name, m in rows.items():
            joint = m.get("joint_log_likelihood")
            budget = (
                f"{args.steps} steps x {args.meta_batch} tasks, {m['seconds']:.0f} s"
                if "seconds" in m
                else "exact"
            )
            print(
                f"| {kernel} | {name} | {m['log_likelihood']:.3f} ± "
                f"{m['log_likelihood_ci95']:.3f} | "
                + (f"{joint:.3f}" if joint is not None else "-")
                + f" | {m['mse']:.3f} | {m['coverage_90']:.3f} | {budget} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
