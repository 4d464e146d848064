"""Any tensorflow-datasets image-classification dataset as few-shot tasks: read, cache, split.

Reading goes through `tfds.data_source` on array_record files, which needs no TensorFlow (it is
not a dependency); preparing a dataset TFDS does not hold yet does need TensorFlow and a network
(`tfds build NAME --file_format=array_record`), so a missing dataset is an error that prints
that command. Every image is decoded with PIL, resized to S x S (LANCZOS, as for Omniglot),
converted to RGB or grayscale and cached once as one uint8 array [classes, examples, S, S, C].
Classes hold different numbers of examples, so the array is padded after each class's last
example and `counts` says how many are real. The cache key hashes the prepared dataset's
metadata (dataset_info.json, file names and sizes) with the preprocessing settings; a cache file
that fails to load, or whose arrays do not fit what the metadata and settings allow, is rebuilt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
from omegaconf import MISSING
from PIL import Image

from metalearn import registry
from metalearn.checks import ConfigError, check_seed, choice, require
from metalearn.data.base import EpisodicDataConfig, open_images, scale_pixels
from metalearn.data.omniglot import DataError, identical, read_cache_file, write_cache_file

log = logging.getLogger("metalearn")

SPLITS = ("train", "val", "test")
_CACHE_VERSION = 1  # bump when preprocessing changes, so old cache files are not reused

# CIFAR-FS (Bertinetto et al. 2019, "Meta-learning with differentiable closed-form solvers"):
# 64 / 16 / 20 CIFAR-100 classes, by their CIFAR-100 names.
CIFAR_FS = {
    "train": (
        "dolphin", "seal", "aquarium_fish", "ray", "trout", "orchid", "sunflower", "tulip",
        "bottle", "bowl", "can", "cup", "plate", "apple", "mushroom", "orange", "pear", "clock",
        "keyboard", "chair", "couch", "bee", "caterpillar", "cockroach", "bear", "lion", "tiger",
        "wolf", "bridge", "castle", "house", "road", "skyscraper", "cloud", "forest", "mountain",
        "elephant", "kangaroo", "porcupine", "possum", "raccoon", "skunk", "lobster", "spider",
        "boy", "girl", "dinosaur", "lizard", "snake", "turtle", "hamster", "mouse", "rabbit",
        "shrew", "squirrel", "oak_tree", "palm_tree", "pine_tree", "willow_tree", "bus", "train",
        "lawn_mower", "streetcar", "tank",
    ),
    "val": (
        "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea",
        "camel", "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
    ),
    "test": (
        "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe",
        "leopard", "plain", "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman",
        "bicycle", "pickup_truck", "rocket",
    ),
}  # fmt: skip

# FC100 (Oreshkin et al. 2018, TADAM): the 20 CIFAR-100 superclasses split 12 / 4 / 4, so that
# meta-test classes share no superclass with meta-train ones (60 / 20 / 20 classes).
FC100 = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables",
        "household_electrical_devices", "household_furniture", "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes", "reptiles", "trees", "vehicles_1", "vehicles_2",
    ),
    "val": (
        "large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
        "small_mammals",
    ),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}  # fmt: skip
SUPERCLASS_KEYS = {"fc100": "coarse_label"}  # the feature a published split reads per class


# data=tfds and its presets (conf/data/<option>.yaml): a TFDS dataset with its usual settings.
TFDS_DATA = ("tfds", "cifar_fs", "fc100", "cub", "vgg_flowers", "dtd", "quickdraw", "omniglot_tfds")


# How a TFDS dataset's classes are split: published splits of cifar100, or a seeded shuffle.
TFDS_CLASS_SPLITS = {"seeded": None, "cifar_fs": "cifar100", "fc100": "cifar100"}


@dataclass
class TfdsConfig(EpisodicDataConfig):
    """Any tensorflow-datasets image-classification dataset as N-way K-shot tasks (data/tfds.py).

    name is the TFDS catalogue name (cifar100, or name/config:version), prepared as array_record.
    Its classes go to meta-train/val/test by a published split (classes=cifar_fs: 64/16/20
    classes; fc100: 12/4/4 superclasses) or by a seeded shuffle cut by fractions or sizes.
    """

    name: str = MISSING  # the TFDS catalogue name, e.g. cifar100
    source: str = "tfds"  # marks a TFDS dataset in a saved config, whatever its name
    locations: ClassVar[tuple[str, ...]] = ("data_dir",)

    data_dir: str | None = None  # TFDS data folder; None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    splits: list[str] = field(default_factory=list)  # TFDS splits pooled; empty: all of them
    classes: str = "seeded"  # seeded | cifar_fs | fc100
    split_seed: int = 0  # seeded: the shuffle of the classes
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # seeded: train/val/test
    split_sizes: list[int] = field(default_factory=list)  # seeded: class counts, over fractions
    image_size: int = 84  # images are resized to image_size x image_size
    channels: int = 3  # 3: RGB; 1: grayscale
    invert: bool = False  # 255 - pixel: dark ink on white (Omniglot) becomes bright ink
    max_per_class: int = 0  # keep the first this many examples of each class; 0: all
    image_key: str = "image"  # the TFDS feature holding the image
    label_key: str = "label"  # the TFDS ClassLabel feature holding the class

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seed("data.split_seed", self.split_seed)
        require(
            self.source == "tfds",
            f"data.source={self.source!r} is not allowed: a TFDS dataset has source 'tfds'.",
        )
        choice("data.classes", self.classes, tuple(TFDS_CLASS_SPLITS))
        needs = TFDS_CLASS_SPLITS[self.classes]
        base = self.name.split("/")[0].split(":")[0]
        require(
            needs is None or base == needs,
            f"data.classes={self.classes} is a published split of {needs}, not of "
            f"data.name={self.name}; use data.classes=seeded for other datasets.",
        )
        fractions = tuple(self.split_fractions)
        require(
            len(fractions) == 3
            and min(fractions) >= 0
            and fractions[0] > 0
            and abs(sum(fractions) - 1) < 1e-6,
            f"data.split_fractions={list(fractions)} is not allowed: give three train/val/test "
            "fractions of the classes, each >= 0 (train > 0), that add up to 1, e.g. "
            "[0.7, 0.15, 0.15].",
        )
        sizes = list(self.split_sizes)
        require(
            not sizes or (len(sizes) == 3 and min(sizes) >= 0),
            f"data.split_sizes={sizes} is not allowed: give [] (use data.split_fractions) or "
            "three non-negative train/val/test class counts.",
        )
        require(
            8 <= self.image_size <= 512, f"data.image_size={self.image_size} must be in [8, 512]."
        )
        require(
            self.channels in (1, 3),
            f"data.channels={self.channels} is not allowed: use 3 (RGB) or 1 (grayscale).",
        )
        require(
            self.max_per_class == 0 or self.max_per_class >= self.k_shot + self.k_query,
            f"data.max_per_class={self.max_per_class} is not allowed: use 0 (every example) or "
            f"at least data.k_shot + data.k_query = {self.k_shot + self.k_query}, since support "
            "and query examples of a class are distinct.",
        )

    def preprocess(self, images) -> np.ndarray:
        """Images of any size and mode (file paths, PIL images, arrays; data/base.py::open_images)
        as the model reads them in training: float32 [N, S, S, C], decode_image / 255,
        with this option's image_size, channels and invert."""
        pixels = np.stack(
            [
                decode_image(im, self.image_size, self.channels, self.invert)
                for im in open_images(images)
            ]
        )
        return scale_pixels(pixels)


class TfdsArrays(NamedTuple):
    images: np.ndarray  # uint8 [classes, max_count, S, S, C]; row c is zero after counts[c]
    counts: np.ndarray  # int32 [classes], the real examples of each class (>= 1)
    labels: np.ndarray  # int32 [classes], each row's TFDS label id (ascending)
    class_names: tuple[str, ...]  # one per row
    superclass: np.ndarray  # int32 [classes], index into superclass_names; -1 without one
    superclass_names: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Public API


def load_tfds(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    splits: Sequence[str] = (),
    image_size: int = 84,
    channels: int = 3,
    invert: bool = False,
    max_per_class: int = 0,
    image_key: str = "image",
    label_key: str = "label",
    superclass_key: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TfdsArrays:
    """Every class of the TFDS dataset `name` (its `splits` pooled; all by default) as arrays.

    Only classes with at least one example are kept, in label order. With max_per_class > 0,
    a class keeps its first max_per_class examples in the dataset's (shuffled) order, and
    reading stops once every class has them (so a huge dataset such as quickdraw_bitmap is
    not read whole). `superclass_key` names a ClassLabel feature read as each class's group.
    """
    tfds = import_tfds()
    check_feature_classes(tfds, name, data_dir)
    with _builtin_features_only(tfds, name):
        builder = _prepared_builder(tfds, name, data_dir)
        _ = builder.info.features  # built here, under the guard, if TFDS builds them lazily
    splits = _check_splits(builder, name, splits)
    _check_features(tfds, builder, name, image_key, label_key, superclass_key)
    settings = (
        f"v{_CACHE_VERSION} {builder.info.full_name} splits={','.join(splits)} {image_size}px "
        f"channels={channels} invert={invert} max={max_per_class} image={image_key} "
        f"label={label_key} superclass={superclass_key}"
    )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    slug = builder.info.full_name.replace("/", "-").replace(":", "-")
    cached = cache / f"{slug}-{image_size}px-{_fingerprint(builder, settings)}.npz"
    features = builder.info.features
    expected = _Expected(
        label=features[label_key],
        examples=sum(builder.info.splits[s].num_examples for s in splits),
        shape=(image_size, image_size, channels),
        max_per_class=max_per_class,
        superclass_names=tuple(features[superclass_key].names) if superclass_key else (),
    )
    source = f"the TFDS dataset {name} in {builder.data_dir}"
    arrays = read_cache_file(
        cached, TfdsArrays._fields, lambda a: _cache_problem(a, expected), source
    )
    if arrays is not None:
        return TfdsArrays(
            images=arrays["images"],
            counts=arrays["counts"],
            labels=arrays["labels"],
            class_names=tuple(str(c) for c in arrays["class_names"]),
            superclass=arrays["superclass"],
            superclass_names=tuple(str(c) for c in arrays["superclass_names"]),
        )
    started = time.perf_counter()
    log.info("preprocessing TFDS %s (%s) once into %s", name, "+".join(splits), cached)
    data = _preprocess(
        tfds, builder, name, splits, image_size, channels, invert, max_per_class,
        image_key, label_key, superclass_key,
    )  # fmt: skip
    log.info(
        "%s: %d classes, %d images in %.1f s",
        name, len(data.class_names), int(data.counts.sum()), time.perf_counter() - started,
    )  # fmt: skip
    _write_cache(cached, data)
    return data


def import_tfds() -> Any:
    """The tensorflow_datasets module, or a DataError saying how to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"data=tfds needs the tensorflow-datasets package, which is not installed ({e}). "
            "Install it with: pip install 'metalearn[tfds]' (it does not need TensorFlow to "
            "read prepared datasets)."
        ) from e
    # TFDS logs routine steps and notes (e.g. "Variant folder ... has no dataset_info.json"
    # before our own not-prepared error) through absl; keep them out of runs and errors.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return tfds


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/metalearn/tfds`, or `~/.cache/metalearn/tfds`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "metalearn" / "tfds"


def prepare_command(name: str, data_dir: str | os.PathLike[str] | None) -> str:
    """The shell command that prepares `name` as array_record (needs TensorFlow and a network)."""
    where = f" --data_dir={data_dir}" if data_dir is not None else ""
    return f"pip install tensorflow && tfds build {name} --file_format=array_record{where}"


def split_classes(
    data: TfdsArrays,
    *,
    classes: str = "seeded",
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    sizes: Sequence[int] = (),
) -> dict[str, np.ndarray]:
    """Disjoint row indices {"train", "val", "test"} -> sorted int32 arrays.

    "seeded": the rows shuffled by `np.random.default_rng(seed)` and cut into `sizes` classes,
    or, without sizes, into round(fraction * classes) for train and val and the rest for test.
    "cifar_fs" and "fc100": the published splits of cifar100, by class and superclass names.
    """
    n = len(data.class_names)
    if classes == "seeded":
        if sizes:
            sizes = tuple(int(s) for s in sizes)
            if sum(sizes) != n:
                raise DataError(
                    f"data.split_sizes={list(sizes)} (train, val, test classes) add up to "
                    f"{sum(sizes)}, but the dataset has {n} classes with examples: give three "
                    f"counts that add up to {n}, or use data.split_fractions (split_sizes=[])."
                )
        else:
            train, val = (round(f * n) for f in tuple(fractions)[:2])
            sizes = (train, val, n - train - val)
        order = np.random.default_rng(seed).permutation(n)
        parts = np.split(order, np.cumsum(sizes)[:2])
    elif classes == "cifar_fs":
        parts = [_rows_named(data.class_names, CIFAR_FS[s], "class", "CIFAR-FS") for s in SPLITS]
    elif classes == "fc100":
        if not data.superclass_names:
            raise DataError("classes=fc100 needs each class's superclass (coarse_label).")
        parts = []
        for s in SPLITS:
            groups = _rows_named(data.superclass_names, FC100[s], "superclass", "FC100")
            parts.append(np.flatnonzero(np.isin(data.superclass, groups)))
    else:
        raise ConfigError(
            f"data.classes={classes!r} is not a known class split: use seeded, cifar_fs or fc100."
        )
    return {s: np.sort(p).astype(np.int32) for s, p in zip(SPLITS, parts, strict=True)}


def make_source(cfg: TfdsConfig):
    """The TaskSource of a TFDS dataset: one (images, counts) pair of device arrays per split."""
    import jax.numpy as jnp

    from metalearn.data import TaskSource
    from metalearn.data.episodic import counted_episodes

    data = load_tfds(
        cfg.name,
        data_dir=cfg.data_dir,
        splits=tuple(cfg.splits),
        image_size=cfg.image_size,
        channels=cfg.channels,
        invert=cfg.invert,
        max_per_class=cfg.max_per_class,
        image_key=cfg.image_key,
        label_key=cfg.label_key,
        superclass_key=SUPERCLASS_KEYS.get(cfg.classes),
    )
    rows = split_classes(
        data,
        classes=cfg.classes,
        seed=cfg.split_seed,
        fractions=tuple(cfg.split_fractions),
        sizes=tuple(cfg.split_sizes),
    )
    arrays = {}
    for split in SPLITS:
        counts = data.counts[rows[split]]
        check_episodes(cfg, split, counts, [data.class_names[r] for r in rows[split]])
        # Padding only up to this split's largest class: less memory on the device.
        images = data.images[rows[split], : int(counts.max())]
        arrays[split] = (jnp.asarray(images), jnp.asarray(counts))

    def training_episodes(n_way: int, k_shot: int, k_query: int):
        """Training episodes of their own shape, checked against the train split."""
        shape = dataclasses.replace(cfg, n_way=n_way, k_shot=k_shot, k_query=k_query)
        counts = data.counts[rows["train"]]
        try:
            check_episodes(shape, "train", counts, [data.class_names[r] for r in rows["train"]])
        except DataError as error:
            raise DataError(f"With train.n_way/k_shot/k_query as set: {error}") from None
        return counted_episodes(n_way, k_shot, k_query)

    return TaskSource(
        kind="classification",
        n_out=cfg.n_way,
        n_train_classes=len(rows["train"]),
        input_shape=(cfg.image_size, cfg.image_size, cfg.channels),
        splits=arrays,
        sample=counted_episodes(cfg.n_way, cfg.k_shot, cfg.k_query),
        episodes=training_episodes,
    )


def check_episodes(cfg: TfdsConfig, split: str, counts: np.ndarray, names: list[str]) -> None:
    """A split must hold n_way classes, each with k_shot + k_query distinct examples."""
    how = (
        f"data.classes={cfg.classes}"
        if cfg.classes != "seeded"
        else f"data.split_sizes={list(cfg.split_sizes)}"
        if cfg.split_sizes
        else f"data.split_fractions={list(cfg.split_fractions)}"
    )
    if len(counts) < cfg.n_way:
        raise DataError(
            f"data.n_way={cfg.n_way} is more classes than the meta-{split} split of "
            f"{cfg.name} holds ({len(counts)} classes with {how}). Use data.n_way <= "
            f"{len(counts)}, or give meta-{split} more classes."
        )
    need = cfg.k_shot + cfg.k_query
    short = [(names[i], int(c)) for i, c in enumerate(counts) if c < need]
    if short:
        listed = ", ".join(f"{n!r} has {c}" for n, c in sorted(short, key=lambda s: s[1])[:3])
        raise DataError(
            f"data.k_shot + data.k_query = {cfg.k_shot} + {cfg.k_query} = {need} distinct "
            f"examples per class are needed, but {len(short)} of the {len(counts)} meta-{split} "
            f"classes of {cfg.name} have fewer ({listed}; the fewest is {min(counts)}). Lower "
            f"data.k_shot or data.k_query"
            + (f", or raise data.max_per_class={cfg.max_per_class}" if cfg.max_per_class else "")
            + "."
        )


# ---------------------------------------------------------------------------------------------
# Feature class names: a prepared folder must not make TFDS import a module of its choosing

# A folder's features.json (and the `features` of dataset_info.json) name each feature's Python
# class; TFDS imports the module of a name it has not registered (FeatureConnector.cls_from_name),
# running that module's code. Only TFDS's own feature types are admitted.
FEATURES_PREFIX = "tensorflow_datasets.core.features."
_CLASS_NAME = re.compile(re.escape(FEATURES_PREFIX) + r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_CLASS_KEYS = ("pythonClassName", "python_class_name")  # protobuf's JSON takes either spelling
_METADATA_FILES = ("features.json", "dataset_info.json")


def _allowed_class(class_name: Any) -> bool:
    return isinstance(class_name, str) and _CLASS_NAME.fullmatch(class_name) is not None


def _refusal(where: str, class_name: Any) -> DataError:
    return DataError(
        f"{where} names the feature class {class_name!r}, which metalearn refuses: TFDS would "
        "import the module it names, running that module's code. Only TFDS's own feature "
        f"types ({FEATURES_PREFIX}..., e.g. {FEATURES_PREFIX}image_feature.Image) are "
        "allowed; prepare the dataset yourself (tfds build) or take it from a source you trust."
    )


def _class_names(value: Any) -> Iterator[Any]:
    """Every feature class name in a parsed metadata file, wherever TFDS could read one: the
    proto form's pythonClassName, the legacy form's {"type": ..., "content": ...}, and inside
    JSON text held in a string (a JsonFeature's "json", legacy content given as text)."""
    if isinstance(value, dict):
        for key in _CLASS_KEYS:
            if key in value:
                yield value[key]
        if "type" in value and "content" in value:
            yield value["type"]
        for item in value.values():
            yield from _class_names(item)
    elif isinstance(value, list):
        for item in value:
            yield from _class_names(item)
    elif isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            inner = json.loads(value)
        except ValueError:
            return
        yield from _class_names(inner)


def check_feature_classes(tfds: Any, name: str, data_dir: str | os.PathLike[str] | None) -> None:
    """Refuse, before TFDS reads them, metadata files naming a class outside TFDS's features.

    Every features.json and dataset_info.json of the dataset's folder in each data folder TFDS
    searches is read: the dataset folder itself, its config and version folders (TFDS picks one
    of these by config and version). A file that is not JSON is left to TFDS to report.
    """
    try:
        parsed, _ = tfds.core.naming.parse_builder_name_kwargs(name)
        base = parsed.name
    except Exception:  # a malformed name: TFDS refuses it before reading any folder
        return
    given = None if data_dir is None else os.fspath(data_dir)
    for root in tfds.core.utils.file_utils.list_data_dirs(given_data_dir=given):
        folder = Path(os.fspath(root)).expanduser() / base
        for depth in ("", "*/", "*/*/"):
            for file in _METADATA_FILES:
                for path in sorted(folder.glob(depth + file)):
                    try:
                        content = json.loads(path.read_text())
                    except (OSError, ValueError):
                        continue
                    for class_name in _class_names(content):
                        if not _allowed_class(class_name):
                            raise _refusal(str(path), class_name)


@contextlib.contextmanager
def _builtin_features_only(tfds: Any, name: str) -> Iterator[None]:
    """While TFDS builds the dataset's features, it resolves only TFDS's own feature classes:
    the backstop for a name in a file check_feature_classes did not read."""
    connector = tfds.features.FeatureConnector
    original = connector.__dict__["cls_from_name"]

    def guarded(cls, python_class_name):
        if not _allowed_class(python_class_name):
            raise _refusal(f"The TFDS dataset {name}", python_class_name)
        return original.__func__(cls, python_class_name)

    connector.cls_from_name = classmethod(guarded)
    try:
        yield
    finally:
        connector.cls_from_name = original


# ---------------------------------------------------------------------------------------------
# Finding the prepared dataset


def _prepared_builder(tfds: Any, name: str, data_dir: str | os.PathLike[str] | None) -> Any:
    """The dataset's builder, checked to be prepared as array_record (no download here)."""
    data_dir = None if data_dir is None else os.fspath(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"data.name={name} is not a TFDS dataset: it is neither in the TFDS catalogue nor "
            f"prepared in {data_dir or 'the default TFDS data folder'}. See the catalogue at "
            "https://www.tensorflow.org/datasets/catalog (e.g. cifar100, caltech_birds2011, "
            "oxford_flowers102, dtd, quickdraw_bitmap, omniglot)."
        ) from e
    except DataError:  # a feature class refused by _builtin_features_only
        raise
    except Exception as e:  # a malformed name, config or version
        raise DataError(f"data.name={name} does not name a TFDS dataset: {e}") from e
    where = builder.data_dir
    if not builder.is_prepared():
        raise DataError(
            f"The TFDS dataset {name} is not prepared in {where}. Preparing it downloads the "
            "data and needs TensorFlow (reading it later does not), so metalearn does not do "
            f"it on its own. Run once: {prepare_command(name, data_dir)} ; or point "
            "data.data_dir (or TFDS_DATA_DIR) at a folder that holds it prepared."
        )
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" not in formats:
        raise DataError(
            f"The TFDS dataset {name} in {where} is stored as {', '.join(sorted(formats))}, "
            "but metalearn reads array_record (random access without TensorFlow). Convert "
            f"it with: tfds convert_format --dataset_dir={where} --out_file_format=array_record "
            f"; or prepare it again: {prepare_command(name, data_dir)}"
        )
    return builder


def _check_splits(builder: Any, name: str, splits: Sequence[str]) -> tuple[str, ...]:
    available = tuple(builder.info.splits)
    if not splits:
        return tuple(sorted(available))
    unknown = [s for s in splits if s not in available]
    if unknown:
        raise DataError(
            f"data.splits={list(splits)}: {name} has no split {unknown[0]!r}; its splits are "
            f"{sorted(available)} (an empty list pools them all)."
        )
    return tuple(dict.fromkeys(splits))


def _check_features(
    tfds: Any, builder: Any, name: str, image_key: str, label_key: str, superclass_key: str | None
) -> None:
    features = builder.info.features
    keys = sorted(features.keys())
    wanted = (("data.image_key", image_key, tfds.features.Image),
              ("data.label_key", label_key, tfds.features.ClassLabel))  # fmt: skip
    if superclass_key is not None:
        wanted += (("the superclass feature", superclass_key, tfds.features.ClassLabel),)
    for what, key, kind in wanted:
        if key not in keys or not isinstance(features[key], kind):
            raise DataError(
                f"{what}={key!r} is not a {kind.__name__} feature of {name}; its features are "
                f"{', '.join(f'{k} ({type(features[k]).__name__})' for k in keys)}."
            )


def _fingerprint(builder: Any, settings: str) -> str:
    """A short key: the settings, dataset_info.json, and every data file's name and size."""
    from etils import epath

    h = hashlib.sha256(settings.encode())
    folder = epath.Path(builder.data_dir)
    h.update((folder / "dataset_info.json").read_bytes())
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.is_file():
            h.update(f"\n{path.name} {path.stat().length}".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Preprocessing and the cache


def _preprocess(
    tfds: Any,
    builder: Any,
    name: str,
    splits: tuple[str, ...],
    image_size: int,
    channels: int,
    invert: bool,
    max_per_class: int,
    image_key: str,
    label_key: str,
    superclass_key: str | None,
) -> TfdsArrays:
    label_feature = builder.info.features[label_key]
    n_labels = label_feature.num_classes
    examples: list[list[np.ndarray]] = [[] for _ in range(n_labels)]
    superclass = np.full(n_labels, -1, np.int32)
    full = 0  # classes that reached max_per_class
    # The image bytes are decoded here with PIL: TFDS's own decoding is skipped.
    decoders = {image_key: tfds.decode.SkipDecoding()}
    for split in splits:
        try:
            source = builder.as_data_source(split=split, decoders=decoders)
            length = len(source)
        except Exception as e:  # e.g. a missing shard file ("open() failed")
            raise _damaged(name, builder, f"split {split!r}", e) from e
        for i in range(length):
            if max_per_class and full == n_labels:
                break
            where = f"example {i} of split {split!r}"
            try:  # a damaged shard shows up as any error of the record reader, or as None fields
                example = source[i]
                label = int(example[label_key])
                group = -1 if superclass_key is None else int(example[superclass_key])
                if not 0 <= label < n_labels:
                    raise ValueError(f"label {label} is not one of its {n_labels} classes")
            except Exception as e:
                raise _damaged(name, builder, where, e) from e
            if max_per_class and len(examples[label]) >= max_per_class:
                continue
            examples[label].append(
                _decode(example[image_key], image_size, channels, invert, name, where)
            )
            full += max_per_class > 0 and len(examples[label]) == max_per_class
            if superclass_key is not None:
                if superclass[label] not in (-1, group):
                    raise DataError(
                        f"{name}: class {label} has examples in two superclasses "
                        f"({superclass[label]} and {group}, {where})."
                    )
                superclass[label] = group
    labels = np.array([c for c in range(n_labels) if examples[c]], np.int32)
    if not len(labels):
        raise DataError(f"The TFDS dataset {name} has no examples in splits {list(splits)}.")
    counts = np.array([len(examples[c]) for c in labels], np.int32)
    images = np.zeros((len(labels), counts.max(), image_size, image_size, channels), np.uint8)
    for row, c in enumerate(labels):
        images[row, : counts[row]] = np.stack(examples[c])
    group_names = builder.info.features[superclass_key].names if superclass_key else []
    return TfdsArrays(
        images=images,
        counts=counts,
        labels=labels,
        class_names=tuple(label_feature.int2str(int(c)) for c in labels),
        superclass=superclass[labels],
        superclass_names=tuple(group_names),
    )


def decode_image(image: Image.Image, size: int, channels: int, invert: bool) -> np.ndarray:
    """One image as the cached arrays hold it: RGB (channels=3) or grayscale (1), resized to
    size x size with LANCZOS, inverted (255 - pixel) with invert; uint8 [size, size, channels]."""
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), resample=Image.Resampling.LANCZOS)
    pixels = np.asarray(image, np.uint8)
    if invert:
        pixels = 255 - pixels
    return pixels.reshape(size, size, channels)


def _decode(raw: Any, size: int, channels: int, invert: bool, name: str, where: str) -> np.ndarray:
    """Encoded image bytes (or an array) -> uint8 [size, size, channels]."""
    try:
        if isinstance(raw, np.ndarray):  # a feature TFDS decoded after all
            image = Image.fromarray(
                raw.squeeze(-1) if raw.ndim == 3 and raw.shape[-1] == 1 else raw
            )
        else:
            image = Image.open(io.BytesIO(raw))
        return decode_image(image, size, channels, invert)
    except Exception as e:  # whatever PIL raises for bad bytes (OSError, SyntaxError, ...)
        raise DataError(
            f"The TFDS dataset {name} is corrupt: {where} does not decode as an image ({e}). "
            "Prepare it again (delete its folder first)."
        ) from e


def _write_cache(path: Path, data: TfdsArrays) -> None:
    arrays = {
        **data._asdict(),
        "class_names": np.array(data.class_names, dtype=str),
        "superclass_names": np.array(data.superclass_names, dtype=str),
    }
    write_cache_file(path, arrays, "the TFDS arrays")


def _damaged(name: str, builder: Any, where: str, e: Exception) -> DataError:
    return DataError(
        f"The TFDS dataset {name} in {builder.data_dir} is damaged: {where} cannot be read "
        f"({type(e).__name__}: {e}). Prepare it again (delete its folder first)."
    )


class _Expected(NamedTuple):
    """What the dataset's metadata and the settings say a cache file must fit."""

    label: Any  # the ClassLabel feature
    examples: int  # in the splits read
    shape: tuple[int, int, int]  # of one image: S, S, C
    max_per_class: int
    superclass_names: tuple[str, ...]


def _cache_problem(a: dict[str, np.ndarray], expected: _Expected) -> str | None:
    """Why a cache file's arrays cannot be what preprocessing gives, or None if they can be."""
    labels, counts, images = a["labels"], a["counts"], a["images"]
    n_labels = expected.label.num_classes
    if (
        labels.dtype != np.int32
        or labels.ndim != 1
        or not 0 < len(labels) <= n_labels
        or labels[0] < 0
        or labels[-1] >= n_labels
        or np.any(np.diff(labels) <= 0)
    ):
        return f"its labels are not ascending ids of the dataset's {n_labels} classes"
    n = len(labels)
    cap = expected.max_per_class or expected.examples
    if counts.dtype != np.int32 or counts.shape != (n,) or counts.min() < 1 or counts.max() > cap:
        return f"its counts are not {n} int32 numbers of examples from 1 to {cap}"
    # Without max_per_class every example is kept, so none (and no class) may be missing.
    kept = int(counts.sum())
    if kept > expected.examples or (not expected.max_per_class and kept != expected.examples):
        return f"its {n} classes hold {kept} examples, but the splits read hold {expected.examples}"
    shape = (n, int(counts.max()), *expected.shape)
    if images.dtype != np.uint8 or images.shape != shape:
        return f"its images are {images.dtype} {list(images.shape)}, not uint8 {list(shape)}"
    names = np.array([expected.label.int2str(int(c)) for c in labels], dtype=str)
    if not identical(a["class_names"], names):
        return "its class names are not those of its labels"
    groups, n_groups = a["superclass"], len(expected.superclass_names)
    if (
        groups.dtype != np.int32
        or groups.shape != (n,)
        or not (  # -1 when no superclass feature was read
            groups.min() >= 0 and groups.max() < n_groups if n_groups else np.all(groups == -1)
        )
    ):
        return "its superclass ids are not those of the superclass feature"
    if not identical(a["superclass_names"], np.array(expected.superclass_names, dtype=str)):
        return "its superclass names are not those of the superclass feature"
    return None


def _rows_named(
    names: Sequence[str], wanted: Sequence[str], what: str, split_name: str
) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    missing = [w for w in wanted if w not in index]
    if missing:
        raise DataError(
            f"The {split_name} split names {what}es this dataset does not have (or has no "
            f"examples of): {', '.join(missing[:5])}. It needs the full cifar100 dataset; use "
            "data.classes=seeded for other data."
        )
    return np.array([index[w] for w in wanted], np.int64)


for _name in TFDS_DATA:
    registry.register("data", _name, TfdsConfig, make_source)
