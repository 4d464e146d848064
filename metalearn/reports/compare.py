"""`metalearn compare`: one row per run below the given paths, sorted by the test metric.

Runs are read by `metalearn.reports.runs` (never raising, never doing what a run's author
chose: a damaged run is listed, its status naming what could not be read) and tabulated by
`metalearn.reports.table`; --plot and --negative-transfer add `reports.plots` and
`reports.transfer`, imported only when asked for (they need matplotlib).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from metalearn.errors import ArgumentParser, fail, path_argument
from metalearn.reports.paired import paired_report, protocol_differences
from metalearn.reports.runs import error_reason, load_run
from metalearn.reports.seeds import merge_seeds
from metalearn.reports.table import (
    objective_of,
    printable,
    render_csv,
    render_markdown,
    render_text,
    table,
    table_order,
)
from metalearn.rundir import RunDirError, atomic_write_bytes, find_runs

OUTPUTS = {
    "csv": "the CSV table",
    "md": "the Markdown table",
    "plot": "the plots",
    "negative_transfer": "the negative-transfer report",
}


def fail_to_write(option: str, path, reason: str) -> None:
    fail(
        f"cannot write {OUTPUTS[option]} to {path} ({reason}). Give a path in a folder you can "
        "write to; missing folders are created."
    )


def output_problem(path: Path, folder: bool) -> str | None:
    """Why `path` (a file, or a folder with folder=True) cannot be written, else None.
    Nothing is created: the missing folders are made when the file is written."""
    if folder and path.exists() and not path.is_dir():
        return "it is a file, not a folder"
    if not folder and path.is_dir():
        return "it is a folder"
    existing = path if folder else path.parent
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is {'a file' if existing.exists() else 'a broken link'}, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def write_table(option: str, path: Path, text: str) -> None:
    try:
        atomic_write_bytes(path, text.encode())
    except OSError as error:
        fail_to_write(option, path, error_reason(error))


def run_paths(paths: list[str]) -> list[Path]:
    """The run directories below the paths, or a one-paragraph error."""
    for path in map(Path, paths):
        if path.exists() and not path.is_dir():
            fail(f"{path} is a file, not a run: give a run directory or a folder of runs.")
    try:
        return find_runs(paths)
    except RunDirError as error:
        fail(str(error))


def compare_command(argv: list[str]) -> None:
    description = __doc__.splitlines()[0]

    parser = ArgumentParser(prog="metalearn compare", description=description)
    parser.add_argument(
        "paths", nargs="+", type=path_argument, help="run directories or folders holding runs"
    )
    parser.add_argument(
        "--csv", type=path_argument, help="also write the table as CSV to this file"
    )
    parser.add_argument(
        "--md", type=path_argument, help="also write the table as Markdown to this file"
    )
    parser.add_argument(
        "--plot",
        metavar="DIR",
        type=path_argument,
        help="also write learning_curves.png and test_metrics.png to this folder",
    )
    parser.add_argument(
        "--negative-transfer",
        metavar="DIR",
        type=path_argument,
        help="multi-task runs: write negative_transfer.md and .png (each task's gain against "
        "conditioning=separate) to this folder",
    )
    parser.add_argument(
        "--each-run",
        action="store_true",
        help="one row per run: runs that differ only in seed are otherwise one row (their mean, "
        "the spread over seeds and each run's CI)",
    )
    args = parser.parse_args(argv)
    try:
        compare(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of the table went away (`| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def compare(args: argparse.Namespace) -> None:
    outputs = {k: Path(getattr(args, k)) for k in OUTPUTS if getattr(args, k) is not None}
    for option, path in outputs.items():  # before any work, so that a bad path fails fast
        reason = output_problem(path, folder=option in ("plot", "negative_transfer"))
        if reason:
            fail_to_write(option, path, reason)
    runs = [load_run(p) for p in run_paths(args.paths)]
    if not runs:
        fail(f"no runs found below {' '.join(args.paths)}.")
    objective = objective_of(runs)
    header, rows = table(runs if args.each_run else merge_seeds(runs, objective))
    print(render_text(header, rows))
    notes = protocol_differences(runs)
    if notes:
        print("\nThe runs' protocols differ (their numbers may not be comparable):")
        print("\n".join(printable(line) for line in notes))
    paired = paired_report(runs, table_order(runs, objective), objective)
    if paired:
        print("\n" + "\n".join(printable(line) for line in paired))
    if "csv" in outputs:
        write_table("csv", outputs["csv"], render_csv(header, rows))
    if "md" in outputs:
        write_table("md", outputs["md"], render_markdown(header, rows) + "\n")
    if "plot" in outputs:
        from metalearn.reports.plots import write_plots

        try:
            written = write_plots(runs, outputs["plot"])
        except OSError as error:
            fail_to_write("plot", outputs["plot"], error_reason(error))
        for path in written:
            print(f"wrote {path}")
    if "negative_transfer" in outputs:
        from metalearn.reports.transfer import write_report

        try:
            written = write_report(runs, outputs["negative_transfer"])
        except RunDirError as error:
            fail(str(error))
        except OSError as error:
            fail_to_write("negative_transfer", outputs["negative_transfer"], error_reason(error))
        print(written[0].read_text())
        for path in written:
            print(f"wrote {path}")
