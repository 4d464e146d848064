"""Multi-task learning end to end: a multirun over every conditioning, the per-task reports, the
negative-transfer report, soft sharing, resumable weighting state, and bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import metalearn

from metalearn.conditioning import CONDITIONINGS
from metalearn.experiment import restore
from metalearn.weighting import pairwise_distance_penalty

TINY = [
    "algo=multitask",
    "data=multi_sinusoid",
    "data.n_tasks=3",
    "train.steps=30",
    "train.meta_batch=6",
    "eval.every=15",
    "eval.num_tasks=12",
    "eval.val_tasks=6",
    "progress=false",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, env):
    """One multirun over every conditioning."""
    root = tmp_path_factory.mktemp("sweep")
    metalearn(
        ["train", "-m", *TINY, f"conditioning={','.join(CONDITIONINGS)}",
         f"hydra.sweep.dir={root / 'sweep'}"],
        env, root, check=True,
    )  # fmt: skip
    return root / "sweep"


@pytest.mark.slow
def test_every_conditioning_writes_comparable_per_task_summaries(sweep):
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert sorted(s["conditioning"] for s in summaries) == sorted(CONDITIONINGS)
    for summary in summaries:
        test = summary["test"]
        assert set(test["per_task"]) == {"task0", "task1", "task2"}
        losses = [t["loss"] for t in test["per_task"].values()]
        assert test["loss"] == pytest.approx(sum(losses) / 3)
        worst = max(test["per_task"], key=lambda t: test["per_task"][t]["loss"])
        assert test["worst"] == {"task": worst, "loss": max(losses)}


@pytest.mark.slow
def test_compare_shows_every_task_and_the_negative_transfer_report(sweep, tmp_path, env):
    result = metalearn(
        ["compare", str(sweep), "--md", str(tmp_path / "t.md"), "--negative-transfer",
         str(tmp_path / "report")],
        env, tmp_path, check=True,
    )  # fmt: skip
    header = (tmp_path / "t.md").read_text().splitlines()[0]
    for column in ("conditioning", "test loss", "worst task", "task0", "task1", "task2"):
        assert column in header
    report = (tmp_path / "report" / "negative_transfer.md").read_text()
    assert "conditioning=film" in report and "conditioning=separate" not in report
    assert (tmp_path / "report" / "negative_transfer.png").stat().st_size > 1000
    # each gain is the separate run's loss minus the run's loss on that task
    runs = {
        s["conditioning"]: s["test"]["per_task"]
        for s in (json.loads(p.read_text()) for p in sweep.glob("*/summary.json"))
    }
    row = next(line for line in report.splitlines() if line.startswith("| task1 "))
    film_column = report.splitlines()[0].split(" | ").index("conditioning=film")
    gain = float(row.split(" | ")[film_column].strip(" |"))
    assert gain == pytest.approx(
        runs["separate"]["task1"]["loss"] - runs["film"]["task1"]["loss"], abs=0.006
    )
    assert "wrote" in result.stdout


@pytest.mark.slow
def test_dwa_state_is_checkpointed_so_a_resumed_run_continues_exactly(tmp_path, env):
    args = [*TINY, "algo.weighting=dwa", "train.log_every=1", "eval.every=1000"]
    full, split = tmp_path / "full", tmp_path / "split"
    metalearn(["train", *args, "train.steps=8", f"hydra.run.dir={full}"], env, tmp_path, check=True)
    metalearn(
        ["train", *args, "train.steps=4", f"hydra.run.dir={split}"], env, tmp_path, check=True
    )
    metalearn(["train", f"resume={split}", "train.steps=8"], env, tmp_path, check=True)

    def train_lines(run):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [
            {k: v for k, v in x.items() if k != "elapsed_s"} for x in lines if x["split"] == "train"
        ]

    assert train_lines(split) == train_lines(full)
    assert len(train_lines(full)) == 8


@pytest.mark.slow
def test_soft_sharing_pulls_separate_networks_together(tmp_path, env):
    def distance(extra):
        run = tmp_path / "_".join(extra).replace("=", "-")
        metalearn(["train", *TINY, "conditioning=separate", "train.outer_lr=0.03", *extra,
                   f"hydra.run.dir={run}"],
                  env, tmp_path, check=True)  # fmt: skip
        _, params, _ = restore(run, [], "best")
        return float(pairwise_distance_penalty(params["model"]["tasks"]))

    assert distance(["algo.soft_sharing=1.0"]) < 0.5 * distance(["algo.soft_sharing=0.0"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["algo.weighting=static", "algo.task_weights=[1,2]"],
         "algo.task_weights has 2 entries but the data has 3 tasks"),
        (["algo.soft_sharing=0.5", "conditioning=film"], "needs conditioning=separate"),
        (["data=sinusoid"], "algo=multitask needs multi-task data"),
        (["algo=maml"], "is a fixed set of tasks for multi-task learning"),
        (["algo=maml", "data=sinusoid", "conditioning=film"], "is not used by algo=maml"),
        (["conditioning=mmoe", "conditioning.experts=0"], "conditioning.experts=0 must be >= 1"),
        (["conditioning=film", "conditioning.experts=2"], "conditioning.experts is not a setting"),
    ],
)  # fmt: skip
def test_bad_multitask_input_is_one_clear_paragraph(args, message, tmp_path, env):
    base = [a for a in TINY if not a.startswith("data")] if "data=sinusoid" in args else TINY
    result = metalearn(["train", *base, *args, f"hydra.run.dir={tmp_path / 'run'}"], env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    summary = tmp_path / "run" / "summary.json"  # no training happened: at most a failed record
    assert not summary.exists() or json.loads(summary.read_text())["status"] == "failed"


@pytest.mark.slow
def test_mmoe_and_separate_train_on_images():
    """The index-selected conditionings work on a conv model (vmapped over tasks in one step)."""
    from metalearn.conditioning import ConditioningConfig, MMoEConfig, make_conditioned_model
    from metalearn.models.conv4 import Conv4Config

    for name in ("mmoe", "separate", "multihead"):
        cfg = MMoEConfig(experts=2) if name == "mmoe" else ConditioningConfig(name=name)
        model = make_conditioned_model(cfg, Conv4Config(hidden=4), (12, 12, 1), n_tasks=2)
        params = model.init(jax.random.PRNGKey(0), 3)
        x = jnp.ones((2, 5, 12, 12, 1))
        out = jax.jit(jax.vmap(model.apply, (None, 0, 0)))(params, x, jnp.array([0, 1]))
        assert out.shape == (2, 5, 3) and bool(jnp.all(jnp.isfinite(out)))


def sweep_run(sweep, conditioning):
    return next(p.parent for p in sweep.glob("*/summary.json")
                if json.loads(p.read_text())["conditioning"] == conditioning)  # fmt: skip


@pytest.mark.slow
def test_transfer_starts_from_the_pretrained_trunk_and_freezes_blocks(sweep, tmp_path, env):
    pre, tuned = sweep_run(sweep, "multihead"), tmp_path / "tuned"
    metalearn(
        ["train", *TINY, "data.task_seed=7", "data.n_tasks=1", f"algo.init_from={pre}",
         "algo.freeze=1", "algo.layer_decay=0.5", f"hydra.run.dir={tuned}"],
        env, tmp_path, check=True,
    )  # fmt: skip
    _, source, _ = restore(pre, [], "best")
    _, target, _ = restore(tuned, [], "best")
    frozen, tuned_block = (b for b in target["model"]["model"]["blocks"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 frozen, source["model"]["model"]["blocks"][0])  # fmt: skip
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                         tuned_block, source["model"]["model"]["blocks"][1])  # fmt: skip
    assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.slow
def test_transfer_from_a_run_without_a_shared_trunk_is_refused(sweep, tmp_path, env):
    pre = sweep_run(sweep, "separate")
    result = metalearn(["train", *TINY, f"algo.init_from={pre}", f"hydra.run.dir={tmp_path / 'b'}"],
                       env, tmp_path)  # fmt: skip
    assert result.returncode == 2 and "cannot initialise this model" in result.stderr
