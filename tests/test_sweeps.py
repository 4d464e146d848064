"""Sweeps as a user runs them (docs/SWEEPS.md): a multirun that survives a failing job, parallel
local jobs with the joblib launcher, an Optuna search, and the launcher/search presets.

Every run is a `metalearn train` subprocess on tiny sinusoid settings. The joblib and Optuna
tests are skipped, with the reason, when their Hydra plugin is not installed
(`pip install -e '.[sweep]'`)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import metalearn

pytestmark = pytest.mark.slow  # every test here starts metalearn processes

CONF = Path(__file__).resolve().parent.parent / "conf"
# Every stage of a run (train, validate, test the best checkpoint) in a few seconds.
TINY = [
    "train.steps=20",
    "train.meta_batch=4",
    "eval.every=10",
    "eval.num_tasks=10",
    "eval.val_tasks=5",
]


def has_plugin(module: str) -> bool:
    return importlib.util.find_spec(f"hydra_plugins.{module}") is not None


needs_joblib = pytest.mark.skipif(
    not has_plugin("hydra_joblib_launcher"),
    reason="hydra-joblib-launcher is not installed: pip install -e '.[test]' (or '.[sweep]')",
)
needs_optuna = pytest.mark.skipif(
    not has_plugin("hydra_optuna_sweeper"),
    reason="hydra-optuna-sweeper is not installed: pip install -e '.[sweep]'",
)


def check(result):
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def summaries(sweep: Path) -> dict[str, dict]:
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {run.name: json.loads((run / "summary.json").read_text()) for run in runs}


def assert_completed(run: Path, summary: dict):
    assert summary["status"] == "completed", summary
    assert (run / "checkpoints" / "best.npz").is_file()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(line)["split"] for line in lines} == {"train", "val", "test"}


def test_multirun_records_a_failed_job_and_goes_on(tmp_path, env):
    sweep = tmp_path / "sweep"
    result = metalearn(
        ["train", "-m", "train.outer_lr=0.001,-1,0.01", *TINY, f"hydra.sweep.dir={sweep}"],
        env,
        tmp_path,
    )
    # The sweep runs every job; because job 1 failed, it then exits 1.
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "job failed: train.outer_lr=-1" in result.stdout + result.stderr

    runs = summaries(sweep)
    assert sorted(runs) == ["0_maml_sinusoid", "1_maml_sinusoid", "2_maml_sinusoid"]
    failed = runs["1_maml_sinusoid"]
    assert failed["status"] == "failed"
    assert "train.outer_lr=-1" in failed["error"] and "positive" in failed["error"]
    assert "train.outer_lr=-1" in failed["overrides"]
    assert not (sweep / "1_maml_sinusoid" / "checkpoints").exists()
    for name in ("0_maml_sinusoid", "2_maml_sinusoid"):
        assert_completed(sweep / name, runs[name])

    out = check(metalearn(["compare", str(sweep)], env, tmp_path)).stdout
    table = out.strip().split("\n\n")[0].splitlines()  # the table, before its notes
    assert len(table) == 4, table  # the header and one row per job
    rows = {line.split()[0]: line for line in table[1:]}
    assert set(rows) == set(runs)
    assert "failed: train.outer_lr=-1" in rows["1_maml_sinusoid"]
    assert all("completed" in rows[name] for name in ("0_maml_sinusoid", "2_maml_sinusoid"))
    assert table[-1].startswith("1_maml_sinusoid"), "the failed run, with no metric, sorts last"


@needs_joblib
def test_joblib_launcher_runs_the_jobs_in_worker_processes(tmp_path, env):
    sweep = tmp_path / "sweep"
    result = check(
        metalearn(
            [
                "train",
                "-m",
                "hydra/launcher=joblib_local",
                "train.outer_lr=0.001,0.01",
                *TINY,
                f"hydra.sweep.dir={sweep}",
            ],
            env,
            tmp_path,
        )
    )
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    runs = summaries(sweep)
    assert sorted(runs) == ["0_maml_sinusoid", "1_maml_sinusoid"]
    for name, summary in runs.items():
        assert_completed(sweep / name, summary)
    lrs = {o for s in runs.values() for o in s["overrides"] if o.startswith("train.outer_lr=")}
    assert lrs == {"train.outer_lr=0.001", "train.outer_lr=0.01"}


def hparams_search_in_defaults() -> bool:
    config = (CONF / "config.yaml").read_text()
    return re.search(r"^\s*-\s*(optional\s+)?hparams_search\s*:", config, re.M) is not None


@needs_optuna
def test_optuna_search_minimises_the_validation_loss(tmp_path, env):
    assert hparams_search_in_defaults(), (
        "conf/config.yaml's defaults list needs `- hparams_search: null` (after experiment) for "
        "`metalearn train -m hparams_search=maml_optuna`, the command docs/SWEEPS.md gives."
    )
    sweep = tmp_path / "search"
    check(
        metalearn(
            [
                "train",
                "-m",
                "hparams_search=maml_optuna",
                "hydra.sweeper.n_trials=2",
                *TINY,
                f"hydra.sweep.dir={sweep}",
            ],
            env,
            tmp_path,
        )
    )
    runs = summaries(sweep)
    assert sorted(runs) == ["0_maml_sinusoid", "1_maml_sinusoid"]
    for name, summary in runs.items():
        assert_completed(sweep / name, summary)
        sampled = dict(o.split("=", 1) for o in summary["overrides"])
        assert 0.001 <= float(sampled["algo.inner_lr"]) <= 0.1
        assert 0.0001 <= float(sampled["train.outer_lr"]) <= 0.01
        assert 1 <= int(sampled["algo.inner_steps"]) <= 5

    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"algo.inner_lr", "train.outer_lr", "algo.inner_steps"}
    # Sinusoid regression: each trial returned its best validation loss, and the search
    # minimises it.
    losses = [s["best_val"]["loss"] for s in runs.values()]
    assert result["best_value"] == pytest.approx(min(losses))


PRESETS = {
    # override: (plugin module or None, {dotted key in `--cfg hydra` output: expected value})
    "hydra/launcher=joblib_local": ("hydra_joblib_launcher", {"launcher.n_jobs": 2}),
    "hydra/launcher=slurm": (
        "hydra_submitit_launcher",
        {"launcher.nodes": 1, "launcher.tasks_per_node": 1, "launcher.max_num_timeout": 0},
    ),
    "hydra/launcher=ray_cluster": ("hydra_ray_launcher", {"launcher.ray.init.address": "auto"}),
    "hparams_search=maml_optuna": ("hydra_optuna_sweeper", {"sweeper.direction": "minimize"}),
    "hparams_search=maml_omniglot_optuna": (
        "hydra_optuna_sweeper",
        {"sweeper.direction": "maximize"},
    ),
    "hparams_search=protonet_optuna": ("hydra_optuna_sweeper", {"sweeper.direction": "maximize"}),
}


@pytest.mark.parametrize("override", list(PRESETS))
def test_preset_composes(override, tmp_path, env):
    plugin, expected = PRESETS[override]
    if not has_plugin(plugin):
        pytest.skip(f"{plugin} is not installed (see docs/SWEEPS.md for the extra)")
    if override.startswith("hparams_search=") and not hparams_search_in_defaults():
        pytest.fail("conf/config.yaml's defaults list needs `- hparams_search: null`")
    result = check(metalearn(["train", override, "--cfg", "hydra"], env, tmp_path))
    composed = yaml.safe_load(result.stdout)["hydra"]
    for key, value in expected.items():
        node = composed
        for part in key.split("."):
            node = node[part]
        assert node == value, (key, node)
    if override.startswith("hparams_search="):
        assert composed["mode"] == "MULTIRUN" and composed["sweeper"]["n_trials"] > 0
        assert composed["runtime"]["choices"]["hydra/sweeper"] == "optuna"
