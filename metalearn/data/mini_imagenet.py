"""data=mini_imagenet: miniImageNet (Vinyals et al. 2016) with the class split of Ravi &
Larochelle 2017: 64 / 16 / 20 ImageNet classes of 600 images, 84x84 RGB. Read from local files
(metalearn downloads nothing), in any of the forms the few-shot projects distribute, looked for
in data.root or $METALEARN_DATA, or their subfolder mini_imagenet/, mini-imagenet/ or
miniimagenet/ (data/imagenet_files.py: caching, resizing, episodes):

1. csv: `images/` holding the JPEGs and the split files `train.csv`, `val.csv`, `test.csv`,
   each with the header `filename,label` and one `n0153282900000005.jpg,n01532829` row per
   image (label: the class's wnid). The split files of Ravi & Larochelle
   (twitter/meta-learning-lstm), as Ren et al.'s few-shot-ssl-public reads them to build its
   pickles (below), beside the images those name (any size: they are resized).
2. pickles: `mini-imagenet-cache-train.pkl`, `mini-imagenet-cache-validation.pkl`,
   `mini-imagenet-cache-test.pkl`, each a dict with "image_data" (uint8 [N, 84, 84, 3]) and
   "class_dict" ({wnid: [indices into image_data]}): learn2learn's files
   (learn2learn/vision/datasets/mini_imagenet.py). They are the caches of Ren et al.'s
   few-shot-ssl-public (fewshot/data/mini_imagenet.py), whose own copies and torchmeta's
   (torchmeta/datasets/miniimagenet.py) name the validation file `...-val.pkl`, also read.
3. RFS / MetaOptNet: `miniImageNet_category_split_train_phase_train.pickle`,
   `miniImageNet_category_split_val.pickle`, `miniImageNet_category_split_test.pickle`, each a
   dict with "data" (uint8 [N, 84, 84, 3]), "labels" (one int per image; 0-63, 64-79 and 80-99)
   and "catname2label" ({wnid: label}), pickled by Python 2 (read with encoding latin1): the
   files of Gidaris & Komodakis 2018 (FewShotWithoutForgetting) that kjunelee/MetaOptNet
   (data/mini_imagenet.py) and RFS (WangYueFt/rfs, dataset/mini_imagenet.py) read; as in RFS,
   train_phase_train is meta-train (its train_phase_val/test hold other images of the same 64
   classes, and are not read).

The first complete form wins, in this order. Every form gives the same arrays: the classes of
a split sorted by wnid (by label number for RFS files without catname2label), the images of a
class in the order of the file. A file holds whichever classes it was built with: Ren et al.'s
code, for one, builds its -val.pkl from test.csv and its -test.pkl from val.csv, so a copy made
by it has 20 validation classes and 16 test ones (a warning says when a split does not have the
published number of classes).

The pickles (forms 2 and 3) are read by imagenet_files.load_pickle with a restricted unpickler
(data/safe_pickle.py): one that names anything but numpy arrays and plain values is refused
before it can run code.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metalearn import registry
from metalearn.data import imagenet_files as files
from metalearn.data.base import DataError, TaskSource
from metalearn.data.imagenet_files import Dataset, Form, ImageNetConfig, SplitSource

_L2L_NAMES = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}
_RFS_NAMES = {"train": "train_phase_train", "val": "val", "test": "test"}


# ------------------------------------------------------------------ 1. images + split CSVs


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    """The (filename, wnid) rows of a split file, in order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"The split file {path} cannot be read ({e}).") from e
    reader = csv.reader(lines)
    header = [h.strip() for h in next(reader, [])]
    if header != ["filename", "label"]:
        raise DataError(
            f"{path} is not a miniImageNet split file: its first line should be the header "
            f"filename,label (as in Ravi & Larochelle's CSVs), but it is {','.join(header)!r}."
        )
    rows = []
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue  # e.g. a blank last line
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(
                f"{path}, line {line}: a row is filename,label (e.g. "
                f"n0153282900000005.jpg,n01532829), but it is {','.join(row)!r}."
            )
        name = row[0].strip()
        if Path(name).is_absolute() or ".." in Path(name).parts:  # a received file's paths
            raise DataError(
                f"{path}, line {line}: the image {name!r} is outside the images/ folder beside "
                "it; a split file names images by their file name in images/ (e.g. "
                "n0153282900000005.jpg)."
            )
        rows.append((name, row[1].strip()))
    if not rows:
        raise DataError(f"The split file {path} names no images (it has only its header).")
    return rows


def _csv_index(paths: tuple[Path, ...]) -> list[Path]:
    split_file, folder = paths
    return [split_file, *(folder / name for name, _ in _csv_rows(split_file))]


def _csv_read(paths: tuple[Path, ...], bgr: bool) -> SplitSource:
    split_file, folder = paths
    rows = _csv_rows(split_file)
    classes = tuple(sorted({wnid for _, wnid in rows}))
    row_of = {c: i for i, c in enumerate(classes)}

    def items():
        for name, _ in rows:
            path = folder / name
            try:
                yield path.read_bytes()
            except OSError as e:
                raise DataError(
                    f"The image {path}, named by {split_file}, cannot be read "
                    f"({e.strerror or e}). Restore it from the copy it came from."
                ) from e

    return SplitSource(
        classes=classes,
        rows=np.array([row_of[wnid] for _, wnid in rows], np.int64),
        items=items,
        where=f"{split_file} (with {folder})",
        describe=lambda i: f"the image {folder / rows[min(i, len(rows) - 1)][0]}",
    )


# ------------------------------------------------------------------ 2. learn2learn's pickles


def _l2l_read(paths: tuple[Path, ...], bgr: bool) -> SplitSource:
    (path,) = paths
    what = "a miniImageNet pickle of learn2learn (image_data, class_dict)"
    d = files.record(files.load_pickle(path, what), path, what, ("image_data", "class_dict"))
    images = files.image_array(d["image_data"], path, "image_data")
    class_dict = d["class_dict"]
    if not isinstance(class_dict, dict) or not class_dict:
        raise DataError(f"{path}: 'class_dict' should map each wnid to its image indices.")
    named = {files.text(k): v for k, v in class_dict.items()}
    classes = tuple(sorted(named))
    rows = np.full(len(images), -1, np.int64)
    for row, wnid in enumerate(classes):
        try:
            indices = np.asarray(named[wnid], np.int64).ravel()
        except (TypeError, ValueError):
            raise DataError(f"{path}: class_dict[{wnid!r}] is not a list of indices.") from None
        bad = indices[(indices < 0) | (indices >= len(images))]
        if len(bad):
            raise DataError(
                f"{path}: class_dict[{wnid!r}] names image {bad[0]}, but image_data holds "
                f"{len(images)} images."
            )
        twice = indices[rows[indices] != -1]
        if len(twice) or len(np.unique(indices)) != len(indices):
            i = twice[0] if len(twice) else indices[0]
            raise DataError(f"{path}: image {i} is listed twice in class_dict.")
        rows[indices] = row
    return SplitSource(
        classes=classes,
        rows=rows,
        items=lambda: iter(images),
        where=str(path),
        describe=lambda i: f"image {i} of {path}",
    )


# ------------------------------------------------------------------ 3. RFS / MetaOptNet pickles


def _rfs_read(paths: tuple[Path, ...], bgr: bool) -> SplitSource:
    (path,) = paths
    what = "a miniImageNet pickle of RFS / MetaOptNet (data, labels)"
    d = files.record(files.load_pickle(path, what), path, what, ("data", "labels"))
    images = files.image_array(d["data"], path, "data")
    labels = files.int_labels(d["labels"], len(images), path, "labels")
    present = np.unique(labels)
    names = {int(label): str(int(label)) for label in present}
    catname2label = d.get("catname2label")
    if isinstance(catname2label, dict):
        wnids = {}
        for name, label in catname2label.items():
            try:
                wnids[int(label)] = files.text(name)
            except (TypeError, ValueError):
                continue
        if all(int(label) in wnids for label in present):
            names = {int(label): wnids[int(label)] for label in present}
            present = np.array(sorted(present, key=lambda label: names[int(label)]))
    rank = np.empty(int(labels.max()) + 1 if len(labels) else 0, np.int64)
    rank[present] = np.arange(len(present))
    return SplitSource(
        classes=tuple(names[int(label)] for label in present),
        rows=rank[labels],
        items=lambda: iter(images),
        where=str(path),
        describe=lambda i: f"image {i} of {path}",
    )


FORMS = (
    Form(
        name="csv",
        title="images and split CSVs of Ravi & Larochelle",
        files=lambda split: ((f"{split}.csv",), ("images",)),
        expected=(
            "the split files of Ravi & Larochelle (twitter/meta-learning-lstm) train.csv, val.csv "
            "and test.csv (header filename,label; label: the wnid) beside a folder images/ "
            "holding the ImageNet JPEGs they name, e.g. images/n0153282900000005.jpg"
        ),
        read=_csv_read,
        index=_csv_index,
    ),
    Form(
        name="l2l",
        title="pickles of learn2learn",
        files=lambda split: (tuple(f"mini-imagenet-cache-{n}.pkl" for n in _L2L_NAMES[split]),),
        expected=(
            "learn2learn's pickles mini-imagenet-cache-train.pkl, "
            "mini-imagenet-cache-validation.pkl (or -val.pkl, as Ren et al.'s few-shot-ssl-public "
            "and torchmeta name it) and mini-imagenet-cache-test.pkl (keys image_data and "
            "class_dict)"
        ),
        read=_l2l_read,
    ),
    Form(
        name="rfs",
        title="pickles of RFS / MetaOptNet",
        files=lambda split: ((f"miniImageNet_category_split_{_RFS_NAMES[split]}.pickle",),),
        expected=(
            "the pickles of RFS and MetaOptNet (from Gidaris & Komodakis's "
            "FewShotWithoutForgetting) miniImageNet_category_split_train_phase_train.pickle, "
            "miniImageNet_category_split_val.pickle and miniImageNet_category_split_test.pickle "
            "(keys data, labels and catname2label)"
        ),
        read=_rfs_read,
    ),
)

MINI_IMAGENET = Dataset(
    name="mini_imagenet",
    title="miniImageNet",
    folders=("mini_imagenet", "mini-imagenet", "miniimagenet"),
    forms=FORMS,
    classes={"train": 64, "val": 16, "test": 20},
)


@dataclass
class MiniImageNetConfig(ImageNetConfig):
    """miniImageNet N-way K-shot episodes (the module's docstring lists the files read)."""

    dataset = MINI_IMAGENET  # a class variable (no annotation): not a setting

    name: str = "mini_imagenet"


def make_source(cfg: MiniImageNetConfig) -> TaskSource:
    return files.make_source(cfg)


registry.register("data", "mini_imagenet", MiniImageNetConfig, make_source)
