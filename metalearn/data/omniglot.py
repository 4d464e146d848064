"""Find, verify and preprocess Omniglot once into cached numpy arrays; split its classes.

Pixels: images are uint8 with the ink bright (stroke 255, background 0), so `images / 255` is
the `1 - pixel` input the MAML reference feeds its network. Each 105x105 PNG is converted to
grayscale ("L") and resized with PIL LANCZOS, as learn2learn and torchvision pipelines do. (The
MAML reference calls `resize((28, 28), LANCZOS)` on the mode-"1" files, which Pillow silently
turns into NEAREST for mode "1", giving binary images; we keep the anti-aliased grey levels.)

Order: characters are sorted by set (background, then evaluation), alphabet, character; the 20
drawings of a character by file name. Sources, first match wins: `root`, `$METALEARN_DATA` (each
may also hold the data in an `omniglot/` subfolder), the cache folder, then a download into the
cache that is checked against the official sha256.

Nothing damaged is trusted: a source that cannot be read completely is an error naming what cannot
be read, and a cache file that fails any check against the index of the source is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple, NoReturn

import jax.numpy as jnp
import numpy as np
from PIL import Image

from metalearn import registry
from metalearn.checks import ConfigError, check_seed, choice, require
from metalearn.data.base import (
    SPLITS,
    DataError,
    EpisodicDataConfig,
    TaskSource,
    open_images,
    scale_pixels,
)

SETS = ("images_background", "images_evaluation")
# The release's smaller training sets (images_background_small1/2.zip, Lake et al. 2015): the
# background set's characters of these alphabets, every drawing (the same PNG files).
SMALL_BACKGROUNDS = {
    "small1": ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"),
    "small2": ("Greek", "Japanese_(katakana)", "Latin", "Sanskrit", "Tagalog"),
}
BACKGROUNDS = ("full", *SMALL_BACKGROUNDS)
EPISODES = ("random", "within_alphabet")
URLS = {s: f"https://github.com/brendenlake/omniglot/raw/master/python/{s}.zip" for s in SETS}
# The official release containers, as registered by tensorflow-datasets
# (tensorflow_datasets/url_checksums/omniglot.txt). Only downloads are checked against these:
# local copies are verified by content, since rebuilt zips hold the same PNGs in new containers.
SHA256 = {
    "images_background": "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
    "images_evaluation": "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
}
DRAWINGS = 20
FULL_RELEASE = {"images_background": 964, "images_evaluation": 659}  # characters per set
_CACHE_VERSION = 1  # bump when preprocessing changes, so old cache files are not reused
_PNG = re.compile(r"^[^/]+/character\d+/\d+_\d+\.png$")
_CHARACTER = re.compile(r"^[^/]+/character\d+$")  # a character folder, relative to its set
_HOW_TO_FIX = (
    "Point to a folder holding images_background.zip and images_evaluation.zip (or their "
    "extracted folders images_background/ and images_evaluation/) from "
    "https://github.com/brendenlake/omniglot/tree/master/python, with data.root=/path/to/omniglot "
    "or the METALEARN_DATA environment variable, or allow the download (download=True)."
)

Downloader = Callable[[str, Path], None]

log = logging.getLogger("metalearn")


class OmniglotArrays(NamedTuple):
    images: np.ndarray  # uint8 [n_characters, 20, S, S], ink 255, background 0
    alphabet: np.ndarray  # int32 [n_characters], index into `alphabets`
    background: np.ndarray  # bool [n_characters], True for the images_background set
    alphabets: tuple[str, ...]  # background alphabets sorted, then evaluation ones sorted
    characters: tuple[str, ...]  # "Alphabet/characterNN", one per row of `images`


class _ImageSet(NamedTuple):
    """One of the two sets found on disk, as a zip file or an extracted folder."""

    name: str  # "images_background" or "images_evaluation"
    path: Path
    crcs: dict[str, int]  # "Alphabet/characterNN/XXXX_YY.png" -> CRC-32 of the PNG bytes
    drawings: dict[str, list[str]]  # "Alphabet/characterNN" -> its 20 PNGs, sorted
    top: str  # folder prefix inside a zip ("images_background/"); "" for a folder


# ---------------------------------------------------------------------------------------------
# Public API


def load_omniglot(
    root: str | os.PathLike[str] | None = None,
    *,
    image_size: int = 28,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    downloader: Downloader | None = None,
) -> OmniglotArrays:
    """All 1623 Omniglot characters as arrays, preprocessed on first use and cached.

    An explicit `root` that does not hold the data is an error (no silent fallback to other
    sources). `downloader(url, dest)` writes `url` to `dest`; it defaults to urllib.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(
            f"image_size={image_size!r} is not a positive integer. Use a side length in pixels "
            "such as 28 (the MAML protocol) or 105 (the original resolution)."
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    paths = _find_sources(None if root is None else Path(root), cache, download, downloader)
    sets = [_index_set(name, path) for name, path in paths.items()]
    characters = _characters(sets)
    labels = _labels(characters)
    key = _fingerprint(sets, image_size)
    cached = cache / f"omniglot-{image_size}px-{key}.npz"
    source = " and ".join(str(s.path) for s in sets)
    shape = (len(characters), DRAWINGS, image_size, image_size)
    arrays = read_cache_file(
        cached, ("images", *labels), lambda a: _cache_problem(a, labels, shape), source
    )
    if arrays is None:
        arrays = {"images": _preprocess(sets, characters, image_size), **labels}
        write_cache_file(cached, arrays, "Omniglot")
    return OmniglotArrays(
        images=arrays["images"],
        alphabet=labels["alphabet"],
        background=labels["background"],
        alphabets=tuple(str(a) for a in labels["alphabets"]),
        characters=tuple(str(c) for c in labels["characters"]),
    )


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/metalearn/omniglot`, or `~/.cache/metalearn/omniglot`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "metalearn" / "omniglot"


def split_classes(
    data: OmniglotArrays,
    *,
    split: str = "random",
    seed: int = 0,
    sizes: Sequence[int] = (1100, 100, 423),
    val_alphabets: int = 5,
    background: str = "full",
) -> dict[str, np.ndarray]:
    """Disjoint character indices {"train", "val", "test"} -> sorted int32 arrays.

    "random": characters shuffled by `np.random.default_rng(seed)`, then cut into `sizes`
    (the MAML / learn2learn protocol: 1100 / 100 / 423). "alphabet": the background set for
    train and val, with its last `val_alphabets` alphabets (sorted order) held out as val, and
    the evaluation set as test. With background="small1" or "small2" (alphabet split only), the
    release's small training sets: train holds the characters of their 5 alphabets, val the last
    `val_alphabets` of the other background alphabets. Split before `with_rotations`, so that the
    rotations of a character stay in the split of the character.
    """
    n = len(data.characters)
    if split == "random":
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) != 3 or min(sizes) < 0 or sum(sizes) != n:
            train, val = round(n * 1100 / 1623), round(n * 100 / 1623)  # MAML's proportions
            raise DataError(
                f"data.split_sizes={list(sizes)} (train, val, test characters) add up to "
                f"{sum(sizes)}, but the dataset has {n} characters"
                + (
                    f" of Omniglot's {sum(FULL_RELEASE.values())}, so the copy read is likely "
                    "incomplete (alphabets or characters missing from images_background / "
                    "images_evaluation): replace it with the full release, or"
                    if n < sum(FULL_RELEASE.values())
                    else ":"
                )
                + f" give three non-negative sizes that add up to {n}, e.g. "
                f"data.split_sizes=[{train},{val},{n - train - val}]."
            )
        order = np.random.default_rng(seed).permutation(n)
        cuts = np.cumsum(sizes)[:2]
        parts = np.split(order, cuts)
    elif split == "alphabet":
        background_alphabets = np.unique(data.alphabet[data.background])
        n_bg = len(background_alphabets)
        if not 0 <= val_alphabets < n_bg:
            raise DataError(
                f"data.val_alphabets={val_alphabets} cannot be held out of the {n_bg} background "
                f"alphabets: use a number from 0 to {n_bg - 1} (the default is 5 of 30)"
                + (
                    "; the release has 30, so the copy of images_background read is likely "
                    "incomplete: replace it with the full release."
                    if n_bg < 30
                    else "."
                )
            )
        if background == "full":
            train_alphabets = background_alphabets[: n_bg - val_alphabets]
            held_out = background_alphabets[n_bg - val_alphabets :]
        else:
            names = SMALL_BACKGROUNDS[background]
            small = [a for a in background_alphabets if data.alphabets[a] in names]
            if len(small) != len(names):
                missing = sorted(set(names) - {data.alphabets[a] for a in small})
                raise DataError(
                    f"background={background} needs the background alphabets {list(names)}, "
                    f"but {missing} are not in the data; use the full release."
                )
            rest = [a for a in background_alphabets if a not in small]
            train_alphabets, held_out = small, rest[len(rest) - val_alphabets :]
        parts = [
            np.flatnonzero(np.isin(data.alphabet, train_alphabets) & data.background),
            np.flatnonzero(np.isin(data.alphabet, held_out) & data.background),
            np.flatnonzero(~data.background),
        ]
    else:
        raise DataError(
            f"split={split!r} is not a known Omniglot split: use 'random' (characters shuffled "
            "with a fixed seed into 1100/100/423, as in MAML) or 'alphabet' (background "
            "alphabets for train/val, evaluation alphabets for test)."
        )
    return {
        k: np.sort(p).astype(np.int32) for k, p in zip(("train", "val", "test"), parts, strict=True)
    }


def with_rotations(images: np.ndarray) -> np.ndarray:
    """[C, 20, S, S] -> [4C, 20, S, S]: each class and its 90/180/270 degree rotations.

    Class-major: new class 4*c + k is class c rotated counter-clockwise by k*90 degrees, so
    class indices `idx` of the input become `4 * idx + k` here.
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise DataError(
            f"with_rotations needs images of shape [classes, drawings, S, S], got "
            f"{images.shape}; pass OmniglotArrays.images or a slice of its classes."
        )
    rotated = np.stack([np.rot90(images, k, axes=(-2, -1)) for k in range(4)], axis=1)
    return rotated.reshape(-1, *images.shape[1:])


def download_url(url: str, dest: Path) -> None:
    """The default downloader: stream `url` into the file `dest`."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f, length=1 << 20)


# ---------------------------------------------------------------------------------------------
# Finding the data


def _sets_in(folder: Path) -> dict[str, Path]:
    """The sets present in `folder`, each as `<set>.zip` or an extracted `<set>/` folder."""
    found = {}
    for name in SETS:
        for candidate in (folder / f"{name}.zip", folder / name):
            try:
                present = candidate.exists()
            except OSError as e:  # e.g. a folder we may not look into (exists() raises EACCES)
                raise DataError(
                    f"Cannot look for Omniglot in {folder}: {candidate} cannot be accessed "
                    f"({e.strerror or e}). Make the folder readable, or point data.root (or "
                    "METALEARN_DATA) at another copy of the data."
                ) from e
            if present:
                found[name] = candidate
                break
    return found


def _find_sources(
    root: Path | None, cache: Path, download: bool, downloader: Downloader | None
) -> dict[str, Path]:
    if root is not None:
        if os.path.isfile(root):  # e.g. data.root=/data/images_background.zip
            raise DataError(f"data.root={root} is a file, not a folder. {_HOW_TO_FIX}")
        for folder in (root, root / "omniglot"):
            found = _sets_in(folder)
            if len(found) == len(SETS):
                return found
        found = _sets_in(root)
        raise DataError(
            f"Omniglot was not found at data.root={root}: it holds {_describe(found)}, but both "
            f"{SETS[0]} and {SETS[1]} are expected there, as .zip files or extracted folders "
            f"with the layout <Alphabet>/characterNN/XXXX_YY.png. {_HOW_TO_FIX}"
        )
    looked = []
    env = os.environ.get("METALEARN_DATA")
    candidates = [Path(env), Path(env) / "omniglot"] if env else []
    for folder in [*candidates, cache]:
        found = _sets_in(folder)
        if len(found) == len(SETS):
            return found
        label = "the cache folder" if folder == cache else "METALEARN_DATA"
        looked.append(f"{label} {folder} ({_describe(found)})")
    if not env:
        looked.insert(0, "METALEARN_DATA (not set)")
    if not download:
        raise DataError(
            f"Omniglot was not found and download=False. Looked in: {'; '.join(looked)}. "
            + _HOW_TO_FIX
        )
    for name in SETS:
        if not (cache / f"{name}.zip").exists():
            _download(name, cache / f"{name}.zip", downloader or download_url, looked)
    return {name: cache / f"{name}.zip" for name in SETS}


def _describe(found: dict[str, Path]) -> str:
    return f"only {', '.join(found)}" if found else "neither set"


def _download(name: str, dest: Path, downloader: Downloader, looked: list[str]) -> None:
    """Download one set to `dest`, checked against the official sha256, atomically."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with temp_file_beside(dest) as tmp:
            try:
                downloader(URLS[name], tmp)
            except Exception as e:  # any failure of an injected or network downloader
                raise DataError(
                    f"Omniglot was not found locally and downloading {URLS[name]} failed ({e}). "
                    f"Looked in: {'; '.join(looked)}. {_HOW_TO_FIX}"
                ) from e
            digest = _sha256(tmp)
            if digest != SHA256[name]:
                raise DataError(
                    f"The download of {URLS[name]} has sha256 {digest}, not the official "
                    f"{SHA256[name]}; it was discarded, so no copy of it is left in "
                    f"{dest.parent}. Retry later, or download the file yourself and point "
                    "data.root (or METALEARN_DATA) at the folder holding it."
                )
            os.replace(tmp, dest)
    except OSError as e:  # the cache folder itself: a file, read-only, full (DataError is not one)
        raise DataError(
            f"Omniglot was not found locally, and its download cannot be stored in the cache "
            f"folder {dest.parent} ({e}). Make that folder writable (or set XDG_CACHE_HOME to "
            f"another folder), or download the files yourself. {_HOW_TO_FIX}"
        ) from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Verifying the layout


def _index_set(name: str, path: Path) -> _ImageSet:
    """List the PNGs of one set with their CRCs, checking that the container opens."""
    if path.is_dir():
        crcs = _folder_crcs(path)
        return _ImageSet(name, path, crcs, _check_layout(path, crcs), "")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if i.filename.endswith(".png") and not i.is_dir()]
    except Exception as e:  # BadZipFile, OSError, or what a mangled directory makes zipfile raise
        raise _corrupt(path, f"it does not open as a zip file ({e})") from e
    tops = {i.filename.split("/", 1)[0] for i in infos}
    if len(tops) != 1:
        raise _corrupt(path, f"its PNGs should sit under one top folder, found {sorted(tops)}")
    top = tops.pop() + "/"
    crcs = {i.filename[len(top) :]: i.CRC for i in infos}
    return _ImageSet(name, path, crcs, _check_layout(path, crcs), top)


def _folder_crcs(root: Path) -> dict[str, int]:
    """The CRC of every PNG below the extracted set `root`, which must be readable throughout.

    os.walk with an onerror that raises, since Path.rglob skips what it cannot list without a
    word (an unreadable character folder would be dropped and the rest cached as the dataset).
    Links to folders are followed: a copy assembled from links is as good as one without.
    """

    def unlistable(e: OSError) -> NoReturn:
        raise _unreadable(root, e.filename or root, f"cannot be listed ({e.strerror or e})")

    crcs = {}
    for folder, dirs, files in os.walk(root, onerror=unlistable, followlinks=True):
        dirs.sort()
        for name in sorted(files):  # os.walk lists as "files" whatever is not a folder
            file = Path(folder, name)
            rel = file.relative_to(root).as_posix()
            try:
                if not file.is_file():
                    raise _unreadable(root, file, "is neither a folder nor a file (a broken link?)")
                if _CHARACTER.match(rel):
                    raise _corrupt(root, f"{rel} is a file, where a character folder belongs")
                if name.endswith(".png"):
                    crcs[rel] = zlib.crc32(file.read_bytes())
            except OSError as e:
                raise _unreadable(root, file, f"cannot be read ({e.strerror or e})") from e
    return crcs


def _unreadable(root: Path, entry: str | os.PathLike[str], why: str) -> DataError:
    return DataError(
        f"The Omniglot data at {root} cannot be read completely: {entry} {why}. Every folder "
        "and PNG file of an extracted set must be readable, so that no character is left out: "
        "fix its permissions (or the link), or replace the data with a fresh copy of the "
        f"official release. {_HOW_TO_FIX}"
    )


def _check_layout(path: Path, crcs: dict[str, int]) -> dict[str, list[str]]:
    """Group the PNGs by character, checking the layout and that each has 20 drawings."""
    if not crcs:
        raise _corrupt(path, "it holds no PNG files")
    bad = [p for p in crcs if not _PNG.match(p)]
    if bad:
        raise _corrupt(
            path, f"{len(bad)} PNGs are not at <Alphabet>/characterNN/XXXX_YY.png, e.g. {bad[0]}"
        )
    drawings: dict[str, list[str]] = {}
    for p in sorted(crcs):
        drawings.setdefault(p.rsplit("/", 1)[0], []).append(p)
    wrong = {c: len(d) for c, d in drawings.items() if len(d) != DRAWINGS}
    if wrong:
        examples = ", ".join(f"{c} has {k}" for c, k in sorted(wrong.items())[:3])
        raise _corrupt(
            path, f"every character needs {DRAWINGS} drawings but {len(wrong)} do not ({examples})"
        )
    return drawings


def _corrupt(path: Path, why: str) -> DataError:
    return DataError(
        f"The Omniglot data at {path} is corrupt or not in the expected layout: {why}. Replace "
        "it with a fresh copy of the official release (delete it if it sits in the cache "
        f"folder, to download it again). {_HOW_TO_FIX}"
    )


def _characters(sets: list[_ImageSet]) -> list[tuple[_ImageSet, str]]:
    """(set, "Alphabet/characterNN") in the canonical order; alphabets must not repeat."""
    out = []
    seen: dict[str, str] = {}
    for s in sets:
        chars = sorted(s.drawings)
        for alphabet in sorted({c.split("/")[0] for c in chars}):
            if alphabet in seen:
                raise _corrupt(s.path, f"alphabet {alphabet} is also in {seen[alphabet]}")
            seen[alphabet] = str(s.path)
        out += [(s, c) for c in chars]
    return out


def _fingerprint(sets: list[_ImageSet], image_size: int) -> str:
    """A short content key: member names and CRCs (no full hash of the bytes), plus settings."""
    h = hashlib.sha256(f"v{_CACHE_VERSION} {image_size}px".encode())
    for s in sets:
        h.update(s.name.encode())
        for rel in sorted(s.crcs):
            # surrogateescape: a folder name that is not UTF-8 reaches here as lone surrogates
            h.update(f"\n{rel} {s.crcs[rel]:08x}".encode(errors="surrogateescape"))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Preprocessing and the cache


def _labels(characters: list[tuple[_ImageSet, str]]) -> dict[str, np.ndarray]:
    """Every array of OmniglotArrays but the images, as stored in the cache: the index alone
    determines them, so a cache file must hold exactly these."""
    alphabets = list(dict.fromkeys(c.split("/")[0] for _, c in characters))
    return {
        "alphabet": np.array([alphabets.index(c.split("/")[0]) for _, c in characters], np.int32),
        "background": np.array([s.name == SETS[0] for s, _ in characters], bool),
        "alphabets": np.array(alphabets, dtype=str),
        "characters": np.array([c for _, c in characters], dtype=str),
    }


def _preprocess(
    sets: list[_ImageSet], characters: list[tuple[_ImageSet, str]], image_size: int
) -> np.ndarray:
    images = np.empty((len(characters), DRAWINGS, image_size, image_size), np.uint8)
    for s in sets:
        with _reader(s) as read:
            for row, (owner, char) in enumerate(characters):
                if owner is s:
                    for j, rel in enumerate(s.drawings[char]):
                        images[row, j] = _decode(read, rel, s.path, image_size)
    return images


@contextmanager
def _reader(s: _ImageSet) -> Iterator[Callable[[str], bytes]]:
    if not s.top:
        yield lambda rel: (s.path / rel).read_bytes()
        return
    with zipfile.ZipFile(s.path) as zf:
        yield lambda rel: zf.read(s.top + rel)  # zipfile checks each member's CRC here


def decode_image(image: Image.Image, size: int) -> np.ndarray:
    """One image as Omniglot's training arrays hold it: grayscale, resized to size x size with
    LANCZOS, inverted so that dark strokes on a light background become bright ink (uint8
    [size, size], stroke 255, as the MAML reference feeds it)."""
    image = image.convert("L")
    if image.size != (size, size):
        image = image.resize((size, size), resample=Image.Resampling.LANCZOS)
    return 255 - np.asarray(image, np.uint8)


def _decode(read: Callable[[str], bytes], rel: str, path: Path, size: int) -> np.ndarray:
    try:
        return decode_image(Image.open(io.BytesIO(read(rel))), size)
    except Exception as e:  # a bad CRC, an unsupported compression, PIL's errors of a bad PNG...
        raise _corrupt(path, f"{rel} does not decode as an image ({e})") from e


def _cache_problem(
    arrays: dict[str, np.ndarray], labels: dict[str, np.ndarray], shape: tuple[int, ...]
) -> str | None:
    """Why a cache file's arrays do not belong to the indexed data, or None when they do."""
    images = arrays["images"]
    if images.dtype != np.uint8 or images.shape != shape:
        return f"its images are {images.dtype} {list(images.shape)}, not uint8 {list(shape)}"
    for name, expected in labels.items():
        if not identical(arrays[name], expected):
            return f"its {name!r} array does not match the {shape[0]} characters of the data"
    return None


def identical(found: np.ndarray, expected: np.ndarray) -> bool:
    """Same dtype, shape and values: how a cache file's arrays are checked."""
    return (
        found.dtype == expected.dtype
        and found.shape == expected.shape
        and bool(np.all(found == expected))
    )


# The extra array of every cache file: the sha256 of its other arrays' names, dtypes, shapes and
# bytes, written with them and checked on every load, so that a file rewritten with arrays of the
# right names and shapes but other content (say, all zeros) is rebuilt rather than trained on.
# It guards against content that is wrong by accident (a tool, a test, another program's file),
# not against someone who can write the cache folder and recompute it. sha256, not blake2b: with
# the SHA extensions of current CPUs it is the faster (measured: 1.7 against 0.9 GB/s). On the
# full Omniglot release it adds 13 ms to a load from the cache at 28px (25 MB of images; the
# whole load_omniglot takes 0.17 s) and 0.21 s at 105px (358 MB; 0.53 s in all).
CHECKSUM = "_sha256"


def content_checksum(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The CHECKSUM array of `arrays` (a 0-d str array of the hex digest)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name} {a.dtype.str} {a.shape}\n".encode())
        h.update(a)
    return np.array(h.hexdigest())


def read_cache_file(
    path: Path,
    names: Sequence[str],
    problem: Callable[[dict[str, np.ndarray]], str | None],
    source: str,
) -> dict[str, np.ndarray] | None:
    """The arrays `names` of a cache file metalearn wrote, or None when it must be (re)built.

    `problem(arrays)` says why they do not fit what the source data holds (or None). A file
    that fails to load, fails that check or whose content does not match its CHECKSUM (or has
    none: written by an older metalearn) is never trusted: it is logged as rebuilt, and the
    caller rebuilds it from `source` and writes it over the bad one. np.load's errors of a
    damaged file are of many kinds (EOFError, ValueError, BadZipFile, OSError, ...), so any
    exception counts; the zip CRC of each array, checked as it is read, catches flipped bytes.
    """
    try:
        # Our own file object: np.load leaks the one it opens when the zip directory is bad.
        with open(path, "rb") as file, np.load(file, allow_pickle=False) as f:
            missing = [n for n in names if n not in f.files]
            stored = {n: f[n] for n in f.files}
        checksum = stored.pop(CHECKSUM, None)
        arrays = {n: stored[n] for n in names if n in stored}
        why = f"it lacks the array {missing[0]!r}" if missing else problem(arrays)
        if why is None and checksum is None:
            why = "it holds no checksum of its content (an older metalearn wrote it)"
        elif why is None and not identical(checksum, content_checksum(stored)):
            why = "its content does not match its checksum (it was changed after being written)"
    except FileNotFoundError:
        return None  # not built yet
    except Exception as e:
        why = f"it does not load ({type(e).__name__}: {e})"
    if why is None:
        return arrays
    log.warning("Discarded the cache file %s, as %s; rebuilding it from %s.", path, why, source)
    return None


def write_cache_file(path: Path, arrays: dict[str, np.ndarray], what: str) -> None:
    """Write the arrays and their CHECKSUM to `path` atomically, so readers never see a
    partial file."""
    checksum = content_checksum(arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with temp_file_beside(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays, **{CHECKSUM: checksum})
            os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a cache may be shared
            os.replace(tmp, path)
    except OSError as e:
        # A read-only cache only costs speed: the arrays are still correct.
        warnings.warn(
            f"Could not cache {what} at {path} ({e}); it will be rebuilt next time.", stacklevel=3
        )


@contextmanager
def temp_file_beside(dest: Path) -> Iterator[Path]:
    """A fresh temp path beside `dest`, removed on exit unless it was renamed onto `dest`."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------- the data=omniglot option


@dataclass
class OmniglotConfig(EpisodicDataConfig):
    name: str = "omniglot"
    locations: ClassVar[tuple[str, ...]] = ("root", "download")
    # meta-train's extra classes and background sets: the test characters stay the same
    training_only: ClassVar[tuple[str, ...]] = (
        *EpisodicDataConfig.training_only, "rotations", "background",
    )  # fmt: skip

    root: str | None = None  # folder with images_background.zip and images_evaluation.zip
    split: str = "random"  # random (1100/100/423 characters) | alphabet (background vs evaluation)
    split_seed: int = 0
    split_sizes: tuple[int, int, int] = (1100, 100, 423)  # random split: train/val/test characters
    val_alphabets: int = 5  # alphabet split: last background alphabets held out for meta-val
    rotations: bool = False  # add 90/180/270-degree rotations as new meta-train classes
    image_size: int = 28
    download: bool = True
    # random: N characters from any alphabets | within_alphabet: all N from one alphabet (Lake
    # et al.'s harder test), drawn uniformly among the split's alphabets with >= N characters
    episodes: str = "random"
    # training characters, alphabet split: full (the background set) | small1 | small2 (the
    # release's 5-alphabet training sets)
    background: str = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seed("data.split_seed", self.split_seed)
        choice("data.split", self.split, ("random", "alphabet"))
        choice("data.episodes", self.episodes, EPISODES)
        choice("data.background", self.background, BACKGROUNDS)
        require(
            self.background == "full" or self.split == "alphabet",
            f"data.background={self.background} selects training alphabets, so it needs "
            "data.split=alphabet (with data.split=random, characters of all alphabets are mixed).",
        )
        require(
            self.k_shot + self.k_query <= 20,
            f"data.k_shot + data.k_query = {self.k_shot + self.k_query} is not allowed: Omniglot "
            "has 20 drawings per character, and support and query drawings must be distinct.",
        )
        require(
            8 <= self.image_size <= 105, f"data.image_size={self.image_size} must be in [8, 105]."
        )

    def preprocess(self, images) -> np.ndarray:
        """Images of any size and mode (file paths, PIL images, arrays; data/base.py::open_images)
        as the model reads them in training: float32 [N, S, S, 1], decode_image / 255.
        Give drawings as Omniglot's files are: dark strokes on a light background."""
        pixels = np.stack([decode_image(im, self.image_size) for im in open_images(images)])
        return scale_pixels(pixels)[..., None]


def make_source(cfg: OmniglotConfig) -> TaskSource:
    data = load_omniglot(cfg.root, image_size=cfg.image_size, download=cfg.download)
    classes = split_classes(
        data,
        split=cfg.split,
        seed=cfg.split_seed,
        sizes=tuple(cfg.split_sizes),
        val_alphabets=cfg.val_alphabets,
        background=cfg.background,
    )
    images = {name: data.images[classes[name]] for name in SPLITS}
    alphabets = {name: data.alphabet[classes[name]] for name in SPLITS}
    if cfg.rotations:
        images["train"] = with_rotations(images["train"])
        alphabets["train"] = np.repeat(alphabets["train"], 4)  # class 4c + k is c rotated
    splits = {}
    for name in SPLITS:
        check_way(cfg.n_way, images[name].shape[0], name, cfg, "data.n_way")
        splits[name] = jnp.asarray(images[name])
        if cfg.episodes == "within_alphabet":
            weights = _alphabet_weights(alphabets[name], cfg.n_way, name, data, cfg)
            splits[name] = (splits[name], jnp.asarray(alphabets[name]), jnp.asarray(weights))

    def episodes(n_way: int, k_shot: int, k_query: int, weights=None):
        """sample() for episodes of this shape (the config's, or training's own); weights
        replace the split's alphabet weights (a training way other than the config's)."""

        def sample(key, split_arrays, global_labels=False):
            from metalearn.data.episodic import sample_episode

            if cfg.episodes == "within_alphabet":
                split_images, groups, split_weights = split_arrays
                weights_now = split_weights if weights is None else weights
                extra = {"class_groups": groups, "group_weights": weights_now}
            else:
                split_images, extra = split_arrays, {}
            return sample_episode(
                key,
                split_images,
                n_way=n_way,
                k_shot=k_shot,
                k_query=k_query,
                global_labels=global_labels,
                **extra,
            )

        return sample

    def training_episodes(n_way: int, k_shot: int, k_query: int):
        check_way(n_way, images["train"].shape[0], "train", cfg, "train.n_way")
        require(
            k_shot + k_query <= DRAWINGS,
            f"train.k_shot + train.k_query = {k_shot + k_query} is not allowed: Omniglot has "
            f"{DRAWINGS} drawings per character, and support and query drawings must be distinct.",
        )
        weights = None
        if cfg.episodes == "within_alphabet":
            weights = _alphabet_weights(
                alphabets["train"], n_way, "train", data, cfg, "train.n_way"
            )
            weights = jnp.asarray(weights)
        return episodes(n_way, k_shot, k_query, weights)

    return TaskSource(
        kind="classification",
        n_out=cfg.n_way,
        n_train_classes=int(images["train"].shape[0]),
        input_shape=(cfg.image_size, cfg.image_size, 1),
        splits=splits,
        sample=episodes(cfg.n_way, cfg.k_shot, cfg.k_query),
        episodes=training_episodes,
    )


def check_way(n_way: int, n_classes: int, split: str, cfg: OmniglotConfig, key: str) -> None:
    if n_way > n_classes:
        raise ConfigError(
            f"{key}={n_way} is more classes than the meta-{split} split holds ({n_classes} "
            f"characters with data.split={cfg.split}); use {key} <= {n_classes}."
        )


def _alphabet_weights(
    alphabet: np.ndarray, n_way: int, split: str, data, cfg: OmniglotConfig, key="data.n_way"
) -> np.ndarray:
    """Within-alphabet episodes: an equal weight for each alphabet of the split with at least
    n_way characters (`key` sets it), 0 for the others (float32 [alphabets])."""
    sizes = np.bincount(alphabet, minlength=len(data.alphabets))
    if sizes.max() < n_way:
        biggest = data.alphabets[int(sizes.argmax())]
        fixes = [f"lower {key}"]
        if cfg.split != "alphabet":
            fixes.append("use data.split=alphabet (whole alphabets per split)")
        if split == "train" and not cfg.rotations:
            fixes.append("add data.rotations=true (each rotation of a character is a class)")
        raise ConfigError(
            f"data.episodes=within_alphabet draws all {key}={n_way} classes of an episode from "
            f"one alphabet, but no alphabet of the meta-{split} split has {n_way} characters "
            f"(the largest, {biggest}, has {int(sizes.max())}): {', or '.join(fixes)}."
        )
    eligible = (sizes >= n_way).astype(np.float32)
    return eligible / eligible.sum()


registry.register("data", "omniglot", OmniglotConfig, make_source)
