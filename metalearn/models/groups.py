"""Parameter groups: a label per parameter leaf, read from the parameters' own names.

Labels are "head" (the output layer on the features), "blocks.<i>" (the trunk's blocks in depth
order), "state" (running statistics named running_mean / running_var, metalearn/models/norm.py)
and "other". Selections ("all", "head", "blocks", "blocks.2") pick leaves by label, as
optax masks and big_vision's name masks do, so nothing outside a model reads its layout.

The default rule: a leaf whose dotted path starts with head|classifier|fc|logits|out|output is
the head; every other top-level name is one block (a top-level list or numbered container, such
as `blocks.0` or `layers.3`, gives one block per entry), in natural order (conv2 before conv10).
A model config's `head` / `blocks` regexes replace the rule: the head is every leaf whose path
matches `head`; a block is the text `blocks` matches at the start of a path.
"""

from __future__ import annotations

import re

import jax

from metalearn.checks import ConfigError
from metalearn.models.norm import is_state

HEAD = "head"
OTHER = "other"
STATE = "state"  # running statistics (metalearn/models/norm.py): never adapted nor trained
DEFAULT_HEAD = r"^(head|classifier|fc|logits|out|output)(\.|$)"


def path_name(path) -> str:
    """A tree path as a dotted name: ['blocks'][0]['w'] -> blocks.0.w."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def names(tree):
    """The same tree with each leaf replaced by its dotted path name."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path_name(path), tree)


def _natural(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def label_by_names(tree, head: str | None = None, blocks: str | None = None):
    """Group labels of a parameter tree from its leaves' names (the rule in the docstring)."""
    head_re = re.compile(head or DEFAULT_HEAD)
    block_re = re.compile(blocks) if blocks else None
    named = names(tree)
    flat = jax.tree.leaves(named)

    def block_key(name: str) -> str | None:
        if head_re.search(name) or is_state(name):
            return None
        if block_re is not None:
            match = block_re.match(name)
            return match.group(0) if match else None
        parts = name.split(".")
        if len(parts) > 2 and parts[1].isdigit():  # a list or numbered container of blocks
            return ".".join(parts[:2])
        return parts[0]

    keys = sorted({k for k in map(block_key, flat) if k is not None}, key=_natural)
    index = {k: i for i, k in enumerate(keys)}

    def label(name: str) -> str:
        if is_state(name):
            return STATE
        if head_re.search(name):
            return HEAD
        key = block_key(name)
        return OTHER if key is None else f"blocks.{index[key]}"

    return jax.tree.map(label, named)


def depth(labels) -> int:
    """The number of blocks among the labels."""
    return len({lab for lab in jax.tree.leaves(labels) if lab.startswith("blocks.")})


def block_index(label: str) -> int | None:
    return int(label.split(".")[1]) if label.startswith("blocks.") else None


def select(labels, selection, what: str = "algo.adapt"):
    """A boolean tree: True where a leaf's label is selected by `selection` (a list of "all",
    "head", "blocks", "blocks.<i>", "other"); an unknown or absent group is a ConfigError.
    "all" is every group but the running statistics ("state"), which only the train step's
    own update moves."""
    present = set(jax.tree.leaves(labels))
    if "all" in selection:
        return jax.tree.map(lambda lab: lab != STATE, labels)
    known = present | {"blocks"} if any(p.startswith("blocks.") for p in present) else present
    unknown = sorted(set(selection) - known)
    if unknown:
        raise ConfigError(
            f"{what}={list(selection)} names {unknown}, which this model does not have; use "
            f"'all' or any of {sorted(known, key=_natural)}. (Groups come from the parameters' "
            "names: set model.head / model.blocks to regexes if the default rule does not fit "
            "the model.)"
        )
    return jax.tree.map(
        lambda lab: lab in selection or ("blocks" in selection and lab.startswith("blocks.")),
        labels,
    )


def partition(tree, mask):
    """(selected, rest): the same tree twice, with None where a leaf belongs to the other."""
    selected = jax.tree.map(lambda p, m: p if m else None, tree, mask)
    rest = jax.tree.map(lambda p, m: None if m else p, tree, mask)
    return selected, rest


def combine(selected, rest):
    return jax.tree.map(
        lambda a, b: b if a is None else a, selected, rest, is_leaf=lambda x: x is None
    )


def prune(tree):
    """tree without its None placeholders and the containers left empty (a selection alone)."""
    if isinstance(tree, dict):
        kept = {k: prune(v) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None} or None
    if isinstance(tree, (list, tuple)):
        kept = [prune(v) for v in tree]
        return type(tree)(v for v in kept if v is not None) or None
    return tree
