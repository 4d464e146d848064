"""Train the reference setups and write a results table against the papers' numbers.

    python scripts/reproduce.py sinusoid                    # MAML vs pre-trained, + fit plot
    python scripts/reproduce.py omniglot --maml-steps 3000 --protonet-steps 5000

Each run is an ordinary `metalearn train` run under outputs/reproduce/<suite>/<name> (a rerun
picks a new timestamped folder, never overwriting), so `metalearn compare` and `metalearn eval`
work on them too. The table goes to docs/results_<suite>.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# name -> (overrides, what the paper reports, the metric)
SUITES = {
    "sinusoid": {
        "maml": (["algo=maml", "data=sinusoid"], "MAML paper Fig. 2 (qualitative)", "loss"),
        "pretrained": (
            ["algo=finetune", "data=sinusoid"],
            "MAML paper Fig. 2 (qualitative)",
            "loss",
        ),
    },
    "omniglot": {
        "maml": (["experiment=maml_omniglot_5w1s"], "98.7 ± 0.4 (MAML paper)", "accuracy"),
        "protonet": (["experiment=protonet_omniglot_5w1s"], "98.8 (ProtoNets paper)", "accuracy"),
    },
}


def run(name: str, overrides: list[str], out: Path) -> Path:
    run_dir = out / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
    command = [sys.executable, "-m", "metalearn", "train", *overrides, f"hydra.run.dir={run_dir}"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return run_dir


def row(name: str, run_dir: Path, paper: str, metric: str) -> str:
    s = json.loads((run_dir / "summary.json").read_text())
    test = s["test"]
    scale = 100 if metric == "accuracy" else 1
    value = f"{test[metric] * scale:.4g} ± {test[metric + '_ci95'] * scale:.2g}"
    minutes = s["total_time_s"] / 60
    return (
        f"| {name} | {value} | {paper} | {s['steps']} | {s['steps_per_s']:.3g} | "
        f"{minutes:.1f} | {test['num_tasks']} | `{run_dir}` |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--out", default="outputs/reproduce")
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--maml-steps", type=int, help="train.steps for the maml run")
    parser.add_argument("--protonet-steps", type=int, help="train.steps for the protonet run")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    args = parser.parse_args()

    out = Path(args.out) / args.suite
    rows, runs = [], {}
    for name, (overrides, paper, metric) in SUITES[args.suite].items():
        steps = getattr(args, f"{name}_steps", None)
        extra = [f"train.steps={steps}"] if steps else []
        runs[name] = run(name, overrides + extra + args.extra, out)
        rows.append(row(name, runs[name], paper, metric))

    header = [
        f"| run | test {'accuracy (%)' if args.suite == 'omniglot' else 'MSE'} ± 95% CI | paper |"
        " steps | steps/s | wall min | test tasks | run dir |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table = "\n".join(header + rows) + "\n"
    Path(args.docs).mkdir(exist_ok=True)
    (Path(args.docs) / f"results_{args.suite}.md").write_text(table)
    print(table)
    if args.suite == "sinusoid":
        plot = Path(args.docs) / "sinusoid_fits.png"
        subprocess.run(
            [sys.executable, str(Path(__file__).parent / "plot_sinusoid.py"),
             str(runs["maml"]), str(runs["pretrained"]), "--out", str(plot)],
            check=True,
        )  # fmt: skip


if __name__ == "__main__":
    main()
