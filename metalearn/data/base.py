"""What every dataset option shares: its schema's base, the TaskSource it builds, the DataSpec
of that source (what building a model needs, recorded in a run directory), and reading images
given by a user (for the options' `preprocess`, their training image pipeline)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import MISSING

from metalearn.checks import MAX_EXAMPLES, at_most, require
from metalearn.types import Task

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A dataset or split request that cannot be served; the message says how to fix it."""


class TaskSource(NamedTuple):
    """What the train loop needs from a dataset.

    splits[name] is a pytree of device arrays passed to `sample` as an argument (not closed
    over, so the jitted step does not embed the dataset as a constant).
    sample(key, split_arrays, global_labels) -> Task draws one task.
    """

    kind: str  # "classification" | "regression"
    n_out: int  # outputs of the per-task predictor (n_way, or the regression dimension)
    n_train_classes: int  # outputs of a classifier pre-trained on all meta-train classes
    input_shape: tuple[int, ...]
    splits: dict[str, Any]
    sample: Callable[[jax.Array, Any, bool], Task]
    # Multi-task sources (a fixed set of T tasks, e.g. one per Omniglot alphabet) also have:
    n_tasks: int = 0  # T; 0 for a task distribution (meta-learning)
    task_names: tuple[str, ...] = ()  # one per task, for reports
    classes_per_task: tuple[int, ...] = ()  # classification: task t's labels are < this (<= n_out)
    # sample_task(key, split_arrays, task_id) -> Task: a batch of task `task_id`'s examples of the
    # split (support and query disjoint), task_id set. `sample` draws the task id uniformly.
    sample_task: Callable[[jax.Array, Any, jax.Array], Task] | None = None
    # Episodic sources: episodes(n_way, k_shot, k_query) -> a `sample` of training episodes of
    # that shape (train.n_way / k_shot / k_query), checked against the train split.
    episodes: Callable[[int, int, int], Callable] | None = None


# the data kinds a run's spec may hold: the supervised ones and the environments'
# (envs/base.py::KIND)
SPEC_KINDS = ("classification", "regression", "reinforcement")


class DataSpec(NamedTuple):
    """What a TaskSource tells the model and algorithm factories, without its arrays: enough to
    rebuild a trained run's model and learner without loading its dataset (data_spec.json)."""

    kind: str
    n_out: int
    n_train_classes: int
    input_shape: tuple[int, ...]
    n_tasks: int = 0
    task_names: tuple[str, ...] = ()
    classes_per_task: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._asdict().items()}

    @classmethod
    def from_json(cls, record: Any) -> DataSpec:
        """The spec a to_json() record holds; ValueError for anything else (a damaged file)."""
        if not isinstance(record, dict) or set(record) != set(cls._fields):
            raise ValueError(f"it does not hold exactly the fields {', '.join(cls._fields)}")

        def ints(value: Any, name: str) -> tuple[int, ...]:
            ok = isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)
            if not ok:
                raise ValueError(f"{name} is not a list of non-negative integers")
            return tuple(value)

        for name in ("n_out", "n_train_classes", "n_tasks"):
            if type(record[name]) is not int or record[name] < 0:
                raise ValueError(f"{name}={record[name]!r} is not a non-negative integer")
        names = record["task_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("task_names is not a list of strings")
        if record["kind"] not in SPEC_KINDS:
            raise ValueError(f"kind={record['kind']!r} is not one of {', '.join(SPEC_KINDS)}")
        return cls(
            kind=record["kind"],
            n_out=record["n_out"],
            n_train_classes=record["n_train_classes"],
            input_shape=ints(record["input_shape"], "input_shape"),
            n_tasks=record["n_tasks"],
            task_names=tuple(names),
            classes_per_task=ints(record["classes_per_task"], "classes_per_task"),
        )


def spec_of(source: TaskSource) -> DataSpec:
    """The DataSpec of a task source: its fields that are no arrays or functions."""
    return DataSpec(
        kind=source.kind,
        n_out=int(source.n_out),
        n_train_classes=int(source.n_train_classes),
        input_shape=tuple(int(d) for d in source.input_shape),
        n_tasks=int(source.n_tasks),
        task_names=tuple(str(n) for n in source.task_names),
        classes_per_task=tuple(int(c) for c in source.classes_per_task),
    )


def source_of(spec: DataSpec) -> TaskSource:
    """A stand-in TaskSource with the spec's fields and no data (splits and sample are None):
    what the factories need to build a model and learner, for a run whose data is not loaded."""
    return TaskSource(**spec._asdict(), splits=None, sample=None)


# ---------------------------------------------------------------------------------------------
# A user's images, for the data options' `preprocess` (each applies its own training pipeline)


def open_images(images: Any) -> list:
    """A user's images as a list of PIL images: file paths, PIL images, arrays [H, W] or
    [H, W, C] (C = 1, 3 or 4), a batch array [N, H, W] or [N, H, W, C], or a list of any of
    these. Arrays are uint8 (0-255), bool, or floats in [0, 1] (as `pixels / 255`), which are
    rounded to the nearest of the 256 levels that training images have.

    An image that cannot be read, or an array that is no image, is a DataError naming it.
    """
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Image.Image)):
        items = [images]
    elif hasattr(images, "__array__") and not isinstance(images, (list, tuple)):
        batch = np.asarray(images)
        if batch.ndim not in (3, 4):
            raise DataError(
                f"An array of images must be a batch [N, H, W] or [N, H, W, C]; got one of shape "
                f"{list(batch.shape)}. Give a single image as a list of one ([image])."
            )
        items = list(batch)
    else:
        try:
            items = list(images)
        except TypeError:
            raise DataError(
                f"Images must be file paths, PIL images or arrays (or a list of them); got a "
                f"{type(images).__name__}."
            ) from None
    if not items:
        raise DataError("No images were given (an empty list).")
    return [_open_image(item, i) for i, item in enumerate(items)]


def scale_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels as a model reads them: float32 pixels / 255, computed on the device as the
    episode sampler does (data/episodic.py; XLA multiplies by the reciprocal, which can differ
    from numpy's division in the last bit), so preprocessed images equal training inputs."""
    return np.asarray(jnp.asarray(pixels).astype(jnp.float32) / 255.0)


def _open_image(item: Any, index: int):
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"The image {path} cannot be read ({e.strerror or e}).") from None
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # PIL decodes lazily: a truncated or damaged file fails here
        except Image.UnidentifiedImageError:
            raise DataError(
                f"{path} is not an image in a format PIL reads (PNG, JPEG, BMP, GIF, TIFF...)."
            ) from None
        except Exception as e:  # what a damaged file makes a decoder raise (OSError, ...)
            raise DataError(f"{path} does not decode as an image ({e}).") from None
        return image
    if hasattr(item, "__array__"):
        return Image.fromarray(_pixels(np.asarray(item), index))
    raise DataError(
        f"Image {index} is a {type(item).__name__}: give file paths, PIL images or arrays."
    )


def _pixels(array: np.ndarray, index: int) -> np.ndarray:
    """An image array as uint8 [H, W] or [H, W, 3 | 4], for PIL."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise DataError(
            f"Image {index} has shape {list(array.shape)}: an image is [H, W] (grayscale) or "
            "[H, W, C] with C = 1, 3 (RGB) or 4 (RGBA)."
        )
    if min(array.shape[:2]) < 1:
        raise DataError(f"Image {index} is empty (shape {list(array.shape)}).")
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not (np.all(np.isfinite(array)) and array.min() >= 0 and array.max() <= 1):
            raise DataError(
                f"Image {index} is a float array with values from {array.min()} to "
                f"{array.max()}: float images must be in [0, 1] (pixels / 255); give 0-255 "
                "pixels as uint8."
            )
        return np.round(array * 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise DataError(
                f"Image {index} has integer pixels from {array.min()} to {array.max()}, "
                "outside 0-255."
            )
        return array.astype(np.uint8)
    raise DataError(f"Image {index} has dtype {array.dtype}: give uint8, bool or float pixels.")


@dataclass
class DataConfig:
    kind: ClassVar[str] = "classification"  # or "regression"; what the data's targets are
    multitask: ClassVar[bool] = False  # a fixed set of T tasks with ids (multi-task learning)
    inputs: ClassVar[str] = "images"  # or "vectors": what a model reads (ModelConfig.inputs)
    # its splits may be padded (types.Split.mask): only learners and models that read the mask
    # (AlgoConfig.reads_padded, ModelConfig.reads_padded) can train on it
    padded: ClassVar[bool] = False
    # the settings that size a task's arrays (named when a run does not fit in memory)
    size_settings: ClassVar[tuple[str, ...]] = ("k_shot", "k_query")
    # settings that say where the data is, not what it is (left out of the protocol card,
    # metalearn/protocol.py), and settings that change training only, not the test tasks
    locations: ClassVar[tuple[str, ...]] = ()
    training_only: ClassVar[tuple[str, ...]] = ()

    name: str = MISSING
    k_shot: int = 1  # support examples per class (per task for regression and multi-task data)
    k_query: int = 15  # query examples per class (per task for regression and multi-task data)

    def __post_init__(self) -> None:
        require(self.k_shot >= 1, f"data.k_shot={self.k_shot} is not allowed: it must be >= 1.")
        require(self.k_query >= 1, f"data.k_query={self.k_query} is not allowed: it must be >= 1.")
        # Support and query are drawn as arrays on the device: bound them before any allocation.
        for key in ("k_shot", "k_query"):
            at_most(f"data.{key}", getattr(self, key), MAX_EXAMPLES)


@dataclass
class EpisodicDataConfig(DataConfig):
    """N-way K-shot classification episodes: only these data have a number of classes per task."""

    training_only: ClassVar[tuple[str, ...]] = ("augment", "augment_padding")

    n_way: int = 5  # classes per task
    # augmentation of training episodes on the device (metalearn/data/augment.py): none | flip |
    # crop_flip | standard (RFS / MetaOptNet: crop with padding, colour jitter, flip)
    augment: str = "none"
    augment_padding: int | None = None  # the crop's padding; None: 8 from 64 pixels up, else 4

    def __post_init__(self) -> None:
        from metalearn.data.augment import check_recipe

        super().__post_init__()
        require(self.n_way >= 2, f"data.n_way={self.n_way} is not allowed: it must be >= 2.")
        check_recipe(self.augment)
        if self.augment_padding is not None:
            require(
                0 <= self.augment_padding <= 64,
                f"data.augment_padding={self.augment_padding} is not allowed: give the crop's "
                "padding in pixels, 0 to 64 (or null: 8 for images of 64 pixels and up, else 4).",
            )
