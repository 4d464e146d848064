"""N-way K-shot episodes drawn on the device from one array holding every image of a split."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metalearn.types import Split, Task


def sample_episode(
    key: jax.Array,
    images: jax.Array,
    *,
    n_way: int,
    k_shot: int,
    k_query: int,
    global_labels: bool = False,
    counts: jax.Array | None = None,
    class_groups: jax.Array | None = None,
    group_weights: jax.Array | None = None,
) -> Task:
    """One episode from images [classes, drawings, H, W] (grayscale) or [classes, drawings, H,
    W, C] (uint8; Omniglot's ink is 255).

    N classes without replacement, K + Q distinct drawings of each, support and query disjoint.
    Labels are the classes' positions in the random draw, which is a uniformly random order, so
    labels are permuted afresh in every task. With global_labels the labels are the class
    indices within the split instead (pre-training a classifier over all classes).

    counts (int32 [classes]), for classes with unequal numbers of examples: class c holds
    counts[c] real drawings and zero padding after them, and only the real ones are drawn
    (every class needs counts[c] >= K + Q, which the caller checks).

    class_groups (int32 [classes]) and group_weights (float [groups]), for episodes within one
    group (Omniglot's within-alphabet episodes): a group is drawn with probability proportional
    to its weight (0 for groups with fewer than N classes, which the caller sets), then N of its
    classes without replacement.
    """
    n_classes, n_drawings = images.shape[:2]
    k_classes, k_draws = jax.random.split(key)
    if class_groups is None:
        classes = jax.random.choice(k_classes, n_classes, (n_way,), replace=False)
    else:
        k_group, k_members = jax.random.split(k_classes)
        group = jax.random.choice(k_group, group_weights.shape[0], p=group_weights)
        scores = jax.random.uniform(k_members, (n_classes,))
        classes = jax.lax.top_k(-jnp.where(class_groups == group, scores, 2.0), n_way)[1]
    draw_keys = jax.random.split(k_draws, n_way)
    if counts is None:
        draws = jax.vmap(
            lambda k: jax.random.choice(k, n_drawings, (k_shot + k_query,), replace=False)
        )(draw_keys)
    else:
        draws = jax.vmap(lambda k, n: _distinct_below(k, n, n_drawings, k_shot + k_query))(
            draw_keys, jnp.asarray(counts)[classes]
        )
    picked = images[classes[:, None], draws]  # [N, K+Q, H, W(, C)]
    x = picked.astype(jnp.float32) / 255.0
    if x.ndim == 4:
        x = x[..., None]  # grayscale: [N, K+Q, H, W, 1]
    labels = classes if global_labels else jnp.arange(n_way)
    y = jnp.broadcast_to(labels[:, None], (n_way, k_shot + k_query)).astype(jnp.int32)

    def flat(a):
        return a.reshape((-1,) + a.shape[2:])

    return Task(
        support=Split(flat(x[:, :k_shot]), flat(y[:, :k_shot])),
        query=Split(flat(x[:, k_shot:]), flat(y[:, k_shot:])),
        task_id=jnp.zeros((), jnp.int32),
    )


def counted_episodes(n_way: int, k_shot: int, k_query: int):
    """sample(key, (images, counts), global_labels) for splits stored as padded images with
    per-class counts (data/tfds.py, data/imagenet_files.py)."""

    def sample(key, split_arrays, global_labels=False):
        images, counts = split_arrays
        return sample_episode(
            key,
            images,
            n_way=n_way,
            k_shot=k_shot,
            k_query=k_query,
            global_labels=global_labels,
            counts=counts,
        )

    return sample


def _distinct_below(key: jax.Array, n: jax.Array, size: int, k: int) -> jax.Array:
    """k distinct indices drawn uniformly from [0, n), in a uniformly random order (n >= k).

    Every index gets a uniform score and the padding [n, size) scores 2, above them all, so the
    k lowest scores are a uniform random subset of the real indices.
    """
    scores = jnp.where(jnp.arange(size) < n, jax.random.uniform(key, (size,)), 2.0)
    return jax.lax.top_k(-scores, k)[1]
