"""`metalearn compare` on damaged and hostile run directories: never a traceback, never anything
the run's author chose; damaged runs are listed and marked, bad output paths fail fast."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metalearn.reports.compare import compare_command
from metalearn.reports.runs import load_run
from metalearn.rundir import find_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(
    path: Path,
    summary: dict | bytes | None = None,
    overrides: list[str] | str | None = None,
    metrics: bytes | None = None,
    config: str = "seed: 0\n",
) -> Path:
    """A run directory as `metalearn train` leaves it; bytes and str are written as they are."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(config)
    if isinstance(overrides, list):
        overrides = "".join(f"- {o}\n" for o in overrides)
    if overrides is not None:
        (path / ".hydra" / "overrides.yaml").write_text(overrides)
    if isinstance(summary, dict):
        summary = json.dumps(summary).encode()
    if summary is not None:
        (path / "summary.json").write_bytes(summary)
    if metrics is not None:
        (path / "metrics.jsonl").write_bytes(metrics)
    return path


def completed(accuracy, conditioning="film", per_task=None) -> dict:
    test = {"accuracy": accuracy, "accuracy_ci95": 0.01}
    if per_task is not None:
        test["per_task"] = per_task
        test["worst"] = {"task": "t1", "accuracy": 0.1}
    return {
        "status": "completed",
        "objective": "accuracy",
        "conditioning": conditioning,
        "steps": 20,
        "train_time_s": 1.5,
        "test": test,
    }


def good_metrics() -> bytes:
    lines = [{"step": s, "split": "val", "accuracy": 0.1 * s, "elapsed_s": s} for s in (1, 2)]
    return "".join(json.dumps(r) + "\n" for r in lines).encode()


def compare(argv, capsys) -> tuple[int, str, str]:
    """compare_command in process: (exit code, stdout, stderr)."""
    try:
        compare_command([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def rows_by_run(out: str) -> dict[str, str]:
    """The printed table's lines by run name, in table order (what follows it left out)."""
    rows = {}
    for line in out.splitlines()[1:]:
        if not line.strip() or line.startswith(("wrote ", "|")):
            break
        rows[line.split()[0]] = line
    return rows


def csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


# ------------------------------------------------------------ 1. corrupt files metalearn wrote

DAMAGED_SUMMARIES = {
    "invalid_json": (b'{"status": "compl', "summary.json is not valid JSON"),
    "zero_bytes": (b"", "summary.json is empty"),
    "not_an_object": (b"[1, 2]", "summary.json is not a JSON object"),
    "test_a_string": ({"status": "completed", "test": "x"}, "test is not an object"),
    "steps_a_list": ({**completed(0.5), "steps": [1]}, "steps is not a whole number"),
    "test_values_strings": (
        {"status": "completed", "test": {"accuracy": "x", "accuracy_ci95": "y"}},
        "test.accuracy is not a number",
    ),
    "per_task_strings": (
        completed(0.4, per_task={"t1": {"accuracy": "x"}, "t2": "y"}),
        "test.per_task.t1.accuracy is not a number",
    ),
}
DAMAGED_OVERRIDES = {
    "overrides_invalid_yaml": ("- [unclosed\n  : :", ".hydra/overrides.yaml is not valid YAML"),
    "overrides_not_a_list": ("algo: maml\n", ".hydra/overrides.yaml is not a list"),
    "overrides_not_strings": ("- seed=3\n- 7\n- [a]\n", "holds items that are not strings"),
}


def test_damaged_runs_are_listed_and_marked_and_the_rest_shown(tmp_path, capsys):
    root = tmp_path / "sweep"
    per_task = {"t1": {"accuracy": 0.6}, "t2": {"accuracy": 0.8}}
    write_run(
        root / "good",
        completed(0.9, per_task=per_task),
        ["conditioning=film", "seed=0"],
        good_metrics(),  # (a damaged config is marked too: tests/test_cli_messages.py)
    )
    write_run(
        root / "baseline",
        completed(0.7, "separate", per_task={"t1": {"accuracy": 0.5}, "t2": {"accuracy": 0.9}}),
        ["conditioning=separate", "seed=0"],
        # garbage lines, bytes that are not UTF-8, records of the wrong shape or types
        good_metrics()
        + b'garbage\n\xff\xfe\x00\n[1, 2]\n"text"\n{"split": "val", "accuracy": 0.5}\n'
        + b'{"step": "x", "split": "val", "accuracy": 0.5}\n'
        + b'{"step": 3, "split": "val", "accuracy": "high", "elapsed_s": "late"}\n'
        + b'{"step": 4, "split": "train", "accuracy": 0.5, "elapsed_s": [1]}\n'
        + b'{"step": 5, "split": "val", "accuracy": 1'
        + b"0" * 5000
        + b"}\n"
        + b"[" * 100_000
        + b"\n",
    )
    for name, (summary, _) in DAMAGED_SUMMARIES.items():
        write_run(root / name, summary, [f"seed={name}"], b"\xff not metrics")
    for name, (overrides, _) in DAMAGED_OVERRIDES.items():
        write_run(root / name, {"status": "completed"}, overrides)
    out_dir = tmp_path / "out"

    code, out, err = compare(
        [
            root,
            "--csv",
            out_dir / "t.csv",
            "--md",
            out_dir / "t.md",
            "--plot",
            out_dir / "plots",
            "--negative-transfer",
            out_dir / "nt",
        ],
        capsys,
    )
    assert code == 0, err
    assert "Traceback" not in out + err
    rows = rows_by_run(out)
    assert set(rows) == set(DAMAGED_SUMMARIES) | set(DAMAGED_OVERRIDES) | {"good", "baseline"}
    assert list(rows)[:2] == ["good", "baseline"]
    cells = csv_rows(out_dir / "t.csv")
    good = cells["good"]
    assert (good["test accuracy"], good["t1"], good["steps"], good["status"]) == (
        "90",
        "60",
        "20",
        "completed",
    )
    for name, (_, reason) in {**DAMAGED_SUMMARIES, **DAMAGED_OVERRIDES}.items():
        assert "unreadable: " in rows[name] and reason in rows[name], rows[name]
        assert reason in cells[name]["status"]
    assert "summary.json is not valid JSON" in (out_dir / "t.md").read_text()
    for png in ("plots/learning_curves.png", "plots/test_metrics.png", "nt/negative_transfer.png"):
        assert (out_dir / png).read_bytes().startswith(PNG_MAGIC)
    assert "| t1 | +10.00 |" in (out_dir / "nt" / "negative_transfer.md").read_text()


# ------------------------------------------------ 2. YAML is plain data, never interpolated


def test_overrides_interpolation_is_never_resolved(tmp_path, capsys, monkeypatch):
    secret = "s3cr3t-token-4711"
    monkeypatch.setenv("SECRET_X", secret)
    root = tmp_path / "received"
    # No overrides in the summary: compare reads .hydra/overrides.yaml.
    write_run(
        root / "a",
        {"status": "completed", "test": {"accuracy": 0.5}},
        ["algo.inner_lr=${oc.env:SECRET_X}", "seed=${oc.env:SECRET_X,0}"],
        good_metrics(),
        config="algo:\n  inner_lr: ${oc.env:SECRET_X}\n",
    )
    write_run(root / "b", {"status": "completed", "test": {"accuracy": 0.6}}, ["algo.inner_lr=1"])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = compare(
        [root, "--csv", out_dir / "t.csv", "--md", out_dir / "t.md", "--plot", out_dir / "p"],
        capsys,
    )
    assert code == 0, err
    assert secret not in out + err
    assert "oc.env:SECRET_X" in out, "the override is shown, as a literal"
    written = [p for p in out_dir.rglob("*") if p.is_file()]
    assert len(written) == 4
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in json.dumps(load_run(root / "a"))


# ---------------------------------------------------------- 3. NaN, inf or missing: ranked last

ACCURACIES = {"nan": math.nan, "inf": math.inf, "minus_inf": -math.inf, "missing": None}


@pytest.mark.parametrize("objective", ["accuracy", "loss"])
def test_non_finite_metric_is_ranked_last_and_marked(tmp_path, capsys, objective):
    values = {"low": 0.3, **ACCURACIES, "high": 0.9}
    for name, value in values.items():
        test = {} if value is None else {objective: value, f"{objective}_ci95": 0.01}
        summary = {"status": "completed", "objective": objective, "test": test}
        write_run(tmp_path / name, summary, [f"seed={name}"])
    (tmp_path / "out").mkdir()
    # --each-run: the runs differ only in seed, which compare would otherwise show as one row
    code, out, err = compare([tmp_path, "--csv", tmp_path / "out" / "t.csv", "--each-run"], capsys)
    assert code == 0, err
    rows = rows_by_run(out)
    finite = ["high", "low"] if objective == "accuracy" else ["low", "high"]
    assert list(rows)[:2] == finite and set(list(rows)[2:]) == set(ACCURACIES)
    assert f"{objective} is nan" in rows["nan"]
    assert csv_rows(tmp_path / "out" / "t.csv")["nan"][f"test {objective}"] == "nan"
    assert f"{objective} is inf" in rows["inf"] and f"{objective} is -inf" in rows["minus_inf"]
    assert f"no test {objective}" in rows["missing"]
    assert "is nan" not in rows["high"] + rows["low"]

    from metalearn.reports.plots import metrics_bar_figure

    runs = [load_run(p) for p in find_runs([str(tmp_path)])]
    assert metrics_bar_figure(runs)[1] == 2, "only finite metrics get a bar"


# ------------------------------------------------------------------------ 4. output paths


def unwritable_cases(tmp_path: Path) -> dict[str, tuple[list, Path]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    (tmp_path / "a_folder").mkdir()
    cases = {
        "csv below a file": (["--csv", a_file / "sub" / "t.csv"], a_file / "sub" / "t.csv"),
        "md is a folder": (["--md", tmp_path / "a_folder"], tmp_path / "a_folder"),
        "plot is a file": (["--plot", a_file], a_file),
        "negative-transfer is a file": (["--negative-transfer", a_file], a_file),
    }
    if os.geteuid() != 0:  # root writes into read-only folders
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        cases["read-only folder"] = (["--csv", read_only / "t.csv"], read_only / "t.csv")
    return cases


def test_output_paths_are_created_or_refused_before_any_work(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root / "a", completed(0.5), ["seed=1"])
    for case, (option, named) in unwritable_cases(tmp_path).items():
        code, out, err = compare([root, *option], capsys)
        assert code == 2, case
        assert out == "", f"{case}: failed before printing the table"
        assert err.startswith("metalearn: error: cannot write ") and str(named) in err, err
        assert err.count("\n") == 1 and "Traceback" not in err, err

    csv_path, md_path = tmp_path / "new" / "deep" / "t.csv", tmp_path / "new" / "t.md"
    code, out, err = compare([root, "--csv", csv_path, "--md", md_path], capsys)
    assert code == 0, err
    assert csv_path.read_text().splitlines()[1].startswith("a,")
    assert md_path.read_text().startswith("| run |")
    assert sorted(p.name for p in (tmp_path / "new").rglob("*")) == ["deep", "t.csv", "t.md"]


# --------------------------------------------------------------------- 5. other hostile input


@pytest.mark.slow
def test_hostile_run_directories_end_in_no_traceback(tmp_path, capsys):
    outside = tmp_path / "readers_own.json"
    outside.write_text(json.dumps({"status": "LEAKED-FROM-THE-READER"}))
    root = tmp_path / "received"
    write_run(root / "good", completed(0.8), ["algo=maml"], good_metrics())
    # A label matplotlib would parse as (invalid) mathtext, escape sequences for the terminal.
    write_run(
        root / "escapes",
        {"status": "failed", "error": "boom\x1b]52;c;ZWNobyBoaQ==\x07\x1b[2J"},
        ["algo=$\\foo{$", "seed=\u202eevil"],
        good_metrics(),
    )
    write_run(root / "per_task_list", {"status": "completed", "test": {"per_task": [1, 2]}})
    write_run(root / "worst_list", {"status": "completed", "test": {"worst": ["t1"]}})
    write_run(root / "fifo", overrides=["seed=3"])
    os.mkfifo(root / "fifo" / "summary.json")  # reading it would block forever
    os.mkfifo(root / "fifo" / "metrics.jsonl")
    write_run(root / "link_out", overrides=["seed=4"])
    (root / "link_out" / "summary.json").symlink_to(outside)
    write_run(root / "summary_is_a_folder", overrides=["seed=5"])
    (root / "summary_is_a_folder" / "summary.json").mkdir()
    names = ["a", *(f"b{i}" for i in range(1, 9))]  # 9^9 strings once expanded
    aliases = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    aliases += [f"{n}: &{n} [{', '.join([f'*{prev}'] * 9)}]" for prev, n in zip(names, names[1:])]
    write_run(root / "yaml_aliases", completed(0.6), "\n".join(aliases) + "\n")
    deep = b'{"test": ' * 100_000
    write_run(root / "deeply_nested", deep, ["seed=6"], b"[" * 100_000)
    write_run(root / "digits", b'{"steps": ' + b"9" * 5000 + b"}", ["seed=7"])

    out_dir = tmp_path / "out"
    args = [str(root), "--csv", str(out_dir / "t.csv"), "--plot", str(out_dir / "plots")]
    result = subprocess.run(
        [sys.executable, "-m", "metalearn", "compare", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    rows = rows_by_run(result.stdout)
    assert len(rows) == 10 and list(rows)[0] == "good"
    assert "\x1b" not in result.stdout and "\u202e" not in result.stdout
    assert "\x1b" not in (out_dir / "t.csv").read_text()
    assert "failed: boom\\x1b]52;" in rows["escapes"]
    assert "LEAKED" not in result.stdout and "links outside the run" in rows["link_out"]
    assert (
        "not a regular file" in rows["fifo"] and "not a regular file" in rows["summary_is_a_folder"]
    )
    assert "uses YAML aliases" in rows["yaml_aliases"]
    assert "test.per_task is not an object" in rows["per_task_list"]
    assert "test.worst is not an object" in rows["worst_list"]
    assert "not valid JSON" in rows["deeply_nested"] and "not valid JSON" in rows["digits"]
    assert (out_dir / "plots" / "learning_curves.png").read_bytes().startswith(PNG_MAGIC)

    # A reader that stops early (`metalearn compare ... | head -1`), with more than a pipe holds.
    wide = tmp_path / "wide"
    for i in range(3):
        write_run(wide / str(i), completed(0.5), [f"note={str(i) * 50_000}"])
    with subprocess.Popen(
        [sys.executable, "-m", "metalearn", "compare", str(wide)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    ) as process:
        assert process.stdout.readline().startswith(b"run ")
        process.stdout.close()
        assert b"Traceback" not in process.stderr.read()
        assert process.wait(timeout=60) == 1

    code, out, err = compare([outside], capsys)  # a PATH that is a file, not a run
    assert (code, out) == (2, "")
    assert err == (
        f"metalearn: error: {outside} is a file, not a run: give a run directory or a "
        "folder of runs.\n"
    )
