"""PNG plots for `metalearn compare --plot DIR`: learning curves and the test metrics.

The functions take the run dicts `metalearn.reports.runs.load_run` returns. matplotlib is
imported inside them (with the Agg canvas, never pyplot), so `metalearn compare` without --plot
does not import it. Every PNG is rendered to memory and written atomically.

What a damaged run cannot give is left out rather than raised: a metrics.jsonl line that is not
a JSON object, a record whose step or metric is not a finite number, a test metric that is NaN.
Labels are drawn as plain text (a `$` in an override would otherwise be parsed as mathtext).
"""

from __future__ import annotations

import io
from pathlib import Path

from metalearn.reports.runs import finite, load_metrics
from metalearn.reports.table import differing_overrides, objective_of, printable, table_order
from metalearn.rundir import atomic_write_bytes

LEARNING_CURVES = "learning_curves.png"
TEST_METRICS = "test_metrics.png"
# Agg refuses images of 2^16 pixels or more on a side (at 110 dpi, about 595 inches).
MAX_INCHES = 500.0


def plain_text(text) -> str:
    """`text` as matplotlib draws it literally: printable, with `$` escaped (no mathtext)."""
    return printable(text).replace("$", r"\$")


def run_labels(runs: list[dict]) -> list[str]:
    """Legend labels: the overrides that differ between runs (as in the table), else the folder."""
    maps, differing = differing_overrides(runs)
    labels = []
    for run, overrides in zip(runs, maps):
        label = ", ".join(f"{k}={overrides[k]}" for k in differing if k in overrides)
        labels.append(label or Path(run["path"]).name)
    # Runs with the same overrides (e.g. a rerun) are told apart by their folder names.
    return [
        plain_text(
            f"{label} ({Path(run['path']).name})"
            if labels.count(label) > 1 and label != Path(run["path"]).name
            else label
        )
        for label, run in zip(labels, runs)
    ]


def curve_metric(runs: list[dict]) -> str:
    """The runs' `objective`; without one, accuracy if the records have it, else loss."""
    if any("objective" in r for r in runs):
        return objective_of(runs)
    has_accuracy = any("accuracy" in rec for r in runs for rec in load_metrics(r))
    return "accuracy" if has_accuracy else "loss"


def _curve(records: list[dict], split: str, metric: str) -> tuple[list, list, list]:
    """Steps, cumulative wall time and metric values of one split, in step order; a record whose
    step or metric is not a finite number is skipped, an elapsed_s that is not one ignored.

    A resumed run restarts its clock at 0: after a drop in elapsed_s, the time counts on from
    the last record before the drop.
    """
    offset, last_raw, last, timed = 0.0, None, 0.0, []
    for rec in records:
        elapsed = rec.get("elapsed_s") if finite(rec.get("elapsed_s")) else None
        if elapsed is not None:
            if last_raw is not None and elapsed < last_raw:
                offset = last
            last_raw, last = elapsed, elapsed + offset
            elapsed = last
        timed.append((rec, elapsed))
    points = sorted(
        (rec["step"], elapsed, rec[metric])
        for rec, elapsed in timed
        if rec.get("split") == split and finite(rec.get(metric)) and finite(rec.get("step"))
    )
    if not points:
        return [], [], []
    steps, times, values = map(list, zip(*points))
    return steps, times, values


def learning_curves_figure(runs: list[dict]):
    """A figure with panels val metric vs step, val metric vs wall time, train metric vs step.

    Returns (figure, curves): curves is the number of runs with a validation curve. The two
    validation panels hold one Line2D per such run; the training panel one per run with training
    records, plus a running mean when a run has 120 or more of them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = curve_metric(runs)
    labels = run_labels(runs)
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_step, ax_time, ax_train = fig.subplots(1, 3)
    scale, unit = (100.0, " (%)") if metric == "accuracy" else (1.0, "")
    colors = [f"C{i % 10}" for i in range(len(runs))]
    curves, handles = 0, []
    for run, label, color in zip(runs, labels, colors):
        records = load_metrics(run)
        steps, times, values = _curve(records, "val", metric)
        if steps:
            values = [v * scale for v in values]
            style = {"color": color, "marker": "o", "markersize": 3, "linewidth": 1.5}
            (line,) = ax_step.plot(steps, values, label=label, **style)
            timed = [(t, v) for t, v in zip(times, values) if t is not None]
            if timed:
                ax_time.plot(*zip(*timed), label=label, **style)
            handles.append(line)
            curves += 1
        steps, _, values = _curve(records, "train", metric)
        if steps:
            values = [v * scale for v in values]
            window = len(values) // 40
            if window < 3:
                ax_train.plot(steps, values, color=color, linewidth=1)
            else:  # the raw records faint, and a running mean over `window` records on top
                ax_train.plot(steps, values, color=color, linewidth=0.8, alpha=0.25)
                ax_train.plot(steps[window - 1 :], _running_mean(values, window), color=color)

    ax_step.set(title=f"validation {metric}", xlabel="step", ylabel=f"val {metric}{unit}")
    ax_time.set(title=f"validation {metric} vs wall time", xlabel="elapsed (s)")
    ax_train.set(title=f"training {metric}", xlabel="step", ylabel=f"train {metric}{unit}")
    for ax in (ax_step, ax_time, ax_train):
        ax.grid(alpha=0.3)
        if metric == "loss" and ax.get_lines() and _all_positive(ax):
            ax.set_yscale("log")
        if not ax.get_lines():
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
    if handles:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncol=min(len(handles), 3),
            fontsize="small",
            frameon=False,
        )
    return fig, curves


def metrics_bar_figure(runs: list[dict]):
    """A horizontal bar per run with a test metric, best at the top, 95% CI as error bars.

    Returns (figure, bars). Runs without a test metric (failed, running) are left out.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    objective = objective_of(runs)
    labels = run_labels(runs)
    scale, unit = (100.0, " (%)") if objective == "accuracy" else (1.0, "")
    bars = []
    for i in table_order(runs, objective):
        test = runs[i].get("test") or {}
        if not finite(test.get(objective)):
            continue
        ci = test.get(f"{objective}_ci95")
        ci = ci if finite(ci) and ci > 0 else 0.0
        bars.append((labels[i], test[objective] * scale, ci * scale, f"C{i % 10}"))

    height = min(1.2 + 0.45 * max(len(bars), 1), MAX_INCHES)
    fig = Figure(figsize=(8, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if bars:
        names, values, cis, colors = zip(*bars)
        positions = range(len(bars))
        ax.barh(positions, values, xerr=cis, color=colors, alpha=0.8, capsize=4)
        ax.set_yticks(list(positions), names, fontsize="small")
        ax.invert_yaxis()  # the best run at the top, as in the table
        for y, value, ci in zip(positions, values, cis):
            ax.text(value + ci, y, f"  {value:.4g} ± {ci:.2g}", va="center", fontsize="small")
        ax.margins(x=0.2)
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no run has a test metric", ha="center", va="center")
    ax.set_xlabel(f"test {objective}{unit}, 95% CI")
    ax.set_title(f"test {objective}")
    ax.grid(axis="x", alpha=0.3)
    return fig, len(bars)


def _running_mean(values: list[float], window: int) -> list[float]:
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[i] - sums[i - window]) / window for i in range(window, len(sums))]


def _all_positive(ax) -> bool:
    return all(min(line.get_ydata(), default=1.0) > 0 for line in ax.get_lines())


def save_png(fig, path: Path) -> None:
    """Render a figure to PNG in memory and write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(Path(path), buffer.getvalue())


def plot_learning_curves(runs: list[dict], path) -> int:
    """Write the learning curves to `path`; returns the number of validation curves drawn."""
    fig, curves = learning_curves_figure(runs)
    save_png(fig, path)
    return curves


def plot_test_metrics(runs: list[dict], path) -> int:
    """Write the test-metric bar chart to `path`; returns the number of bars drawn."""
    fig, bars = metrics_bar_figure(runs)
    save_png(fig, path)
    return bars


def write_plots(runs: list[dict], folder: Path) -> list[Path]:
    """Both plots in `folder` (created if needed); returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plot_learning_curves(runs, folder / LEARNING_CURVES)
    plot_test_metrics(runs, folder / TEST_METRICS)
    return [folder / LEARNING_CURVES, folder / TEST_METRICS]
