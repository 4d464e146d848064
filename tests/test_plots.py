"""`metalearn compare --plot DIR` on hand-written run directories (no training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from metalearn.reports.plots import (
    learning_curves_figure,
    metrics_bar_figure,
    plot_learning_curves,
    plot_test_metrics,
    run_labels,
)
from metalearn.reports.runs import load_run
from metalearn.reports.table import table
from metalearn.rundir import find_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(path: Path, overrides: list[str], records: list[dict], summary: dict) -> Path:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if records:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        (path / "metrics.jsonl").write_text(lines + '{"step": 99, "spl')  # a line cut by a kill
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def records(val_accuracies: list[float], clock_restarts_at: int | None = None) -> list[dict]:
    out, elapsed = [], 0.0
    for i, accuracy in enumerate(val_accuracies):
        step = 10 * (i + 1)
        if clock_restarts_at == step:
            elapsed = 0.0  # a resumed run's clock starts again
        for s in range(step - 9, step + 1, 3):
            elapsed += 1.0
            out.append(
                {
                    "step": s,
                    "split": "train",
                    "loss": 1.0 / s,
                    "accuracy": 0.5,
                    "elapsed_s": elapsed,
                }
            )
        elapsed += 0.5
        out.append(
            {
                "step": step,
                "split": "val",
                "loss": 1 - accuracy,
                "accuracy": accuracy,
                "elapsed_s": elapsed,
            }
        )
    out.append(
        {"step": 20, "split": "test", "loss": 0.1, "accuracy": 0.9, "elapsed_s": elapsed + 1}
    )
    return out


def summary(accuracy: float, ci: float, steps: int = 30) -> dict:
    return {
        "algo": "maml",
        "data": "omniglot",
        "objective": "accuracy",
        "steps": steps,
        "status": "completed",
        "test": {"accuracy": accuracy, "accuracy_ci95": ci, "loss": 1 - accuracy, "loss_ci95": ci},
        "train_time_s": 1.5,
    }


@pytest.fixture
def runs_root(tmp_path) -> Path:
    root = tmp_path / "sweep"
    write_run(
        root / "0_maml", ["algo=maml", "seed=0"], records([0.5, 0.6, 0.7]), summary(0.71, 0.02)
    )
    write_run(
        root / "1_protonet",
        ["algo=protonet", "seed=0"],
        records([0.6, 0.8, 0.9], clock_restarts_at=20),
        summary(0.93, 0.01),
    )
    failed = {
        "status": "failed",
        "error": "Omniglot was not found",
        "overrides": ["algo=reptile", "seed=0"],
    }
    write_run(root / "2_reptile", ["algo=reptile", "seed=0"], [], failed)
    return root


def load(root: Path) -> list[dict]:
    return [load_run(p) for p in find_runs([str(root)])]


def test_compare_plot_writes_both_pngs(runs_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "METALEARN_DATA"}
    out = tmp_path / "plots" / "nested"  # created by the command
    result = subprocess.run(
        [sys.executable, "-m", "metalearn", "compare", str(runs_root), "--plot", str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    table_lines = result.stdout.split("\n\n")[0].splitlines()  # the table, before its notes
    assert len(table_lines) == 4 and "algo" in table_lines[0]
    assert [line.split()[0] for line in table_lines[1:]] == ["1_protonet", "0_maml", "2_reptile"]
    assert "failed: Omniglot was not found" in table_lines[3]
    for name in ("learning_curves.png", "test_metrics.png"):
        path = out / name
        assert f"wrote {path}" in lines
        assert path.read_bytes().startswith(PNG_MAGIC)
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
            assert image.format == "PNG" and 600 <= width <= 3000 and 150 <= height <= 2000
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "no temp files left"


def test_learning_curves_one_line_per_run(runs_root, tmp_path):
    runs = load(runs_root)
    fig, curves = learning_curves_figure(runs)
    assert curves == 2  # the failed run has no records
    val_step, val_time, train = fig.axes[:3]
    assert len(val_step.get_lines()) == 2 and len(val_time.get_lines()) == 2
    assert len(train.get_lines()) == 2
    protonet = next(line for line in val_step.get_lines() if "protonet" in line.get_label())
    assert list(protonet.get_xdata()) == [10, 20, 30]
    assert list(protonet.get_ydata()) == pytest.approx([60.0, 80.0, 90.0])  # accuracy in %
    # The resumed run's clock restarted; the wall-time axis keeps running forward.
    times = {line.get_label(): list(line.get_xdata()) for line in val_time.get_lines()}
    assert times["algo=maml"] == pytest.approx([4.5, 9.0, 13.5])
    assert times["algo=protonet"] == pytest.approx([4.5, 9.0, 13.5])
    legend = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert legend == ["algo=maml", "algo=protonet"]  # seed=0 is the same for all runs

    assert plot_learning_curves(runs, tmp_path / "curves.png") == 2
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)


def test_test_metrics_skips_failed_runs_and_sorts_as_the_table(runs_root, tmp_path):
    runs = load(runs_root)
    fig, bars = metrics_bar_figure(runs)
    assert bars == 2
    ax = fig.axes[0]
    assert len(ax.patches) == 2
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert names == ["algo=protonet", "algo=maml"]  # best first, as the table sorts
    widths = [p.get_width() for p in ax.patches]
    assert widths == pytest.approx([93.0, 71.0])
    _, rows = table(runs)
    assert [row[0] for row in rows[:2]] == ["1_protonet", "0_maml"]

    assert plot_test_metrics(runs, tmp_path / "bars.png") == 2
    with Image.open(tmp_path / "bars.png") as image:
        assert image.format == "PNG"


def test_regression_runs_plot_the_loss(tmp_path):
    for i, algo in enumerate(["maml", "finetune", "reptile"]):
        recs = [
            {"step": s, "split": "val", "loss": 1.0 / (s + i), "elapsed_s": float(s)}
            for s in (5, 10)
        ]
        test = {"loss": 0.1 * (i + 1), "loss_ci95": 0.01}
        write_run(
            tmp_path / f"{i}_{algo}", [f"algo={algo}"], recs, {"objective": "loss", "test": test}
        )
    runs = load(tmp_path)
    fig, curves = learning_curves_figure(runs)
    assert curves == 3 and "loss" in fig.axes[0].get_title()
    assert fig.axes[0].get_yscale() == "log"
    fig, bars = metrics_bar_figure(runs)
    assert bars == 3
    # lower loss is better: the smallest bar is at the top
    assert [p.get_width() for p in fig.axes[0].patches] == pytest.approx([0.1, 0.2, 0.3])


def test_labels_fall_back_to_folder_names(tmp_path):
    runs = [{"path": str(tmp_path / name), "overrides": ["seed=1"]} for name in ("a", "b")]
    assert run_labels(runs) == ["a", "b"]
    runs = [
        {"path": str(tmp_path / "x"), "overrides": ["algo=maml"]},
        {"path": str(tmp_path / "y"), "overrides": ["algo=maml"]},
        {"path": str(tmp_path / "z"), "overrides": ["algo=protonet"]},
    ]
    # differing keys are computed over all runs; equal labels get the folder name
    assert run_labels(runs) == ["algo=maml (x)", "algo=maml (y)", "algo=protonet"]


def test_compare_without_plot_does_not_import_matplotlib(runs_root, tmp_path):
    code = (
        "import sys; from metalearn.reports.compare import compare_command; "
        f"compare_command([{str(runs_root)!r}]); "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
