"""Reliability, one case per class of failure: a refused command never changes a run, the same
command resumes, every failure is one paragraph, nothing is silently ignored, and a received
run cannot make metalearn do what its author chose. scripts/fuzz_cli.py is the broad sweep."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from helpers import metalearn as run_metalearn
from hydra import compose, initialize_config_dir

from metalearn.config import ConfigError, register_schemas, to_config
from metalearn.rundir import RunDir, RunDirError

CONF = Path(__file__).resolve().parent.parent / "conf"
SINUSOID = ["train.steps=40", "eval.every=20", "eval.num_tasks=30", "eval.val_tasks=10"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, env):
    """A finished sinusoid MAML run; tests that damage a run work on a copy of it."""
    cwd = tmp_path_factory.mktemp("work")
    run = cwd / "sine"
    run_metalearn(["train", *SINUSOID, f"hydra.run.dir={run}"], env, cwd, check=True)
    return run


def metalearn(args, env, cwd):
    result = run_metalearn(args, env, cwd)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def refused(result, *named: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("metalearn: error: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, "one paragraph"
    for text in named:
        assert text in result.stderr, result.stderr


def digest(path: Path) -> dict:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def compose_config(overrides):
    register_schemas()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


# ------------------------------------------------ a failed or refused command changes nothing


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, named",
    [
        ("model.hidden=80", "model.hidden=80 (the run's is 40)"),
        ("algo=reptile", "algo=reptile (the run's is maml)"),
        ("algo.inner_lr=0.9", "algo.inner_lr=0.9"),
        ("seed=3", "seed=3 (the run's is 0)"),
    ],
)
def test_refused_resume_changes_nothing(finished, env, tmp_path, change, named):
    before = digest(finished)
    refused(metalearn(["train", f"resume={finished}", change], env, tmp_path), named)
    assert digest(finished) == before
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_the_run_still_evaluates_and_resumes_after_refusals(finished, env, tmp_path):
    metalearn(["train", f"resume={finished}", "model.hidden=80"], env, tmp_path)
    assert metalearn(["eval", str(finished)], env, tmp_path).returncode == 0
    # Re-running the command that started it is a requeued job: nothing is left to do.
    before = {k: v for k, v in digest(finished).items() if not k.startswith("evals/")}
    again = metalearn(
        ["train", *SINUSOID, f"hydra.run.dir={finished}", "resume=true", "algo=maml",
         "data=sinusoid", "progress=false"],
        env, tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert {k: v for k, v in digest(finished).items() if not k.startswith("evals/")} == before


def test_checkpoints_are_keyed_by_tree_path(tmp_path):
    run = RunDir(tmp_path)
    tree = {"blocks": [{"w": np.arange(6.0).reshape(2, 3)}], "head": {"b": np.ones(3)}}
    run.save_checkpoint("latest", tree, {"step": 7})
    with np.load(tmp_path / "checkpoints" / "latest.npz") as data:
        assert set(data.files) == {"['blocks'][0]['w']", "['head']['b']", "meta"}
    loaded, meta = run.load_checkpoint("latest", tree)
    np.testing.assert_array_equal(loaded["blocks"][0]["w"], tree["blocks"][0]["w"])
    assert meta == {"step": 7}
    other = {"blocks": [{"w": np.zeros((2, 4))}], "head": {"b": np.ones(3)}}
    with pytest.raises(RunDirError, match=r"\['blocks'\]\[0\]\['w'\] is float64\[2, 3\] in the "
                       r"checkpoint but float64\[2, 4\]"):  # fmt: skip
        run.load_checkpoint("latest", other)
    # Same leaf count and shapes, other names: an index-keyed load would have taken them.
    renamed = {"blocks": [{"v": np.zeros((2, 3))}], "head": {"b": np.ones(3)}}
    with pytest.raises(RunDirError, match=r"\['blocks'\]\[0\]\['v'\] is missing"):
        run.load_checkpoint("latest", renamed)


def test_index_keyed_checkpoints_still_load(tmp_path):
    """Checkpoints written before path keys held leaf_0, leaf_1, ... in tree order."""
    (tmp_path / "checkpoints").mkdir()
    meta = np.frombuffer(json.dumps({"step": 3}).encode(), dtype=np.uint8)
    np.savez(
        tmp_path / "checkpoints" / "best.npz", leaf_0=np.ones(2), leaf_1=np.zeros(3), meta=meta
    )
    loaded, _ = RunDir(tmp_path).load_checkpoint("best", {"a": np.zeros(2), "b": np.ones(3)})
    np.testing.assert_array_equal(loaded["a"], np.ones(2))


def test_checkpoints_of_the_layout_before_2026_12_load_into_moved_paths(tmp_path):
    """multihead's heads were ['heads']['w'] before the model protocol; now
    ['heads']['head']['w']. Ambiguous or reshaped moves still fail by name."""
    run = RunDir(tmp_path)
    old = {"model": {"blocks": [{"w": np.ones(2)}]}, "heads": {"w": np.arange(6.0).reshape(3, 2)}}
    run.save_checkpoint("best", old, {"step": 1})
    new = {"model": {"blocks": [{"w": np.zeros(2)}]}, "heads": {"head": {"w": np.zeros((3, 2))}}}
    loaded, _ = run.load_checkpoint("best", new)
    np.testing.assert_array_equal(loaded["heads"]["head"]["w"], old["heads"]["w"])
    reshaped = {"model": {"blocks": [{"w": np.zeros(2)}]}, "heads": {"head": {"w": np.zeros(6)}}}
    with pytest.raises(RunDirError, match=r"\['heads'\]\['head'\]\['w'\] is missing"):
        run.load_checkpoint("best", reshaped)


@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "missing array"])
def test_damaged_checkpoint_is_named_with_what_to_do(tmp_path, damage):
    run = RunDir(tmp_path)
    tree = {"w": np.ones((4, 4)), "b": np.ones(4)}
    run.save_checkpoint("best", tree, {"step": 1})
    path = tmp_path / "checkpoints" / "best.npz"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:
        run.save_checkpoint("best", {"w": np.ones((4, 4))}, {"step": 1})
    with pytest.raises(RunDirError, match="best.npz") as error:
        run.load_checkpoint("best", tree)
    assert "--checkpoint latest" in str(error.value) or "is missing" in str(error.value)


@pytest.mark.slow
def test_eval_of_a_damaged_checkpoint_is_one_paragraph(finished, env, tmp_path):
    run = copy_run(finished, tmp_path / "copy")
    (run / "checkpoints" / "best.npz").write_bytes(b"PK\x03\x04 not really")
    before = digest(run)
    refused(metalearn(["eval", str(run)], env, tmp_path), "best.npz", "damaged")
    assert digest(run) == before


# ------------------------------------------------------------ the same command resumes


@pytest.mark.slow
def test_second_process_on_a_run_in_use_is_refused(finished, env, tmp_path):
    run = copy_run(finished, tmp_path / "copy")
    holder = RunDir(run)
    holder.lock()  # as the process that trains it would
    try:
        before = digest(run)
        refused(metalearn(["train", f"resume={run}", "train.steps=60"], env, tmp_path), "in use")
        assert digest(run) == before
    finally:
        holder.unlock()


def test_lock_of_a_killed_process_is_released(tmp_path):
    code = f"from metalearn.rundir import RunDir; RunDir({str(tmp_path)!r}).lock(); print(1)"
    holder = subprocess.Popen(
        [sys.executable, "-c", code + "; import time; time.sleep(60)"], stdout=subprocess.PIPE
    )
    assert holder.stdout.readline().strip() == b"1"
    with pytest.raises(RunDirError, match="in use"):
        RunDir(tmp_path).lock()
    holder.kill()
    holder.wait()
    RunDir(tmp_path).lock()  # no stale lock: the kernel released it with the process


def test_stale_temporary_files_are_removed(tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint("latest", {"w": np.ones(2)}, {"step": 1})
    stale = [tmp_path / "checkpoints" / ".latest.abc123.npz", tmp_path / ".summary.json.x1.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    kept = tmp_path / "checkpoints" / "notes.txt"
    kept.write_text("mine")
    assert sorted(run.remove_stale_temps()) == sorted(stale)
    assert kept.exists() and (tmp_path / "checkpoints" / "latest.npz").exists()


@pytest.mark.slow
def test_run_killed_before_its_first_checkpoint_restarts(finished, env, tmp_path):
    """What a kill during compilation leaves: the run's config, no checkpoint. Both `resume=`
    and the command that started it run it from step 0, to the uninterrupted result."""
    full = json.loads((finished / "summary.json").read_text())
    for how in ("resume", "same command"):
        run = copy_run(finished, tmp_path / how)
        for name in ("checkpoints", "summary.json", "metrics.jsonl", "evals"):
            shutil.rmtree(run / name, ignore_errors=True)
            (run / name).unlink(missing_ok=True)
        args = [f"resume={run}"] if how == "resume" else [*SINUSOID, f"hydra.run.dir={run}"]
        assert metalearn(["train", *args], env, tmp_path).returncode == 0
        assert json.loads((run / "summary.json").read_text())["test"] == full["test"]


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    """The default run directory is named by the second: a second run takes the next name."""
    from metalearn.run_plan import plan

    base = tmp_path / "outputs" / "12-00-00_maml_sinusoid"
    hydra_cfg = types.SimpleNamespace(
        runtime=types.SimpleNamespace(output_dir=str(base)),
        overrides=types.SimpleNamespace(hydra=[], task=[]),
    )
    dcfg = compose_config([])
    first, _, _ = plan(dcfg, hydra_cfg, RunDir(base), [])  # holds the lock, as while training
    second, _, _ = plan(dcfg, hydra_cfg, RunDir(base), [])
    assert first.path == base and second.path == base.with_name(base.name + "_1")
    second.unlock()
    (base / "summary.json").write_text("{}")  # the first has finished
    first.unlock()
    third, _, _ = plan(dcfg, hydra_cfg, RunDir(base), [])
    assert third.path == base.with_name(base.name + "_1")


# ------------------------------------------------------ every failure is one paragraph


@pytest.mark.slow
def test_sizes_that_cannot_fit_are_refused_before_allocating(env, tmp_path):
    result = metalearn(
        ["train", "data.k_shot=100000", "data.k_query=100000", "train.meta_batch=1000"],
        env, tmp_path,
    )  # fmt: skip
    refused(result, "GiB", "1000 tasks of 100,000 support and 100,000 query examples")
    refused(metalearn(["train", "model.hidden=10000000"], env, tmp_path), "model.hidden")
    assert not (tmp_path / "outputs").exists()


def scratch_mount(path: Path, options: str) -> bool:
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    return mounted.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_stops_with_a_message_and_keeps_the_run_valid(env, tmp_path):
    disk = tmp_path / "disk"
    if not scratch_mount(disk, "size=64k"):
        pytest.skip("this container cannot mount a tmpfs")
    try:
        run = disk / "run"
        result = metalearn(["train", *SINUSOID, f"hydra.run.dir={run}"], env, tmp_path)
        refused(result, "No space left on device")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
def test_eval_into_a_read_only_run_fails_before_the_work(finished, env, tmp_path):
    place = tmp_path / "ro"
    if not scratch_mount(place, "size=1m"):
        pytest.skip("this container cannot mount a tmpfs")
    try:
        shutil.copytree(finished, place / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(place)], check=True)
        result = metalearn(["eval", str(place / "run"), "eval.num_tasks=100000"], env, tmp_path)
        refused(result, "Cannot write to", "evals")
    finally:
        subprocess.run(["umount", str(place)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, named",
    [
        (["distributed=true"], "distributed=true could not join"),
        (["data.amplitude=[1]"], "data.amplitude=[1.0] is not allowed: it takes exactly 2"),
        (["train.steps=abc"], "train.steps"),
    ],
)
def test_bad_values_are_one_paragraph(env, tmp_path, args, named):
    refused(metalearn(["train", *args], env, tmp_path), named)


@pytest.mark.slow
def test_run_dir_that_is_a_file_is_refused(env, tmp_path):
    (tmp_path / "afile").write_text("mine")
    refused(metalearn(["train", "hydra.run.dir=afile"], env, tmp_path), "is not a folder")
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.slow
def test_non_finite_loss_before_a_checkpoint_names_no_checkpoint(env, tmp_path):
    run = tmp_path / "run"
    args = ["algo.inner_lr=1e30", "train.log_every=1", f"hydra.run.dir={run}"]
    result = metalearn(["train", *args], env, tmp_path)
    refused(result, "non-finite at step 1", "No checkpoint was saved")
    assert "latest.npz" not in result.stderr


# ------------------------------------------------------- nothing is silently ignored


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["+algo.innerlr=0.1"], "algo.innerlr is not a setting of algo=maml"),
        (["++train.foo=1"], "train.foo is not a setting of train"),
        (["algo.first_order=2"], "algo.first_order=2 is not allowed"),
        (["algo.first_order=yes"], "it is a boolean"),
        (["seed=4294967296"], "seed=4294967296 is not allowed"),
        (["data=omniglot", "data.split_seed=-1"], "data.split_seed=-1"),
        (["data.k_query=1000000"], "data.k_query=1000000"),
        (["eval.num_tasks=2147483648"], "eval.num_tasks=2147483648"),
    ],
)
def test_schema_is_closed_and_exact(overrides, named):
    with pytest.raises(ConfigError, match=named.replace("+", r"\+").replace("[", r"\[")):
        to_config(compose_config(overrides), overrides)


@pytest.mark.slow
def test_a_setting_without_meaning_for_the_data_is_refused(env, tmp_path):
    refused(metalearn(["train", "data.n_way=5"], env, tmp_path), "data.n_way is not a setting")
    assert "+data.n_way" not in metalearn(["train", "data.n_way=5"], env, tmp_path).stderr


# ------------------------------------------------- run directories from someone else


@pytest.mark.slow
def test_interpolations_in_a_received_run_never_resolve(finished, env, tmp_path):
    secret = "s3cr3t-value-42"
    environ = {**env, "ML_TEST_SECRET": secret}
    run = copy_run(finished, tmp_path / "received")
    config = (run / ".hydra" / "config.yaml").read_text()
    config = config.replace("outer_lr: 0.001", "outer_lr: ${oc.env:ML_TEST_SECRET}")
    (run / ".hydra" / "config.yaml").write_text(config)
    overrides = run / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text() + "- algo.inner_lr=${oc.env:ML_TEST_SECRET}\n")
    outputs = ""
    for command in (["eval", str(run)], ["train", f"resume={run}"], ["compare", str(run)]):
        result = run_metalearn(command, environ, tmp_path)
        outputs += result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr
    assert "${oc.env:ML_TEST_SECRET}" in outputs  # shown as written, never resolved
    assert secret not in outputs
    assert all(secret.encode() not in p.read_bytes() for p in run.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("link", ["train.log", "checkpoints", "evals"])
def test_writes_never_follow_a_symlink_out_of_the_run(finished, env, tmp_path, link):
    run = copy_run(finished, tmp_path / "received")
    outside = tmp_path / "outside"
    if link == "train.log":
        outside.write_text("someone's file\n")
        (run / link).unlink()
    else:
        outside.mkdir()
        (outside / "keep.txt").write_text("someone's folder")
        if (run / link).exists():
            shutil.copytree(run / link, outside, dirs_exist_ok=True)
            shutil.rmtree(run / link)
    (run / link).symlink_to(outside)
    before = digest(tmp_path / "outside") if outside.is_dir() else outside.read_bytes()
    command = (
        ["eval", str(run)] if link == "evals" else ["train", f"resume={run}", "train.steps=60"]
    )
    refused(metalearn(command, env, tmp_path), "is a symlink")
    after = digest(tmp_path / "outside") if outside.is_dir() else outside.read_bytes()
    assert after == before


def test_memory_check_says_what_asks_for_the_memory():
    from metalearn.memory import available_bytes, check_fits

    check_fits(1024, "A small step", "1 task")
    with pytest.raises(ConfigError, match=r"A huge step needs about .* GiB.*: 9 tasks\. Lower"):
        check_fits(2 * available_bytes(), "A huge step", "9 tasks")
    # the data option names its own size settings (data=meta_dataset has no k_shot to lower)
    from metalearn.data.meta_dataset import MetaDatasetConfig

    with pytest.raises(ConfigError, match=r"Lower train.meta_batch, data.max_way, data.max_query"):
        check_fits(2 * available_bytes(), "A step", "1 task", MetaDatasetConfig.size_settings)


@pytest.mark.parametrize("override", ["algo=reptile", "train=3"])
def test_eval_overrides_set_keys_not_groups(override):
    from dataclasses import asdict

    from metalearn.config import from_yaml_with_overrides

    saved = asdict(to_config(compose_config([])))
    with pytest.raises(ConfigError, match="is a group of settings"):
        from_yaml_with_overrides(saved, [override])
    assert from_yaml_with_overrides(saved, ["train.steps=3"]).train.steps == 3
