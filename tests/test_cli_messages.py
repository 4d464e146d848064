"""What the commands say about input they cannot use (issue 28): settings that would do nothing,
empty paths, unknown flags, runs that cannot be paired, damaged run files, the user's module.

Mostly in-process (metalearn's `main` with argv, SystemExit and stderr captured): the run
directories are written by hand as `metalearn train` leaves them, since none of these checks
needs a checkpoint. One slow test trains a run with the console script, as a user would.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from helpers import compose_config

from metalearn import cli
from metalearn.checks import ConfigError
from metalearn.errors import ArgumentParser, unknown_options
from metalearn.eval_overrides import check_eval_overrides
from metalearn.protocol import TEST_TASKS_FILE
from metalearn.reports.compare import compare_command
from metalearn.reports.runs import load_run
from metalearn.rundir import RunDir, RunDirError, find_runs


def run_main(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`metalearn ARGV` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["metalearn", *argv])
    code = 0
    try:
        cli.main()
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_paragraph(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("metalearn: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "usage:" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def write_config_run(path: Path, overrides: list[str], tmp_path: Path, monkeypatch) -> Path:
    """A run directory's .hydra/ as `metalearn train <overrides>` writes it (no checkpoint)."""
    cfg = compose_config(overrides, tmp_path, monkeypatch)
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(json.dumps(asdict(cfg)))  # JSON is YAML
    (path / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))
    return path


@pytest.fixture(scope="module")
def sine_run(tmp_path_factory) -> Path:
    """A sinusoid run's directory, shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        return write_config_run(folder / "sine", ["data=sinusoid"], folder, monkeypatch)


# ------------------------------------------- eval: settings that only training reads are refused

TRAINING_ONLY = {
    "train.steps=5": None,
    "train.outer_lr=0.1": None,
    "train.max_minutes=1": None,
    "train.meta_batch=2": None,
    "train.k_shot=3": "data.k_shot",
    "train.task_chunk=1": "eval.batch",
    "eval.every=3": None,
    "eval.val_tasks=7": "eval.num_tasks",
    "seed=4": "eval.seed",
    "algo.init_from=/elsewhere": None,
    "algo.first_order=true": None,  # declared by MAML's schema (training_only)
    "algo.remat=true": None,
}
USED_BY_EVAL = ["eval.num_tasks=5", "data.k_shot=3", "eval.inner_steps=2", "algo.inner_lr=0.1"]


@pytest.mark.parametrize("override", TRAINING_ONLY)
def test_eval_refuses_a_setting_only_training_reads(override, sine_run, capsys, monkeypatch):
    key = override.split("=")[0]
    code, out, err = run_main(["eval", str(sine_run), override], capsys, monkeypatch)
    assert_one_paragraph(code, err, override, f"{key} only affects training")
    instead = TRAINING_ONLY[override]
    assert (f"The setting eval reads for this is {instead}" in err) == (instead is not None)
    assert not (sine_run / "evals").exists()


def test_eval_accepts_the_settings_it_reads(sine_run):
    check_eval_overrides(RunDir(sine_run), [*USED_BY_EVAL, "train.precision=bf16"])


def test_data_settings_declared_training_only_are_refused(tmp_path, monkeypatch):
    run = write_config_run(tmp_path / "omni", ["data=omniglot"], tmp_path, monkeypatch)
    for override in ("data.augment=flip", "data.rotations=true"):
        with pytest.raises(ConfigError, match=f"{override.split('=')[0]} only affects training"):
            check_eval_overrides(RunDir(run), [override])
    check_eval_overrides(RunDir(run), ["data.n_way=3", "data.episodes=within_alphabet"])


def test_eval_takes_overrides_after_options(sine_run, capsys, monkeypatch):
    seen = {}

    def evaluate_run(run_dir, overrides, split, checkpoint, save=True):
        seen.update(run_dir=run_dir, overrides=overrides, checkpoint=checkpoint, save=save)
        return {"split": split}

    monkeypatch.setattr(cli, "evaluate_run", evaluate_run)
    argv = ["eval", str(sine_run), "--checkpoint", "latest", "eval.num_tasks=2", "--no-save"]
    code, out, err = run_main([*argv, "data.k_shot=3"], capsys, monkeypatch)
    assert code == 0, err
    assert seen == {
        "run_dir": str(sine_run),
        "overrides": ["eval.num_tasks=2", "data.k_shot=3"],
        "checkpoint": "latest",
        "save": False,
    }


# ---------------------------------------------------------------- unknown flags, every command

UNKNOWN = {
    "eval": ["eval", "--bogus"],
    "eval_with_run": ["eval", "RUN", "--bogus", "eval.num_tasks=2"],
    "compare": ["compare", "--bogus"],
    "compare_with_path": ["compare", "RUN", "--bogus=3"],
    "predict": ["predict", "--bogus"],
    "train": ["train", "--bogus", "data=sinusoid"],
    "no_command": ["--bogus"],
}


@pytest.mark.parametrize("case", UNKNOWN)
def test_unknown_flags_get_one_paragraph(case, sine_run, capsys, monkeypatch):
    argv = [str(sine_run) if a == "RUN" else a for a in UNKNOWN[case]]
    code, out, err = run_main(argv, capsys, monkeypatch)
    flag = next(a for a in argv if a.startswith("--bogus"))
    assert_one_paragraph(code, err, f"unrecognized arguments: {flag}")
    assert out == ""


def test_unknown_command_gets_one_paragraph(capsys, monkeypatch):
    code, _, err = run_main(["nosuchcommand"], capsys, monkeypatch)
    assert_one_paragraph(code, err, "unknown command 'nosuchcommand'", "train, eval, predict")


def test_known_flags_and_their_prefixes_are_not_unknown():
    parser = ArgumentParser(prog="p")
    parser.add_argument("--checkpoint")
    parser.add_argument("-s")
    argv = ["--check", "latest", "--checkpoint=best", "-sval", "-1", "-2.5e3", "--", "--x"]
    assert unknown_options(parser, argv) == []
    assert unknown_options(parser, ["--checkpointx", "-t", "--"]) == ["--checkpointx", "-t"]


def test_hydra_flags_of_train_pass_the_check():
    cli.check_train_arguments(["-m", "seed=0,1", "--cfg", "job", "--package", "train"])


# -------------------------------------------------------------------- empty paths are refused

EMPTY_CLI = {
    "eval": ["eval", ""],
    "eval_blank": ["eval", "  ", "--no-save"],
    "predict_run": ["predict", "", "--support", "s", "--query", "q"],
    "predict_support": ["predict", "RUN", "--support", "", "--query", "q"],
    "predict_query": ["predict", "RUN", "--support", "s", "--query", ""],
    "predict_output": ["predict", "RUN", "--support", "s", "--query", "q", "--output", ""],
    "compare": ["compare", ""],
    "compare_csv": ["compare", "RUN", "--csv", ""],
    "compare_plot": ["compare", "RUN", "--plot", ""],
}


@pytest.mark.parametrize("case", EMPTY_CLI)
def test_an_empty_path_argument_is_refused(case, sine_run, capsys, monkeypatch):
    monkeypatch.chdir(sine_run)  # the current folder holds a run: '' must not stand for it
    argv = [str(sine_run) if a == "RUN" else a for a in EMPTY_CLI[case]]
    code, out, err = run_main(argv, capsys, monkeypatch)
    assert_one_paragraph(code, err, "an empty path would be taken as the current folder")
    assert out == ""


@pytest.mark.parametrize(
    "overrides, setting",
    [
        (["data=omniglot", "data.root=''"], "data.root"),
        (["data=omniglot_alphabets", "algo=multitask", "data.root=' '"], "data.root"),
        (["data=tfds", "data.name=cifar100", "data.data_dir=''"], "data.data_dir"),
        (["data=sinusoid", "algo.init_from=''"], "algo.init_from"),
    ],
)
def test_an_empty_path_setting_is_refused(overrides, setting, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=f"{setting}=.* an empty path would be taken as the"):
        compose_config(overrides, tmp_path, monkeypatch)


def test_the_library_refuses_an_empty_run_path(tmp_path, monkeypatch):
    from metalearn.api import load_run as load_trained

    monkeypatch.chdir(tmp_path)
    for call in (lambda: RunDir(""), lambda: find_runs([""]), lambda: load_trained(" ")):
        with pytest.raises(RunDirError, match="an empty path would be taken as the current"):
            call()


# ----------------------------------------------- compare: why two runs cannot be paired

CARD = {"data": {"name": "omniglot", "k_shot": 1}, "test": {"num_tasks": 4}, "test_tasks": "k1"}


def write_tested(path: Path, metrics: dict | None, card=CARD, mean=None) -> Path:
    """A tested run: summary.json with its protocol card, and test_tasks.json of `metrics`."""
    path.mkdir(parents=True)
    values = next(iter(metrics.values())) if metrics else [0.5]
    mean = sum(values) / len(values) if mean is None else mean
    summary = {"status": "completed", "objective": "accuracy", "protocol": card}
    summary["test"] = {"accuracy": mean, "accuracy_ci95": 0.01}
    (path / "summary.json").write_text(json.dumps(summary))
    if metrics is not None:
        record = {"test_tasks": card["test_tasks"], "metrics": metrics}
        (path / TEST_TASKS_FILE).write_text(json.dumps(record))
    return path


def paired_lines(root: Path, capsys) -> dict[str, str]:
    compare_command([str(root)])
    out = capsys.readouterr().out
    lines = out.split("Paired test", 1)[1].splitlines()[1:]
    return {line.split(":")[0].strip(): line.split(":", 1)[1] for line in lines if ":" in line}


def test_compare_names_why_a_run_cannot_be_paired(tmp_path, capsys):
    write_tested(tmp_path / "best", {"accuracy": [1.0, 0.8, 0.9, 1.0]})
    write_tested(tmp_path / "regression", {"loss": [0.1, 0.2, 0.3, 0.4]})
    write_tested(tmp_path / "nan", {"accuracy": [0.5, math.nan, 0.5, 0.5]})
    write_tested(tmp_path / "untested", None)
    other = {**CARD, "data": {"name": "omniglot", "k_shot": 5}, "test_tasks": "k5"}
    write_tested(tmp_path / "five_shot", {"accuracy": [0.7, 0.7, 0.7, 0.7]}, card=other)
    write_tested(tmp_path / "short", {"accuracy": [0.6, 0.6]})
    lines = paired_lines(tmp_path, capsys)
    assert "no per-task test accuracy in its test_tasks.json (it has loss)" in lines["regression"]
    assert "not finite" in lines["nan"]
    assert "there is no test_tasks.json" in lines["untested"]
    assert "other protocol: data.k_shot: 5 against 1" in lines["five_shot"]
    assert "2 per-task results against 4" in lines["short"]
    # a run whose file is there is never said to lack it
    for name in ("regression", "nan", "five_shot", "short"):
        assert "no per-task test results" not in lines[name] and "there is no" not in lines[name]


def test_compare_names_why_the_best_run_cannot_be_paired(tmp_path, capsys):
    write_tested(tmp_path / "best", {"accuracy": [1.0, math.inf, 1.0, 1.0]}, mean=1.0)
    write_tested(tmp_path / "other", {"accuracy": [0.5, 0.5, 0.5, 0.5]})
    compare_command([str(tmp_path)])
    out = capsys.readouterr().out
    assert "Paired test: best (the best run) cannot be paired: its per-task test accuracy" in out


# ------------------------------------------- damaged .hydra files are named, never defaults

DAMAGED = {
    "overrides_null": (".hydra/overrides.yaml", "null\n", "holds no value"),
    "overrides_comment": (".hydra/overrides.yaml", "# cut\n", "holds no value"),
    "overrides_missing": (".hydra/overrides.yaml", None, ".hydra/overrides.yaml is missing"),
    "config_invalid": (".hydra/config.yaml", "data: {name: [\n", "config.yaml is not valid YAML"),
    "config_list": (".hydra/config.yaml", "- seed\n", "config.yaml is not a mapping"),
    "config_null": (".hydra/config.yaml", "~\n", "config.yaml is not a mapping"),
    "config_alias": (".hydra/config.yaml", "a: &x 1\nb: *x\n", "config.yaml uses YAML aliases"),
    "config_bytes": (".hydra/config.yaml", b"seed: \xff\n", "config.yaml is not valid YAML"),
}


@pytest.mark.parametrize("summary", [False, True], ids=["running", "completed"])
def test_damaged_hydra_files_are_shown_as_unreadable(summary, tmp_path, capsys):
    for name, (file, content, _) in DAMAGED.items():
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text("seed: 3\n")
        (run / ".hydra" / "overrides.yaml").write_text("- seed=3\n")
        if content is None:
            (run / file).unlink()
        else:
            (run / file).write_bytes(content if isinstance(content, bytes) else content.encode())
        if summary:
            record = {"status": "completed", "test": {"loss": 1.0}, "overrides": ["seed=3"]}
            (run / "summary.json").write_text(json.dumps(record))
    compare_command([str(tmp_path)])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:] if line}
    for name, (_, content, reason) in DAMAGED.items():
        if summary and content is None:  # the summary holds the overrides: nothing is lost
            assert "unreadable" not in rows[name]
            continue
        assert "unreadable: " in rows[name] and reason in rows[name], rows[name]


def test_intact_hydra_files_are_not_marked(tmp_path, monkeypatch):
    run = write_config_run(tmp_path / "sine", ["data=sinusoid"], tmp_path, monkeypatch)
    assert load_run(run)["problems"] == [] and load_run(run)["overrides"] == ["data=sinusoid"]


# ------------------------------------------------ model.module from the folder of the command


def test_model_module_is_found_in_the_folder_the_command_started_in(tmp_path, monkeypatch):
    from metalearn.models.flax_module import load_class

    (tmp_path / "issue28_net.py").write_text("class Net:\n    width = 3\n")
    monkeypatch.chdir(tmp_path)
    # as under the `metalearn` console script: neither the folder nor '' is on the path
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != str(tmp_path)]
    monkeypatch.setattr(sys, "path", path)
    monkeypatch.delitem(sys.modules, "issue28_net", raising=False)
    assert load_class("issue28_net:Net").width == 3
    assert sys.path == path  # the caller's path is left as it was
    with pytest.raises(ConfigError, match=f"the folder the command was started in, {tmp_path}"):
        load_class("issue28_absent:Net")


# -------------------------------------------- a user's run: console script, its own folder


FLAX_NET = """
from flax import nnx


class Net(nnx.Module):
    def __init__(self, num_classes=1, *, rngs):
        self.blocks = nnx.List([nnx.Linear(1, 8, rngs=rngs)])
        self.head = nnx.Linear(8, num_classes, rngs=rngs)

    def embed(self, x):
        return nnx.relu(self.blocks[0](x))

    def __call__(self, x):
        return self.head(self.embed(x))
"""


@pytest.mark.slow
def test_console_script_trains_a_module_of_its_folder_and_evals_after_options(tmp_path, env):
    script = Path(sys.executable).with_name("metalearn")  # not `python -m`: that adds the cwd
    (tmp_path / "issue28_flax.py").write_text(FLAX_NET)
    run = tmp_path / "run"
    tiny = ["train.steps=2", "eval.every=1", "eval.num_tasks=4", "eval.val_tasks=2"]
    train = [script, "train", "data=sinusoid", "model=flax", "model.module=issue28_flax:Net"]
    environ = {k: v for k, v in env.items() if k != "PYTHONPATH"}

    def metalearn(*args):
        return subprocess.run(args, cwd=tmp_path, env=environ, capture_output=True, text=True)

    result = metalearn(*train, *tiny, f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr
    evaluated = [script, "eval", run, "--checkpoint", "latest", "eval.num_tasks=3", "--no-save"]
    result = metalearn(*evaluated)
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["checkpoint"] == "latest" and output["test"]["num_tasks"] == 3


def test_an_empty_resume_path_is_refused_before_anything_is_written(tmp_path):
    # a subprocess: Hydra's logging outlives an in-process run's captured stderr
    script = str(Path(sys.executable).with_name("metalearn"))
    done = subprocess.run(
        [script, "train", "resume=''", "hydra.run.dir=run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert_one_paragraph(done.returncode, done.stderr, "resume=''", "empty path")
    assert list(tmp_path.iterdir()) == []
