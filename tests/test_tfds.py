"""TFDS datasets as few-shot tasks: real array_record datasets built here, read without TensorFlow.

The datasets are written with TFDS's own builder API (GeneratorBasedBuilder, array_record), fed
encoded PNG bytes, which needs no TensorFlow; metalearn then reads them with tfds.data_source.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import metalearn
from omniglot_fixture import make_omniglot_zips
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from metalearn.config import ConfigError  # noqa: E402
from metalearn.data import make_task_source  # noqa: E402
from metalearn.data import tfds as tfds_data  # noqa: E402
from metalearn.data.episodic import sample_episode  # noqa: E402
from metalearn.data.omniglot import DataError, load_omniglot  # noqa: E402
from metalearn.data.tfds import TfdsConfig  # noqa: E402

# CIFAR-100's class hierarchy (20 superclasses of 5 classes), the fixture's label names.
CIFAR100 = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
N_SHAPES = 12  # classes of the tiny_shapes fixture


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def shapes_count(c: int, split: str) -> int:
    """tiny_shapes examples of class c in a split: unequal, 6 to 10 in all."""
    return 4 + 2 * (c % 3) if split == "train" else 2


def shape_pixels(c: int, j: int, split: str) -> np.ndarray:
    """An RGB image that encodes (class, split, example) in its first pixel; the sizes vary."""
    h, w = (20, 24) if j % 2 else (24, 20)
    pixels = np.full((h, w, 3), (20 * c, 40 * (split == "test"), 10 * j), np.uint8)
    pixels[h // 4 :, w // 4 :, c % 3] = 255  # class-specific colour patch
    return pixels


def build(builder_cls, data_dir: Path) -> Path:
    builder_cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def tiny_shapes_builder(seed: int = 0):
    class TinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """12 classes, 6-10 RGB images each of two sizes, over a train and a test split."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(
                            names=[f"shape{c:02d}" for c in range(N_SHAPES)]
                        ),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in ("train", "test")}

        def _generate_examples(self, split):
            rng = np.random.default_rng(seed)
            for c in range(N_SHAPES):
                for j in range(shapes_count(c, split)):
                    pixels = shape_pixels(c, j, split)
                    if seed:
                        pixels = rng.integers(0, 256, pixels.shape, dtype=np.uint8)
                    yield f"{split}-{c}-{j}", {"image": png(pixels), "label": c}

    return TinyShapes


class Cifar100(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """cifar100's features and label names, 2 random 32x32 images per class."""

    VERSION = tfds.core.Version("3.0.2")

    def _info(self):
        fine = sorted(n for names in CIFAR100.values() for n in names)
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(names=fine),
                    "coarse_label": tfds.features.ClassLabel(names=sorted(CIFAR100)),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split):
        fine = sorted(n for names in CIFAR100.values() for n in names)
        coarse = sorted(CIFAR100)
        rng = np.random.default_rng(split == "test")
        for group, names in CIFAR100.items():
            for name in names:
                key = f"{split}_{name}"
                yield (
                    key,
                    {
                        "id": key,
                        "image": png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                        "label": fine.index(name),
                        "coarse_label": coarse.index(group),
                    },
                )


def omniglot_builder(zips: Path):
    """TFDS's omniglot (3.0.0) features, built from release-format zips without TensorFlow.

    As TFDS's builder does: train is images_background, test images_evaluation, the label is
    the file's character number minus 1, and the image is the PNG file's bytes.
    """
    sets = {"train": zips / "images_background.zip", "test": zips / "images_evaluation.zip"}

    def members():
        for split, path in sets.items():
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if info.filename.endswith(".png"):
                        _, alphabet, char, file = info.filename.split("/")
                        yield split, alphabet, int(char[9:]) - 1, file, zf.read(info)

    labels = {int(f.split("_")[0]) - 1: f"{a}_{c}" for _, a, c, f, _ in members()}
    alphabets = sorted({a for _, a, _, _, _ in members()})

    class Omniglot(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("3.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(105, 105, 3), encoding_format="png"),
                        "alphabet": tfds.features.ClassLabel(names=alphabets),
                        "alphabet_char_id": np.int64,
                        "label": tfds.features.ClassLabel(
                            names=[labels[k] for k in sorted(labels)]
                        ),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in sets}

        def _generate_examples(self, split):
            for s, alphabet, char, file, data in members():
                if s == split:
                    yield (
                        f"{alphabet}_{char}_{file}",
                        {
                            "image": data,
                            "alphabet": alphabet,
                            "alphabet_char_id": char,
                            "label": int(file.split("_")[0]) - 1,
                        },
                    )

    return Omniglot


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test writes to the real cache or reads the user's TFDS data folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds_data"))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    return build(tiny_shapes_builder(), tmp_path_factory.mktemp("tfds_shapes"))


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    return build(Cifar100, tmp_path_factory.mktemp("tfds_cifar"))


def shapes_config(data_dir, **kw) -> TfdsConfig:
    kw = {"n_way": 3, "k_shot": 1, "k_query": 2, "image_size": 16, **kw}
    return TfdsConfig(name="tiny_shapes", data_dir=str(data_dir), **kw)


def load_shapes(data_dir, cache, **kw) -> tfds_data.TfdsArrays:
    return tfds_data.load_tfds("tiny_shapes", data_dir=data_dir, cache_dir=cache, **kw)


# ---------------------------------------------------------------------------------------------
# Reading and caching


def test_arrays_hold_every_example_resized(shapes_dir, tmp_path):
    data = load_shapes(shapes_dir, tmp_path / "cache", image_size=16)
    counts = [shapes_count(c, "train") + shapes_count(c, "test") for c in range(N_SHAPES)]
    assert data.images.shape == (N_SHAPES, max(counts), 16, 16, 3)
    assert data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.counts, counts)
    np.testing.assert_array_equal(data.labels, range(N_SHAPES))
    assert data.class_names == tuple(f"shape{c:02d}" for c in range(N_SHAPES))
    for c in range(N_SHAPES):
        # The first pixel encodes (class, split, example): each source image exactly once.
        seen = sorted(tuple(int(v) for v in data.images[c, j, 0, 0]) for j in range(counts[c]))
        expected = sorted(
            tuple(int(v) for v in shape_pixels(c, j, s)[0, 0])
            for s in ("train", "test")
            for j in range(shapes_count(c, s))
        )
        assert seen == expected
        assert not data.images[c, counts[c] :].any(), "padding after a class's examples is zero"
    # Resized with PIL's LANCZOS, as the Omniglot loader does.
    image = Image.fromarray(shape_pixels(4, 0, "test")).resize((16, 16), Image.Resampling.LANCZOS)
    assert any(np.array_equal(np.asarray(image), data.images[4, j]) for j in range(counts[4]))


def test_grayscale_inversion_splits_and_cap(shapes_dir, tmp_path):
    gray = load_shapes(
        shapes_dir, tmp_path / "cache", image_size=16, splits=["test"], channels=1, invert=True
    )
    assert gray.images.shape == (N_SHAPES, 2, 16, 16, 1)
    np.testing.assert_array_equal(gray.counts, 2)
    for c in (0, 5):
        # To grayscale ("L"), resized, then inverted: the same steps as the Omniglot loader.
        expected = sorted(
            (255 - np.asarray(
                Image.fromarray(shape_pixels(c, j, "test")).convert("L")
                .resize((16, 16), Image.Resampling.LANCZOS)
            )).tobytes()
            for j in range(2)
        )  # fmt: skip
        assert sorted(gray.images[c, j, :, :, 0].tobytes() for j in range(2)) == expected
    capped = load_shapes(shapes_dir, tmp_path / "cache", image_size=16, max_per_class=3)
    np.testing.assert_array_equal(capped.counts, 3)


def test_second_load_uses_cache_without_decoding(shapes_dir, tmp_path, monkeypatch):
    first = load_shapes(shapes_dir, tmp_path / "cache")

    def fail(*args):
        raise AssertionError("decoded an image on a cache hit")

    monkeypatch.setattr(tfds_data, "_decode", fail)
    again = load_shapes(shapes_dir, tmp_path / "cache")
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def test_cache_invalidated_when_the_dataset_changes(tmp_path):
    data_dir = build(tiny_shapes_builder(), tmp_path / "tfds")
    first = load_shapes(data_dir, tmp_path / "cache")
    build(tiny_shapes_builder(seed=1), tmp_path / "tfds2")  # same name and shapes, new pixels
    os.rename(data_dir / "tiny_shapes", tmp_path / "old")
    os.rename(tmp_path / "tfds2" / "tiny_shapes", data_dir / "tiny_shapes")
    second = load_shapes(data_dir, tmp_path / "cache")
    assert not np.array_equal(first.images, second.images)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_cache_write_is_atomic(shapes_dir, tmp_path, monkeypatch):
    def killed_midway(f, **arrays):
        f.write(b"half an npz")
        raise KeyboardInterrupt

    monkeypatch.setattr(tfds_data.np, "savez", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        load_shapes(shapes_dir, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Class splits


def test_seeded_split_is_disjoint_complete_and_seeded(shapes_dir, tmp_path):
    data = load_shapes(shapes_dir, tmp_path / "cache")
    split = tfds_data.split_classes(data, fractions=(0.5, 0.25, 0.25), seed=3)
    assert [len(split[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(N_SHAPES))
    again = tfds_data.split_classes(data, fractions=(0.5, 0.25, 0.25), seed=3)
    assert all(np.array_equal(split[s], again[s]) for s in split)
    other = tfds_data.split_classes(data, fractions=(0.5, 0.25, 0.25), seed=4)
    assert any(not np.array_equal(split[s], other[s]) for s in split)
    sized = tfds_data.split_classes(data, sizes=(8, 2, 2))
    assert [len(sized[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    with pytest.raises(DataError, match=r"add up to 11, but the dataset has 12 classes"):
        tfds_data.split_classes(data, sizes=(8, 2, 1))


def test_cifar_fs_and_fc100_are_the_published_splits(cifar_dir, tmp_path):
    data = tfds_data.load_tfds(
        "cifar100", data_dir=cifar_dir, cache_dir=tmp_path, superclass_key="coarse_label"
    )
    assert data.images.shape == (100, 2, 84, 84, 3)
    every = sorted(n for names in CIFAR100.values() for n in names)

    def names(split):
        return {s: sorted(data.class_names[i] for i in split[s]) for s in split}

    fs = names(tfds_data.split_classes(data, classes="cifar_fs"))
    assert [len(fs[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert sorted(fs["train"] + fs["val"] + fs["test"]) == every
    assert {"whale", "rose", "baby", "rocket"} <= set(fs["test"])  # Bertinetto et al.'s test
    assert {"beaver", "shark", "tractor"} <= set(fs["val"])

    fc = names(tfds_data.split_classes(data, classes="fc100"))
    assert [len(fc[s]) for s in ("train", "val", "test")] == [60, 20, 20]
    superclass = {n: g for g, names in CIFAR100.items() for n in names}
    groups = {s: {superclass[n] for n in fc[s]} for s in fc}
    assert groups["test"] == {"aquatic_mammals", "insects", "medium_mammals", "people"}
    assert groups["val"] == {
        "large_carnivores",
        "large_omnivores_and_herbivores",
        "non-insect_invertebrates",
        "small_mammals",
    }
    assert len(groups["train"]) == 12 and not groups["train"] & (groups["val"] | groups["test"])


def test_published_split_needs_cifar100s_classes(shapes_dir, tmp_path):
    data = load_shapes(shapes_dir, tmp_path / "cache")
    with pytest.raises(
        DataError, match="CIFAR-FS split names classes this dataset does not have.*dolphin"
    ):
        tfds_data.split_classes(data, classes="cifar_fs")
    with pytest.raises(ConfigError, match="published split of cifar100.*data.name=tiny_shapes"):
        shapes_config(shapes_dir, classes="cifar_fs")


# ---------------------------------------------------------------------------------------------
# Episodes on the device


def test_episodes_draw_only_real_examples_of_unequal_classes():
    """Class c has counts[c] real examples (value 1 + its index) and zero padding after them."""
    counts = np.array([3, 7, 4, 10], np.int32)
    images = np.zeros((4, 10, 1, 1, 3), np.uint8)
    for c, n in enumerate(counts):
        images[c, :n] = (np.arange(n) + 1 + 20 * c)[:, None, None, None]

    images, counts = jax.numpy.asarray(images), jax.numpy.asarray(counts)

    @jax.jit
    def sample(key):
        return sample_episode(key, images, n_way=3, k_shot=1, k_query=2, counts=counts)

    hits = np.zeros((4, 10), int)
    for i in range(300):
        task = sample(jax.random.PRNGKey(i))
        assert task.support.x.shape == (3, 1, 1, 3) and task.query.x.shape == (6, 1, 1, 3)
        codes = np.rint(np.concatenate([task.support.x, task.query.x])[:, 0, 0, 0] * 255)
        labels = np.concatenate([task.support.y, task.query.y])
        assert codes.min() >= 1, "a padding slot was drawn"
        for label in range(3):
            drawn = codes[labels == label].astype(int)
            c = (drawn[0] - 1) // 20
            assert len(set(drawn)) == 3 and all((d - 1) // 20 == c for d in drawn)
            hits[c, (drawn - 1) % 20] += 1
    for c, n in enumerate(np.asarray(counts)):
        assert not hits[c, n:].any()
        # Each real example of a class is drawn about equally often (3 of n per draw).
        assert hits[c, :n].min() > 0.5 * hits[c, :n].mean()


def test_task_source_splits_and_rgb_episodes(shapes_dir):
    cfg = shapes_config(shapes_dir, split_fractions=(0.5, 0.25, 0.25))
    source = make_task_source(cfg)
    assert source.kind == "classification" and source.input_shape == (16, 16, 3)
    assert source.n_out == 3 and source.n_train_classes == 6
    images, counts = source.splits["test"]
    assert images.shape[:2] == (3, int(counts.max()))
    task = jax.jit(lambda k, a: source.sample(k, a, False))(
        jax.random.PRNGKey(0), source.splits["train"]
    )
    assert task.support.x.shape == (3, 16, 16, 3) and task.query.x.shape == (6, 16, 16, 3)
    assert 0 <= float(task.support.x.min()) and float(task.support.x.max()) <= 1
    pretrain = source.sample(jax.random.PRNGKey(1), source.splits["train"], True)
    assert int(pretrain.support.y.max()) < source.n_train_classes


def test_omniglot_through_tfds_equals_the_zip_loader(tmp_path):
    """data=omniglot_tfds's settings give data=omniglot's images of every character."""
    zips = make_omniglot_zips(tmp_path / "zips")
    data_dir = build(omniglot_builder(zips), tmp_path / "tfds")
    from_zips = load_omniglot(zips, cache_dir=tmp_path / "cache", download=False)
    from_tfds = tfds_data.load_tfds(
        "omniglot",
        data_dir=data_dir,
        splits=["train", "test"],
        image_size=28,
        channels=1,
        invert=True,
        cache_dir=tmp_path / "cache",
    )
    np.testing.assert_array_equal(from_tfds.counts, 20)
    assert from_tfds.images.shape == (9, 20, 28, 28, 1)
    # TFDS names a character "<alphabet>_<character number - 1>" and orders them by label.
    row = {
        f"{alphabet}_{int(char[len('character') :]) - 1}": i
        for i, (alphabet, char) in enumerate(c.split("/") for c in from_zips.characters)
    }
    assert sorted(row) == sorted(from_tfds.class_names)
    for c, name in enumerate(from_tfds.class_names):  # the same 20 drawings, in some order
        ours = sorted(from_tfds.images[c, :, :, :, 0].reshape(20, -1).tolist())
        assert ours == sorted(from_zips.images[row[name]].reshape(20, -1).tolist())


# ---------------------------------------------------------------------------------------------
# Errors


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(DataError) as err:
        tfds_data.load_tfds("cifar100", data_dir=empty, cache_dir=tmp_path)
    message = str(err.value)
    assert f"tfds build cifar100 --file_format=array_record --data_dir={empty}" in message
    assert "pip install tensorflow" in message and "not prepared" in message
    assert not empty.exists(), "nothing was downloaded or created"


def test_unknown_dataset_and_bad_keys(shapes_dir, tmp_path):
    with pytest.raises(DataError, match="no_such_dataset is not a TFDS dataset"):
        tfds_data.load_tfds("no_such_dataset", data_dir=shapes_dir, cache_dir=tmp_path)
    with pytest.raises(DataError, match=r"data.label_key='coarse'.*image \(Image\), label"):
        load_shapes(shapes_dir, tmp_path, label_key="coarse")
    with pytest.raises(DataError, match=r"no split 'validation'.*\['test', 'train'\]"):
        load_shapes(shapes_dir, tmp_path, splits=["validation"])


def test_tfrecord_dataset_says_how_to_convert(shapes_dir, tmp_path):
    """A dataset prepared in TFDS's default format (tfrecord): its metadata says so."""
    folder = shutil.copytree(shapes_dir, tmp_path / "tfds") / "tiny_shapes" / "1.0.0"
    info = json.loads((folder / "dataset_info.json").read_text())
    assert info["fileFormat"] == "array_record"
    info["fileFormat"] = "tfrecord"
    (folder / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="stored as tfrecord.*tfds convert_format"):
        load_shapes(tmp_path / "tfds", tmp_path / "cache")


def test_too_few_classes_or_examples_name_the_numbers(shapes_dir):
    with pytest.raises(DataError, match=r"n_way=4 is more classes than the meta-val split.*\(3 "):
        make_task_source(shapes_config(shapes_dir, n_way=4, split_fractions=(0.5, 0.25, 0.25)))
    # Classes 0, 3, 6, 9 have 6 examples, the others 8 or 10.
    with pytest.raises(DataError, match=r"1 \+ 6 = 7 distinct.*'shape0\d' has 6.*fewest is 6"):
        make_task_source(shapes_config(shapes_dir, k_query=6))


def test_config_errors_name_the_value():
    with pytest.raises(ConfigError, match=r"split_fractions=\[0.5, 0.2, 0.2\]"):
        TfdsConfig(name="dtd", split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ConfigError, match="data.channels=2"):
        TfdsConfig(name="dtd", channels=2)
    with pytest.raises(ConfigError, match=r"max_per_class=10.*k_query = 16"):
        TfdsConfig(name="dtd", max_per_class=10)
    with pytest.raises(ConfigError, match="data.classes='vinyals'"):
        TfdsConfig(name="dtd", classes="vinyals")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DataError, match=r"pip install 'metalearn\[tfds\]'"):
        tfds_data.import_tfds()


# ---------------------------------------------------------------------------------------------
# The command line

PRESETS = {  # data= -> (TFDS name, class split, image size, channels, conv4 downsampling)
    "tfds": ("food101", "seeded", 84, 3, "maxpool"),
    "cifar_fs": ("cifar100", "cifar_fs", 32, 3, "maxpool"),
    "fc100": ("cifar100", "fc100", 32, 3, "maxpool"),
    "cub": ("caltech_birds2011", "seeded", 84, 3, "maxpool"),
    "vgg_flowers": ("oxford_flowers102", "seeded", 84, 3, "maxpool"),
    "dtd": ("dtd", "seeded", 84, 3, "maxpool"),
    "quickdraw": ("quickdraw_bitmap", "seeded", 28, 1, "stride"),
    "omniglot_tfds": ("omniglot", "seeded", 28, 1, "stride"),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_compose_and_reload_from_a_saved_config(preset):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from metalearn.config import from_yaml_with_overrides, register_schemas, to_config
    from metalearn.data.tfds import TFDS_DATA

    assert set(PRESETS) == set(TFDS_DATA)
    register_schemas()
    conf = Path(__file__).resolve().parents[1] / "conf"
    extra = ["data.name=food101"] if preset == "tfds" else []
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        composed = compose("config", overrides=[f"data={preset}", "algo=protonet", *extra])
    cfg = to_config(composed)
    name, classes, size, channels, downsample = PRESETS[preset]
    assert isinstance(cfg.data, TfdsConfig) and cfg.data.name == name
    assert (cfg.data.classes, cfg.data.image_size, cfg.data.channels) == (classes, size, channels)
    assert cfg.model.name == "conv4" and cfg.model.downsample == downsample
    # What eval and resume do: rebuild the typed config from the run's saved YAML.
    saved = OmegaConf.create(OmegaConf.to_yaml(composed))
    again = from_yaml_with_overrides(saved, ["data.k_shot=5"])
    assert isinstance(again.data, TfdsConfig) and again.data.name == name
    assert again.data.k_shot == 5


@pytest.mark.slow
def test_train_from_the_command_line(shapes_dir, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HYDRA_FULL_ERROR": "0"}
    run_dir = tmp_path / "run"
    metalearn(
        [
            "train",
            "algo=protonet",
            "data=tfds",
            "data.name=tiny_shapes",
            f"data.data_dir={shapes_dir}",
            "data.split_fractions=[0.5,0.25,0.25]",
            "data.n_way=3",
            "data.k_query=2",
            "data.image_size=16",
            "model.hidden=8",
            "train.steps=4",
            "train.meta_batch=2",
            "eval.every=4",
            "eval.val_tasks=4",
            "eval.num_tasks=8",
            "eval.batch=4",
            "progress=false",
            f"hydra.run.dir={run_dir}",
        ],
        env,
        tmp_path,
        check=True,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"] == "tiny_shapes" and summary["test"]["num_tasks"] == 8
    assert 0 <= summary["test"]["accuracy"] <= 1
    assert len(list((tmp_path / "xdg" / "metalearn" / "tfds").glob("*.npz"))) == 1


def test_unprepared_preset_fails_with_one_paragraph(tmp_path):
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "empty"), "HYDRA_FULL_ERROR": "0"}
    result = metalearn(
        ["train", "algo=protonet", "data=cifar_fs", f"hydra.run.dir={tmp_path / 'run'}"],
        env,
        tmp_path,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metalearn: error: The TFDS dataset cifar100")
    assert "tfds build cifar100 --file_format=array_record" in lines[0]
