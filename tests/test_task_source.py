"""The Omniglot task source: split arrays on the device, rotations, and disjoint splits."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from omniglot_fixture import make_omniglot_zips

from metalearn.config import ConfigError
from metalearn.data import SPLITS, make_task_source
from metalearn.data.omniglot import OmniglotConfig


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_omniglot_zips(tmp_path_factory.mktemp("omniglot"), 3, 2, 4)  # 20 characters


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def source(root, **kw):
    cfg = OmniglotConfig(root=str(root), download=False, image_size=12, **kw)
    return make_task_source(cfg)


def class_set(images) -> set[bytes]:
    """Each class as the bytes of its drawings, turned to a canonical rotation."""
    out = set()
    for drawings in np.asarray(images):
        out.add(min(np.rot90(drawings, k, axes=(1, 2)).tobytes() for k in range(4)))
    return out


@pytest.mark.parametrize("split", ["random", "alphabet"])
@pytest.mark.parametrize("rotations", [False, True])
def test_no_class_in_two_splits(root, split, rotations):
    kw = dict(split=split, rotations=rotations, n_way=2, k_shot=1, k_query=1)
    kw.update(split_sizes=(12, 4, 4)) if split == "random" else kw.update(val_alphabets=1)
    src = source(root, **kw)
    sets = {name: class_set(src.splits[name]) for name in SPLITS}
    assert sum(len(s) for s in sets.values()) == 20, "every character in exactly one split"
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not sets[a] & sets[b], (a, b)
    n_train = src.splits["train"].shape[0]
    assert src.n_train_classes == n_train
    assert n_train == (4 if rotations else 1) * len(sets["train"])


def test_episodes_come_from_their_split(root):
    src = source(root, split_sizes=(12, 4, 4), n_way=3, k_shot=1, k_query=2)
    test_images = {d.tobytes() for c in np.asarray(src.splits["test"]) for d in c}
    task = jax.jit(lambda k: src.sample(k, src.splits["test"], False))(jax.random.PRNGKey(0))
    for x in np.asarray(task.query.x):
        assert np.rint(x[..., 0] * 255).astype(np.uint8).tobytes() in test_images


def test_too_many_ways_for_a_split(root):
    with pytest.raises(ConfigError, match="data.n_way=5"):
        source(root, split_sizes=(12, 4, 4), n_way=5)
