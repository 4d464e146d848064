"""What data=mini_imagenet and data=tiered_imagenet share: finding the files few-shot projects
distribute, reading them into one uint8 array per split, caching that array, and the option's
schema and TaskSource. The forms each dataset is read from are listed in its own module
(data/mini_imagenet.py, data/tiered_imagenet.py).

Neither dataset can be downloaded by metalearn: both are cut from ImageNet, which image-net.org
shares with registered users only, and each copy in use comes from one project's scripts or
shared drive. The files are looked for in data.root, or in $METALEARN_DATA when data.root is
unset, and in the subfolders of it that the projects name theirs (e.g. mini_imagenet/,
mini-imagenet/); the first form whose files are complete there for all three splits is read.

Each split is read once into `images` uint8 [classes, max_per_class, S, S, 3] (RGB) and
`counts` int32 [classes]: classes with fewer images are zero-padded after their last one. An
image that is not S x S is resized with PIL (bilinear, antialiased when shrinking), without
cropping, as the projects' own scripts resize ImageNet images to 84 x 84. The arrays are cached
in `$XDG_CACHE_HOME/metalearn/<option>/` (or ~/.cache/...), one .npz per split, keyed by the
source files' names, sizes and modification times and by the preprocessing settings; a cache
file that fails to load or does not fit those settings is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
from omegaconf import MISSING
from PIL import Image

from metalearn.checks import MAX_EXAMPLES, at_most, choice, require
from metalearn.data import safe_pickle
from metalearn.data.base import (
    SPLITS,
    DataError,
    EpisodicDataConfig,
    TaskSource,
    open_images,
    scale_pixels,
)
from metalearn.data.omniglot import read_cache_file, write_cache_file

log = logging.getLogger("metalearn")

_CACHE_VERSION = 1  # bump when preprocessing changes, so old cache files are not reused
_FIELDS = ("images", "counts", "classes")
_CHUNK = 512  # images read at a time from an .npz member


class SplitArrays(NamedTuple):
    images: np.ndarray  # uint8 [classes, max_count, S, S, 3]; row c is zero after counts[c]
    counts: np.ndarray  # int32 [classes], the real images of each class (>= 1)
    classes: tuple[str, ...]  # one name per row (a wnid, a class name, or a label number)


class SplitSource(NamedTuple):
    """One split as found on disk, indexed but not decoded."""

    classes: tuple[str, ...]
    rows: np.ndarray  # int [N]: the class row of each of the N images, in the file's order
    items: Callable[[], Iterator[Any]]  # the N images in order: uint8 [H, W, 3] or encoded bytes
    where: str  # the files, for errors
    describe: Callable[[int], str]  # "image i of <file>", for errors
    bgr: bool = False  # the arrays are BGR (OpenCV's order), flipped to RGB when read


class Form(NamedTuple):
    """One way a dataset is stored: its files per split, and how to read them."""

    name: str  # short id, in cache keys and logs
    title: str  # e.g. "learn2learn pickles"
    # split -> the files it needs, each as the names it may have (first match wins)
    files: Callable[[str], tuple[tuple[str, ...], ...]]
    expected: str  # the files, for the not-found error
    read: Callable[[tuple[Path, ...], bool], SplitSource]  # (a split's files, bgr) -> source
    # the files a split's cache key covers (by default, its files themselves)
    index: Callable[[tuple[Path, ...]], Sequence[Path]] = tuple
    bgr: bool = False  # its image arrays are BGR unless the option says otherwise


class Dataset(NamedTuple):
    name: str  # the option name, and the cache subfolder
    title: str  # e.g. "miniImageNet"
    folders: tuple[str, ...]  # subfolders of data.root / METALEARN_DATA looked in, in order
    forms: tuple[Form, ...]  # in order of preference
    classes: dict[str, int]  # the published number of classes of each split


# ---------------------------------------------------------------------------------------------
# Public API


def load(
    dataset: Dataset,
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int = 84,
    max_per_class: int | None = None,
    npz_bgr: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, SplitArrays]:
    """The three splits of `dataset` as arrays, preprocessed on first use and cached.

    With max_per_class, a class keeps its first max_per_class images (in the file's order).
    npz_bgr: a form whose arrays are BGR (tieredImageNet's .npz) is flipped to RGB.
    """
    _, form, paths = find(dataset, root)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(dataset.name)
    return {
        split: _load_split(
            dataset, form, split, paths[split], image_size, max_per_class, npz_bgr, cache
        )
        for split in SPLITS
    }


def default_cache_dir(name: str) -> Path:
    """`$XDG_CACHE_HOME/metalearn/<name>`, or `~/.cache/metalearn/<name>`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "metalearn" / name


def decode_image(image: Image.Image, size: int) -> np.ndarray:
    """One image as the cached arrays hold it: RGB, resized to size x size (bilinear, which PIL
    antialiases when shrinking; no crop); uint8 [size, size, 3]."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), resample=Image.Resampling.BILINEAR)
    return np.asarray(image, np.uint8)


def find(
    dataset: Dataset, root: str | os.PathLike[str] | None
) -> tuple[Path, Form, dict[str, tuple[Path, ...]]]:
    """The folder holding a complete form of the dataset, that form, and each split's files."""
    if root is not None:
        base, label = Path(root).expanduser(), f"data.root={root}"
        if base.is_file():
            raise DataError(
                f"{label} is a file, not a folder: point it at the folder holding the "
                f"{dataset.title} files. {_expected(dataset)} {_how(dataset)}"
            )
    else:
        env = os.environ.get("METALEARN_DATA")
        if not env:
            raise DataError(
                f"{dataset.title} has no folder to be read from: data.root is not set, and "
                f"neither is the METALEARN_DATA environment variable. {_expected(dataset)} "
                + _how(dataset)
            )
        base, label = Path(env), f"METALEARN_DATA={env}"
    folders = [base, *(base / sub for sub in dataset.folders)]
    partial = []
    for folder in folders:
        for form in dataset.forms:
            found, missing = _locate(folder, form)
            if not missing:
                return folder, form, found
            present = sorted({p.name for files in found.values() for p in files})
            if present:
                partial.append(
                    f"{folder} holds {', '.join(present)} of the {form.title} but lacks "
                    f"{', '.join(missing)}"
                )
    holds = f" Of the files expected, {'; '.join(partial)}." if partial else ""
    raise DataError(
        f"{dataset.title} was not found at {label}: looked in {', '.join(map(str, folders))}."
        f"{holds} {_expected(dataset)} {_how(dataset)}"
    )


def check_episodes(
    title: str,
    split: str,
    data: SplitArrays,
    n_way: int,
    k_shot: int,
    k_query: int,
    max_per_class: int | None = None,
    keys: str = "data",
) -> None:
    """A split must hold n_way classes, each with k_shot + k_query distinct images (the checks
    of tfds.check_episodes, for settings under `keys`: data, or train for training's own)."""
    counts, n = data.counts, len(data.counts)
    if n < n_way:
        raise DataError(
            f"{keys}.n_way={n_way} is more classes than the meta-{split} split of {title} holds "
            f"({n} classes). Use {keys}.n_way <= {n}; if the published meta-{split} split has "
            f"more classes, the copy of {title} read is incomplete: replace its files with a "
            "full copy."
        )
    need = k_shot + k_query
    short = [(data.classes[i], int(c)) for i, c in enumerate(counts) if c < need]
    if short:
        listed = ", ".join(f"{c!r} has {k}" for c, k in sorted(short, key=lambda s: s[1])[:3])
        raise DataError(
            f"{keys}.k_shot + {keys}.k_query = {k_shot} + {k_query} = {need} distinct images "
            f"per class are needed, but {len(short)} of the {n} meta-{split} classes of {title} "
            f"have fewer ({listed}; the fewest is {int(counts.min())}). Lower {keys}.k_shot or "
            f"{keys}.k_query"
            + (f", or raise data.max_per_class={max_per_class}" if max_per_class else "")
            + (
                f". The published files hold hundreds of images per class, so the copy of "
                f"{title} read is likely incomplete: replace its files with a full copy."
                if not max_per_class
                else "."
            )
        )


# ---------------------------------------------------------------------------------------------
# The data options' schema and task source


@dataclass
class ImageNetConfig(EpisodicDataConfig):
    """N-way K-shot episodes of an ImageNet subset read from local files (no download)."""

    dataset: ClassVar[Dataset]  # set by each option

    name: str = MISSING
    # the folder holding the files (or a subfolder named as the projects name it); None:
    # $METALEARN_DATA or one of its subfolders (e.g. $METALEARN_DATA/mini_imagenet)
    locations: ClassVar[tuple[str, ...]] = ("root",)

    root: str | None = None
    image_size: int = 84  # images are resized to image_size x image_size (stored: 84)
    max_per_class: int | None = None  # keep the first this many images of each class; None: all

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("data.name", self.name, (self.dataset.name,))
        require(
            self.root is None or str(self.root).strip() != "",
            f"data.root={self.root!r} is not allowed: give the folder holding the "
            f"{self.dataset.title} files, or null to look in $METALEARN_DATA.",
        )
        require(
            8 <= self.image_size <= 512,
            f"data.image_size={self.image_size} is not allowed: images are resized to "
            f"image_size x image_size pixels, from 8 to 512 ({self.dataset.title} is stored "
            "at 84).",
        )
        if self.max_per_class is not None:
            need = self.k_shot + self.k_query
            require(
                self.max_per_class >= need,
                f"data.max_per_class={self.max_per_class} is not allowed: use null (every "
                f"image) or at least data.k_shot + data.k_query = {need}, since the support "
                "and query images of a class are distinct.",
            )
            at_most("data.max_per_class", self.max_per_class, MAX_EXAMPLES)

    def preprocess(self, images) -> np.ndarray:
        """Images of any size and mode (file paths, PIL images, arrays; data/base.py::open_images)
        as the model reads them in training: float32 [N, S, S, 3], decode_image / 255."""
        pixels = np.stack([decode_image(im, self.image_size) for im in open_images(images)])
        return scale_pixels(pixels)


def make_source(cfg: ImageNetConfig) -> TaskSource:
    """One (images, counts) pair of device arrays per split, and episodes drawn from them."""
    import jax.numpy as jnp

    from metalearn.data.episodic import counted_episodes

    title = cfg.dataset.title
    data = load(
        cfg.dataset,
        cfg.root,
        image_size=cfg.image_size,
        max_per_class=cfg.max_per_class,
        npz_bgr=getattr(cfg, "npz_bgr", True),
    )
    for split in SPLITS:
        check_episodes(
            title, split, data[split], cfg.n_way, cfg.k_shot, cfg.k_query, cfg.max_per_class
        )
    arrays = {s: (jnp.asarray(data[s].images), jnp.asarray(data[s].counts)) for s in SPLITS}

    def training_episodes(n_way: int, k_shot: int, k_query: int):
        """Training episodes of their own shape, checked against the train split."""
        check_episodes(title, "train", data["train"], n_way, k_shot, k_query, keys="train")
        return counted_episodes(n_way, k_shot, k_query)

    return TaskSource(
        kind="classification",
        n_out=cfg.n_way,
        n_train_classes=len(data["train"].classes),
        input_shape=(cfg.image_size, cfg.image_size, 3),
        splits=arrays,
        sample=counted_episodes(cfg.n_way, cfg.k_shot, cfg.k_query),
        episodes=training_episodes,
    )


# ---------------------------------------------------------------------------------------------
# Finding the files


def _locate(folder: Path, form: Form) -> tuple[dict[str, tuple[Path, ...]], list[str]]:
    """Each split's files of `form` found in `folder`, and the names of those missing."""
    found: dict[str, tuple[Path, ...]] = {}
    missing = []
    for split in SPLITS:
        paths = []
        for names in form.files(split):
            path = next((folder / n for n in names if _exists(folder / n)), None)
            if path is None:
                missing.append(" or ".join(names))
            else:
                paths.append(path)
        found[split] = tuple(paths)
    return found, list(dict.fromkeys(missing))  # images/ once


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError as e:  # e.g. a folder we may not look into
        raise DataError(
            f"Cannot look for {path.name} in {path.parent}: it cannot be accessed "
            f"({e.strerror or e}). Make the folder readable, or point data.root (or "
            "METALEARN_DATA) at another copy of the data."
        ) from e


def _expected(dataset: Dataset) -> str:
    forms = "; ".join(f"({i}) {f.expected}" for i, f in enumerate(dataset.forms, 1))
    return (
        f"{dataset.title} is read from any one of these forms, with its three splits in one "
        f"folder: {forms}."
    )


def _how(dataset: Dataset) -> str:
    subfolders = ", ".join(f"{f}/" for f in dataset.folders)
    return (
        f"metalearn does not download {dataset.title}, and cannot: it is cut from ImageNet, "
        "which image-net.org shares with registered users only, so get the files from one of "
        "the projects named above. Then "
        "point data.root at their folder, or set METALEARN_DATA to a folder holding them "
        f"itself or in one of its subfolders {subfolders}."
    )


# ---------------------------------------------------------------------------------------------
# Reading, preprocessing and the cache


def _load_split(
    dataset: Dataset,
    form: Form,
    split: str,
    paths: tuple[Path, ...],
    size: int,
    max_per_class: int | None,
    npz_bgr: bool,
    cache: Path,
) -> SplitArrays:
    bgr = form.bgr and npz_bgr
    settings = (
        f"v{_CACHE_VERSION} {dataset.name} {form.name} {split} {size}px "
        f"max={max_per_class or 0} bgr={bgr}"
    )
    key = _fingerprint(form.index(paths), settings)
    cached = cache / f"{dataset.name}-{split}-{size}px-{key}.npz"
    source = f"the {form.title} in {paths[0].parent}"
    arrays = read_cache_file(
        cached, _FIELDS, lambda a: _cache_problem(a, size, max_per_class), source
    )
    if arrays is not None:
        return SplitArrays(
            images=arrays["images"],
            counts=arrays["counts"],
            classes=tuple(str(c) for c in arrays["classes"]),
        )
    started = time.perf_counter()
    log.info("reading %s %s from %s once into %s", dataset.title, split, source, cached)
    data = _build(form.read(paths, bgr), size, max_per_class)
    log.info(
        "%s %s: %d classes, %d images in %.1f s", dataset.title, split, len(data.classes),
        int(data.counts.sum()), time.perf_counter() - started,
    )  # fmt: skip
    published = dataset.classes[split]
    if len(data.classes) != published:
        log.warning(
            "%s's meta-%s split has %d classes in %s, but the published split has %d: a "
            "partial copy, or files of another split (check which file is which).",
            dataset.title, split, len(data.classes), source, published,
        )  # fmt: skip
    write_cache_file(
        cached,
        {"images": data.images, "counts": data.counts, "classes": np.array(data.classes, str)},
        f"{dataset.title} {split}",
    )
    return data


def _fingerprint(files: Sequence[Path], settings: str) -> str:
    """A short key: the settings, and every source file's name, size and modification time."""
    h = hashlib.sha256(settings.encode())
    for path in files:
        try:
            stat = path.stat()
        except OSError as e:
            raise DataError(
                f"{path} cannot be read ({e.strerror or e}), but the dataset's files need it: "
                "restore it from the copy it came from."
            ) from e
        h.update(f"\n{path.name} {stat.st_size} {stat.st_mtime_ns}".encode(errors="replace"))
    return h.hexdigest()[:16]


def _build(src: SplitSource, size: int, max_per_class: int | None) -> SplitArrays:
    """Decode a split into its padded array: each image to its class row, in file order."""
    rows = np.asarray(src.rows, np.int64)
    totals = np.bincount(rows[rows >= 0], minlength=len(src.classes))
    present = np.flatnonzero(totals)  # a class named without images is left out
    if not len(present):
        raise DataError(f"{src.where} holds no images of any class: it is empty or damaged.")
    renumber = np.full(len(src.classes), -1, np.int64)
    renumber[present] = np.arange(len(present))
    rows = np.where(rows >= 0, renumber[np.maximum(rows, 0)], -1)
    counts = totals[present].astype(np.int32)
    if max_per_class:
        counts = np.minimum(counts, max_per_class).astype(np.int32)
    images = np.zeros((len(present), int(counts.max()), size, size, 3), np.uint8)
    filled = np.zeros(len(present), np.int64)
    left = int(counts.sum())
    i = -1
    try:
        for i, item in enumerate(src.items()):
            row = rows[i] if i < len(rows) else -1
            if row < 0 or filled[row] >= counts[row]:
                continue
            images[row, filled[row]] = _pixels(item, size, src.bgr, src.describe, i)
            filled[row] += 1
            left -= 1
            if not left:
                break
    except DataError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(
            f"{src.describe(i + 1)} cannot be read ({type(e).__name__}: {e}): the file is "
            "damaged or truncated. Replace it with a fresh copy."
        ) from e
    if left:
        raise DataError(
            f"{src.where} holds {i + 1} images, fewer than its labels name ({len(rows)}): it "
            "is truncated, or its files belong to different copies."
        )
    return SplitArrays(images, counts, tuple(src.classes[c] for c in present))


def _pixels(item: Any, size: int, bgr: bool, describe: Callable[[int], str], i: int) -> np.ndarray:
    """An image array [H, W, 3] or encoded bytes -> uint8 [size, size, 3] (RGB)."""
    if isinstance(item, np.ndarray) and item.ndim == 3:
        if item.dtype != np.uint8 or item.shape[-1] != 3:
            raise DataError(
                f"{describe(i)} is a {item.dtype} array of shape {list(item.shape)}, not a uint8 "
                "RGB image [H, W, 3]."
            )
        pixels = item[..., ::-1] if bgr else item
        if pixels.shape[:2] == (size, size):
            return pixels
        return decode_image(Image.fromarray(np.ascontiguousarray(pixels)), size)
    if isinstance(item, np.ndarray):  # encoded bytes as cv2.imencode returns them: uint8 [n, 1]
        item = item.tobytes()
    elif isinstance(item, str):  # a Python 2 str read with encoding latin1
        item = item.encode("latin1")
    if not isinstance(item, (bytes, bytearray, memoryview)):
        raise DataError(f"{describe(i)} is a {type(item).__name__}, not an image.")
    try:
        image = Image.open(io.BytesIO(item))
        image.load()  # PIL decodes lazily: a truncated or damaged image fails here
    except Exception as e:  # whatever PIL raises for bad bytes (OSError, SyntaxError, ...)
        raise DataError(
            f"{describe(i)} does not decode as an image ({e}): the file is damaged. Replace it "
            "with a fresh copy."
        ) from e
    return decode_image(image, size)


def _cache_problem(a: dict[str, np.ndarray], size: int, max_per_class: int | None) -> str | None:
    """Why a cache file's arrays cannot be what preprocessing gives, or None if they can be."""
    images, counts, classes = a["images"], a["counts"], a["classes"]
    if classes.dtype.kind != "U" or classes.ndim != 1 or not len(classes):
        return "its class names are not a list of strings"
    n = len(classes)
    if len(set(classes.tolist())) != n:
        return "its class names repeat"
    cap = max_per_class or MAX_EXAMPLES
    if counts.dtype != np.int32 or counts.shape != (n,) or counts.min() < 1 or counts.max() > cap:
        return f"its counts are not {n} int32 numbers of images from 1 to {cap}"
    shape = (n, int(counts.max()), size, size, 3)
    if images.dtype != np.uint8 or images.shape != shape:
        return f"its images are {images.dtype} {list(images.shape)}, not uint8 {list(shape)}"
    if any(images[c, counts[c] :].any() for c in range(n)):
        return "its padding after the last image of a class is not zero"
    return None


# ---------------------------------------------------------------------------------------------
# Reading the files' contents (for the forms of data/mini_imagenet.py and data/tiered_imagenet.py)


def load_pickle(path: Path, what: str) -> Any:
    """A pickle file's object; Python 2 pickles (str and numpy arrays) load with latin1, as
    numpy recommends. These files come from third-party mirrors, and pickle.load runs whatever
    callable a file names, so they are read with data/safe_pickle.py, which admits only numpy
    arrays and dtypes and plain Python values: a file naming anything else is refused unrun."""
    try:
        with open(path, "rb") as f:
            return safe_pickle.load(f, encoding="latin1")
    except MemoryError:
        raise
    except safe_pickle.Refused as e:
        raise DataError(
            f"{path} was not loaded as {what}: it is a pickle that calls {e.name}, which no "
            "file of this dataset holds (they hold only numpy arrays, lists, dicts, strings "
            "and numbers), so loading it would run code of the file's choosing; it was refused "
            "before that call. Delete it, and get the dataset from a source you trust."
        ) from e
    except Exception as e:  # what a damaged or foreign file makes the unpickler raise
        raise DataError(
            f"{path} does not load as {what} ({type(e).__name__}: {e}): it is damaged or another "
            "file. Replace it with a fresh copy."
        ) from e


def text(value: Any) -> str:
    """A name from a pickle: bytes (encoding bytes), or a Python 2 str read as latin1 (whose
    UTF-8 bytes are decoded back when they are UTF-8)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    value = str(value)
    try:
        return value.encode("latin1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def record(obj: Any, path: Path, what: str, keys: Sequence[str]) -> dict[str, Any]:
    """A pickled dict with its keys as str (they are bytes in some copies), checked to hold
    `keys`."""
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not {what}: it holds a {type(obj).__name__}, not a dict.")
    d = {text(k): v for k, v in obj.items()}
    missing = [k for k in keys if k not in d]
    if missing:
        raise DataError(
            f"{path} is not {what}: it lacks the key {missing[0]!r} (its keys are {sorted(d)})."
        )
    return d


def image_array(value: Any, path: Path, key: str) -> np.ndarray:
    """uint8 [N, H, W, 3] from a pickled dict."""
    if not (
        isinstance(value, np.ndarray)
        and value.dtype == np.uint8
        and value.ndim == 4
        and value.shape[-1] == 3
    ):
        found = (
            f"a {value.dtype} array of shape {list(value.shape)}"
            if isinstance(value, np.ndarray)
            else f"a {type(value).__name__}"
        )
        raise DataError(
            f"{path}: {key!r} should be the images as a uint8 array [N, H, W, 3], but it is "
            f"{found}."
        )
    return value


def int_labels(value: Any, n: int, path: Path, key: str) -> np.ndarray:
    """int64 [n] non-negative labels from a pickled list or array."""
    try:
        labels = np.asarray(value)
    except Exception:  # a ragged or odd object
        labels = np.array([])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.size != n:
        raise DataError(
            f"{path}: {key!r} should be {n} integer labels, one per image, but it is "
            f"{labels.size} {labels.dtype} values of shape {list(labels.shape)}."
        )
    if n and labels.min() < 0:
        raise DataError(f"{path}: {key!r} holds a negative label ({labels.min()}).")
    return labels.astype(np.int64)


def npz_images(path: Path, key: str = "images") -> tuple[int, Callable[[], Iterator[np.ndarray]]]:
    """The number of images of the array `key` of an .npz file, and an iterator over them that
    streams the member (np.load would hold the whole array, ~9 GB for tieredImageNet's train)."""

    def header(f) -> tuple[tuple[int, ...], np.dtype]:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy format version {version} is not supported")
        if fortran or dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise DataError(
                f"{path}: {key!r} should be uint8 images [N, H, W, 3] in C order, but it is "
                f"{dtype} of shape {list(shape)}" + (" in Fortran order." if fortran else ".")
            )
        return shape, dtype

    def member(zf: zipfile.ZipFile) -> str:
        name = f"{key}.npy"
        if name not in zf.namelist():
            arrays = sorted(n.removesuffix(".npy") for n in zf.namelist())
            raise DataError(f"{path} holds no array {key!r} (its arrays are {arrays}).")
        return name

    try:
        with zipfile.ZipFile(path) as zf, zf.open(member(zf)) as f:
            shape, _ = header(f)
    except DataError:
        raise
    except Exception as e:  # BadZipFile, OSError, a bad header (ValueError)...
        raise DataError(
            f"{path} does not open as an .npz file of images ({type(e).__name__}: {e}): it is "
            "damaged or another file. Replace it with a fresh copy."
        ) from e
    n, per = shape[0], int(np.prod(shape[1:]))

    def items() -> Iterator[np.ndarray]:
        with zipfile.ZipFile(path) as zf, zf.open(member(zf)) as f:
            header(f)
            for start in range(0, n, _CHUNK):
                k = min(_CHUNK, n - start)
                data = f.read(k * per)
                if len(data) != k * per:
                    raise EOFError(f"the array ends after {start + len(data) // per} images")
                yield from np.frombuffer(data, np.uint8).reshape(k, *shape[1:])

    return n, items
