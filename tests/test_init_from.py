"""algo.init_from: any algorithm starts model groups from another run's checkpoint, by path."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omniglot_fixture import make_omniglot_zips

from metalearn.checks import ConfigError
from metalearn.config import register_schemas, to_config
from metalearn.experiment import build, prepare
from metalearn.rundir import RunDir

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = ["train.steps=2", "eval.every=2", "eval.num_tasks=2", "eval.val_tasks=2",
        "train.meta_batch=2"]  # fmt: skip


def config(overrides):
    register_schemas()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return to_config(compose("config", overrides=[*TINY, *overrides]), overrides)


def source_run(tmp_path, overrides) -> tuple[Path, dict]:
    """A run directory holding only a best checkpoint of the config's freshly drawn params."""
    exp = build(config(overrides))
    params = exp.algo.init(jax.random.PRNGKey(42))
    run = tmp_path / "source"
    RunDir(run).save_checkpoint("best", params, {"step": 1})
    return run, params


def started(tmp_path, overrides):
    cfg = config(overrides)
    return prepare(cfg, RunDir(tmp_path / "target")).state.params


def assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize(
    "target, prefix",
    [
        ("algo=maml", None),
        pytest.param("algo=metasgd", "init", marks=pytest.mark.slow),
        pytest.param("algo=reptile", None, marks=pytest.mark.slow),
    ],
)
def test_blocks_of_a_pretraining_run_start_another_algorithm(tmp_path, target, prefix):
    """Pre-train (finetune) on sinusoids, start MAML / Meta-SGD / Reptile from its blocks."""
    run, source = source_run(tmp_path, ["algo=finetune"])
    params = started(tmp_path, [target, f"algo.init_from={run}"])
    model_params = params[prefix] if prefix else params
    assert_same(model_params["blocks"], source["blocks"])
    fresh = started(tmp_path / "fresh", [target])
    fresh_model = fresh[prefix] if prefix else fresh
    # the head is not in init_groups=[blocks]: it stays as this run draws it
    assert_same(model_params["head"], fresh_model["head"])
    assert not np.array_equal(fresh_model["blocks"][0]["w"], source["blocks"][0]["w"])


def test_groups_select_what_is_loaded(tmp_path):
    run, source = source_run(tmp_path, ["algo=maml"])
    params = started(tmp_path, ["algo=maml", f"algo.init_from={run}", "algo.init_groups=[all]"])
    assert_same(params, source)
    params = started(
        tmp_path, ["algo=maml", f"algo.init_from={run}", "algo.init_groups=[blocks.1]"]
    )
    assert_same(params["blocks"][1], source["blocks"][1])
    assert not np.array_equal(params["blocks"][0]["w"], source["blocks"][0]["w"])


@pytest.mark.slow  # builds a (synthetic) Omniglot source: the fast tier has the sinusoid cases
def test_an_image_pretraining_run_starts_protonet_and_r2d2(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_omniglot_zips(tmp_path / "omniglot", 3, 2, 4)
    data = ["data=omniglot", f"data.root={root}", "data.split_sizes=[12,4,4]", "model.hidden=8",
            "data.image_size=14", "data.k_query=2", "data.n_way=3"]  # fmt: skip
    run, source = source_run(tmp_path, [*data, "algo=finetune"])
    proto = started(tmp_path / "p", [*data, "algo=protonet", f"algo.init_from={run}"])
    assert_same(proto["blocks"], source["blocks"])
    r2d2 = started(tmp_path / "r", [*data, "algo=r2d2", f"algo.init_from={run}"])
    assert_same(r2d2["embed"]["blocks"], source["blocks"])


def test_mismatches_name_the_parameter(tmp_path):
    run, _ = source_run(tmp_path, ["algo=maml", "model.hidden=16"])
    with pytest.raises(ConfigError, match=r"\['blocks'\]\[0\]\['b'\] is \[40\] here but"):
        started(tmp_path, ["algo=maml", f"algo.init_from={run}"])
    with pytest.raises(ConfigError, match="names \\['tail'\\], which this model does not have"):
        started(tmp_path, ["algo=maml", f"algo.init_from={run}", "algo.init_groups=[tail]"])
    with pytest.raises(ConfigError, match="cannot be read"):
        started(tmp_path, ["algo=maml", f"algo.init_from={tmp_path / 'nowhere'}"])
