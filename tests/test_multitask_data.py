"""Multi-task task sources: Omniglot alphabets as tasks, and sinusoids with set relatedness."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omniglot_fixture import make_omniglot_zips

from metalearn.config import ConfigError, register_schemas, to_config
from metalearn.data import SPLITS, make_task_source
from metalearn.data.multi_sinusoid import MultiSinusoidConfig, task_parameters
from metalearn.data.omniglot import OmniglotArrays, load_omniglot
from metalearn.data.omniglot_alphabets import (
    OmniglotAlphabetsConfig,
    alphabet_arrays,
    sample_alphabet_task,
    select_alphabets,
    split_drawings,
)

REAL_DATA = Path(__file__).resolve().parents[2] / "shared/data/omniglot"
CONF = Path(__file__).resolve().parents[1] / "conf"
KEY = jax.random.PRNGKey(0)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test sees the user's METALEARN_DATA or writes to the real cache."""
    monkeypatch.delenv("METALEARN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """3 background + 2 evaluation alphabets of 4 characters each."""
    return make_omniglot_zips(tmp_path_factory.mktemp("omniglot"), 3, 2, 4)


def alphabets_source(root, **kw):
    kw = {"k_shot": 3, "k_query": 2, "image_size": 12, **kw}
    return make_task_source(OmniglotAlphabetsConfig(root=str(root), download=False, **kw))


def sinusoid_source(**kw):
    return make_task_source(MultiSinusoidConfig(**kw))


# ------------------------------------------------------------------------- Omniglot alphabets


def synthetic_omniglot(sizes=(2, 5, 3), eval_sizes=(2,)) -> OmniglotArrays:
    """Alphabets of unequal sizes; every image is constant, with value 1 + 20 * row + drawing,
    so an example decodes back to the character row and drawing it came from."""
    per_alphabet = [*sizes, *eval_sizes]
    n = sum(per_alphabet)
    assert 20 * n < 255
    values = 1 + 20 * np.arange(n)[:, None] + np.arange(20)[None, :]
    images = np.broadcast_to(values[:, :, None, None], (n, 20, 4, 4)).astype(np.uint8)
    alphabet = np.repeat(np.arange(len(per_alphabet)), per_alphabet).astype(np.int32)
    names = tuple(f"Bg{i}" for i in range(len(sizes))) + tuple(
        f"Ev{i}" for i in range(len(eval_sizes))
    )
    return OmniglotArrays(
        images=images,
        alphabet=alphabet,
        background=alphabet < len(sizes),
        alphabets=names,
        characters=tuple(f"{names[a]}/character{i:02d}" for i, a in enumerate(alphabet)),
    )


def decode(x) -> tuple[np.ndarray, np.ndarray]:
    """Examples x [n, 4, 4, 1] of synthetic_omniglot -> (character rows, drawings)."""
    value = np.rint(np.asarray(x)[:, 0, 0, 0] * 255).astype(int) - 1
    return value // 20, value % 20


@pytest.mark.parametrize("split", SPLITS)
def test_alphabet_batches_are_labelled_within_their_alphabet(split):
    data = synthetic_omniglot()
    alphabets = select_alphabets(data, [], [])
    assert alphabets == [0, 1, 2], "the default is every background alphabet"
    drawing_ids = split_drawings(len(data.characters), (12, 4, 4), seed=3)[split]
    arrays = jax.tree.map(jnp.asarray, alphabet_arrays(data, alphabets, drawing_ids))
    np.testing.assert_array_equal(arrays.n_characters, [2, 5, 3])
    assert arrays.images.shape == (3, 5, drawing_ids.shape[1], 4, 4)
    k_shot, k_query = 3, 5  # 8 = every slot of the smallest alphabet's val/test split

    @jax.jit
    def batches(keys, task_id):
        return jax.vmap(
            lambda k: sample_alphabet_task(k, arrays, task_id, k_shot=k_shot, k_query=k_query)
        )(keys)

    first_row = [int(np.flatnonzero(data.alphabet == a)[0]) for a in alphabets]
    for t, n_chars in enumerate([2, 5, 3]):
        tasks = batches(jax.random.split(jax.random.fold_in(KEY, t), 40), t)
        assert tasks.support.x.shape == (40, k_shot, 4, 4, 1)
        assert tasks.query.x.shape == (40, k_query, 4, 4, 1)
        assert tasks.support.y.dtype == jnp.int32
        np.testing.assert_array_equal(tasks.task_id, t)
        x = np.concatenate([tasks.support.x, tasks.query.x], axis=1)
        y = np.concatenate([tasks.support.y, tasks.query.y], axis=1)
        assert y.min() >= 0 and y.max() < n_chars
        assert set(y.ravel().tolist()) == set(range(n_chars)), "every character gets drawn"
        for xs, ys in zip(x, y, strict=True):
            rows, draws = decode(xs)
            np.testing.assert_array_equal(rows, first_row[t] + ys)  # label = index in alphabet
            assert all(d in drawing_ids[r] for r, d in zip(rows, draws, strict=True))
            assert len(set(zip(rows, draws, strict=True))) == k_shot + k_query, "disjoint"


def test_drawing_split_partitions_each_characters_drawings():
    parts = split_drawings(7, (14, 2, 4), seed=0)
    assert [parts[s].shape for s in SPLITS] == [(7, 14), (7, 2), (7, 4)]
    every = np.concatenate([parts[s] for s in SPLITS], axis=1)
    np.testing.assert_array_equal(np.sort(every, axis=1), np.tile(np.arange(20), (7, 1)))
    assert not np.array_equal(parts["test"][0], parts["test"][1]), "one permutation per character"
    other = split_drawings(7, (14, 2, 4), seed=1)
    assert not np.array_equal(parts["test"], other["test"]), "the seed picks the drawings"
    np.testing.assert_array_equal(parts["test"], split_drawings(7, (14, 2, 4), seed=0)["test"])


def test_every_split_has_every_character_and_no_drawing_twice(root):
    src = alphabets_source(root, drawings=(12, 3, 5))
    data = load_omniglot(root, image_size=12, download=False)
    assert src.n_tasks == 3 and src.task_names == ("Background_A", "Background_B", "Background_C")
    assert src.classes_per_task == (4, 4, 4) and src.n_out == 4
    assert src.kind == "classification" and src.input_shape == (12, 12, 1)
    for t, name in enumerate(src.task_names):
        rows = np.flatnonzero(data.alphabet == data.alphabets.index(name))
        for c, row in enumerate(rows):
            seen = {}
            for split, n_draw in zip(SPLITS, (12, 3, 5), strict=True):
                drawings = np.asarray(src.splits[split].images[t, c])
                assert drawings.shape == (n_draw, 12, 12)
                seen[split] = {d.tobytes() for d in drawings}
                assert len(seen[split]) == n_draw
            assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"])
            assert not seen["val"] & seen["test"]
            assert set.union(*seen.values()) == {d.tobytes() for d in data.images[row]}


def test_sample_task_honours_the_id_and_sample_draws_ids_uniformly(root):
    src = alphabets_source(root, alphabets=["Evaluation_B", "0", "Background_C"])
    assert src.task_names == ("Evaluation_B", "Background_A", "Background_C")
    arrays = src.splits["train"]
    task = jax.jit(src.sample_task)(KEY, arrays, jnp.int32(1))
    assert int(task.task_id) == 1 and task.support.x.dtype == jnp.float32
    assert 0 <= float(task.support.x.min()) and float(task.support.x.max()) <= 1

    n = 3000
    tasks = jax.jit(jax.vmap(lambda k: src.sample(k, arrays, False)))(jax.random.split(KEY, n))
    counts = np.bincount(np.asarray(tasks.task_id), minlength=3)
    # Binomial(3000, 1/3): sd 25.8, so 5 sd is 129.
    assert counts.sum() == n and np.all(np.abs(counts - n / 3) < 130), counts
    limits = np.asarray(src.classes_per_task)[np.asarray(tasks.task_id)]
    assert np.all(np.asarray(tasks.query.y) < limits[:, None])


def test_exclude_an_alphabet(root):
    src = alphabets_source(root, exclude_alphabets=["Background_B"])
    assert src.task_names == ("Background_A", "Background_C")
    assert src.splits["test"].images.shape[:3] == (2, 4, 4)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(alphabets=["Klingon"]), r"'Klingon'.*0 Background_A, 1 Background_B"),
        (dict(alphabets=["7"]), r"'7', which is not an Omniglot alphabet"),
        (dict(alphabets=["Background_A", "0"]), r"lists \['Background_A'\] more than once"),
        (dict(exclude_alphabets=["Evaluation_A"]), r"\['Evaluation_A'\], which are not among"),
        (dict(alphabets=["1"], exclude_alphabets=["1"]), "leaves no task"),
        (dict(k_shot=5, k_query=4), r"val split of alphabet .* \(4 characters x 2 drawings = 8\)"),
    ],
)
def test_bad_alphabet_options(root, kw, match):
    with pytest.raises(ConfigError, match=match):
        alphabets_source(root, **kw)


@pytest.mark.parametrize("drawings", [(14, 2, 3), (18, 2, 0), (10, 5, 5, 0)])
def test_drawing_counts_must_cover_the_20_drawings(drawings):
    with pytest.raises(ConfigError, match=r"data.drawings=\[.*add up to the 20 drawings"):
        OmniglotAlphabetsConfig(drawings=drawings)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"no Omniglot copy at {REAL_DATA}")
def test_real_omniglot_background_alphabets():
    src = alphabets_source(REAL_DATA, image_size=28, k_shot=10, k_query=10)
    assert src.n_tasks == 30 and len(src.task_names) == 30
    assert sum(src.classes_per_task) == 964
    assert src.n_out == 55 and src.classes_per_task[src.task_names.index("Tifinagh")] == 55
    assert src.splits["train"].images.shape == (30, 55, 14, 28, 28)
    tasks = jax.jit(jax.vmap(lambda k: src.sample(k, src.splits["test"], False)))(
        jax.random.split(KEY, 64)
    )
    assert tasks.query.x.shape == (64, 10, 28, 28, 1)
    limits = np.asarray(src.classes_per_task)[np.asarray(tasks.task_id)]
    assert np.all(np.asarray(tasks.support.y) < limits[:, None])


# ------------------------------------------------------------------------------ multi-sinusoid


def test_sinusoid_targets_equal_the_closed_form():
    cfg = MultiSinusoidConfig(n_tasks=4, relatedness=0.3, conflict=0.5, k_shot=6, k_query=7)
    src = make_task_source(cfg)
    params = task_parameters(cfg)
    assert src.kind == "regression" and src.n_out == 1 and src.n_tasks == 4
    for t in range(4):
        task = jax.jit(src.sample_task)(jax.random.fold_in(KEY, t), src.splits["test"], t)
        assert int(task.task_id) == t
        assert task.support.x.shape == (6, 1) and task.query.y.shape == (7, 1)
        for part in (task.support, task.query):
            x = np.asarray(part.x, np.float64)
            assert np.all((-5 <= x) & (x <= 5))
            a, f, p = (params[k][t] for k in ("amplitude", "frequency", "phase"))
            np.testing.assert_allclose(part.y, a * np.sin(f * x - p), rtol=1e-5, atol=1e-5)


def test_task_parameters_come_from_their_ranges_and_interpolate():
    ranges = dict(amplitude=(0.1, 5.0), frequency=(0.5, 2.0), phase=(0.0, np.pi))
    base = dict(n_tasks=6, task_seed=4, **ranges)
    own = task_parameters(MultiSinusoidConfig(relatedness=0.0, **base))
    shared = task_parameters(MultiSinusoidConfig(relatedness=1.0, **base))
    half = task_parameters(MultiSinusoidConfig(relatedness=0.25, **base))
    for k, (lo, hi) in ranges.items():
        assert np.all((lo <= own[k]) & (own[k] <= hi))
        assert len(set(own[k].tolist())) == 6, f"relatedness=0: every task has its own {k}"
        assert len(set(shared[k].tolist())) == 1, f"relatedness=1: one shared {k}"
        np.testing.assert_allclose(half[k], 0.25 * shared[k] + 0.75 * own[k], rtol=1e-12)


def test_relatedness_one_gives_identical_tasks_and_zero_different_ones():
    def curves(relatedness):
        src = sinusoid_source(n_tasks=3, relatedness=relatedness)
        draw = jax.jit(src.sample_task)
        return [np.asarray(draw(KEY, src.splits["val"], t).query.y) for t in range(3)]

    same = curves(1.0)
    for y in same[1:]:
        np.testing.assert_array_equal(y, same[0])
    different = curves(0.0)
    for i in range(3):
        for j in range(i):
            assert np.abs(different[i] - different[j]).max() > 0.1


def test_conflict_negates_the_last_tasks():
    src = sinusoid_source(n_tasks=4, relatedness=1.0, conflict=0.5)
    assert src.task_names == ("task0", "task1", "task2_flipped", "task3_flipped")
    ys = [np.asarray(src.sample_task(KEY, src.splits["train"], t).support.y) for t in range(4)]
    assert np.abs(ys[0]).max() > 0
    np.testing.assert_array_equal(ys[1], ys[0])
    np.testing.assert_array_equal(ys[2], -ys[0])
    np.testing.assert_array_equal(ys[3], -ys[0])


def test_splits_draw_different_points_and_train_points_fix_a_finite_set():
    src = sinusoid_source(n_tasks=2)
    xs = {s: np.asarray(src.sample_task(KEY, src.splits[s], 0).support.x) for s in SPLITS}
    assert not np.array_equal(xs["train"], xs["test"]) and not np.array_equal(xs["val"], xs["test"])

    src = sinusoid_source(n_tasks=2, train_points=25, k_shot=10, k_query=15)
    pool = np.asarray(src.splits["train"].points)
    assert pool.shape == (2, 25) and src.splits["test"].points.shape == (2, 0)
    tasks = jax.jit(jax.vmap(lambda k: src.sample_task(k, src.splits["train"], 1)))(
        jax.random.split(KEY, 20)
    )
    for support, query in zip(tasks.support.x, tasks.query.x, strict=True):
        x = np.concatenate([support[:, 0], query[:, 0]])
        assert set(x.tolist()) == set(pool[1].tolist()), "all 25 distinct pool points, once each"


def test_sinusoid_sample_draws_task_ids_uniformly():
    src = sinusoid_source(n_tasks=5)
    n = 5000
    tasks = jax.jit(jax.vmap(lambda k: src.sample(k, src.splits["train"], False)))(
        jax.random.split(KEY, n)
    )
    counts = np.bincount(np.asarray(tasks.task_id), minlength=5)
    # Binomial(5000, 1/5): sd 28.3, so 5 sd is 141.
    assert counts.sum() == n and np.all(np.abs(counts - n / 5) < 142), counts
    params = task_parameters(MultiSinusoidConfig(n_tasks=5))
    ids = np.asarray(tasks.task_id)
    x, y = np.asarray(tasks.query.x, np.float64), np.asarray(tasks.query.y)
    a, f, p = (params[k][ids][:, None, None] for k in ("amplitude", "frequency", "phase"))
    np.testing.assert_allclose(y, a * np.sin(f * x - p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(relatedness=1.5), r"data.relatedness=1.5 .* \[0, 1\]"),
        (dict(conflict=-0.1), r"data.conflict=-0.1 .* \[0, 1\]"),
        (dict(n_tasks=0), "data.n_tasks=0"),
        (dict(frequency=(2.0, 1.0)), r"data.frequency=\[2.0, 1.0\]"),
        (dict(x_range=(1.0, 1.0)), r"data.x_range=\[1.0, 1.0\]"),
        (dict(train_points=15), "data.train_points=15 .* at least .* = 20 points"),
        (dict(train_points=-3), "data.train_points=-3"),
    ],
)
def test_bad_sinusoid_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        MultiSinusoidConfig(**kw)


# ------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("data", "model", "kind"),
    [("omniglot_alphabets", "conv4", "classification"), ("multi_sinusoid", "mlp", "regression")],
)
def test_config_composes(data, model, kind):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_config(compose("config", overrides=[f"data={data}", "algo=multitask"]))
    assert cfg.data.name == data and cfg.model.name == model
    assert cfg.data.multitask and cfg.data.kind == kind
