"""Episode protocols: training episodes of another shape than the test episodes (train.n_way,
train.k_shot, train.k_query), Omniglot's within-alphabet episodes and its small background sets
(Lake et al. 2015)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compose_config

from metalearn.checks import ConfigError
from metalearn.data import omniglot
from metalearn.experiment import build, initial_state
from metalearn.train_step import make_train_step

REAL_DATA = Path(__file__).resolve().parents[2] / "shared/data/omniglot"
KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def root(omniglot):  # conftest's tiny Omniglot (this module uses the name for the data module)
    return omniglot


def config(root, tmp_path, monkeypatch, overrides):
    overrides = ["data=omniglot", f"data.root={root}", "data.image_size=12", "model.hidden=4",
                 "data.download=false", *overrides]  # fmt: skip
    return compose_config(overrides, tmp_path, monkeypatch)


def random_split(*more):
    return ["data.split_sizes=[12,4,4]", *more]


# ------------------------------------------------------------------ training shapes


def test_training_episodes_take_their_own_shape_and_test_episodes_keep_the_data_shape(
    root, tmp_path, monkeypatch
):
    cfg = config(root, tmp_path, monkeypatch, random_split(
        "algo=protonet", "data.n_way=3", "data.k_shot=1", "data.k_query=2",
        "train.n_way=6", "train.k_shot=2", "train.k_query=3"))  # fmt: skip
    exp = build(cfg)
    train = exp.train_sample(KEY, exp.source.splits["train"], False)
    assert train.support.x.shape[0] == 6 * 2 and train.query.x.shape[0] == 6 * 3
    assert sorted(set(np.asarray(train.support.y).tolist())) == list(range(6))
    test = exp.source.sample(KEY, exp.source.splits["test"], False)
    assert test.support.x.shape[0] == 3 and test.query.x.shape[0] == 3 * 2
    params = exp.algo.init(KEY)
    step = make_train_step(exp, meta_batch=2)
    state, metrics = step(initial_state(exp, params), exp.source.splits["train"], KEY, 1)
    assert np.isfinite(float(metrics["loss"]))
    # the 6-way training loss is the prototype loss of 6-way episodes: its chance level is log 6
    assert float(metrics["loss"]) == pytest.approx(np.log(6), abs=0.8)


def test_a_training_way_needs_a_learner_whose_parameters_fit_any_way(root, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"train.n_way=6 differs from data.n_way=3.*protonet"):
        config(root, tmp_path, monkeypatch, random_split("algo=maml", "data.n_way=3",
                                                         "train.n_way=6"))  # fmt: skip
    # another shot or query size is fine for every learner
    cfg = config(root, tmp_path, monkeypatch, random_split("algo=maml", "data.n_way=3",
                                                           "train.k_query=4"))  # fmt: skip
    exp = build(cfg)
    assert exp.train_sample(KEY, exp.source.splits["train"], False).query.x.shape[0] == 12


def test_bad_training_shapes_are_one_paragraph(root, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.k_shot=0 is not allowed"):
        config(root, tmp_path, monkeypatch, random_split("train.k_shot=0"))
    with pytest.raises(ConfigError, match="only N-way K-shot classification data"):
        sinusoid = ["data=sinusoid", "model=mlp", "train.k_shot=5"]
        compose_config(sinusoid, tmp_path, monkeypatch)
    cfg = config(
        root, tmp_path, monkeypatch, random_split("algo=protonet", "data.n_way=3", "train.n_way=13")
    )
    with pytest.raises(ConfigError, match="train.n_way=13 is more classes than the meta-train"):
        build(cfg)
    cfg = config(
        root,
        tmp_path,
        monkeypatch,
        random_split("data.n_way=3", "train.k_shot=10", "train.k_query=11"),
    )
    with pytest.raises(ConfigError, match="train.k_shot \\+ train.k_query = 21"):
        build(cfg)


# ------------------------------------------------------------------ within-alphabet episodes


def alphabets_of(exp, split: str) -> np.ndarray:
    """The alphabet index of each class of a split, by the class order make_source uses."""
    data = omniglot.load_omniglot(exp.cfg.data.root, image_size=12, download=False)
    d = exp.cfg.data
    classes = omniglot.split_classes(
        data,
        split=d.split,
        sizes=(12, 4, 4),
        val_alphabets=d.val_alphabets,
        background=d.background,
    )
    return data.alphabet[classes[split]], data


def test_within_alphabet_episodes_draw_every_class_from_one_alphabet(root, tmp_path, monkeypatch):
    overrides = ["data.split=alphabet", "data.val_alphabets=1", "data.episodes=within_alphabet",
                 "data.n_way=3"]  # fmt: skip
    cfg = config(root, tmp_path, monkeypatch, overrides)
    exp = build(cfg)
    alphabet, _ = alphabets_of(exp, "train")
    tasks = jax.vmap(lambda k: exp.source.sample(k, exp.source.splits["train"], True))(
        jax.random.split(KEY, 200)
    )
    classes = np.asarray(tasks.support.y)  # global labels: the classes' indices in the split
    per_episode = alphabet[classes]
    assert (per_episode == per_episode[:, :1]).all()  # one alphabet per episode
    assert set(per_episode[:, 0].tolist()) == set(alphabet.tolist())  # both train alphabets
    assert all(len(set(row)) == 3 for row in classes.tolist())  # 3 distinct classes
    local = exp.source.sample(KEY, exp.source.splits["train"], False)
    assert sorted(np.asarray(local.support.y).tolist()) == [0, 1, 2]


def test_within_alphabet_needs_an_alphabet_with_n_way_characters(root, tmp_path, monkeypatch):
    cfg = config(root, tmp_path, monkeypatch, random_split("data.episodes=within_alphabet",
                                                           "data.n_way=3"))  # fmt: skip
    with pytest.raises(ConfigError, match="no alphabet of the meta-val split has 3 characters"):
        build(cfg)


def test_small_background_trains_on_its_alphabets_only(root, tmp_path, monkeypatch):
    # the fixture's alphabet names stand in for the release's five
    monkeypatch.setitem(omniglot.SMALL_BACKGROUNDS, "small1", ("Background_A",))
    overrides = ["data.split=alphabet", "data.val_alphabets=1", "data.background=small1",
                 "data.n_way=3"]  # fmt: skip
    cfg = config(root, tmp_path, monkeypatch, overrides)
    exp = build(cfg)
    alphabet, data = alphabets_of(exp, "train")
    assert {data.alphabets[a] for a in alphabet} == {"Background_A"}
    val, _ = alphabets_of(exp, "val")
    assert {data.alphabets[a] for a in val} == {"Background_C"}  # the last of the others
    assert exp.source.n_train_classes == 4
    with pytest.raises(ConfigError, match="data.background=small1 .* needs data.split=alphabet"):
        config(root, tmp_path, monkeypatch, random_split("data.background=small1"))


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"no Omniglot copy at {REAL_DATA}")
def test_the_release_small_sets_and_20_way_within_alphabet_test_episodes(tmp_path, monkeypatch):
    """On the real release: small1/small2 hold the characters their zips hold (136 and 156),
    and 20-way within-alphabet episodes of the evaluation set stay in one alphabet."""
    import zipfile

    for name, n in (("small1", 136), ("small2", 156)):
        with zipfile.ZipFile(REAL_DATA / f"images_background_{name}.zip") as z:
            folders = {tuple(p.split("/")[1:3]) for p in z.namelist() if p.endswith(".png")}
        assert len(folders) == n
        cfg = config(REAL_DATA, tmp_path, monkeypatch, ["data.split=alphabet",
                     f"data.background={name}", "data.episodes=within_alphabet",
                     "data.n_way=20"])  # fmt: skip
        exp = build(cfg)
        data = omniglot.load_omniglot(REAL_DATA, image_size=12, download=False)
        classes = omniglot.split_classes(data, split="alphabet", background=name)
        train = {tuple(data.characters[c].split("/")) for c in classes["train"]}
        assert train == folders  # the same characters as the release's small zip
        sample, test = exp.source.sample, exp.source.splits["test"]
        tasks = jax.vmap(lambda k, sample=sample, test=test: sample(k, test, True))(
            jax.random.split(KEY, 50)
        )
        alphabet = data.alphabet[classes["test"]][np.asarray(tasks.support.y)]
        assert (alphabet == alphabet[:, :1]).all()
        assert jnp.asarray(tasks.support.x).shape == (50, 20, 12, 12, 1)


# ------------------------------------------------------------------ augmentation


def test_augmentation_changes_training_episodes_only(root, tmp_path, monkeypatch):
    """data.augment=flip: a training episode is the same episode as without augmentation, each
    image flipped or not; test episodes are untouched; bad recipes are one paragraph."""
    cfg = config(root, tmp_path, monkeypatch, random_split("data.n_way=3", "data.augment=flip"))
    exp = build(cfg)
    arrays = exp.source.splits["train"]
    plain, augmented = exp.source.sample(KEY, arrays, False), exp.train_sample(KEY, arrays, False)
    np.testing.assert_array_equal(plain.support.y, augmented.support.y)
    x, a = np.asarray(plain.query.x), np.asarray(augmented.query.x)
    flipped = [not np.array_equal(xi, ai) for xi, ai in zip(x, a, strict=True)]
    for xi, ai, f in zip(x, a, flipped, strict=True):
        np.testing.assert_array_equal(ai, xi[:, ::-1] if f else xi)
    assert any(flipped)
    assert exp.source.sample is not exp.train_sample  # evaluation samples without it
    step = make_train_step(exp, meta_batch=2)
    _, metrics = step(initial_state(exp, exp.algo.init(KEY)), arrays, KEY, 1)
    assert np.isfinite(float(metrics["loss"]))
    with pytest.raises(ConfigError, match="data.augment='rotate' is not allowed"):
        config(root, tmp_path, monkeypatch, random_split("data.augment=rotate"))
