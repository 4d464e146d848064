"""The `metalearn` command end to end, as a user runs it: train, multirun, compare, eval, errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import metalearn as run_metalearn
from omniglot_fixture import make_omniglot_zips

pytestmark = pytest.mark.slow  # every test here starts metalearn processes

# Small but complete: every stage of a run, in seconds.
SINUSOID = ["train.steps=40", "eval.every=20", "eval.num_tasks=30", "eval.val_tasks=10"]
TINY_OMNIGLOT = [
    "data=omniglot",
    "data.n_way=3",
    "data.k_shot=1",
    "data.k_query=2",
    "data.image_size=12",
    "data.split_sizes=[12,4,4]",
    "data.download=false",
    "model.hidden=8",
    "train.steps=6",
    "train.meta_batch=2",
    "train.log_every=2",
    "eval.every=3",
    "eval.num_tasks=10",
    "eval.val_tasks=5",
    "eval.batch=5",
]


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    # 3 + 2 alphabets x 4 characters = 20 characters: a 12/4/4 random split.
    return make_omniglot_zips(tmp_path_factory.mktemp("omniglot"), 3, 2, 4)


def metalearn(args, env, cwd, check=True):
    return run_metalearn(args, env, cwd, check=check)


def assert_run_dir(run: Path, classification: bool):
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "best.npz").is_file()
    assert (run / "checkpoints" / "latest.npz").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "val", "test"}
    for r in records:
        assert {"step", "split", "loss", "elapsed_s"} <= set(r)
        assert ("accuracy" in r) == classification
    summary = json.loads((run / "summary.json").read_text())
    keys = "algo data model seed steps test best_val train_time_s steps_per_s num_params"
    assert set(keys.split()) | {"jax_version", "devices"} <= set(summary)
    test_keys = {"loss", "loss_ci95", "num_tasks"} | (
        {"accuracy", "accuracy_ci95"} if classification else set()
    )
    assert test_keys <= set(summary["test"])
    assert summary["status"] == "completed"
    return summary


def tree_digest(path: Path) -> dict:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory, env):
    cwd = tmp_path_factory.mktemp("work")
    run = cwd / "runs" / "sine"
    metalearn(["train", *SINUSOID, f"hydra.run.dir={run}"], env, cwd)
    return run


def test_sinusoid_run_dir_contract(sinusoid_run):
    summary = assert_run_dir(sinusoid_run, classification=False)
    assert summary["algo"] == "maml" and summary["data"] == "sinusoid"
    assert summary["steps"] == 40 and summary["test"]["num_tasks"] == 30


def test_default_run_dir_is_under_outputs(tmp_path, env):
    metalearn(["train", "train.steps=2", "eval.num_tasks=2", "eval.val_tasks=2"], env, tmp_path)
    runs = list((tmp_path / "outputs").glob("*/*_maml_sinusoid"))
    assert len(runs) == 1 and (runs[0] / "summary.json").is_file()


def test_time_budget_stops_validates_and_tests(tmp_path, env):
    """train.max_minutes=0.002 (0.12 s) runs out within the first steps of a million-step run:
    the run validates and saves at that step, tests the best checkpoint and says how far it got."""
    run = tmp_path / "budget"
    args = ["train.steps=1000000", "train.max_minutes=0.002", "eval.every=1000000"]
    metalearn(["train", *args, "eval.num_tasks=5", "eval.val_tasks=5", f"hydra.run.dir={run}"],
              env, tmp_path)  # fmt: skip
    summary = assert_run_dir(run, classification=False)
    assert 1 <= summary["steps"] < 1000 and summary["best_step"] == summary["steps"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "val"] == [summary["steps"]]
    assert records[-1]["split"] == "test"


def test_omniglot_multirun_compare_and_eval(tmp_path, env, omniglot_root):
    sweep = tmp_path / "sweep"
    metalearn(
        [
            "train",
            "-m",
            "algo=maml,protonet",
            *TINY_OMNIGLOT,
            f"data.root={omniglot_root}",
            f"hydra.sweep.dir={sweep}",
        ],
        env,
        tmp_path,
    )
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2
    summaries = [assert_run_dir(run, classification=True) for run in runs]
    assert {s["algo"] for s in summaries} == {"maml", "protonet"}

    csv_path = tmp_path / "table.csv"
    for run, summary in zip(runs, summaries):  # each test task's metrics, for paired tests
        tasks = json.loads((run / "test_tasks.json").read_text())
        assert tasks["test_tasks"] == summary["protocol"]["test_tasks"]
        accuracy = tasks["metrics"]["accuracy"]
        assert len(accuracy) == summary["test"]["num_tasks"]
        assert sum(accuracy) / len(accuracy) == pytest.approx(summary["test"]["accuracy"])
    assert summaries[0]["protocol"] == summaries[1]["protocol"]  # same data, model, budget
    assert all(0 <= s["test"]["ece"] <= 1 for s in summaries)  # calibration of the test tasks

    result = metalearn(["compare", str(sweep), "--csv", str(csv_path)], env, tmp_path)
    lines = result.stdout.strip().split("\n\n")[0].splitlines()
    assert len(lines) == 3 and "algo" in lines[0] and "test accuracy" in lines[0]
    # one algorithm against the other on the same test tasks, and no protocol difference
    assert "Paired test against" in result.stdout and "protocols differ" not in result.stdout
    assert re.search(r"_(maml|protonet)_omniglot: [+-][\d.e+-]+ ± [\d.e+-]+ points", result.stdout)
    assert {"maml", "protonet"} <= set(result.stdout.split())
    accuracies = [float(line.split()[2]) for line in lines[1:]]
    assert accuracies == sorted(accuracies, reverse=True), "sorted by the test metric"
    assert len(csv_path.read_text().strip().splitlines()) == 3

    maml_run = next(r for r, s in zip(runs, summaries) if s["algo"] == "maml")
    before = tree_digest(maml_run)
    result = metalearn(
        ["eval", str(maml_run), "eval.num_tasks=7", "eval.inner_steps=2"], env, tmp_path
    )
    out = json.loads(result.stdout)
    assert out["test"]["num_tasks"] == 7 and out["eval_inner_steps"] == 2
    assert 0.0 <= out["test"]["accuracy"] <= 1.0
    after = tree_digest(maml_run)
    assert {k: v for k, v in after.items() if not k.startswith("evals/")} == before
    assert any(k.startswith("evals/") for k in after)


def test_eval_reproduces_training_test_metric(sinusoid_run, env, tmp_path):
    summary = json.loads((sinusoid_run / "summary.json").read_text())
    out = json.loads(metalearn(["eval", str(sinusoid_run)], env, tmp_path).stdout)
    assert out["test"]["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-5)


def tree_state(path: Path) -> dict:
    """Every file's hash and every entry's inode and mtime: a file replaced with the same bytes,
    a folder made, or a temporary file made and deleted all show."""
    state = {}
    for p in sorted([path, *path.rglob("*")]):
        info = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        state[str(p.relative_to(path))] = (digest, info.st_ino, info.st_mtime_ns)
    return state


@contextlib.contextmanager
def read_only(path: Path):
    """`path` with every write permission removed (chmod a-w). Root writes through permissions,
    so as root the folder is also bind-mounted read-only over itself, where that is allowed."""
    entries = [path, *path.rglob("*")]
    for p in entries:
        p.chmod(p.stat().st_mode & ~0o222)
    mounted = False
    if os.geteuid() == 0:
        bind = ["mount", "--bind", "-o", "ro", str(path), str(path)]
        mounted = subprocess.run(bind, capture_output=True).returncode == 0
    try:
        yield
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)
        for p in entries:
            p.chmod(p.stat().st_mode | 0o200)


def test_eval_no_save_prints_and_writes_nothing_in_a_read_only_run(sinusoid_run, env, tmp_path):
    run = shutil.copytree(sinusoid_run, tmp_path / "received")
    summary = json.loads((run / "summary.json").read_text())
    with read_only(run):
        before = tree_state(run)
        result = metalearn(["eval", str(run), "--no-save"], env, tmp_path)
        after = tree_state(run)
    out = json.loads(result.stdout)
    assert out["split"] == "test" and out["test"]["num_tasks"] == 30
    assert out["test"]["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-5)
    assert after == before  # no result in evals/, no folder or temporary file made


def test_eval_help_names_no_save(capsys):
    from metalearn.cli import eval_command

    with pytest.raises(SystemExit) as exit_:
        eval_command(["--help"])
    assert exit_.value.code == 0
    assert "--no-save" in capsys.readouterr().out


def corrupt_copy(root: Path, dest: Path) -> Path:
    dest.mkdir()
    (dest / "images_background.zip").write_bytes(b"this is not a zip file")
    (dest / "images_evaluation.zip").write_bytes((root / "images_evaluation.zip").read_bytes())
    return dest


BAD_INPUTS = {
    "unknown group option": (["algo=nosuchalgo"], "nosuchalgo"),
    "n_way below 2": (TINY_OMNIGLOT + ["data.n_way=1"], "data.n_way=1"),
    "k_shot below 1": (["data.k_shot=0"], "data.k_shot=0"),
    "more ways than classes": (TINY_OMNIGLOT + ["data.n_way=5"], "data.n_way=5"),
    "negative learning rate": (["algo.inner_lr=-0.1"], "algo.inner_lr=-0.1"),
    "zero outer learning rate": (["train.outer_lr=0"], "train.outer_lr=0"),
    "zero steps": (["train.steps=0"], "train.steps=0"),
    "negative time budget": (["train.max_minutes=-1"], "train.max_minutes=-1"),
    "missing dataset": (
        TINY_OMNIGLOT + ["data.root=/nonexistent/omniglot"],
        "/nonexistent/omniglot",
    ),
    "unknown key": (["algo.no_such_key=1"], "no_such_key"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_paragraph(case, tmp_path, env, omniglot_root):
    args, named = BAD_INPUTS[case]
    if "data=omniglot" in args and not any(a.startswith("data.root") for a in args):
        args = args + [f"data.root={omniglot_root}"]
    result = metalearn(["train", *args], env, tmp_path, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert named in result.stderr, result.stderr
    # A failure found once the run had started is recorded as such; nothing else is left.
    for summary in (tmp_path / "outputs").rglob("summary.json"):
        assert json.loads(summary.read_text())["status"] == "failed"


def test_corrupt_dataset(tmp_path, env, omniglot_root):
    root = corrupt_copy(omniglot_root, tmp_path / "corrupt")
    result = metalearn(["train", *TINY_OMNIGLOT, f"data.root={root}"], env, tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "images_background.zip" in result.stderr


def test_occupied_run_dir_is_refused_and_untouched(sinusoid_run, env, tmp_path):
    before = tree_digest(sinusoid_run)
    result = metalearn(
        ["train", *SINUSOID, f"hydra.run.dir={sinusoid_run}"], env, tmp_path, check=False
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "already holds a run" in result.stderr
    assert tree_digest(sinusoid_run) == before


def test_bad_eval_override_shape(sinusoid_run, env, tmp_path):
    before = tree_digest(sinusoid_run)
    result = metalearn(["eval", str(sinusoid_run), "model.hidden=7"], env, tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "shape" in result.stderr, result.stderr
    assert tree_digest(sinusoid_run) == before
