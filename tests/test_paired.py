"""Comparisons a reviewer trusts: the protocol card's differences and the paired test of runs on
the same test tasks (metalearn/protocol.py, metalearn/reports/paired.py). Run directories are
written here as `metalearn train` leaves them; tests/test_cli.py checks that training writes them
so (test_omniglot_multirun_compare_and_eval)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from metalearn.protocol import TEST_TASKS_FILE, flatten
from metalearn.reports.compare import compare_command
from metalearn.reports.paired import paired_difference

CARD = {
    "data": {"name": "omniglot", "n_way": 5, "k_shot": 1, "k_query": 15},
    "train_episodes": None,
    "test": {"num_tasks": 600, "seed": 0, "inner_steps": 1},
    "model": {"name": "conv4", "norm": "transductive"},
    "budget": {"steps": 100},
    "test_tasks": "same-tasks",
}


def write_run(path: Path, accuracies, card=CARD, key=None) -> Path:
    path.mkdir(parents=True)
    acc = np.asarray(accuracies, float)
    summary = {
        "status": "completed",
        "objective": "accuracy",
        "test": {
            "accuracy": acc.mean(),
            "accuracy_ci95": 1.96 * acc.std() / len(acc) ** 0.5,
            "loss": 0.25,
            "ece": 0.0625,
        },
        "protocol": card,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    record = {"test_tasks": key or card["test_tasks"], "metrics": {"accuracy": acc.tolist()}}
    (path / TEST_TASKS_FILE).write_text(json.dumps(record))
    return path


def compare_output(paths, capsys) -> str:
    compare_command([str(p) for p in paths])
    return capsys.readouterr().out


def test_paired_difference_matches_a_paired_t_test():
    """Against scipy's paired t-test (ttest_rel) and numpy's moments, written independently."""
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 1.0, 600)
    b = np.clip(a - 0.01 + rng.normal(0, 0.1, 600), 0, 1)
    d = paired_difference(a.tolist(), b.tolist())
    diff = a - b
    np.testing.assert_allclose(d["mean"], diff.mean(), rtol=1e-12)
    se = diff.std(ddof=1) / np.sqrt(600)
    np.testing.assert_allclose(d["ci95"], stats.t.ppf(0.975, 599) * se, rtol=1e-9)
    np.testing.assert_allclose(d["ci95"], 1.964 * se, rtol=1e-3)  # t's 97.5% point at 599 dof
    np.testing.assert_allclose(d["p"], stats.ttest_rel(a, b).pvalue, rtol=1e-6)
    assert d["n"] == 600 and d["p"] < 0.05


def test_runs_on_the_same_tasks_are_paired_and_others_are_named(tmp_path, capsys):
    rng = np.random.default_rng(1)
    hard = rng.uniform(0.3, 1.0, 200)  # what makes a task hard is shared by both runs
    write_run(tmp_path / "best", np.clip(hard + 0.02, 0, 1))
    write_run(tmp_path / "other", hard)
    other_shape = {**CARD, "data": {**CARD["data"], "k_shot": 5}, "test_tasks": "5-shot tasks"}
    write_run(tmp_path / "five_shot", hard, card=other_shape)
    out = compare_output([tmp_path], capsys)
    header, first = out.splitlines()[:2]
    assert "test nll" in header and "test ece" in header  # calibration columns
    assert "0.25" in first.split() and "0.0625" in first.split()
    assert "Paired test against best" in out
    line = next(s for s in out.splitlines() if s.strip().startswith("other:"))
    mean = float(line.split(":")[1].split()[0])
    assert mean == pytest.approx(-100 * np.mean(np.clip(hard + 0.02, 0, 1) - hard), rel=1e-2)
    assert "p = " in line and "200 tasks" in line
    assert "five_shot: not on the same test tasks" in out
    # the protocol note names the field that differs, and which runs have which value
    note = next(s for s in out.splitlines() if "data.k_shot" in s)
    assert "1 (best, other)" in note and "5 (five_shot)" in note
    assert "budget" not in out  # budgets differ by design: not a protocol difference


def test_runs_without_per_task_results_are_said_to_lack_them(tmp_path, capsys):
    write_run(tmp_path / "a", [1.0, 0.0, 1.0])
    (write_run(tmp_path / "b", [0.0, 0.0, 1.0]) / TEST_TASKS_FILE).write_text("{not json")
    out = compare_output([tmp_path], capsys)
    assert "b: no per-task test results" in out


def test_flatten_gives_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": None}) == {
        "a.b": 1,
        "a.c.d": [2],
        "e": None,
    }


def test_expected_calibration_error_by_hand():
    """Guo et al.'s ECE, written out with numpy: 15 bins, |accuracy - confidence| weighted."""
    import jax.numpy as jnp

    from metalearn.algorithms.base import classification_loss

    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (40, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 40)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    conf, correct = p.max(1), (p.argmax(1) == labels).astype(float)
    bins = np.minimum((conf * 15).astype(int), 14)
    want = sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / 40
    from metalearn.models import norm

    with norm.testing():  # calibration is a meta-test metric
        _, metrics = classification_loss(jnp.asarray(logits), jnp.asarray(labels))
        _, m = classification_loss(jnp.asarray(logits)[:-1], jnp.asarray(labels)[:-1])
        assert "ece" in m
    assert "ece" not in classification_loss(jnp.asarray(logits), jnp.asarray(labels))[1]
    np.testing.assert_allclose(metrics["ece"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], -np.log(p[np.arange(40), labels]).mean(), rtol=1e-5)
    # a padded slot changes nothing
    mask = jnp.asarray(np.arange(41) < 40)
    padded = jnp.concatenate([jnp.asarray(logits), jnp.full((1, 5), 9.0)])
    with norm.testing():
        _, m = classification_loss(padded, jnp.asarray(np.append(labels, -1)), mask)
    np.testing.assert_allclose(m["ece"], want, rtol=1e-5, atol=1e-6)


def test_seeds_of_one_configuration_are_one_row(tmp_path, capsys):
    """-m seed=0,1,2 of one setting: one row with the mean, the spread over seeds and each
    run's CI; another setting keeps its own row; --each-run lists every run."""
    rng = np.random.default_rng(3)
    means = {}
    for seed in range(3):
        acc = rng.uniform(0.4, 1.0, 50)
        run = write_run(tmp_path / f"lr0.1_seed{seed}", acc)
        means[seed] = acc.mean()
        summary = json.loads((run / "summary.json").read_text())
        summary["overrides"] = ["algo.inner_lr=0.1", f"seed={seed}"]
        (run / "summary.json").write_text(json.dumps(summary))
    other = write_run(tmp_path / "lr0.5", rng.uniform(0.0, 0.3, 50))
    summary = json.loads((other / "summary.json").read_text())
    summary["overrides"] = ["algo.inner_lr=0.5", "seed=0"]
    (other / "summary.json").write_text(json.dumps(summary))

    table = compare_output([tmp_path], capsys).split("\n\n")[0].splitlines()
    assert len(table) == 3 and "sd over seeds" in table[0]
    row = table[1].split()
    assert row[0] == "lr0.1_seed0" and row[1] == "+2" and "0,1,2" in row
    values = list(means.values())
    assert float(row[row.index("0,1,2") + 1]) == pytest.approx(100 * np.mean(values), rel=1e-3)
    sd = float(row[row.index("0,1,2") + 3])
    assert sd == pytest.approx(100 * np.std(values, ddof=1), rel=0.05)
    assert len(row[row.index("0,1,2") + 2].split("/")) == 3  # each seed's own CI
    each = compare_command([str(tmp_path), "--each-run"]) or capsys.readouterr().out
    assert len(each.split("\n\n")[0].splitlines()) == 5
