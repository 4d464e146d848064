"""Data loading fails with one DataError paragraph, never a traceback, and trusts nothing damaged.

Four classes of bad input: a damaged cache file of metalearn's own (Omniglot's, then TFDS's),
which must be rebuilt from the source data and replaced; an extracted Omniglot set that cannot
be read completely, which must be an error naming what cannot be read (never a dataset silently
missing characters); and other bad sources, which must be a DataError that names them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from omniglot_fixture import make_omniglot_zips

from metalearn.data import omniglot
from metalearn.data.omniglot import SETS, DataError, load_omniglot


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test sees the user's data folders or writes to the real caches."""
    monkeypatch.delenv("METALEARN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds_data"))


@pytest.fixture(scope="module")
def zips(tmp_path_factory) -> Path:
    """2 background alphabets + 1 evaluation alphabet, 3 characters each: 9 characters."""
    return make_omniglot_zips(tmp_path_factory.mktemp("omniglot"))


@pytest.fixture
def extracted(zips, tmp_path) -> Path:
    """The tiny zips as extracted folders images_background/ and images_evaluation/."""
    for name in SETS:
        with zipfile.ZipFile(zips / f"{name}.zip") as zf:
            zf.extractall(tmp_path / "extracted")
    return tmp_path / "extracted"


def _load(root, cache, **kw) -> omniglot.OmniglotArrays:
    return load_omniglot(root, cache_dir=cache, download=False, **kw)


def _assert_same(a: tuple, b: tuple) -> None:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


def _edit(path: Path, **edits) -> None:
    """Rewrite a cache file as a well-formed .npz, each named array replaced by `edit(array)`
    (None: removed): a file that loads, holding arrays that are not the data's."""
    with np.load(path) as f:
        arrays = dict(f)
    for name, edit in edits.items():
        arrays[name] = None if edit is None else edit(arrays[name])
    with open(path, "wb") as f:
        np.savez(f, **{k: v for k, v in arrays.items() if v is not None})


def _flip_a_pixel(path: Path) -> None:
    """Flip one bit inside the stored images: the file is well-formed, only zip's CRC can tell."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("images.npy")
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size - 9] ^= 1
    path.write_bytes(bytes(raw))


def _plain_npy(path: Path) -> None:
    with open(path, "wb") as f:  # np.save(path) would write to path + ".npy"
        np.save(f, np.zeros(3, np.uint8))


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_last(*names: str):
    """A self-consistent cache file of one class fewer."""
    return lambda p: _edit(p, **{n: lambda a: a[:-1] for n in names})


# Damage done to a good cache file, as left by crashes, full disks, old or foreign writers.
COMMON_DAMAGE = {
    "zero_bytes": lambda p: p.write_bytes(b""),
    "truncated": _cut,
    "random_bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
    "flipped_bit": _flip_a_pixel,
    "plain_npy": _plain_npy,
    "pickled_array": lambda p: _edit(p, images=lambda a: np.array([None, 1], dtype=object)),
    "missing_array": lambda p: _edit(p, images=None),
    "wrong_image_size": lambda p: _edit(p, images=lambda a: a[:, :, :-1, :-1]),
}
OMNIGLOT_DAMAGE = {
    **COMMON_DAMAGE,
    "wrong_dtype": lambda p: _edit(p, images=lambda a: a.astype(np.int16)),
    "too_few_characters": _drop_last("images", "alphabet", "background", "characters"),
    "too_few_drawings": lambda p: _edit(p, images=lambda a: a[:, :-1]),
    "characters_reordered": lambda p: _edit(p, characters=lambda a: a[::-1]),
    "alphabet_out_of_range": lambda p: _edit(p, alphabet=lambda a: a + 7),
    "alphabets_renamed": lambda p: _edit(p, alphabets=lambda a: np.array(["A", "B", "C"])),
    "background_flipped": lambda p: _edit(p, background=lambda a: ~a),
}


def _rebuilt_and_replaced(cached: Path, load, fresh, caplog, monkeypatch, decoder: str) -> None:
    """`load()` logs the rebuild, returns `fresh`'s arrays and leaves a good cache file."""
    with caplog.at_level(logging.WARNING, logger="metalearn"):
        _assert_same(load(), fresh)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(cached) in warned[0] and "rebuilding it from" in warned[0]
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]  # no temp files

    def fail(*args):
        raise AssertionError("decoded an image although the rebuilt cache is good")

    monkeypatch.setattr(decoder, fail)
    _assert_same(load(), fresh)


@pytest.mark.parametrize("damage", sorted(OMNIGLOT_DAMAGE))
def test_damaged_omniglot_cache_is_rebuilt(zips, tmp_path, damage, caplog, monkeypatch):
    fresh = _load(zips, tmp_path / "fresh")
    cache = tmp_path / "cache"
    _load(zips, cache)
    (cached,) = cache.glob("omniglot-28px-*.npz")
    OMNIGLOT_DAMAGE[damage](cached)
    _rebuilt_and_replaced(
        cached,
        lambda: _load(zips, cache),
        fresh,
        caplog,
        monkeypatch,
        "metalearn.data.omniglot._decode",
    )


# ---------------------------------------------------------------------------------------------
# TFDS: the tiny_shapes dataset of test_tfds (12 classes of 6-10 images, train and test splits)


@pytest.fixture(scope="module")
def tfds_tests(tmp_path_factory):
    """test_tfds's helpers and a prepared tiny_shapes dataset (imported here, not at the top:
    without tensorflow-datasets only these tests are skipped)."""
    pytest.importorskip("tensorflow_datasets")
    import test_tfds

    data_dir = test_tfds.build(test_tfds.tiny_shapes_builder(), tmp_path_factory.mktemp("tfds"))
    return test_tfds, data_dir


TFDS_DAMAGE = {
    **COMMON_DAMAGE,
    "wrong_dtype": lambda p: _edit(p, images=lambda a: a.astype(np.float32)),
    "too_few_classes": _drop_last("images", "counts", "labels", "class_names", "superclass"),
    "wrong_channels": lambda p: _edit(p, images=lambda a: a[..., :1]),
    "count_zero": lambda p: _edit(p, counts=lambda a: np.where(np.arange(len(a)) == 3, 0, a)),
    "count_beyond_padding": lambda p: _edit(p, counts=lambda a: a + 1),
    "counts_int64": lambda p: _edit(p, counts=lambda a: a.astype(np.int64)),
    "labels_not_ascending": lambda p: _edit(p, labels=lambda a: a[::-1].copy()),
    "class_names_reordered": lambda p: _edit(p, class_names=lambda a: a[::-1]),
    "superclass_without_feature": lambda p: _edit(p, superclass=lambda a: a * 0),
}


@pytest.mark.parametrize("damage", sorted(TFDS_DAMAGE))
def test_damaged_tfds_cache_is_rebuilt(tfds_tests, tmp_path, damage, caplog, monkeypatch):
    test_tfds, data_dir = tfds_tests

    def load(cache=tmp_path / "cache"):
        return test_tfds.load_shapes(data_dir, cache, image_size=8)

    fresh = load(tmp_path / "fresh")
    load()
    (cached,) = (tmp_path / "cache").glob("tiny_shapes-*.npz")
    TFDS_DAMAGE[damage](cached)
    _rebuilt_and_replaced(cached, load, fresh, caplog, monkeypatch, "metalearn.data.tfds._decode")


# ---------------------------------------------------------------------------------------------
# An extracted set that cannot be read completely


def _dangling_link(folder: Path, monkeypatch) -> Path:
    shutil.rmtree(folder)
    folder.symlink_to(folder.parent / "gone")
    return folder


def _unlistable(folder: Path, monkeypatch) -> Path:
    """What an unreadable folder does to a non-root user: listing it raises EACCES."""
    real = os.scandir

    def scandir(path="."):
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return folder


def _chmod_000(folder: Path, monkeypatch) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root reads a folder of mode 000")
    folder.chmod(0)  # undone by the test, so that tmp_path can be removed
    return folder


def _file_for_folder(folder: Path, monkeypatch) -> Path:
    shutil.rmtree(folder)
    folder.write_bytes(b"")
    return folder


def _unreadable_png(folder: Path, monkeypatch) -> Path:
    png = sorted(folder.iterdir())[4]
    real = Path.read_bytes

    def read_bytes(self):
        if self == png:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    return png


UNREADABLE = {
    "dangling_link": _dangling_link,
    "unlistable_folder": _unlistable,
    "chmod_000": _chmod_000,
    "file_for_folder": _file_for_folder,
    "unreadable_png": _unreadable_png,
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_unreadable_extracted_set_names_what_cannot_be_read(extracted, tmp_path, kind, monkeypatch):
    folder = extracted / "images_background" / "Background_B" / "character02"
    bad = UNREADABLE[kind](folder, monkeypatch)
    try:
        with pytest.raises(DataError) as err:
            _load(extracted, tmp_path / "cache")
    finally:
        if kind == "chmod_000":
            folder.chmod(0o755)
    message = str(err.value)
    assert "\n" not in message and str(bad.relative_to(extracted / "images_background")) in message
    assert not (tmp_path / "cache").exists(), "nothing is cached from an incomplete dataset"


def test_symlinked_character_folder_is_read(extracted, tmp_path):
    """A copy assembled from links is complete: the linked characters are not skipped."""
    reference = _load(extracted, tmp_path / "reference")
    folder = extracted / "images_evaluation" / "Evaluation_A" / "character03"
    folder.rename(tmp_path / "elsewhere")
    folder.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    _assert_same(_load(extracted, tmp_path / "cache"), reference)


# ---------------------------------------------------------------------------------------------
# Other bad sources: one DataError each, naming the bad file, folder or value


def _deflate64(zip_path: Path) -> str:
    """Mark one member as Deflate64 (method 9, written by some Windows tools): zipfile cannot
    decompress it. Returns the member's name inside its set."""
    raw = bytearray(zip_path.read_bytes())
    entry = raw.index(b"PK\x01\x02")  # the central directory's first entry
    struct.pack_into("<H", raw, entry + 10, 9)
    zip_path.write_bytes(bytes(raw))
    with zipfile.ZipFile(zip_path) as zf:
        return zf.infolist()[0].filename.split("/", 1)[1]


def test_bad_sources_are_data_errors_naming_them(zips, extracted, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    with pytest.raises(
        DataError, match=re.escape(f"data.root={zips / 'images_background.zip'} is a file")
    ):
        _load(zips / "images_background.zip", cache)

    root = Path(shutil.copytree(zips, tmp_path / "truncated"))
    _cut(root / "images_evaluation.zip")
    with pytest.raises(
        DataError, match=re.escape(str(root / "images_evaluation.zip")) + ".*does not open"
    ):
        _load(root, cache)

    root = Path(shutil.copytree(zips, tmp_path / "deflate64"))
    member = _deflate64(root / "images_background.zip")
    with pytest.raises(
        DataError, match=r"images_background\.zip.*" + re.escape(f"{member} does not decode")
    ):
        _load(root, cache)

    png = extracted / "images_evaluation" / "Evaluation_A" / "character01" / "0007_20.png"
    png.unlink()
    with pytest.raises(DataError, match=r"images_evaluation.*Evaluation_A/character01 has 19"):
        _load(extracted, cache)

    # A cache folder that cannot hold the download (here: a file).
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(
        DataError, match=re.escape(f"cannot be stored in the cache folder {tmp_path / 'file'}")
    ):
        load_omniglot(None, cache_dir=tmp_path / "file", downloader=lambda url, dest: None)

    # A data folder we may not look into: Path.exists raises EACCES (as it does for non-root).
    private = tmp_path / "private"
    real = Path.stat

    def stat(self, **kw):
        if self.parent == private:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, **kw)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(DataError, match=re.escape(f"Cannot look for Omniglot in {private}")):
        _load(private, cache)
    monkeypatch.undo()
    assert not cache.exists() or not list(cache.glob("*.npz"))


def test_damaged_tfds_dataset_is_a_data_error(tfds_tests, tmp_path):
    test_tfds, data_dir = tfds_tests
    for damage in ("truncated", "missing"):
        copy = Path(shutil.copytree(data_dir, tmp_path / damage))
        (shard,) = (copy / "tiny_shapes" / "1.0.0").glob("*-train.array_record-*")
        _cut(shard) if damage == "truncated" else shard.unlink()
        with pytest.raises(DataError, match=r"tiny_shapes.*is damaged: .*split 'train'.*again"):
            test_tfds.load_shapes(copy, tmp_path / "cache", image_size=8)
