"""Episode augmentation (metalearn/data/augment.py) against independent numpy references."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.checks import ConfigError
from metalearn.data import augment
from metalearn.types import Split, Task

KEY = jax.random.PRNGKey(0)
RNG = np.random.default_rng(0)
DRAWS = jax.jit(jax.vmap(augment.draw, (0, None)), static_argnums=1)  # keys [n] -> Draws [n]
JITTER = jax.jit(augment.color_jitter)


def images(n, h=8, w=8, c=3, low=0.1):
    """Random images with no zero pixels, so padding and every window are distinguishable."""
    return RNG.uniform(low, 1.0, (n, h, w, c)).astype(np.float32)


def image_task(n_support=5, n_query=7, h=8, c=3, same=False):
    xs = images(n_support, h, h, c)
    xq = xs.copy() if same else images(n_query, h, h, c)
    return Task(
        support=Split(jnp.asarray(xs), jnp.arange(len(xs), dtype=jnp.int32)),
        query=Split(jnp.asarray(xq), jnp.arange(len(xq), dtype=jnp.int32) % 3),
        task_id=jnp.asarray(4, jnp.int32),
    )


# --- numpy references of torchvision's ColorJitter formulas (PIL luma weights) ---------------


def np_gray(x):
    if x.shape[-1] == 1:
        return x
    return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]


def np_jitter(x, factors, order):
    x = x.astype(np.float64)
    b, c, s = factors
    for op in order:
        if op == 0:
            x = np.clip(b * x, 0, 1)
        elif op == 1:
            x = np.clip(c * x + (1 - c) * np_gray(x).mean(), 0, 1)
        elif x.shape[-1] == 3:
            x = np.clip(s * x + (1 - s) * np_gray(x), 0, 1)
    return x


# --- flip ---------------------------------------------------------------------------------------


def test_flip_mirrors_each_image_or_leaves_it_and_flips_about_half():
    x = images(2000, 4, 4, 1)
    out = np.asarray(augment.augment_images(KEY, jnp.asarray(x), "flip", 0))
    same = np.all(out == x, axis=(1, 2, 3))
    flipped = np.all(out == x[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same ^ flipped)  # random images: never both
    assert 0.45 < flipped.mean() < 0.55


# --- crop ---------------------------------------------------------------------------------------


def window_offsets(out, x, p, allow_flip=False):
    """For each output image, the (top, left) of the window of the zero-padded input it equals
    (exactly), searching all (2p + 1)^2 offsets; fails if none or several match."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    found = []
    for i in range(n):
        hits = []
        for top, left in itertools.product(range(2 * p + 1), repeat=2):
            window = padded[i, top : top + h, left : left + w]
            if np.array_equal(out[i], window) or (
                allow_flip and np.array_equal(out[i], window[:, ::-1])
            ):
                hits.append((top, left))
        assert len(hits) == 1, (i, hits)
        found.append(hits[0])
    return found


def test_crop_flip_is_a_window_of_the_zero_padded_image_at_spread_offsets():
    p, x = 2, images(500, 8, 8, 3)
    out = np.asarray(augment.augment_images(KEY, jnp.asarray(x), "crop_flip", p))
    assert out.shape == x.shape and out.dtype == np.float32
    offsets = window_offsets(out, x, p, allow_flip=True)
    assert set(offsets) == set(itertools.product(range(2 * p + 1), repeat=2))  # all 25 occur
    assert offsets.count((p, p)) < 0.1 * len(x)  # not always centred (1/25 expected)


def test_crop_returns_the_window_at_its_offset():
    x, p = images(1, 6, 5, 1)[0], 3
    padded = np.pad(x, ((p, p), (p, p), (0, 0)))
    for top, left in [(0, 0), (6, 6), (2, 5), (3, 3)]:
        got = augment.crop(jnp.asarray(x), jnp.array([top, left]), p)
        np.testing.assert_array_equal(got, padded[top : top + 6, left : left + 5])
    np.testing.assert_array_equal(augment.crop(jnp.asarray(x), jnp.array([0, 0]), 0), x)


# --- colour jitter ------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_matches_torchvision_formulas_in_every_order(channels):
    x = images(1, 6, 5, channels, low=0.0)[0]
    for factors in ([1.3, 0.7, 1.2], [0.6, 1.4, 0.8], [1.4, 1.4, 1.4]):
        for order in itertools.permutations(range(3)):
            got = np.asarray(JITTER(jnp.asarray(x), jnp.asarray(factors), jnp.asarray(order)))
            want = np_jitter(x, factors, order)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(order))
            assert got.min() >= 0 and got.max() <= 1 and got.shape == x.shape


def test_color_jitter_clips_to_the_unit_interval():
    x = jnp.asarray(images(1, 6, 5, 3, low=0.0)[0])
    bright = JITTER(x, jnp.array([1.4, 1.4, 1.4]), jnp.array([0, 1, 2]))
    assert float(bright.max()) == 1.0 and float(bright.min()) >= 0.0
    assert float(jnp.mean(bright == 1.0)) > 0.1  # many pixels saturate, none exceed 1


def test_draws_follow_torchvision_ranges_and_reach_every_order_and_offset():
    p, keys = 3, jax.random.split(KEY, 1000)
    d = jax.tree.map(np.asarray, DRAWS(keys, p))
    assert d.offset.min() == 0 and d.offset.max() == 2 * p
    assert all(len(np.unique(d.offset[:, i])) == 2 * p + 1 for i in range(2))
    assert 0.45 < d.flipped.mean() < 0.55
    assert d.factors.min() >= 0.6 and d.factors.max() <= 1.4
    assert d.factors.min() < 0.61 and d.factors.max() > 1.39
    assert 0.45 < np.mean(d.factors > 1.0) < 0.55
    assert np.all(np.sort(d.order, axis=1) == np.arange(3))
    counts = {o: 0 for o in itertools.permutations(range(3))}
    for o in d.order:
        counts[tuple(o)] += 1
    assert min(counts.values()) > 120  # each of the 6 orders about 1000 / 6 times


def test_standard_equals_a_numpy_crop_jitter_flip_with_the_drawn_parameters():
    p, x = 2, images(12, 8, 8, 3, low=0.0)
    out = np.asarray(augment.augment_images(KEY, jnp.asarray(x), "standard", p))
    keys = jax.random.split(KEY, len(x))  # augment_images splits its key per image
    draws = jax.tree.map(np.asarray, DRAWS(keys, p))
    for i in range(len(x)):
        d = augment.Draws(*(a[i] for a in draws))
        (top, left) = d.offset
        want = np.pad(x[i], ((p, p), (p, p), (0, 0)))[top : top + 8, left : left + 8]
        want = np_jitter(want, d.factors, d.order)
        if d.flipped:
            want = want[:, ::-1]
        np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-6)


def test_standard_on_a_gray_constant_image_only_scales_its_brightness():
    # Contrast and saturation leave a constant gray image unchanged, so the output is the
    # brightness factor times 0.5 (the crop's zero padding is excluded by using padding 0).
    x = jnp.full((400, 4, 4, 3), 0.5, jnp.float32)
    out = np.asarray(augment.augment_images(KEY, x, "standard", 0))
    ratio = out[:, 0, 0, 0] / 0.5
    want = np.broadcast_to(ratio[:, None, None, None] * 0.5, out.shape)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert 0.6 <= ratio.min() < 0.65 and 1.35 < ratio.max() <= 1.4


def test_standard_keeps_shape_dtype_and_range():
    for c in (1, 3):
        x = jnp.asarray(images(10, 32, 32, c, low=0.0))
        out = augment.augment_images(KEY, x, "standard", augment.default_padding(32))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        assert not np.array_equal(out, x)


# --- recipes, tasks, keys, jit and vmap ---------------------------------------------------------


def test_none_returns_the_inputs_themselves():
    x = jnp.asarray(images(3))
    assert augment.augment_images(KEY, x, "none", 4) is x
    task = image_task()
    assert augment.augment_task(KEY, task, "none", 4) is task


def test_non_image_tasks_are_left_alone():
    support, query = Split(jnp.ones((5, 1)), jnp.ones((5, 1))), Split(jnp.ones((9, 1)), jnp.ones(9))
    task = Task(support, query, jnp.asarray(0, jnp.int32))
    assert augment.augment_task(KEY, task, "standard", 4) is task


def test_augment_task_keeps_labels_and_uses_independent_keys_for_support_and_query():
    task = image_task(same=True)  # query images are the support images
    out = augment.augment_task(KEY, task, "standard", 2)
    assert out.support.y is task.support.y and out.query.y is task.query.y
    assert out.task_id is task.task_id
    assert out.support.x.shape == task.support.x.shape
    assert not np.array_equal(out.support.x, out.query.x)  # different randomness
    again = augment.augment_task(KEY, task, "standard", 2)
    np.testing.assert_array_equal(again.support.x, out.support.x)  # same key, same output
    np.testing.assert_array_equal(again.query.x, out.query.x)
    other = augment.augment_task(jax.random.PRNGKey(1), task, "standard", 2)
    assert not np.array_equal(other.support.x, out.support.x)


def test_jit_and_vmap_over_a_batch_of_tasks_equal_the_unbatched_calls():
    tasks = [image_task() for _ in range(3)]
    batch = jax.tree.map(lambda *a: jnp.stack(a), *tasks)
    keys = jax.random.split(KEY, 3)
    batched = jax.jit(jax.vmap(lambda k, t: augment.augment_task(k, t, "standard", 2)))(keys, batch)
    for i, task in enumerate(tasks):
        one = augment.augment_task(keys[i], task, "standard", 2)
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
            np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="vmap"):
        augment.augment_task(KEY, batch, "standard", 2)


def test_check_recipe_names_the_bad_value_and_the_allowed_ones():
    for recipe in augment.RECIPES:
        augment.check_recipe(recipe)
    with pytest.raises(ConfigError) as err:
        augment.check_recipe("bogus")
    message = str(err.value)
    assert "bogus" in message and "data.augment" in message
    assert all(repr(r) in message for r in augment.RECIPES)
    with pytest.raises(ConfigError, match="bogus"):
        augment.augment_images(KEY, jnp.zeros((1, 4, 4, 1)), "bogus", 4)
    with pytest.raises(ConfigError, match="padding"):
        augment.augment_images(KEY, jnp.zeros((1, 4, 4, 1)), "crop_flip", -1)


def test_default_padding_is_rfs_per_image_size():
    assert augment.default_padding(84) == 8 and augment.default_padding(64) == 8
    assert augment.default_padding(32) == 4 and augment.default_padding(28) == 4
