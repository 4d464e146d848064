"""Tests for metalearn.data.omniglot: finding, verifying, caching and splitting Omniglot."""

from __future__ import annotations

import hashlib
import io
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from omniglot_fixture import make_omniglot_zips
from PIL import Image

from metalearn.data import omniglot
from metalearn.data.omniglot import (
    URLS,
    DataError,
    load_omniglot,
    split_classes,
    with_rotations,
)

REAL_DATA = Path(__file__).resolve().parents[2] / "shared/data/omniglot"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test sees the user's METALEARN_DATA or writes to the real cache."""
    monkeypatch.delenv("METALEARN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="session")
def tiny_zips(tmp_path_factory) -> Path:
    """2 background alphabets + 1 evaluation alphabet, 3 characters each: 9 characters."""
    return make_omniglot_zips(tmp_path_factory.mktemp("omniglot"))


@pytest.fixture
def tiny(tiny_zips, tmp_path) -> Path:
    """A private copy of the tiny zips, which a test may modify."""
    return Path(shutil.copytree(tiny_zips, tmp_path / "data"))


def _no_network(url: str, dest: Path) -> None:
    raise AssertionError(f"unexpected download of {url}")


def _load(root, cache, **kw) -> omniglot.OmniglotArrays:
    return load_omniglot(root, cache_dir=cache, download=False, downloader=_no_network, **kw)


def _assert_same(a: omniglot.OmniglotArrays, b: omniglot.OmniglotArrays) -> None:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


def test_shapes_dtypes_order_and_pixels(tiny_zips, tmp_path):
    data = _load(tiny_zips, tmp_path / "cache")
    assert data.images.shape == (9, 20, 28, 28) and data.images.dtype == np.uint8
    assert data.alphabet.dtype == np.int32 and data.background.dtype == bool
    assert data.alphabets == ("Background_A", "Background_B", "Evaluation_A")
    assert data.characters[:4] == (
        "Background_A/character01",
        "Background_A/character02",
        "Background_A/character03",
        "Background_B/character01",
    )
    assert data.characters[-1] == "Evaluation_A/character03"
    np.testing.assert_array_equal(data.alphabet, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(data.background, [True] * 6 + [False] * 3)

    # At full size the pixels are the PNGs, inverted so that strokes (black in the file) are 255.
    full = _load(tiny_zips, tmp_path / "cache", image_size=105)
    with zipfile.ZipFile(tiny_zips / "images_evaluation.zip") as zf:
        png = zf.read("images_evaluation/Evaluation_A/character02/0008_05.png")
    stroke = ~np.asarray(Image.open(io.BytesIO(png)))
    np.testing.assert_array_equal(full.images[7, 4], np.where(stroke, 255, 0))


def test_load_is_deterministic(tiny_zips, tmp_path):
    _assert_same(_load(tiny_zips, tmp_path / "a"), _load(tiny_zips, tmp_path / "b"))


def test_extracted_folders_equal_zips(tiny_zips, tmp_path):
    folder = tmp_path / "extracted"
    for name in omniglot.SETS:
        with zipfile.ZipFile(tiny_zips / f"{name}.zip") as zf:
            zf.extractall(folder)
    from_zip = _load(tiny_zips, tmp_path / "cache_zip")
    from_folder = _load(folder, tmp_path / "cache_folder")
    _assert_same(from_zip, from_folder)
    # Same content, same cache key: either source reuses the other's preprocessing.
    assert sorted(p.name for p in (tmp_path / "cache_zip").iterdir()) == sorted(
        p.name for p in (tmp_path / "cache_folder").iterdir()
    )


def test_second_load_uses_cache_without_decoding(tiny_zips, tmp_path, monkeypatch):
    first = _load(tiny_zips, tmp_path / "cache")

    def fail(*args):
        raise AssertionError("decoded a PNG on a cache hit")

    monkeypatch.setattr(omniglot, "_decode", fail)
    _assert_same(first, _load(tiny_zips, tmp_path / "cache"))


def test_cache_invalidated_when_source_changes(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = _load(tiny, cache)
    make_omniglot_zips(tiny, seed=1)  # same names, new pixels
    calls = []
    decode = omniglot._decode
    monkeypatch.setattr(omniglot, "_decode", lambda *a: calls.append(1) or decode(*a))
    second = _load(tiny, cache)
    assert len(calls) == 9 * 20
    assert not np.array_equal(first.images, second.images)
    assert len(list(cache.glob("*.npz"))) == 2


def test_cache_write_is_atomic(tiny_zips, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _load(tiny_zips, cache)
    assert [p.suffix for p in cache.iterdir()] == [".npz"]  # no temp files left behind

    def killed_midway(f, **arrays):
        f.write(b"half an npz")
        raise KeyboardInterrupt

    monkeypatch.setattr(omniglot.np, "savez", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        _load(tiny_zips, tmp_path / "cache2")
    assert list((tmp_path / "cache2").iterdir()) == []


def test_random_split_is_disjoint_complete_and_seeded(tiny_zips, tmp_path):
    data = _load(tiny_zips, tmp_path / "cache")
    split = split_classes(data, sizes=(5, 2, 2), seed=3)
    assert [len(split[k]) for k in ("train", "val", "test")] == [5, 2, 2]
    assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(9))
    again = split_classes(data, sizes=(5, 2, 2), seed=3)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    other = split_classes(data, sizes=(5, 2, 2), seed=4)
    assert any(not np.array_equal(split[k], other[k]) for k in split)


def test_alphabet_split(tiny_zips, tmp_path):
    data = _load(tiny_zips, tmp_path / "cache")
    split = split_classes(data, split="alphabet", val_alphabets=1)
    np.testing.assert_array_equal(split["train"], [0, 1, 2])  # Background_A
    np.testing.assert_array_equal(split["val"], [3, 4, 5])  # Background_B, the last one
    np.testing.assert_array_equal(split["test"], [6, 7, 8])  # the evaluation set
    no_val = split_classes(data, split="alphabet", val_alphabets=0)
    assert len(no_val["train"]) == 6 and len(no_val["val"]) == 0


def test_split_errors_name_the_problem(tiny_zips, tmp_path):
    data = _load(tiny_zips, tmp_path / "cache")
    with pytest.raises(DataError, match=r"add up to 1623, but the dataset has 9 characters"):
        split_classes(data)  # the full-dataset default sizes do not fit 9 characters
    with pytest.raises(DataError, match="'random'.*'alphabet'"):
        split_classes(data, split="vinyals")
    with pytest.raises(DataError, match="val_alphabets=2"):
        split_classes(data, split="alphabet", val_alphabets=2)


def test_rotations_make_four_classes_per_class():
    images = np.random.default_rng(0).integers(0, 256, (3, 20, 5, 5), dtype=np.uint8)
    rotated = with_rotations(images)
    assert rotated.shape == (12, 20, 5, 5) and rotated.dtype == np.uint8
    for c in range(3):
        for k in range(4):
            np.testing.assert_array_equal(rotated[4 * c + k], np.rot90(images[c], k, axes=(1, 2)))
    tiny = np.array([[1, 2], [3, 4]], np.uint8).reshape(1, 1, 2, 2)
    np.testing.assert_array_equal(with_rotations(tiny)[1, 0], [[2, 4], [1, 3]])  # 90 deg, CCW


def test_missing_dataset_names_where_it_looked(tmp_path):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"data.root={nowhere}"):
        _load(nowhere, tmp_path / "cache")
    with pytest.raises(DataError) as err:
        _load(None, tmp_path / "cache")
    assert str(tmp_path / "cache") in str(err.value) and "METALEARN_DATA" in str(err.value)


def test_corrupt_zip_raises(tiny, tmp_path):
    (tiny / "images_background.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=f"{tiny / 'images_background.zip'}.*does not open"):
        _load(tiny, tmp_path / "cache")


def test_damaged_png_member_raises(tiny, tmp_path):
    path = tiny / "images_evaluation.zip"
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[5]
    raw = bytearray(path.read_bytes())
    data_start = info.header_offset + 30 + len(info.filename.encode())
    raw[data_start + 60] ^= 0xFF  # zipfile's CRC check catches this on read
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"{path}.*does not decode"):
        _load(tiny, tmp_path / "cache")


def test_wrong_number_of_drawings_raises(tmp_path):
    root = make_omniglot_zips(tmp_path / "data", 1, 1, 1, drawings=19)
    with pytest.raises(DataError, match=r"images_background\.zip.*20 drawings.*has 19"):
        _load(root, tmp_path / "cache")


@pytest.mark.parametrize("subfolder", ["", "omniglot"])
def test_root_and_metalearn_data_env(tiny_zips, tmp_path, monkeypatch, subfolder):
    folder = tmp_path / "data"
    shutil.copytree(tiny_zips, folder / subfolder)
    assert len(_load(folder, tmp_path / "cache").characters) == 9
    monkeypatch.setenv("METALEARN_DATA", str(folder))
    assert len(_load(None, tmp_path / "cache").characters) == 9


def _serve(files: dict[str, Path], calls: list[str]):
    def downloader(url: str, dest: Path) -> None:
        calls.append(url)
        shutil.copyfile(files[url], dest)

    return downloader


def test_download_only_when_nothing_local(tiny_zips, tmp_path, monkeypatch):
    files = {URLS[name]: tiny_zips / f"{name}.zip" for name in omniglot.SETS}
    sums = {name: hashlib.sha256(files[URLS[name]].read_bytes()).hexdigest() for name in URLS}
    monkeypatch.setattr(omniglot, "SHA256", sums)
    calls: list[str] = []
    cache = tmp_path / "cache"

    load_omniglot(tiny_zips, cache_dir=cache, downloader=_serve(files, calls))
    assert calls == []  # local data wins
    data = load_omniglot(None, cache_dir=cache, downloader=_serve(files, calls))
    assert sorted(calls) == sorted(URLS.values()) and len(data.characters) == 9
    assert (cache / "images_background.zip").is_file()
    load_omniglot(None, cache_dir=cache, downloader=_serve(files, calls))
    assert len(calls) == 2  # the cache folder is a source now


def test_download_checksum_mismatch_leaves_nothing(tiny_zips, tmp_path):
    files = {URLS[name]: tiny_zips / f"{name}.zip" for name in omniglot.SETS}
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="sha256"):
        load_omniglot(None, cache_dir=cache, downloader=_serve(files, []))
    assert list(cache.iterdir()) == []


def test_download_failure_raises_data_error(tmp_path):
    def offline(url: str, dest: Path) -> None:
        dest.write_bytes(b"partial")
        raise OSError("network unreachable")

    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="network unreachable.*METALEARN_DATA"):
        load_omniglot(None, cache_dir=cache, downloader=offline)
    assert list(cache.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"no Omniglot copy at {REAL_DATA}")
def test_real_omniglot(tmp_path):
    start = time.perf_counter()
    data = _load(REAL_DATA, tmp_path / "cache")
    first = time.perf_counter() - start
    assert data.images.shape == (1623, 20, 28, 28)
    assert data.background.sum() == 964 and len(data.alphabets) == 50
    assert len(set(data.alphabet[data.background].tolist())) == 30
    split = split_classes(data)
    assert [len(split[k]) for k in ("train", "val", "test")] == [1100, 100, 423]
    start = time.perf_counter()
    _assert_same(data, _load(REAL_DATA, tmp_path / "cache"))
    cached = time.perf_counter() - start
    assert cached < 3, f"cached load took {cached:.1f}s (first load {first:.1f}s)"
