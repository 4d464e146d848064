"""Train a small MLP on a random N-class subset of Omniglot: the inner problems of learned
optimizers standing in for Andrychowicz et al. 2016's MNIST network (section 3.2: one hidden
layer of 20 sigmoid units, minibatches of 128). A task is n_way characters drawn from one split
of the characters, the same meta-train / meta-val / meta-test split data=omniglot makes
(omniglot.py's load_omniglot and split_classes), so held-out problems classify characters the
optimizer never trained on. The inner loss is the MLP's cross-entropy on a minibatch of the
task's n_way x 20 drawings, drawn afresh at each inner step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from metalearn import registry
from metalearn.checks import MAX_DEPTH, check_seed, choice, require
from metalearn.checks import width as check_width
from metalearn.data import omniglot
from metalearn.data.base import SPLITS, TaskSource
from metalearn.data.omniglot import DRAWINGS, check_way
from metalearn.data.problems import InnerProblem, ProblemDataConfig
from metalearn.types import Split, Task

ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu, "tanh": jnp.tanh}


@dataclass
class MLPTasksConfig(ProblemDataConfig):
    kind: ClassVar[str] = "classification"
    inputs: ClassVar[str] = "images"
    size_settings: ClassVar[tuple[str, ...]] = ("n_way", "batch", "image_size")
    locations: ClassVar[tuple[str, ...]] = ("root", "download")

    name: str = "mlp_tasks"
    root: str | None = None  # folder with Omniglot's images_background.zip, images_evaluation.zip
    download: bool = True
    split: str = "random"  # data=omniglot's character splits: random | alphabet
    split_seed: int = 0
    split_sizes: tuple[int, int, int] = (1100, 100, 423)
    val_alphabets: int = 5
    image_size: int = 28  # the MLP reads image_size^2 pixels
    n_way: int = 10  # classes per task (MNIST's 10)
    batch: int = 128  # examples per inner step's minibatch, of the task's n_way x 20
    hidden: int = 20  # units per hidden layer
    layers: int = 1  # hidden layers
    activation: str = "sigmoid"  # sigmoid | relu | tanh

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seed("data.split_seed", self.split_seed)
        choice("data.split", self.split, ("random", "alphabet"))
        choice("data.activation", self.activation, tuple(ACTIVATIONS))
        require(
            8 <= self.image_size <= 105, f"data.image_size={self.image_size} must be in [8, 105]."
        )
        require(self.n_way >= 2, f"data.n_way={self.n_way} is not allowed: it must be >= 2.")
        require(
            1 <= self.batch <= self.n_way * DRAWINGS,
            f"data.batch={self.batch} is not allowed: a minibatch holds 1 to "
            f"data.n_way x {DRAWINGS} = {self.n_way * DRAWINGS} of the task's drawings.",
        )
        check_width("data.hidden", self.hidden)
        require(
            0 <= self.layers <= MAX_DEPTH, f"data.layers={self.layers} must be 0 to {MAX_DEPTH}."
        )

    def problem(self) -> InnerProblem:
        dims = [self.image_size**2] + [self.hidden] * self.layers + [self.n_way]
        act, n, batch = ACTIVATIONS[self.activation], self.n_way * DRAWINGS, self.batch

        def init(key):
            keys = jax.random.split(key, len(dims) - 1)
            return {
                f"layer{i}": {
                    "w": jax.random.normal(k, (a, b)) / jnp.sqrt(a),  # LeCun normal
                    "b": jnp.zeros(b),
                }
                for i, (k, a, b) in enumerate(zip(keys, dims[:-1], dims[1:]))
            }

        def apply(params, x):
            h = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
            for i in range(len(dims) - 1):
                layer = params[f"layer{i}"]
                h = h @ layer["w"] + layer["b"]
                if i < len(dims) - 2:
                    h = act(h)
            return h

        def loss(params, split):
            logits = apply(params, split.x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, split.y).mean()

        def minibatch(split, key):
            take = jax.random.permutation(key, n)[:batch]  # without replacement
            return Split(split.x[take], split.y[take])

        return InnerProblem(init, apply, loss, minibatch)


def sample_problem(key: jax.Array, images: jax.Array, n_way: int) -> Task:
    """n_way distinct characters of `images` [C, 20, S, S] with all their drawings, labelled
    0..n_way-1; support and query are the same (the inner problem's training set)."""
    classes = jax.random.choice(key, images.shape[0], (n_way,), replace=False)
    x = images[classes].reshape(n_way * DRAWINGS, *images.shape[2:])
    y = jnp.repeat(jnp.arange(n_way, dtype=jnp.int32), DRAWINGS)
    split = Split(x, y)
    return Task(support=split, query=split, task_id=jnp.zeros((), jnp.int32))


def make_source(cfg: MLPTasksConfig) -> TaskSource:
    # through the module: tests replace omniglot.load_omniglot by synthetic data
    data = omniglot.load_omniglot(cfg.root, image_size=cfg.image_size, download=cfg.download)
    classes = omniglot.split_classes(
        data,
        split=cfg.split,
        seed=cfg.split_seed,
        sizes=tuple(cfg.split_sizes),
        val_alphabets=cfg.val_alphabets,
    )
    for name in SPLITS:
        check_way(cfg.n_way, len(classes[name]), name, cfg, "data.n_way")
    return TaskSource(
        kind="classification",
        n_out=cfg.n_way,
        n_train_classes=len(classes["train"]),
        input_shape=(cfg.image_size, cfg.image_size, 1),
        splits={name: jnp.asarray(data.images[classes[name]]) for name in SPLITS},
        sample=lambda key, images, global_labels=False: sample_problem(key, images, cfg.n_way),
    )


registry.register("data", "mlp_tasks", MLPTasksConfig, make_source)
