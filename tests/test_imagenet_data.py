"""data=mini_imagenet and data=tiered_imagenet, on small synthetic copies in every on-disk form.

Every image is an RGB picture whose colour says where it belongs: red its class (numbered over
all splits), green its position within the class, blue its split, plus a horizontal ramp, so a
mean colour tells which image landed in which class and slot (JPEG changes pixels by a little).
The pickles are written as the projects' files are: learn2learn's by Python 3, the RFS /
MetaOptNet and Ren et al.'s by Python 2 (protocol 2, byte strings; written here opcode by opcode),
which Python 3 reads only with encoding latin1.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from metalearn.checks import ConfigError
from metalearn.data import imagenet_files as files
from metalearn.data import mini_imagenet, tiered_imagenet
from metalearn.data.base import SPLITS, DataError, scale_pixels
from metalearn.data.imagenet_files import decode_image, load
from metalearn.data.mini_imagenet import MINI_IMAGENET, MiniImageNetConfig
from metalearn.data.tiered_imagenet import TIERED_IMAGENET, TieredImageNetConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
KEY = jax.random.PRNGKey(0)
STORED = 10  # the synthetic images' side (the real files' is 84)

# Per split, its classes in the order the files list them (not sorted) and their image counts.
MINI = {
    "train": [("n01000003", 5), ("n01000001", 6), ("n01000002", 4), ("n01000004", 5)],
    "val": [("n02000002", 4), ("n02000001", 5), ("n02000003", 4)],
    "test": [("n03000001", 4), ("n03000003", 6), ("n03000002", 5)],
}
TIERED = {
    "train": [("house finch", 5), ("robin", 4), ("jay", 6), ("magpie", 4)],
    "val": [("goldfish", 4), ("tench", 5), ("great white shark", 4)],
    "test": [("tiger shark", 6), ("hammerhead", 4), ("électric ray", 5)],
}
# Each class's number over all splits (its red level), in the files' order.
NUMBER = {
    name: i
    for i, name in enumerate(n for split in SPLITS for d in (MINI, TIERED) for n, _ in d[split])
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """No test reads or writes the real cache, or finds the user's data."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("METALEARN_DATA", raising=False)


def picture(split: str, name: str, slot: int, size: int = STORED) -> np.ndarray:
    colour = np.array([20 + 6 * NUMBER[name], 20 + 30 * slot, 40 + 50 * SPLITS.index(split)])
    ramp = np.linspace(0, 20, size)[None, :, None]
    return np.clip(colour + ramp + np.zeros((size, size, 1)), 0, 255).astype(np.uint8)


def where(image: np.ndarray) -> tuple[int, int, int]:
    """(class number, slot, split index) of a picture, from its mean colour."""
    r, g, b = image.reshape(-1, 3).astype(float).mean(0) - np.array([30, 30, 50])
    return round(r / 6), round(g / 30), round(b / 50)


def file_order(classes: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """(class, slot) of each image of a split in the files' order: round robin over classes."""
    return [(c, j) for j in range(max(n for _, n in classes)) for c, n in classes if j < n]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def py2_pickle(obj) -> bytes:
    """`obj` as Python 2's cPickle writes it at protocol 2: str as byte strings (UTF-8 here),
    numpy arrays through numpy.core.multiarray._reconstruct with their bytes in a str."""
    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        head = b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))
        out.extend(head + b)

    def put(o) -> None:
        if o is None:
            out.extend(b"N")
        elif isinstance(o, (int, np.integer)):
            out.extend(b"J" + struct.pack("<i", int(o)))
        elif isinstance(o, (str, bytes)):  # both are a Python 2 str
            string(o.encode("utf-8") if isinstance(o, str) else o)
        elif isinstance(o, (list, tuple)):
            out.extend(b"](" if isinstance(o, list) else b"(")
            for x in o:
                put(x)
            out.extend(b"e" if isinstance(o, list) else b"t")
        elif isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                put(k)
                put(v)
            out.extend(b"u")
        elif isinstance(o, np.ndarray):
            o = np.ascontiguousarray(o)
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85")
            string(b"b")
            out.extend(b"\x87R(K\x01")
            put(tuple(int(d) for d in o.shape))
            out.extend(b"cnumpy\ndtype\n")
            string(o.dtype.str[1:].encode())
            out.extend(b"K\x00K\x01\x87R(K\x03")
            string(o.dtype.str[:1].encode())
            out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
            string(o.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    put(obj)
    return bytes(out + b".")


# ------------------------------------------------------------------------------ miniImageNet


def write_mini_csv(root: Path, splits=MINI) -> dict[str, list[np.ndarray]]:
    """images/*.jpg with train/val/test.csv; returns each split's decoded images in file order."""
    (root / "images").mkdir(parents=True)
    decoded = {}
    for split, classes in splits.items():
        rows, decoded[split] = [], []
        for name, slot in file_order(classes):
            filename = f"{name}{slot + 1:08d}.jpg"
            Image.fromarray(picture(split, name, slot)).save(root / "images" / filename, quality=95)
            rows.append((filename, name))
            decoded[split].append(np.asarray(Image.open(root / "images" / filename)))
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("filename", "label"), *rows])
    return decoded


def write_mini_l2l(root: Path, decoded, splits=MINI, val_name="validation") -> None:
    root.mkdir(parents=True, exist_ok=True)
    for split, classes in splits.items():
        class_dict: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(file_order(classes)):
            class_dict.setdefault(name, []).append(i)
        record = {"image_data": np.stack(decoded[split]), "class_dict": class_dict}
        suffix = val_name if split == "val" else split
        (root / f"mini-imagenet-cache-{suffix}.pkl").write_bytes(pickle.dumps(record, protocol=4))


def write_mini_rfs(root: Path, decoded, splits=MINI, names=True) -> None:
    """The Gidaris pickles: global labels (train 0.., then val, then test) by sorted wnid."""
    root.mkdir(parents=True, exist_ok=True)
    label, first = {}, 0
    for split in SPLITS:
        for i, name in enumerate(sorted(n for n, _ in splits[split])):
            label[name] = first + i
        first += len(splits[split])
    file = {"train": "train_phase_train", "val": "val", "test": "test"}
    for split, classes in splits.items():
        record = {
            "data": np.stack(decoded[split]),
            "labels": [label[name] for name, _ in file_order(classes)],
        }
        if names:
            record["catname2label"] = {name: label[name] for name, _ in classes}
        path = root / f"miniImageNet_category_split_{file[split]}.pickle"
        path.write_bytes(py2_pickle(record))


def expected(decoded, splits, order) -> dict[str, tuple[np.ndarray, np.ndarray, tuple]]:
    """(images, counts, classes) of each split, the classes in `order(names)`."""
    out = {}
    for split, classes in splits.items():
        names = order([n for n, _ in classes])
        counts = np.array([dict(classes)[n] for n in names], np.int32)
        images = np.zeros((len(names), counts.max(), *decoded[split][0].shape), np.uint8)
        for pixels, (name, slot) in zip(decoded[split], file_order(classes)):
            images[names.index(name), slot] = pixels
        out[split] = (images, counts, tuple(names))
    return out


@pytest.fixture
def mini(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "mini"
    return root, write_mini_csv(root)


def assert_loaded(data, want) -> None:
    for split in SPLITS:
        images, counts, classes = want[split]
        assert data[split].classes == classes, split
        np.testing.assert_array_equal(data[split].counts, counts)
        assert data[split].counts.dtype == np.int32
        np.testing.assert_array_equal(data[split].images, images)


def test_every_mini_imagenet_form_reads_into_the_same_arrays(mini, tmp_path):
    root, decoded = mini
    write_mini_l2l(tmp_path / "l2l", decoded)
    write_mini_l2l(tmp_path / "l2l_val", decoded, val_name="val")  # Ren et al.'s / torchmeta's
    write_mini_rfs(tmp_path / "rfs", decoded)
    with pytest.raises(UnicodeDecodeError):  # a Python 2 pickle: latin1 is needed
        pickle.loads((tmp_path / "rfs/miniImageNet_category_split_val.pickle").read_bytes())
    want = expected(decoded, MINI, sorted)  # classes sorted by wnid
    for folder in (root, tmp_path / "l2l", tmp_path / "l2l_val", tmp_path / "rfs"):
        data = load(MINI_IMAGENET, folder, image_size=STORED)
        assert_loaded(data, want)
    for split in SPLITS:  # the right picture in the right class and slot, padding zero
        images, counts, classes = data[split].images, data[split].counts, data[split].classes
        for row, name in enumerate(classes):
            for slot in range(images.shape[1]):
                if slot < counts[row]:
                    assert where(images[row, slot]) == (NUMBER[name], slot, SPLITS.index(split))
                else:
                    assert not images[row, slot].any()


def test_rfs_pickles_without_catname2label_name_classes_by_label(mini, tmp_path):
    _, decoded = mini
    write_mini_rfs(tmp_path / "rfs", decoded, names=False)
    data = load(MINI_IMAGENET, tmp_path / "rfs", image_size=STORED)
    assert data["val"].classes == ("4", "5", "6")  # labels 64-79 in the real files
    want = expected(decoded, MINI, sorted)  # labels were given by sorted wnid
    for split in SPLITS:
        np.testing.assert_array_equal(data[split].images, want[split][0])
        np.testing.assert_array_equal(data[split].counts, want[split][1])


def test_images_are_resized_once_with_pil_and_max_per_class_keeps_the_first(mini):
    root, decoded = mini
    data = load(MINI_IMAGENET, root, image_size=16, max_per_class=4)
    train = data["train"]
    assert train.images.shape == (4, 4, 16, 16, 3)
    np.testing.assert_array_equal(train.counts, [4, 4, 4, 4])
    for pixels, (name, slot) in zip(decoded["train"], file_order(MINI["train"])):
        if slot < 4:
            image = Image.fromarray(pixels).resize((16, 16), Image.Resampling.BILINEAR)
            want = np.asarray(image)
            np.testing.assert_array_equal(train.images[train.classes.index(name), slot], want)
            assert where(want) == (NUMBER[name], slot, 0)


def test_preprocess_gives_what_training_reads(mini):
    root, decoded = mini
    cfg = MiniImageNetConfig(root=str(root), image_size=16)
    data = load(MINI_IMAGENET, root, image_size=16)
    paths = sorted((root / "images").glob("n01000001*.jpg"))[:2]
    row = data["train"].classes.index("n01000001")
    np.testing.assert_array_equal(
        cfg.preprocess(paths), scale_pixels(data["train"].images[row, :2])
    )
    assert cfg.preprocess(paths).shape == (2, 16, 16, 3)


def test_the_cache_is_written_reused_and_rebuilt_when_damaged(mini, tmp_path, monkeypatch, caplog):
    _, decoded = mini
    folder = tmp_path / "l2l"
    write_mini_l2l(folder, decoded)
    first = load(MINI_IMAGENET, folder, image_size=STORED)
    cache = tmp_path / "xdg" / "metalearn" / "mini_imagenet"
    cached = sorted(cache.glob("mini_imagenet-*.npz"))
    assert [p.name.split("-")[1] for p in cached] == ["test", "train", "val"]

    real = files.load_pickle

    def no_reading(path, what):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(files, "load_pickle", no_reading)
    assert_loaded(load(MINI_IMAGENET, folder, image_size=STORED), expected(decoded, MINI, sorted))

    train = next(p for p in cached if "-train-" in p.name)
    train.write_bytes(train.read_bytes()[:-100])  # a damaged file
    monkeypatch.setattr(files, "load_pickle", real)
    again = load(MINI_IMAGENET, folder, image_size=STORED)
    assert "Discarded the cache file" in caplog.text
    np.testing.assert_array_equal(again["train"].images, first["train"].images)
    with np.load(train) as f:  # rewritten whole
        np.testing.assert_array_equal(f["images"], first["train"].images)

    # another setting, or a changed source file, is another cache file
    load(MINI_IMAGENET, folder, image_size=12)
    source = folder / "mini-imagenet-cache-train.pkl"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    load(MINI_IMAGENET, folder, image_size=STORED)
    assert len(list(cache.glob("mini_imagenet-train-*.npz"))) == 3


def test_episodes_hold_real_images_of_their_classes(mini):
    root, _ = mini
    cfg = MiniImageNetConfig(root=str(root), image_size=STORED, n_way=3, k_shot=2, k_query=2)
    source = mini_imagenet.make_source(cfg)
    assert source.input_shape == (STORED, STORED, 3) and source.n_train_classes == 4
    data = load(MINI_IMAGENET, root, image_size=STORED)
    keys = jax.random.split(KEY, 20)
    # every class of 4 to 6 images is padded to 6 in train (to 5 in val): 4 of them are drawn
    sample = jax.jit(jax.vmap(source.sample, in_axes=(0, None, None)), static_argnums=2)
    for split, global_labels in (("train", False), ("val", True)):
        classes = data[split].classes
        tasks = sample(keys, source.splits[split], global_labels)
        assert tasks.support.x.shape == tasks.query.x.shape == (20, 6, STORED, STORED, 3)
        assert tasks.support.x.dtype == jnp.float32
        for t in range(20):
            x = np.concatenate([tasks.support.x[t], tasks.query.x[t]])
            y = np.concatenate([tasks.support.y[t], tasks.query.y[t]])
            seen = [where(np.round(im * 255).astype(np.uint8)) for im in x]
            assert len(set(seen)) == 12  # support and query images all distinct
            assert all(s == SPLITS.index(split) for _, _, s in seen)  # no padding
            by_label: dict[int, set[int]] = {}
            for label, (number, slot, _) in zip(y, seen):
                by_label.setdefault(int(label), set()).add(number)
                name = next(n for n in classes if NUMBER[n] == number)
                assert slot < dict(MINI[split])[name]
                if global_labels:
                    assert int(label) == classes.index(name)
            assert len(by_label) == 3 and all(len(n) == 1 for n in by_label.values())
            if not global_labels:
                np.testing.assert_array_equal(tasks.support.y[t], [0, 0, 1, 1, 2, 2])
                np.testing.assert_array_equal(tasks.query.y[t], [0, 0, 1, 1, 2, 2])


def test_a_split_too_small_for_the_episodes_is_a_clear_error(mini):
    root, _ = mini
    cfg = MiniImageNetConfig(root=str(root), image_size=STORED, n_way=3, k_shot=2, k_query=3)
    with pytest.raises(DataError, match=r"k_query = 2 \+ 3 = 5 distinct images per class") as e:
        mini_imagenet.make_source(cfg)
    assert "'n01000002' has 4" in str(e.value) and "meta-train" in str(e.value)
    cfg = MiniImageNetConfig(root=str(root), image_size=STORED, n_way=4, k_shot=1, k_query=2)
    with pytest.raises(DataError, match="data.n_way=4 is more classes than the meta-val split"):
        mini_imagenet.make_source(cfg)
    source = mini_imagenet.make_source(MiniImageNetConfig(root=str(root), n_way=3, k_query=2))
    with pytest.raises(DataError, match=r"train.k_shot \+ train.k_query = 4 \+ 1 = 5"):
        source.episodes(3, 4, 1)


def test_a_missing_dataset_names_the_folders_and_files_expected(tmp_path, monkeypatch):
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        load(MINI_IMAGENET, empty)
    message = str(e.value)
    assert "\n" not in message and str(empty) in message and str(empty / "mini-imagenet") in message
    for name in ("train.csv", "val.csv", "images/", "mini-imagenet-cache-train.pkl",
                 "mini-imagenet-cache-validation.pkl", "learn2learn", "RFS", "MetaOptNet",
                 "miniImageNet_category_split_train_phase_train.pickle", "Ravi & Larochelle",
                 "does not download"):  # fmt: skip
        assert name in message, name
    with pytest.raises(DataError) as e:
        load(TIERED_IMAGENET, empty)
    for name in ("train_images_png.pkl", "test_labels.pkl", "val_images.npz", "Ren et al.",
                 "does not download", "tiered-imagenet"):  # fmt: skip
        assert name in str(e.value), name

    (empty / "mini-imagenet-cache-train.pkl").write_bytes(b"")  # a partial copy says what lacks
    with pytest.raises(DataError, match="holds mini-imagenet-cache-train.pkl of the pickles of "
                       "learn2learn but lacks mini-imagenet-cache-validation.pkl or "
                       "mini-imagenet-cache-val.pkl, mini-imagenet-cache-test.pkl"):  # fmt: skip
        load(MINI_IMAGENET, empty)
    with pytest.raises(DataError, match="data.root is not set, and neither is the METALEARN_DATA"):
        load(MINI_IMAGENET, None)
    monkeypatch.setenv("METALEARN_DATA", str(empty))
    with pytest.raises(DataError, match=f"not found at METALEARN_DATA={empty}"):
        load(MINI_IMAGENET, None)


def test_metalearn_data_and_the_projects_subfolders_are_looked_in(mini, tmp_path, monkeypatch):
    _, decoded = mini
    write_mini_l2l(tmp_path / "data" / "mini_imagenet", decoded)
    monkeypatch.setenv("METALEARN_DATA", str(tmp_path / "data"))
    assert load(MINI_IMAGENET, None, image_size=STORED)["val"].classes == tuple(
        sorted(n for n, _ in MINI["val"])
    )
    write_mini_rfs(tmp_path / "elsewhere" / "miniimagenet", decoded)
    data = load(MINI_IMAGENET, tmp_path / "elsewhere", image_size=STORED)
    assert_loaded(data, expected(decoded, MINI, sorted))


def test_damaged_files_are_errors_that_name_them(mini, tmp_path):
    root, decoded = mini
    (root / "images" / f"n02000002{1:08d}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="n0200000200000001.jpg does not decode as an image"):
        load(MINI_IMAGENET, root, image_size=STORED)
    (root / "images" / f"n02000002{1:08d}.jpg").unlink()
    with pytest.raises(DataError, match="n0200000200000001.jpg cannot be read"):
        load(MINI_IMAGENET, root, image_size=STORED)
    (root / "val.csv").write_text("file,class\nx.jpg,n1\n")
    with pytest.raises(DataError, match="header filename,label"):
        load(MINI_IMAGENET, root, image_size=STORED)

    folder = tmp_path / "l2l"
    write_mini_l2l(folder, decoded)
    (folder / "mini-imagenet-cache-test.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="mini-imagenet-cache-test.pkl does not load as"):
        load(MINI_IMAGENET, folder, image_size=STORED)
    (folder / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps({"images": 1}))
    with pytest.raises(DataError, match="lacks the key 'image_data'"):
        load(MINI_IMAGENET, folder, image_size=STORED)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"image_size": 4}, "data.image_size=4 is not allowed"),
        ({"image_size": 1000}, "data.image_size=1000 is not allowed"),
        ({"max_per_class": 10}, r"data.max_per_class=10 is not allowed: .* = 16"),
        ({"name": "imagenet"}, "data.name='imagenet' is not allowed"),
        ({"root": ""}, "data.root='' is not allowed"),
        ({"n_way": 1}, "data.n_way=1 is not allowed"),
        ({"k_shot": 0}, "data.k_shot=0 is not allowed"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_value(settings, message):
    for schema in (MiniImageNetConfig, TieredImageNetConfig):
        if settings.get("name") and schema is TieredImageNetConfig:
            continue
        with pytest.raises(ConfigError, match=message):
            schema(**settings)


# ----------------------------------------------------------------------------- tieredImageNet


def tiered_labels(classes, key="label_specific") -> dict:
    order = file_order(classes)
    names = [n for n, _ in classes]
    if key == "labels":  # MetaOptNet's copies: global numbers
        return {"labels": [100 + names.index(n) for n, _ in order]}
    return {
        "label_specific": np.array([names.index(n) for n, _ in order], np.int32),
        "label_general": np.array([names.index(n) // 2 for n, _ in order], np.int32),
        "label_specific_str": names,
        "label_general_str": ["category a", "category b"],
    }


def write_tiered(root: Path, form: str, key="label_specific", compressed=False, bgr=True):
    """The release (png) or the decompressed arrays (npz, BGR as OpenCV writes them)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, classes in TIERED.items():
        pictures = [picture(split, n, j) for n, j in file_order(classes)]
        if form == "png":  # cv2.imencode's uint8 [n, 1] arrays, and bytes
            encoded = [
                np.frombuffer(png(p), np.uint8)[:, None] if i % 2 else png(p)
                for i, p in enumerate(pictures)
            ]
            (root / f"{split}_images_png.pkl").write_bytes(py2_pickle(encoded))
        else:
            stack = np.stack(pictures)[..., ::-1] if bgr else np.stack(pictures)
            save = np.savez_compressed if compressed else np.savez
            save(root / f"{split}_images.npz", images=stack)
        (root / f"{split}_labels.pkl").write_bytes(py2_pickle(tiered_labels(classes, key)))


def tiered_expected(size: int = STORED) -> dict:
    pictures = {
        s: [decode_image(Image.fromarray(picture(s, n, j)), size) for n, j in file_order(c)]
        for s, c in TIERED.items()
    }
    return expected(pictures, TIERED, lambda names: names)  # classes in label order


def test_every_tiered_imagenet_form_reads_into_the_same_arrays(tmp_path):
    write_tiered(tmp_path / "png", "png")
    write_tiered(tmp_path / "npz", "npz")
    write_tiered(tmp_path / "zipped", "npz", compressed=True)
    for folder in ("png", "npz", "zipped"):
        assert_loaded(
            load(TIERED_IMAGENET, tmp_path / folder, image_size=STORED), tiered_expected()
        )
    assert load(TIERED_IMAGENET, tmp_path / "png")["test"].classes[2] == "électric ray"
    # an RGB copy of the arrays, and resizing after the channels are put right
    write_tiered(tmp_path / "rgb", "npz", bgr=False)
    assert_loaded(load(TIERED_IMAGENET, tmp_path / "rgb", image_size=STORED, npz_bgr=False),
                  tiered_expected())  # fmt: skip
    assert_loaded(load(TIERED_IMAGENET, tmp_path / "npz", image_size=16), tiered_expected(16))
    # decompressed beside the release, the PNGs are read (whatever the arrays' channel order)
    write_tiered(tmp_path / "both", "png")
    write_tiered(tmp_path / "both", "npz", bgr=False)
    assert_loaded(load(TIERED_IMAGENET, tmp_path / "both", image_size=STORED), tiered_expected())


def test_metaoptnet_labels_files_name_classes_by_label(tmp_path):
    write_tiered(tmp_path / "tiered-imagenet", "npz", key="labels")  # as the release's tar unpacks
    data = load(TIERED_IMAGENET, tmp_path, image_size=STORED)
    want = tiered_expected()
    for split in SPLITS:
        assert data[split].classes == tuple(str(100 + i) for i in range(len(TIERED[split])))
        np.testing.assert_array_equal(data[split].images, want[split][0])


def test_damaged_tiered_files_are_errors_that_name_them(tmp_path):
    write_tiered(tmp_path / "npz", "npz")
    npz = tmp_path / "npz" / "val_images.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    with pytest.raises(DataError, match="val_images.npz"):
        load(TIERED_IMAGENET, tmp_path / "npz", image_size=STORED)
    np.savez(npz, pictures=np.zeros((13, 10, 10, 3), np.uint8))
    with pytest.raises(DataError, match="holds no array 'images'"):
        load(TIERED_IMAGENET, tmp_path / "npz", image_size=STORED)
    np.savez(npz, images=np.zeros((12, 10, 10, 3), np.uint8))
    with pytest.raises(DataError, match="should be 12 integer labels, one per image"):
        load(TIERED_IMAGENET, tmp_path / "npz", image_size=STORED)

    write_tiered(tmp_path / "png", "png")
    encoded = pickle.loads((tmp_path / "png/test_images_png.pkl").read_bytes(), encoding="latin1")
    encoded[3] = b"\x89PNG broken"
    (tmp_path / "png/test_images_png.pkl").write_bytes(pickle.dumps(encoded))
    with pytest.raises(DataError, match="image 3 of .*test_images_png.pkl does not decode"):
        load(TIERED_IMAGENET, tmp_path / "png", image_size=STORED)
    (tmp_path / "png/test_labels.pkl").write_bytes(py2_pickle({"label_general": [0]}))
    with pytest.raises(DataError, match="neither 'label_specific'.* nor 'labels'"):
        load(TIERED_IMAGENET, tmp_path / "png", image_size=STORED)


def test_tiered_episodes_and_cache(tmp_path, monkeypatch):
    write_tiered(tmp_path / "png", "png")
    cfg = TieredImageNetConfig(root=str(tmp_path / "png"), image_size=STORED, n_way=3, k_query=3)
    source = tiered_imagenet.make_source(cfg)
    assert source.n_train_classes == 4
    task = jax.jit(source.sample, static_argnums=2)(KEY, source.splits["test"], True)
    assert task.query.x.shape == (9, STORED, STORED, 3)
    test = tiered_expected()["test"][2]
    for x, y in zip(task.query.x, task.query.y):
        assert where(np.round(np.asarray(x) * 255).astype(np.uint8))[0] == NUMBER[test[int(y)]]
    monkeypatch.setattr(files, "load_pickle", lambda path, what: pytest.fail(f"read {path}"))
    assert_loaded(load(TIERED_IMAGENET, tmp_path / "png", image_size=STORED), tiered_expected())


# -------------------------------------------------------------------------------------- Hydra


def composed(overrides):
    from metalearn.config import register_schemas, to_config

    register_schemas()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return to_config(compose("config", overrides=overrides), overrides)


def test_hydra_composes_both_options_and_refuses_bad_values(mini, tmp_path):
    root, _ = mini
    cfg = composed(["data=mini_imagenet", f"data.root={root}", "model=conv4", "algo=protonet"])
    assert isinstance(cfg.data, MiniImageNetConfig)
    assert (cfg.data.image_size, cfg.data.n_way, cfg.data.max_per_class) == (84, 5, None)
    cfg = composed(["data=tiered_imagenet", "model=conv4", "algo=protonet", "data.npz_bgr=false"])
    assert isinstance(cfg.data, TieredImageNetConfig) and cfg.data.root is None
    assert not cfg.data.npz_bgr
    with pytest.raises(ConfigError, match="data.image_size=6 is not allowed"):
        composed(["data=mini_imagenet", "model=conv4", "algo=protonet", "data.image_size=6"])


@pytest.mark.parametrize("option", ["mini_imagenet", "tiered_imagenet"])
def test_the_default_network_is_conv4(option):
    if not (CONF / "model" / f"{option}.yaml").exists():
        pytest.skip(f"conf/model/{option}.yaml (the data's default network) is not in conf/")
    cfg = composed([f"data={option}", "algo=protonet"])
    assert cfg.model.name == "conv4"


@pytest.mark.slow  # compiles a conv4 train step
def test_a_composed_experiment_builds_and_trains_a_step(mini):
    from metalearn.experiment import build, initial_state
    from metalearn.train_step import make_train_step

    root, _ = mini
    cfg = composed(["data=mini_imagenet", f"data.root={root}", "data.image_size=16",
                    "data.n_way=3", "data.k_query=2", "model=conv4", "model.hidden=8",
                    "algo=protonet", "train.meta_batch=2"])  # fmt: skip
    exp = build(cfg)
    assert exp.source.input_shape == (16, 16, 3)
    params = exp.algo.init(KEY)
    step = make_train_step(exp, meta_batch=2)
    state = initial_state(exp, jax.tree.map(jnp.copy, params))  # the step donates its buffers
    state, metrics = step(state, exp.source.splits["train"], KEY, 1)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(metrics))
    assert not np.allclose(state.params["blocks"][0]["w"], params["blocks"][0]["w"])
