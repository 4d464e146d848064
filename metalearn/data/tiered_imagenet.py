"""data=tiered_imagenet: tieredImageNet (Ren et al. 2018, "Meta-Learning for Semi-Supervised
Few-Shot Classification"): 608 ImageNet classes in 34 high-level categories, split by category
20 / 6 / 8 into 351 / 97 / 160 classes of ~1300 images (732 to 1300), 84x84 RGB. Read from local
files (metalearn downloads nothing), in either form the few-shot projects distribute, looked
for in data.root or $METALEARN_DATA, or their subfolder tiered_imagenet/, tiered-imagenet/ (the
folder the release's tar unpacks to) or tieredimagenet/ (data/imagenet_files.py: caching,
resizing, episodes):

1. png: the release of Ren et al. (renmengye/few-shot-ssl-public, tiered-imagenet.tar), as
   learn2learn (learn2learn/vision/datasets/tiered_imagenet.py) and torchmeta
   (torchmeta/datasets/tieredimagenet.py) read it: `train_images_png.pkl`, `val_images_png.pkl`,
   `test_images_png.pkl`, each a list of PNG-encoded images (uint8 arrays as cv2.imencode
   returns them, or bytes), with `train_labels.pkl`, `val_labels.pkl`, `test_labels.pkl`, each a
   dict with "label_specific" (int [N], the class of each image: 0..C-1 within the split),
   "label_specific_str" (the C class names), "label_general" and "label_general_str" (the
   categories, not used). Both are pickled by Python 2 and read with encoding latin1, by a
   restricted unpickler (data/safe_pickle.py) that refuses a file naming anything but numpy
   arrays and plain values before it can run code.
2. npz: `train_images.npz`, `val_images.npz`, `test_images.npz` (key "images", uint8 [N, 84, 84,
   3]) with the same `{split}_labels.pkl` beside them: what the release's own
   fewshot/data/compress_tiered_imagenet.py `decompress` writes from the PNGs and what
   MetaOptNet (kjunelee/MetaOptNet, data/tiered_imagenet.py) and RFS (WangYueFt/rfs,
   dataset/tiered_imagenet.py) read; their copies' labels file may hold "labels" (one int per
   image, offset per split) instead of "label_specific", which is read as well (the classes are
   then named by their label numbers). `decompress` decodes with OpenCV, so these arrays are BGR
   (the PNGs are RGB): they are flipped to RGB; data.npz_bgr=false reads an RGB copy as is.

The first complete form wins, in this order (both are there once the release is decompressed,
and the PNGs are unambiguous about the channel order). Both give the same arrays: the classes of
a split in the order of their label ids, the images of a class in the order of the file. The
train split is ~9 GB at 84x84 (as uint8, in memory and on the device); data.max_per_class or a
smaller data.image_size makes it smaller.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metalearn import registry
from metalearn.data import imagenet_files as files
from metalearn.data.base import DataError, TaskSource
from metalearn.data.imagenet_files import Dataset, Form, ImageNetConfig, SplitSource


def _labels(path: Path, n: int, images: Path) -> tuple[tuple[str, ...], np.ndarray]:
    """The class names and each image's class row, from a {split}_labels.pkl of N images."""
    what = "a tieredImageNet labels file (label_specific, or labels)"
    d = files.record(files.load_pickle(path, what), path, what, ())
    key = "label_specific" if "label_specific" in d else "labels" if "labels" in d else None
    if key is None:
        raise DataError(
            f"{path} is not {what}: it holds neither 'label_specific' (Ren et al.'s release) "
            f"nor 'labels' (MetaOptNet's copies); its keys are {sorted(d)}."
        )
    labels = files.int_labels(d[key], n, path, f"{key} (for the {n} images of {images.name})")
    if key == "labels":  # global label numbers (offset per split): rows in their order
        present = np.unique(labels)
        return tuple(str(int(c)) for c in present), np.searchsorted(present, labels)
    n_classes = int(labels.max()) + 1 if n else 0
    names = d.get("label_specific_str")
    if isinstance(names, (list, tuple, np.ndarray)) and len(names) >= n_classes:
        classes = tuple(files.text(c) for c in list(names)[:n_classes])
        if len(set(classes)) == n_classes:
            return classes, labels
    return tuple(str(c) for c in range(n_classes)), labels


def _png_read(paths: tuple[Path, ...], bgr: bool) -> SplitSource:
    images_path, labels_path = paths
    what = "a tieredImageNet images file of Ren et al. (a list of PNG-encoded images)"
    images = files.load_pickle(images_path, what)
    if not isinstance(images, (list, tuple)):
        raise DataError(
            f"{images_path} is not {what}: it holds a {type(images).__name__}, not a list."
        )
    classes, rows = _labels(labels_path, len(images), images_path)
    return SplitSource(
        classes=classes,
        rows=rows,
        items=lambda: iter(images),
        where=f"{images_path} (with {labels_path.name})",
        describe=lambda i: f"image {i} of {images_path}",
    )


def _npz_read(paths: tuple[Path, ...], bgr: bool) -> SplitSource:
    images_path, labels_path = paths
    n, items = files.npz_images(images_path, "images")
    classes, rows = _labels(labels_path, n, images_path)
    return SplitSource(
        classes=classes,
        rows=rows,
        items=items,
        where=f"{images_path} (with {labels_path.name})",
        describe=lambda i: f"image {i} of {images_path}",
        bgr=bgr,
    )


FORMS = (
    Form(
        name="png",
        title="release of Ren et al.",
        files=lambda split: ((f"{split}_images_png.pkl",), (f"{split}_labels.pkl",)),
        expected=(
            "the release of Ren et al. 2018 (renmengye/few-shot-ssl-public, tiered-imagenet.tar, "
            "as learn2learn and torchmeta read it): train_images_png.pkl, val_images_png.pkl and "
            "test_images_png.pkl (PNG-encoded images) with train_labels.pkl, val_labels.pkl and "
            "test_labels.pkl (key label_specific)"
        ),
        read=_png_read,
    ),
    Form(
        name="npz",
        title="RFS / MetaOptNet arrays",
        files=lambda split: ((f"{split}_images.npz",), (f"{split}_labels.pkl",)),
        expected=(
            "the arrays RFS and MetaOptNet read (written by the release's decompress script): "
            "train_images.npz, val_images.npz and test_images.npz (key images) with the same "
            "train_labels.pkl, val_labels.pkl and test_labels.pkl (key label_specific or labels)"
        ),
        read=_npz_read,
        bgr=True,
    ),
)

TIERED_IMAGENET = Dataset(
    name="tiered_imagenet",
    title="tieredImageNet",
    folders=("tiered_imagenet", "tiered-imagenet", "tieredimagenet"),
    forms=FORMS,
    classes={"train": 351, "val": 97, "test": 160},
)


@dataclass
class TieredImageNetConfig(ImageNetConfig):
    """tieredImageNet N-way K-shot episodes (the module's docstring lists the files read)."""

    dataset = TIERED_IMAGENET  # a class variable (no annotation): not a setting

    name: str = "tiered_imagenet"
    # the {split}_images.npz arrays are BGR, as the release's decompress script (OpenCV) writes
    # them, and are flipped to RGB; false: they are RGB already (the PNGs are always RGB)
    npz_bgr: bool = True


def make_source(cfg: TieredImageNetConfig) -> TaskSource:
    return files.make_source(cfg)


registry.register("data", "tiered_imagenet", TieredImageNetConfig, make_source)
