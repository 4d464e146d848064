"""A dataset file never runs code, and a cache is used only with the content metalearn wrote.

Two classes of received file are pinned here (docs/RELIABILITY.md, "What each reader trusts"):
a pickle of the miniImageNet / tieredImageNet forms whose payload calls a shell command or
Python's exec (refused with one DataError paragraph naming the file and the call, and the
command never runs), and a preprocessing cache rewritten with arrays of the right names and
shapes but other content (detected by its checksum and rebuilt from the source). Plus what the
other readers rely on: PIL's decompression-bomb limit is in force for every image decoder.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from omniglot_fixture import make_omniglot_zips
from PIL import Image
from test_imagenet_data import (
    MINI,
    STORED,
    TIERED,
    assert_loaded,
    expected,
    py2_pickle,
    tiered_labels,
    write_mini_csv,
    write_mini_l2l,
    write_mini_rfs,
    write_tiered,
)

from metalearn.data import imagenet_files as files
from metalearn.data import omniglot, safe_pickle
from metalearn.data.base import DataError, open_images
from metalearn.data.imagenet_files import load
from metalearn.data.mini_imagenet import MINI_IMAGENET
from metalearn.data.tiered_imagenet import TIERED_IMAGENET


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test reads the user's data or writes the real caches."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("METALEARN_DATA", raising=False)


# ---------------------------------------------------------------------------------------------
# Pickles whose payload runs code


class _Call:
    """Pickles as a call of fn(*args), as a hostile file's payload is written."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


# name -> (the global the file calls, payload(marker) -> the object whose pickle calls it)
PAYLOADS = {
    "os_system": ("posix.system", lambda m: _Call(os.system, f"touch '{m}'")),
    "exec": ("builtins.exec", lambda m: _Call(exec, _touch_code(m))),
    "eval": ("builtins.eval", lambda m: _Call(eval, _touch_code(m))),
    "subprocess": ("subprocess.call", lambda m: _Call(subprocess.call, ["touch", str(m)])),
}


def _hostile(kind: str, marker: Path, protocol: int) -> bytes:
    """A learn2learn-shaped record whose class_dict is the payload, after a real image array:
    the refusal must come mid-stream, before the call, not only at a file's first opcode."""
    payload = PAYLOADS[kind][1](marker)
    record = {"image_data": np.zeros((2, 4, 4, 3), np.uint8), "class_dict": payload}
    return pickle.dumps(record, protocol=protocol)


def _protocol0_os_system(marker: Path) -> bytes:
    """The classic hand-written payload: GLOBAL os.system, called on a string."""
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_each_payload_runs_code_under_plain_pickle(kind, tmp_path):
    """The payloads are real: pickle.loads runs them (so the refusals below can fail)."""
    marker = tmp_path / "ran"
    pickle.loads(_hostile(kind, marker, 2))
    assert marker.exists()
    marker.unlink()
    pickle.loads(_protocol0_os_system(marker))
    assert marker.exists()


def _one_paragraph(error: DataError, *parts: str) -> str:
    text = str(error)
    assert "\n" not in text and "Traceback" not in text, text
    for part in parts:
        assert part in text, (part, text)
    return text


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_a_pickle_that_would_run_code_is_refused_unrun(kind, protocol, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(_hostile(kind, marker, protocol))
    with pytest.raises(DataError) as caught:
        files.load_pickle(path, "a miniImageNet pickle")
    _one_paragraph(caught.value, str(path), f"calls {PAYLOADS[kind][0]}", "refused")
    assert not marker.exists()


def test_a_hand_written_os_system_payload_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "x.pkl"
    path.write_bytes(_protocol0_os_system(marker))
    with pytest.raises(DataError) as caught:
        files.load_pickle(path, "a pickle")
    _one_paragraph(caught.value, str(path), "calls os.system")
    assert not marker.exists()


def test_only_latin1_bytes_and_no_persistent_ids_are_admitted(tmp_path):
    """_codecs.encode is admitted for protocol 2's bytes (latin1); another codec, or a
    persistent id (resolved by the writer's own code), is refused."""
    path = tmp_path / "x.pkl"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(DataError, match="calls _codecs.encode with the codec 'rot13'"):
        files.load_pickle(path, "a pickle")
    path.write_bytes(b"\x80\x02X\x01\x00\x00\x00xQ.")  # BINPERSID
    with pytest.raises(DataError, match="calls persistent id 'x'"):
        files.load_pickle(path, "a pickle")


@pytest.mark.parametrize("form", ["l2l", "rfs", "tiered_labels", "tiered_images"])
def test_a_hostile_file_in_a_dataset_folder_stops_the_load(form, tmp_path):
    """Through the data option's loader: the error names the file, and nothing runs or is
    cached."""
    marker = tmp_path / "ran"
    payload = _Call(os.system, f"touch '{marker}'")
    folder = tmp_path / form
    if form in ("l2l", "rfs"):
        decoded = write_mini_csv(tmp_path / "csv", MINI)
        (write_mini_l2l if form == "l2l" else write_mini_rfs)(folder, decoded)
        path = folder / (
            "mini-imagenet-cache-validation.pkl"
            if form == "l2l"
            else "miniImageNet_category_split_val.pickle"
        )
        path.write_bytes(pickle.dumps({"image_data": payload, "class_dict": {}}, protocol=4))
        dataset = MINI_IMAGENET
    else:
        write_tiered(folder, "png")
        path = folder / ("val_labels.pkl" if form == "tiered_labels" else "val_images_png.pkl")
        path.write_bytes(pickle.dumps([payload], protocol=2))
        dataset = TIERED_IMAGENET
    with pytest.raises(DataError) as caught:
        load(dataset, folder, image_size=STORED)
    _one_paragraph(caught.value, str(path), "calls posix.system")
    assert not marker.exists()
    cache = tmp_path / "xdg" / "metalearn" / dataset.name
    assert not list(cache.glob("*-val-*.npz"))


@pytest.mark.parametrize("name", ["../outside.jpg", "/etc/outside.jpg", "a/../../outside.jpg"])
def test_a_split_file_naming_an_image_outside_images_is_refused(name, tmp_path):
    """The csv form reads the images its split files name: only inside images/."""
    root = tmp_path / "csv"
    write_mini_csv(root, MINI)
    Image.new("RGB", (10, 10)).save(tmp_path / "outside.jpg")
    val = root / "val.csv"
    lines = val.read_text().splitlines()
    lines[1] = f"{name},{lines[1].split(',')[1]}"
    val.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        load(MINI_IMAGENET, root, image_size=STORED)
    _one_paragraph(caught.value, f"{val}, line 2", repr(name), "outside the images/ folder")


def test_real_format_pickles_load_at_every_protocol(tmp_path):
    """What the formats hold, written by numpy 2 at protocols 0-5 (protocol 5: _frombuffer) and
    as Python 2 wrote them (numpy.core spelling, str data read with latin1), loads unchanged."""
    record = {
        "image_data": np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3),
        "class_dict": {"n01": [0], "n02": [1]},
        "labels": [np.int64(3), 4, 5.5, None, True],
        "names": np.array(["électric ray", "b"]),
        "objects": np.array([b"\x89PNG", "x", None], dtype=object),
        "bytes": [b"", b"\x00\xff", bytearray(b"ab")],
        "sets": ({1, 2}, frozenset({3})),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
    }
    path = tmp_path / "x.pkl"
    for protocol in range(6):
        path.write_bytes(pickle.dumps(record, protocol=protocol))
        loaded = files.load_pickle(path, "a pickle")
        assert loaded.keys() == record.keys()
        for key, want in record.items():
            got = loaded[key]
            if isinstance(want, np.ndarray):
                assert got.dtype == want.dtype and got.flags.f_contiguous == want.flags.f_contiguous
                np.testing.assert_array_equal(got, want)
            else:
                assert got == want and list(map(type, got)) == list(map(type, want)), key
    py2 = {"data": record["image_data"], "labels": [0, 1], "catname2label": {"n01": 0}}
    path.write_bytes(py2_pickle(py2))
    assert b"cnumpy.core.multiarray\n_reconstruct" in path.read_bytes()
    loaded = files.load_pickle(path, "a pickle")
    np.testing.assert_array_equal(loaded["data"], py2["data"])
    assert loaded["labels"] == [0, 1] and loaded["catname2label"] == {"n01": 0}
    labels = tiered_labels(TIERED["train"], "label_specific")
    path.write_bytes(py2_pickle(labels))
    loaded = files.load_pickle(path, "a pickle")
    np.testing.assert_array_equal(loaded["label_specific"], labels["label_specific"])
    assert [files.text(n) for n in loaded["label_specific_str"]] == labels["label_specific_str"]


def test_both_numpy_module_spellings_resolve_and_nothing_is_imported():
    """numpy 1.x writes numpy.core..., numpy 2.x numpy._core...; both map to the installed
    numpy's functions from a fixed table, so find_class never imports what a file names."""
    table = safe_pickle._ALLOWED
    for name in ("_reconstruct", "scalar"):
        assert table[("numpy.core.multiarray", name)] is table[("numpy._core.multiarray", name)]
    assert table[("numpy.core.numeric", "_frombuffer")] is np.zeros(1).__reduce_ex__(5)[0]
    unpickler = safe_pickle._Unpickler(io.BytesIO(b"."))
    refused = [("os", "system"), ("numpy", "load"), ("builtins", "getattr")]
    refused += [("numpy.core.multiarray", "_no_such"), ("copyreg", "_reconstructor")]
    for module, name in refused:
        with pytest.raises(safe_pickle.Refused):
            unpickler.find_class(module, name)


# ---------------------------------------------------------------------------------------------
# Caches whose content was replaced


def _warnings(caplog) -> list[str]:
    """The cache warnings (not the synthetic copies' "partial copy" ones)."""
    return [r.getMessage() for r in caplog.records if "cache file" in r.getMessage()]


def _rewrite(path: Path, keep_checksum: bool = True, **edits) -> None:
    """Rewrite a cache file as a well-formed .npz of the same names and shapes, each named
    array replaced by edit(array); keep_checksum=False drops the checksum (an old cache)."""
    with np.load(path) as f:
        arrays = dict(f)
    for name, edit in edits.items():
        arrays[name] = edit(arrays[name])
    if not keep_checksum:
        del arrays[omniglot.CHECKSUM]
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.fixture(scope="module")
def zips(tmp_path_factory) -> Path:
    return make_omniglot_zips(tmp_path_factory.mktemp("omniglot"))


def _omniglot(zips, cache):
    return omniglot.load_omniglot(zips, cache_dir=cache, download=False)


@pytest.mark.parametrize(
    "rewrite, reason",
    [
        (lambda p: _rewrite(p, images=np.zeros_like), "does not match its checksum"),
        (lambda p: _rewrite(p, images=lambda a: a[::-1].copy()), "does not match its checksum"),
        (lambda p: _rewrite(p, keep_checksum=False), "holds no checksum"),
        (lambda p: _rewrite(p, _sha256=lambda a: np.array("0" * 64)), "does not match"),
    ],
    ids=["zeroed_images", "characters_swapped", "old_cache_without_checksum", "other_checksum"],
)
def test_an_omniglot_cache_with_other_content_is_rebuilt(zips, tmp_path, caplog, monkeypatch,
                                                         rewrite, reason):  # fmt: skip
    fresh = _omniglot(zips, tmp_path / "fresh")
    cache = tmp_path / "cache"
    _omniglot(zips, cache)
    (cached,) = cache.glob("omniglot-28px-*.npz")
    original = cached.read_bytes()
    rewrite(cached)
    with np.load(cached) as f:  # what the existing checks see: nothing wrong
        assert f["images"].shape == fresh.images.shape and f["images"].dtype == np.uint8
    with caplog.at_level(logging.WARNING, logger="metalearn"):
        again = _omniglot(zips, cache)
    (warned,) = _warnings(caplog)
    assert str(cached) in warned and reason in warned and "rebuilding it from" in warned
    np.testing.assert_array_equal(again.images, fresh.images)
    assert cached.read_bytes() == original  # rebuilt whole, checksum included
    assert sorted(p.name for p in cache.iterdir()) == [cached.name]  # no temp files

    caplog.clear()  # rebuilt once: the next load trusts the new file and decodes nothing
    monkeypatch.setattr(omniglot, "_decode", lambda *a: pytest.fail("decoded again"))
    with caplog.at_level(logging.WARNING, logger="metalearn"):
        np.testing.assert_array_equal(_omniglot(zips, cache).images, fresh.images)
    assert not _warnings(caplog)


def test_the_checksum_covers_every_array_and_its_shape():
    a = {"images": np.arange(12, dtype=np.uint8).reshape(3, 4), "names": np.array(["x", "y"])}
    base = str(omniglot.content_checksum(a))
    assert len(base) == 64 and base == str(omniglot.content_checksum(dict(reversed(a.items()))))
    changed = [
        {**a, "images": a["images"].reshape(4, 3)},  # same bytes, other shape
        {**a, "images": a["images"].view(np.int8)},  # same bytes, other dtype
        {**a, "names": np.array(["x", "z"])},
        {"images2": a["images"], "names": a["names"]},  # same content, other name
        {"images": a["images"]},
    ]
    assert len({base, *(str(omniglot.content_checksum(c)) for c in changed)}) == 6


def test_a_mini_imagenet_cache_with_zeroed_images_is_rebuilt(tmp_path, caplog, monkeypatch):
    """The imagenet_files caches go through the same check (as do TFDS's and Meta-Dataset's:
    all write and read through omniglot.write_cache_file / read_cache_file)."""
    decoded = write_mini_csv(tmp_path / "csv", MINI)
    folder = tmp_path / "l2l"
    write_mini_l2l(folder, decoded)
    want = expected(decoded, MINI, sorted)
    assert_loaded(load(MINI_IMAGENET, folder, image_size=STORED), want)
    (train,) = (tmp_path / "xdg" / "metalearn" / "mini_imagenet").glob("*-train-*.npz")
    _rewrite(train, images=np.zeros_like)  # zero padding stays zero: the shape checks pass
    with caplog.at_level(logging.WARNING, logger="metalearn"):
        assert_loaded(load(MINI_IMAGENET, folder, image_size=STORED), want)
    (warned,) = _warnings(caplog)
    assert str(train) in warned and "does not match its checksum" in warned
    with np.load(train) as f:
        np.testing.assert_array_equal(f["images"], want["train"][0])
    monkeypatch.setattr(files, "load_pickle", lambda *a: pytest.fail("read the pickle again"))
    assert_loaded(load(MINI_IMAGENET, folder, image_size=STORED), want)


# ---------------------------------------------------------------------------------------------
# Image decoders: PIL's decompression-bomb limit


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (PIL refuses it at open, before
    decoding: the data is never inflated)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_the_decompression_bomb_limit_is_in_force_for_every_decoder(tmp_path):
    import metalearn.data  # noqa: F401  (every data module, and what they import)

    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's default: nothing raised or removed it
    bomb = _png_claiming(20_000, 20_000)  # 400 M pixels: over twice the limit
    describe = lambda i: f"image {i} of x.pkl"  # noqa: E731
    with pytest.raises(DataError, match="image 0 of x.pkl does not decode.*decompression bomb"):
        files._pixels(bomb, 8, False, describe, 0)
    with pytest.raises(DataError, match="does not decode as an image.*decompression bomb"):
        omniglot._decode(lambda rel: bomb, "a/b.png", tmp_path / "images_background.zip", 28)
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(DataError, match="bomb.png does not decode.*decompression bomb"):
        open_images(str(tmp_path / "bomb.png"))


# ---------------------------------------------------------------------------------------------
# model=flax: a received run names a module (docs/RELIABILITY.md says who imports it)


def test_compare_imports_no_module_a_run_names(tmp_path, monkeypatch, capsys):
    """compare of a received model=flax run imports nothing; eval's path (load_class) imports
    the module the run names, as the docs say, which is why they tell to read it first."""
    from test_compare_reliability import compare, completed, write_run

    from metalearn.models import flax_module

    marker = tmp_path / "imported"
    (tmp_path / "trust_probe_mod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Net: pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # importable, as from the folder it is in
    monkeypatch.delitem(sys.modules, "trust_probe_mod", raising=False)
    config = "seed: 0\nmodel:\n  name: flax\n  module: trust_probe_mod:Net\n"
    write_run(tmp_path / "runs" / "received", completed(0.7), ["model=flax"], config=config)
    code, out, err = compare([tmp_path / "runs"], capsys)
    assert code == 0 and "received" in out, err
    assert not marker.exists() and "trust_probe_mod" not in sys.modules
    assert flax_module.load_class("trust_probe_mod:Net").__name__ == "Net"
    assert marker.exists()
    monkeypatch.delitem(sys.modules, "trust_probe_mod")


# ---------------------------------------------------------------------------------------------
# data=tfds: a prepared folder's features.json names Python classes TFDS would import


_IMAGE = "tensorflow_datasets.core.features.image_feature.Image"


def _probe_module(tmp_path, monkeypatch) -> Path:
    """An importable module trust_probe_tfds that creates a marker file when imported."""
    marker = tmp_path / "imported"
    (tmp_path / "trust_probe_tfds.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "trust_probe_tfds", raising=False)
    return marker


def _hostile_tfds(tmp_path) -> tuple[Path, Path]:
    """A prepared tiny_shapes folder whose image feature names trust_probe_tfds.Image."""
    pytest.importorskip("tensorflow_datasets")
    from test_tfds import build, tiny_shapes_builder

    data_dir = build(tiny_shapes_builder(), tmp_path / "tfds")
    features = data_dir / "tiny_shapes" / "1.0.0" / "features.json"
    spec = json.loads(features.read_text())
    spec["featuresDict"]["features"]["image"]["pythonClassName"] = "trust_probe_tfds.Image"
    features.write_text(json.dumps(spec))
    return data_dir, features


def test_a_tfds_features_json_naming_another_module_is_refused_unimported(tmp_path,
                                                                          monkeypatch):  # fmt: skip
    import tensorflow_datasets as tfds

    from metalearn.data import tfds as tfds_data

    marker = _probe_module(tmp_path, monkeypatch)
    data_dir, features = _hostile_tfds(tmp_path)
    with pytest.raises(ValueError):  # the hole is real: TFDS itself imports the module
        tfds.builder("tiny_shapes", data_dir=str(data_dir))
    assert marker.exists()
    marker.unlink()
    monkeypatch.delitem(sys.modules, "trust_probe_tfds")

    load = lambda: tfds_data.load_tfds("tiny_shapes", data_dir=data_dir, cache_dir=tmp_path / "c")  # noqa: E731
    with pytest.raises(DataError) as caught:
        load()
    _one_paragraph(caught.value, str(features), "'trust_probe_tfds.Image'",
                   "tensorflow_datasets.core.features.")  # fmt: skip
    assert not marker.exists() and "trust_probe_tfds" not in sys.modules
    assert not (tmp_path / "c").exists()

    # The backstop, for a name in a file the check did not read: TFDS resolves no other class.
    monkeypatch.setattr(tfds_data, "check_feature_classes", lambda *a: None)
    with pytest.raises(DataError) as caught:
        load()
    _one_paragraph(caught.value, "tiny_shapes", "'trust_probe_tfds.Image'", "refuses")
    assert not marker.exists() and "trust_probe_tfds" not in sys.modules
    cls_from_name = tfds.features.FeatureConnector.cls_from_name  # restored after the load
    assert cls_from_name(_IMAGE).__name__ == "Image"


@pytest.mark.parametrize(
    "file, content",
    [
        ("features.json", {"pythonClassName": _IMAGE, "x": {"python_class_name": "os.path"}}),
        ("features.json", {"type": _IMAGE, "content": {"a": {"type": "os.Foo", "content": {}}}}),
        ("features.json", {"jsonFeature": {"json": json.dumps({"pythonClassName": "os.Foo"})}}),
        ("features.json", {"pythonClassName": "tensorflow_datasets.core.features..os"}),
        ("features.json", {"pythonClassName": "tensorflow_datasets.core.featuresX.Image"}),
        ("dataset_info.json", {"name": "x", "features": {"pythonClassName": "trust_probe_tfds.A"}}),
    ],
    ids=["snake_case", "legacy_type_content", "json_in_a_string", "dots", "lookalike", "info"],
)
def test_every_place_a_tfds_file_can_name_a_class_is_checked(tmp_path, file, content):
    tfds = pytest.importorskip("tensorflow_datasets")
    from metalearn.data.tfds import check_feature_classes

    folder = tmp_path / "tiny_shapes" / "cfg" / "1.0.0"  # a config and a version folder deep
    folder.mkdir(parents=True)
    (folder / file).write_text(json.dumps(content))
    with pytest.raises(DataError) as caught:
        check_feature_classes(tfds, "tiny_shapes", tmp_path)
    _one_paragraph(caught.value, str(folder / file), "refuses")
    (folder / file).write_text(json.dumps({"pythonClassName": _IMAGE, "type": "not a class"}))
    check_feature_classes(tfds, "tiny_shapes", tmp_path)  # TFDS's own types (and no "content")
