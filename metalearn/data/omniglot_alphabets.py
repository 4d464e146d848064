"""Multi-task Omniglot: each alphabet is one classification task over its own characters.

Task t's labels are the character's index within its alphabet, 0..C_t-1. The 20 drawings of
every character are split into train/val/test drawings (a seeded permutation per character),
so every split holds every character and no drawing is in two splits. Each split is one device
array [T, C_max, D_split, S, S], the alphabets padded to the largest one, plus the count C_t of
each: drawing a batch of task t inside jit is then pure array indexing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metalearn import registry
from metalearn.checks import ConfigError, check_seed, require
from metalearn.data import SPLITS, TaskSource
from metalearn.data.base import DataConfig
from metalearn.data.omniglot import DRAWINGS, OmniglotArrays, load_omniglot
from metalearn.types import Split, Task


@dataclass
class OmniglotAlphabetsConfig(DataConfig):
    """Multi-task Omniglot: each alphabet is one task over its own characters (labels 0..C_t-1).

    k_shot and k_query count examples per task, not per class: a task's support and query are
    disjoint batches of (character, drawing) pairs of its alphabet from the split's drawings.
    n_way is not used. Train/val/test split the 20 drawings of every character.
    """

    multitask: ClassVar[bool] = True

    name: str = "omniglot_alphabets"
    k_shot: int = 10  # support examples per task
    k_query: int = 10  # query examples per task (disjoint from the support)
    # Alphabet names or indices (0-29 background, 30-49 evaluation, sorted); empty: the 30
    # background alphabets. exclude_alphabets then drops some (e.g. one held out for transfer).
    alphabets: list[str] = field(default_factory=list)
    exclude_alphabets: list[str] = field(default_factory=list)
    drawings: tuple[int, int, int] = (14, 2, 4)  # train/val/test drawings of each character
    split_seed: int = 0  # which drawings of a character go to which split
    locations: ClassVar[tuple[str, ...]] = ("root", "download")

    root: str | None = None  # folder with images_background.zip and images_evaluation.zip
    image_size: int = 28
    download: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seed("data.split_seed", self.split_seed)
        drawings = tuple(self.drawings)
        require(
            len(drawings) == 3 and min(drawings) >= 1 and sum(drawings) == 20,
            f"data.drawings={list(drawings)} is not allowed: give three train/val/test counts, "
            "each >= 1 (every split holds every character), that add up to the 20 drawings of "
            "an Omniglot character, e.g. [14, 2, 4].",
        )
        require(
            8 <= self.image_size <= 105, f"data.image_size={self.image_size} must be in [8, 105]."
        )


class AlphabetArrays(NamedTuple):
    """One split of T alphabets; characters c >= n_characters[t] of task t are zero padding."""

    images: jax.Array  # uint8 [T, C_max, D_split, S, S], ink 255
    n_characters: jax.Array  # int32 [T]: C_t


def select_alphabets(
    data: OmniglotArrays, include: Sequence[str | int], exclude: Sequence[str | int]
) -> list[int]:
    """Indices into data.alphabets: `include` (names or indices; empty: every background
    alphabet) minus `exclude`, in the order given (background order by default)."""
    include_ids = _resolve(data, include, "data.alphabets")
    exclude_ids = _resolve(data, exclude, "data.exclude_alphabets")
    if not include_ids:
        include_ids = [int(a) for a in np.unique(data.alphabet[data.background])]
    missing = [data.alphabets[a] for a in exclude_ids if a not in include_ids]
    if missing:
        raise ConfigError(
            f"data.exclude_alphabets names {missing}, which are not among the selected "
            "alphabets (data.alphabets, or the 30 background alphabets when it is empty); "
            "exclude only alphabets that would otherwise be tasks."
        )
    chosen = [a for a in include_ids if a not in exclude_ids]
    if not chosen:
        raise ConfigError(
            "data.exclude_alphabets removes every selected alphabet, which leaves no task; "
            "keep at least one alphabet."
        )
    return chosen


def _resolve(data: OmniglotArrays, entries: Sequence[str | int], option: str) -> list[int]:
    ids = []
    for entry in entries:
        text = str(entry).strip()
        if text in data.alphabets:
            ids.append(data.alphabets.index(text))
        elif text.isdigit() and int(text) < len(data.alphabets):
            ids.append(int(text))
        else:
            known = ", ".join(f"{i} {name}" for i, name in enumerate(data.alphabets))
            raise ConfigError(
                f"{option} has {entry!r}, which is not an Omniglot alphabet: give names or "
                f"indices from this list (0-29 are the background set): {known}."
            )
    repeated = sorted({data.alphabets[a] for a in ids if ids.count(a) > 1})
    if repeated:
        raise ConfigError(f"{option} lists {repeated} more than once; list each alphabet once.")
    return ids


def split_drawings(n_characters: int, drawings: Sequence[int], seed: int) -> dict[str, np.ndarray]:
    """{"train", "val", "test"} -> int [n_characters, drawings[i]]: each character's drawing
    indices in that split, from a seeded permutation of its 20 drawings.

    The permutations are drawn for every character of the dataset, so a character's split does
    not depend on which alphabets a run selects."""
    order = np.argsort(np.random.default_rng(seed).random((n_characters, DRAWINGS)), axis=1)
    cuts = np.cumsum(drawings)[:2]
    return dict(zip(SPLITS, np.split(order, cuts, axis=1), strict=True))


def alphabet_arrays(
    data: OmniglotArrays, alphabets: Sequence[int], drawing_ids: np.ndarray
) -> AlphabetArrays:
    """One split as numpy arrays: drawing_ids [n_characters, D_split] from split_drawings."""
    rows = [np.flatnonzero(data.alphabet == a) for a in alphabets]  # characters in name order
    counts = np.array([len(r) for r in rows], np.int32)
    size = data.images.shape[-1]
    images = np.zeros((len(rows), counts.max(), drawing_ids.shape[1], size, size), np.uint8)
    for t, r in enumerate(rows):
        images[t, : len(r)] = data.images[r[:, None], drawing_ids[r]]
    return AlphabetArrays(images, counts)


def sample_alphabet_task(
    key: jax.Array, arrays: AlphabetArrays, task_id: jax.Array, *, k_shot: int, k_query: int
) -> Task:
    """Disjoint support (k_shot) and query (k_query) examples of alphabet `task_id`.

    The K+Q (character, drawing) slots are drawn uniformly without replacement among the task's
    valid slots: the top K+Q of uniform scores, with the padding slots scored below every valid
    one. Needs K+Q <= C_t * D_split (checked when the source is built).
    """
    _, c_max, n_draw = arrays.images.shape[:3]
    task_id = jnp.asarray(task_id, jnp.int32)
    slots = jnp.arange(c_max * n_draw)
    valid = slots // n_draw < arrays.n_characters[task_id]
    scores = jnp.where(valid, jax.random.uniform(key, slots.shape), -1.0)
    _, picked = jax.lax.top_k(scores, k_shot + k_query)
    chars, draws = picked // n_draw, picked % n_draw
    x = (arrays.images[task_id, chars, draws].astype(jnp.float32) / 255.0)[..., None]
    y = chars.astype(jnp.int32)
    return Task(
        support=Split(x[:k_shot], y[:k_shot]),
        query=Split(x[k_shot:], y[k_shot:]),
        task_id=task_id,
    )


def make_source(cfg: OmniglotAlphabetsConfig) -> TaskSource:
    data = load_omniglot(cfg.root, image_size=cfg.image_size, download=cfg.download)
    alphabets = select_alphabets(data, cfg.alphabets, cfg.exclude_alphabets)
    drawing_ids = split_drawings(len(data.characters), tuple(cfg.drawings), cfg.split_seed)
    splits = {name: alphabet_arrays(data, alphabets, drawing_ids[name]) for name in SPLITS}
    names = tuple(data.alphabets[a] for a in alphabets)
    counts = tuple(int(c) for c in splits["train"].n_characters)
    _check_batch_fits(cfg, names, counts)

    def sample_task(key, arrays, task_id):
        return sample_alphabet_task(key, arrays, task_id, k_shot=cfg.k_shot, k_query=cfg.k_query)

    def sample(key, arrays, global_labels=False):
        # Labels are always within the alphabet; global_labels has no other meaning here.
        k_task, k_batch = jax.random.split(key)
        return sample_task(k_batch, arrays, jax.random.randint(k_task, (), 0, len(names)))

    return TaskSource(
        kind="classification",
        n_out=max(counts),
        n_train_classes=max(counts),
        input_shape=(cfg.image_size, cfg.image_size, 1),
        splits={name: jax.tree.map(jnp.asarray, arrays) for name, arrays in splits.items()},
        sample=sample,
        n_tasks=len(names),
        task_names=names,
        classes_per_task=counts,
        sample_task=sample_task,
    )


def _check_batch_fits(cfg: OmniglotAlphabetsConfig, names: tuple[str, ...], counts) -> None:
    need = cfg.k_shot + cfg.k_query
    smallest = int(np.argmin(counts))
    for split, n_draw in zip(SPLITS, cfg.drawings, strict=True):
        have = counts[smallest] * n_draw
        if need > have:
            raise ConfigError(
                f"data.k_shot + data.k_query = {need} examples per task is more than the "
                f"{split} split of alphabet {names[smallest]} holds ({counts[smallest]} "
                f"characters x {n_draw} drawings = {have}); support and query are disjoint, so "
                f"lower data.k_shot / data.k_query or give {split} more drawings with "
                f"data.drawings={list(cfg.drawings)}."
            )


registry.register("data", "omniglot_alphabets", OmniglotAlphabetsConfig, make_source)
