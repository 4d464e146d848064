"""Data augmentation of few-shot episodes on the device: pure, jittable, vmappable JAX functions.

The recipes, named by the config option `data.augment` (RECIPES):

- "none": the identity: episodes are used as sampled.
- "flip": a horizontal flip with probability 0.5.
- "crop_flip": a random crop of the image zero-padded by `padding` pixels on every side, back to
  its own size (torchvision's RandomCrop(size, padding=p): each of the (2p + 1)^2 offsets is
  equally likely), then the flip.
- "standard": the crop, colour jitter, then the flip: the training pipeline of RFS (Tian et al.
  2020, github.com/WangYueFt/rfs, dataset/transform_cfg.py) and MetaOptNet (Lee et al. 2019,
  github.com/kjunelee/MetaOptNet, data/mini_imagenet.py): RandomCrop(84, padding=8) for
  miniImageNet and RandomCrop(32, padding=4) for CIFAR-FS / FC100, then
  ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4), then RandomHorizontalFlip().

The colour jitter is torchvision's: brightness, contrast and saturation factors drawn uniformly
from [max(0, 1 - 0.4), 1 + 0.4], the three adjustments applied in a random order per image, each
clipped to [0, 1] as torchvision clips after every adjustment. Brightness scales the image;
contrast blends it with the mean of its grayscale; saturation blends it with its grayscale,
gray = 0.299 R + 0.587 G + 0.114 B (PIL's luma, which RFS and MetaOptNet jitter with; the
tensor path of torchvision rounds the red weight to 0.2989). A one-channel image is its own
grayscale, so it gets brightness and contrast only. (RFS and MetaOptNet jitter 8-bit PIL
images, which rounds between the adjustments; these work on floats and do not.)

Images are float [N, H, W, C] in [0, 1] with C = 1 or 3. Every image gets its own randomness
(the key is split per image), and outputs keep the input's shape and dtype. `recipe` and
`padding` are static Python values (close over them, or mark them static, under jax.jit).

The augmentation runs inside the jitted train step, on training episodes only: augment_task on
each sampled task, its support and query sets with independent keys. It never runs at
evaluation, where episodes are used as sampled. default_padding(image_size) is the recipes'
per-dataset padding (8 for 84-pixel miniImageNet, 4 for 32-pixel CIFAR-FS).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metalearn.checks import choice, require
from metalearn.types import Task

RECIPES = ("none", "flip", "crop_flip", "standard")
JITTER = 0.4  # ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)
LUMA = (0.299, 0.587, 0.114)  # grayscale weights of R, G, B
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2  # indices into factors; the values of an order


def check_recipe(name: str) -> None:
    """data.augment: ConfigError naming the value and the allowed recipes unless it is one."""
    choice("data.augment", name, RECIPES)


def default_padding(image_size: int) -> int:
    """The crop's padding RFS and MetaOptNet use: 8 pixels for 84-pixel miniImageNet images
    (any of 64 pixels or more), 4 for 32-pixel CIFAR-FS / FC100 images (anything smaller)."""
    return 8 if image_size >= 64 else 4


class Draws(NamedTuple):
    """One image's random parameters (drawn by draw): the crop's (top, left) offset into the
    padded image, whether it is mirrored, and the colour jitter's factors and order."""

    offset: jax.Array  # int32 [2], each uniform in [0, 2 * padding]
    flipped: jax.Array  # bool, true with probability 0.5
    factors: jax.Array  # [3] brightness, contrast, saturation, uniform in [1 - JITTER, 1 + JITTER]
    order: jax.Array  # int32 [3], a uniformly random permutation of (0, 1, 2)


def draw(key: jax.Array, padding: int, strength: float = JITTER) -> Draws:
    """One image's Draws from its key: every parameter from a single uniform draw (one random
    number call per image keeps the compiled step small). The order is the argsort of three
    uniforms, which is a uniformly random permutation, as torchvision's randperm."""
    u = jax.random.uniform(key, (9,))
    span = 2 * padding + 1
    offset = jnp.minimum(jnp.floor(u[:2] * span), span - 1).astype(jnp.int32)
    low = max(0.0, 1.0 - strength)
    factors = low + (1.0 + strength - low) * u[3:6]
    return Draws(offset, u[2] < 0.5, factors, jnp.argsort(u[6:]).astype(jnp.int32))


def crop(image: jax.Array, offset: jax.Array, padding: int) -> jax.Array:
    """The window of one image [H, W, C] zero-padded by `padding` pixels on every side, of the
    image's own size, whose top-left corner is at `offset` (top, left) in the padded image."""
    if padding == 0:
        return image
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    return jax.lax.dynamic_slice(padded, (offset[0], offset[1], 0), image.shape)


def _grayscale(image: jax.Array) -> jax.Array:
    """The luma [H, W, 1] of one image [H, W, C]; a one-channel image is its own grayscale."""
    if image.shape[-1] == 1:
        return image
    return jnp.tensordot(image, jnp.asarray(LUMA, image.dtype), axes=([-1], [0]))[..., None]


def color_jitter(image: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
    """Colour jitter of one image [H, W, C] with given factors and order (torchvision's).

    factors: [3] brightness, contrast and saturation factors (1 leaves the image unchanged).
    order: [3] int, a permutation of (BRIGHTNESS, CONTRAST, SATURATION): the adjustments in the
        order they are applied.
    Each adjustment is torchvision's blend, clip(f * image + (1 - f) * other, 0, 1), with other
    = 0 (brightness), the mean of the image's grayscale (contrast) or its grayscale
    (saturation; the identity on one-channel images).
    """
    _check_channels(image)
    factors = jnp.asarray(factors, image.dtype)
    if image.shape[-1] == 1:
        factors = factors.at[SATURATION].set(1)  # exactly the identity: 1 * x + 0 * gray
    for step in range(3):
        op = order[step]
        gray = _grayscale(image)
        other = jnp.where(op == BRIGHTNESS, 0, jnp.where(op == CONTRAST, jnp.mean(gray), gray))
        image = jnp.clip(factors[op] * image + (1 - factors[op]) * other, 0, 1)
    return image


def augment_image(key: jax.Array, image: jax.Array, recipe: str, padding: int) -> jax.Array:
    """One image [H, W, C] augmented by `recipe` with parameters draw(key, padding): crop,
    colour jitter, flip, in RFS's order, each step only where the recipe has it."""
    d = draw(key, padding)
    if recipe in ("crop_flip", "standard"):
        image = crop(image, d.offset, padding)
    if recipe == "standard":
        image = color_jitter(image, d.factors, d.order)
    if recipe != "none":
        image = jnp.where(d.flipped, image[:, ::-1], image)
    return image


def augment_images(key: jax.Array, x: jax.Array, recipe: str, padding: int) -> jax.Array:
    """Images x [N, H, W, C] augmented by `recipe` (RECIPES), each with its own key; the
    crop pads by `padding` pixels (default_padding). "none" returns x itself."""
    check_recipe(recipe)
    require(
        type(padding) is int and padding >= 0,
        f"augmentation padding={padding!r} must be a non-negative integer number of pixels.",
    )
    if recipe == "none":
        return x
    if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"augment_images takes float images [N, H, W, C] in [0, 1]; got {x.dtype} {x.shape}."
        )
    if recipe == "standard":
        _check_channels(x)
    return _augment_images(key, x, recipe, padding)


@functools.partial(jax.jit, static_argnames=("recipe", "padding"))
def _augment_images(key: jax.Array, x: jax.Array, recipe: str, padding: int) -> jax.Array:
    # jitted so that eager calls compile once instead of dispatching every op of the vmap;
    # inside a jitted train step it is inlined like any other function.
    keys = jax.random.split(key, x.shape[0])
    out = jax.vmap(lambda k, image: augment_image(k, image, recipe, padding))(keys, x)
    return out.astype(x.dtype)


def augment_task(key: jax.Array, task: Task, recipe: str, padding: int) -> Task:
    """One task with its support and query images augmented (augment_images) with independent
    keys; labels and task_id unchanged. The task itself for "none" and for non-image inputs
    (x [n, d] regression vectors). For a batch of tasks, vmap it over the task axis."""
    check_recipe(recipe)
    if recipe == "none" or task.support.x.ndim < 4:
        return task
    if task.support.x.ndim > 4:
        raise ValueError(
            f"augment_task takes one task, images [n, H, W, C]; got support.x of shape "
            f"{task.support.x.shape}. For a batch of tasks, jax.vmap it over the task axis."
        )
    k_support, k_query = jax.random.split(key)
    return task._replace(
        support=task.support._replace(x=augment_images(k_support, task.support.x, recipe, padding)),
        query=task.query._replace(x=augment_images(k_query, task.query.x, recipe, padding)),
    )


def _check_channels(x: jax.Array) -> None:
    if x.shape[-1] not in (1, 3):
        raise ValueError(
            f"colour jitter takes grayscale or RGB images (1 or 3 channels); got shape {x.shape}."
        )


def augmenting(sample, recipe: str, padding: int):
    """A task sampler whose tasks are augmented: the same episodes as `sample` draws from the
    same key (the augmentation's randomness is a stream folded from it)."""
    if recipe == "none":
        return sample

    def augmented(key, split_arrays, global_labels=False):
        task = sample(key, split_arrays, global_labels)
        return augment_task(jax.random.fold_in(key, AUGMENT_STREAM), task, recipe, padding)

    return augmented


AUGMENT_STREAM = 0x61756764  # folded into an episode's key for its augmentation
