"""logger=: the registry of backends, its errors, and what wandb and MLflow store of a run.

The wandb run is offline (no network, no account) and MLflow's is a file store in the run
directory; each test reads back what the backend stored and compares it with metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from metalearn.config import ConfigError
from metalearn.loggers import LOGGERS, Logger, check_logger, flatten, scalars

ARGS = ["train", "train.steps=3", "eval.every=3", "eval.num_tasks=4", "eval.val_tasks=4"]
# The user's own settings would change where and how the backends write.
USER_SETTINGS = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT")
USER_SETTINGS += ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metalearn(args, env, cwd, check=False) -> subprocess.CompletedProcess:
    """`python -m metalearn ARGS` (as tests/helpers.py does, without importing the library)."""
    command = [sys.executable, "-m", "metalearn", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    if check and result.returncode != 0:
        output = f"{result.stdout}\n{result.stderr}"
        raise AssertionError(f"metalearn {' '.join(args)} failed:\n{output}")
    return result


def logger_env(env: dict, tmp_path: Path) -> dict:
    environ = {k: v for k, v in env.items() if k not in USER_SETTINGS}
    for name in ("CONFIG", "CACHE", "DATA"):  # nothing of wandb's outside the test's folder
        environ[f"WANDB_{name}_DIR"] = str(tmp_path / f"wandb-{name.lower()}")
    return environ


# ------------------------------------------------------------------- registry and errors


def test_unknown_logger_names_the_registered_ones():
    with pytest.raises(ConfigError) as error:
        check_logger("tensorbord")
    message = str(error.value)
    assert message.startswith("logger='tensorbord' is not allowed")
    assert "\n" not in message
    for name in ("jsonl", "tensorboard", "wandb", "mlflow"):
        assert repr(name) in message


def test_missing_package_names_its_extra(monkeypatch):
    for name in ("wandb", "mlflow", "tensorboard"):
        check_logger(name)  # installed here
        monkeypatch.setattr(LOGGERS[name], "module", "metalearn_no_such_package")
        with pytest.raises(ConfigError, match=rf"pip install 'metalearn\[{name}\]'"):
            check_logger(name)


def test_every_extra_a_logger_needs_is_in_pyproject_and_the_test_extra():
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for backend in LOGGERS.values():
        if backend.extra is not None:
            assert extras[backend.extra], backend.name
            assert set(extras[backend.extra]) <= set(extras["test"]), backend.name


def test_every_backend_gets_the_same_tags():
    metrics = {"loss": 2, "per_task": {"a": {"loss": 1.5}}, "worst": {"task": "a", "loss": 1.5}}
    assert scalars("val", metrics) == {"val/loss": 2.0, "val_tasks/loss/a": 1.5}
    assert flatten({"a": {"b": 1, "c": (1, 2)}, "d": None}) == {"a.b": 1, "a.c": (1, 2), "d": None}


@pytest.fixture
def broken_logger(monkeypatch):
    """A backend registered as logger=broken for one test; it fails where `fails_at` says."""
    monkeypatch.setitem(LOGGERS, "broken", None)  # removed again after the test
    calls = []

    class Broken(Logger, name="broken"):
        fails_at = "log"

        @classmethod
        def open(cls, run, config):
            calls.append(("open", config["train"]["steps"]))
            if cls.fails_at == "open":
                raise ConnectionError("no network\n  (second line)")
            return cls()

        def log(self, step, split, metrics):
            calls.append(("log", step, split))
            raise RuntimeError("disk quota")

        def close(self, failed=False):
            calls.append(("close", failed))

    return Broken, calls


@pytest.mark.parametrize("fails_at", ["open", "log"])
def test_a_failing_logger_warns_once_and_metrics_jsonl_goes_on(
    tmp_path, caplog, broken_logger, fails_at
):
    from metalearn.progress import Reporter
    from metalearn.rundir import RunDir

    @dataclasses.dataclass
    class Train:
        steps: int = 3

    @dataclasses.dataclass
    class Config:
        train: Train = dataclasses.field(default_factory=Train)

    backend, calls = broken_logger
    backend.fails_at = fails_at
    # The backend gets a dict, from a dict or from the run's config dataclass.
    config = {"train": {"steps": 3}} if fails_at == "open" else Config()
    with caplog.at_level(logging.WARNING, logger="metalearn"):
        report = Reporter(
            RunDir(tmp_path), total_steps=3, start_step=0, elapsed_s=0.0, progress=False,
            logger="broken", config=config,
        )  # fmt: skip
        with report.active():
            for step in (1, 2, 3):
                report.record(step, "train", {"loss": 1.0 / step})
        report.record(3, "test", {"loss": 0.5})
        report.close()
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 3]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    action = {"open": "start", "log": "log"}[fails_at]
    assert warnings[0].startswith(f"logger=broken failed to {action}")
    assert "metrics.jsonl only" in warnings[0] and "\n" not in warnings[0]
    if fails_at == "open":
        assert calls == [("open", 3)]
    else:  # the backend is closed as failed, once, and called no more
        assert calls == [("open", 3), ("log", 1, "train"), ("close", True)]


# ------------------------------------------------------------------- backends, end to end


def wandb_records(path: Path) -> list:
    """The protobuf Records of a .wandb file: a magic header, then LevelDB-log chunks
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) in blocks of 32 KiB."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, offset, pending, found = 32768, 7, b"", []
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if kind == 0:  # zeroed rest of the block
            offset += block - offset % block
            continue
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            found.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return found


@pytest.mark.slow
def test_wandb_offline_run_holds_the_config_and_every_metric(tmp_path, env):
    run_dir = tmp_path / "wandb_run"
    result = metalearn(
        [*ARGS, "logger=wandb", f"hydra.run.dir={run_dir}"],
        logger_env(env, tmp_path),
        tmp_path,
        check=True,
    )
    assert "logger=wandb failed" not in result.stdout + result.stderr
    (folder,) = (run_dir / "wandb").glob("offline-run-*")  # offline: no network, no account
    (wandb_file,) = folder.glob("run-*.wandb")
    found = wandb_records(wandb_file)
    by_kind: dict[str, list] = {}
    for record in found:
        by_kind.setdefault(record.WhichOneof("record_type"), []).append(record)

    (run,) = by_kind["run"]
    assert run.run.display_name == "wandb_run" and run.run.project == "metalearn"
    config = {item.key: json.loads(item.value_json) for item in run.run.config.update}
    assert config["train"]["steps"] == 3 and config["logger"] == "wandb"
    assert config["algo"]["name"] == "maml" and config["eval"]["every"] == 3

    rows = []
    for record in by_kind["history"]:
        row = {item.nested_key[0]: json.loads(item.value_json) for item in record.history.item}
        rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    want = [
        {"step": r["step"], **{f"{r['split']}/{k}": r[k] for k in ("loss", "loss_ci95") if k in r}}
        for r in records(run_dir)
    ]
    got = [{k: v for k, v in row.items() if k == "step" or k.endswith(("/loss", "_ci95"))}
           for row in rows]  # fmt: skip
    assert got == want
    assert {"train/loss", "val/loss", "test/loss"} <= {k for row in rows for k in row}
    assert [r.exit.exit_code for r in by_kind["exit"]] == [0]


@pytest.mark.slow
def test_mlflow_file_store_holds_the_params_and_every_metric(tmp_path, env, monkeypatch):
    run_dir = tmp_path / "mlflow_run"
    result = metalearn(
        [*ARGS, "logger=mlflow", f"hydra.run.dir={run_dir}"],
        logger_env(env, tmp_path),
        tmp_path,
        check=True,
    )
    assert "logger=mlflow failed" not in result.stdout + result.stderr
    assert (run_dir / "mlruns").is_dir()

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for the file store
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("metalearn")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "mlflow_run" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.steps"] == "3" and params["algo.name"] == "maml"
    assert params["logger"] == "mlflow" and "data.amplitude" in params

    logged = records(run_dir)
    for split in ("train", "val", "test"):
        for name in ("loss", "loss_ci95"):
            want = [(r["step"], r[name]) for r in logged if r["split"] == split and name in r]
            history = client.get_metric_history(run.info.run_id, f"{split}/{name}")
            assert [m.step for m in history] == [step for step, _ in want], (split, name)
            values = [m.value for m in history]
            assert values == pytest.approx([v for _, v in want], rel=1e-12), (split, name)
            assert want or split == "train" and name == "loss_ci95"


@pytest.mark.slow
def test_unknown_logger_on_the_command_line(tmp_path, env):
    result = metalearn([*ARGS, "logger=wandbb", f"hydra.run.dir={tmp_path / 'run'}"], env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "logger='wandbb' is not allowed; choose one of" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
