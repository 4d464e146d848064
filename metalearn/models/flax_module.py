"""model=flax: any Flax module, NNX (flax.nnx.Module) or Linen (flax.linen.Module), found by
its import path, as a metalearn model.

    metalearn train algo=maml data=omniglot model=flax model.module=mypkg.nets:ResNet \\
        model.kwargs='{width: 64}'

The class is built as `Module(**model.kwargs, <model.out_kwarg>=n_out)` (NNX modules also get
`rngs=nnx.Rngs(key)`), and its parameters become a plain nested dict: NNX's `nnx.Param` state as
a pure dict (nnx.split / nnx.to_pure_dict; `nnx.merge` rebuilds the module for every call), or
Linen's `variables["params"]`. Other variables (batch-norm running statistics, RNG counters) are
constants of the model: they are never trained, saved or updated.

What the module provides:
- the number of outputs as the constructor argument named model.out_kwarg (num_classes);
- an `embed(x)` method returning features [B, D], for the algorithms that read features
  (protonet, amortized, blackbox, r2d2) and for task conditioning (additive, film, multihead,
  mmoe); MAML and its variants, Reptile and fine-tuning only call the module;
- names that the group rule of metalearn/models/groups.py reads: a head submodule called
  head (or classifier, fc, logits, out, output) and one top-level submodule (or list entry) per
  block. model.head / model.blocks (regexes) replace the rule. The head submodule is called on
  features by `head`, and the block submodules' outputs are where task conditioning's hooks
  apply (in NNX the block is swapped for a wrapper in the rebuilt module; in Linen
  nn.intercept_methods catches its call; a Linen head must be an attribute set in setup()).

Batch norm (model.norm): the module is told which statistics to use through the switches its
`__call__` (or `embed`) takes, train=True or use_running_average=False (NNX layers' attribute
use_running_average is set too). transductive (default): batch statistics of the examples at
hand, in training and at test alike, as metalearn's conv4; the module's running averages are
constants, never used. inductive: the running averages (Linen's batch_stats collection, NNX's
nnx.BatchStat variables) become parameters named <layer>.running_<name>, labelled "state"
(metalearn/models/norm.py): never adapted nor given to the optimizer, moved in training to the
module's own moving average of each task's batch statistics (its momentum), saved in
checkpoints, and used at meta-test (train=False / use_running_average=True).

Dropout and other randomness: in training each call gets a key from the task's stream
(metalearn/models/randomness.py): Linen modules as rngs={"dropout": key}, NNX modules as the key
of every RNG stream they hold. At meta-test they are deterministic: deterministic=True when the
method takes it (NNX layers' attribute deterministic is set too), or train=False under inductive
batch norm. A Linen module whose only switch is `train`, with transductive batch norm, would
drop units at test; it is refused (give it a `deterministic` argument, or use inductive).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from omegaconf import MISSING

from metalearn import registry
from metalearn.checks import ConfigError, choice, require
from metalearn.models import Model, ModelConfig, norm, randomness
from metalearn.models.groups import DEFAULT_HEAD, HEAD, label_by_names, names, path_name, prune
from metalearn.models.norm import NORMS, is_state

MODULE_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
FEATURE_ALGOS = (
    "protonet, amortized, blackbox, r2d2 and the additive, film, multihead and mmoe conditionings"
)


@dataclass
class FlaxConfig(ModelConfig):
    inputs: ClassVar[tuple[str, ...]] = ("images", "vectors")

    name: str = "flax"
    module: str = MISSING  # "package.module:Class", importable from the working directory
    # The constructor's keyword arguments, a mapping: model.kwargs='{width: 64}'. (Typed Any, not
    # dict[str, Any]: Hydra's struct mode refuses new keys in a dict field, so a dict default
    # would refuse that override; null means none.)
    kwargs: Any = None
    out_kwarg: str = "num_classes"  # the constructor argument that receives the outputs' number
    head: str | None = None  # regex over parameter names: the head (default: the group rule)
    blocks: str | None = None  # regex: a block is the text it matches at a name's start
    # batch-norm statistics: transductive (each batch's own) | inductive (the module's running
    # averages, trained as model state and used at meta-test; module docstring)
    norm: str = "transductive"

    def __post_init__(self) -> None:
        choice("model.norm", self.norm, NORMS)
        if self.kwargs is None:
            self.kwargs = {}
        require(
            isinstance(self.kwargs, dict) and all(isinstance(k, str) for k in self.kwargs),
            f"model.kwargs={self.kwargs!r} is not allowed: give the constructor's keyword "
            "arguments as a mapping, e.g. model.kwargs='{width: 64}'.",
        )
        require(
            bool(MODULE_PATH.fullmatch(self.module)),
            f"model.module={self.module!r} is not an import path: give it as "
            "package.module:Class (e.g. model.module=mypkg.nets:ResNet).",
        )
        require(
            self.out_kwarg.isidentifier(),
            f"model.out_kwarg={self.out_kwarg!r} must be the name of a constructor argument.",
        )
        for key in (self.out_kwarg, "rngs"):
            require(
                key not in self.kwargs,
                f"model.kwargs sets {key!r}, which metalearn passes itself ({key}= is the number "
                "of outputs the data needs, or the NNX random stream); remove it from "
                "model.kwargs.",
            )
        for what in ("head", "blocks"):
            pattern = getattr(self, what)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ConfigError(
                        f"model.{what}={pattern!r} is not a regular expression: {error}."
                    ) from None


# -------------------------------------------------------------------------------- helpers


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:600]


def load_class(path: str):
    """The object `package.module:Attr.Sub` names; a ConfigError when it cannot be imported."""
    module_name, _, attr = path.partition(":")
    try:
        with _start_folder_on_path():
            obj = importlib.import_module(module_name)
    except Exception as error:  # the user's module: any failure while importing it
        raise ConfigError(
            f"model.module={path}: the module {module_name!r} could not be imported "
            f"({_one_line(error)}). Give package.module:Class of a module on the Python path "
            f"(the folder the command was started in, {_start_folder()}, is on it; add others "
            "with PYTHONPATH)."
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"model.module={path}: {module_name!r} has no attribute {attr!r}; give "
                "package.module:Class of a Flax module class defined there."
            )
        obj = getattr(obj, part)
    return obj


def _start_folder() -> str:
    """The folder the command was started in (Hydra's, where it changed into the run's)."""
    try:
        from hydra.utils import get_original_cwd

        return get_original_cwd()
    except (ImportError, ValueError):  # ValueError: not inside a Hydra command
        return os.getcwd()


@contextlib.contextmanager
def _start_folder_on_path():
    """sys.path with the start folder first while the user's module is imported: `python -m`
    puts it there, the `metalearn` console script does not. Removed afterwards, so that a
    library caller's path is left as it was."""
    folder = _start_folder()
    on_path = {os.path.abspath(p or os.curdir) for p in sys.path}
    added = os.path.abspath(folder) not in on_path
    if added:
        sys.path.insert(0, folder)
    importlib.invalidate_caches()  # a module written since the folder was last listed
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _flavour(cls, path: str) -> str:
    from flax import linen, nnx

    if inspect.isclass(cls) and issubclass(cls, nnx.Module):
        return "nnx"
    if inspect.isclass(cls) and issubclass(cls, linen.Module):
        return "linen"
    what = f"an instance of {type(cls).__name__}" if not inspect.isclass(cls) else "a class"
    raise ConfigError(
        f"model.module={path} is {what} that is not a Flax module class: model=flax takes a "
        "subclass of flax.nnx.Module or flax.linen.Module (the class itself, which metalearn "
        "builds with model.kwargs)."
    )


SWITCHES = ("train", "use_running_average", "deterministic")


def _switches(fn) -> tuple[str, ...]:
    """The mode arguments (SWITCHES) a module method takes."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(name for name in SWITCHES if name in params)


def _switch_values(switches, running: bool, key) -> dict[str, bool]:
    """The switches' values for a call: running averages or batch statistics; dropout on (a
    key) or off."""
    values = {"train": not running, "use_running_average": running, "deterministic": key is None}
    return {name: values[name] for name in switches}


def _paths(tree) -> dict[tuple, Any]:
    """{path as a tuple of keys: leaf} of a nested dict (None leaves left out)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
        flat[keys] = leaf
    return flat


def _unflatten(flat: dict[tuple, Any]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def _state_path(path: tuple) -> tuple:
    """Where a Flax running statistic (bn.mean) lives among the parameters (bn.running_mean)."""
    return (*path[:-1], f"running_{path[-1]}")


def _with_state(params, stats) -> dict:
    """The parameters with the running statistics among them, as <layer>.running_<name>."""
    flat = _paths(params)
    flat.update({_state_path(p): v for p, v in _paths(stats).items()})
    return _unflatten(flat)


def _fill(params, template):
    """params with the leaves it lacks (a head-only or trunk-only selection, whose missing part
    the call does not read) as zeros of the template's shapes."""
    if isinstance(template, dict):
        given = params if isinstance(params, dict) else {}
        return {k: _fill(given.get(k), v) for k, v in template.items()}
    return jnp.zeros(template.shape, template.dtype) if params is None else params


def _block_key(name: str, head_re, block_re) -> str | None:
    """The block a leaf belongs to, as metalearn.models.groups.label_by_names reads it."""
    if head_re.search(name):
        return None
    if block_re is not None:
        match = block_re.match(name)
        return match.group(0) if match else None
    parts = name.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def _common_prefix(paths: list[tuple]) -> tuple:
    prefix = paths[0]
    for p in paths[1:]:
        n = 0
        while n < min(len(prefix), len(p)) and prefix[n] == p[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


class _Entry:
    """What a module built for one number of outputs needs besides its parameters."""

    def __init__(self, n, template, rest, graphdef=None, stats=None):
        self.n = n  # the number of outputs it was built with
        # inductive batch norm: {path among the parameters: path in the module's statistics}
        self.stats = {_state_path(p): p for p in _paths(stats)} if stats else {}
        # the parameters' shapes and dtypes, to fill partial selections
        self.template = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), template)
        self.shapes = {p: tuple(v.shape) for p, v in _paths(self.template).items()}
        self.rest = rest  # the non-parameter variables (pure dicts), constants of the model
        self.graphdef = graphdef  # NNX

    def fits(self, params) -> bool:
        return all(self.shapes.get(p) == tuple(jnp.shape(v)) for p, v in _paths(params).items())

    def split(self, params):
        """(module parameters, running statistics or None) of a full parameter tree."""
        if not self.stats:
            return params, None
        flat = _paths(params)
        stats = {self.stats[p]: v for p, v in flat.items() if p in self.stats}
        rest = {p: v for p, v in flat.items() if p not in self.stats}
        return _unflatten(rest), _unflatten(stats)


class _Adapter:
    """The Model functions over one Flax class; subclasses build and call NNX or Linen."""

    def __init__(self, cls, cfg: FlaxConfig, input_shape: tuple[int, ...]):
        self.cls, self.cfg, self.input_shape = cls, cfg, tuple(input_shape)
        self.path = cfg.module
        self.head_re = re.compile(cfg.head or DEFAULT_HEAD)
        self.block_re = re.compile(cfg.blocks) if cfg.blocks else None
        self.entries: dict[int, _Entry] = {}
        self.has_embed = callable(getattr(cls, "embed", None))
        self.inductive = cfg.norm == "inductive"
        self.call_switches = _switches(cls.__call__)
        self.embed_switches = _switches(getattr(cls, "embed", None)) if self.has_embed else ()

    def mode(self) -> tuple[bool, Any]:
        """(use the running statistics, dropout key or None) for the call being traced."""
        return self.inductive and norm.is_testing(), randomness.next_key()

    def check_state(self, entry: _Entry, params) -> None:
        taken = [path_name(p) for p in _paths(params) if is_state(path_name(p))]
        if taken:
            raise ConfigError(
                f"model.module={self.path} has parameters named like running statistics "
                f"({', '.join(taken[:3])}): metalearn keeps names running_<name> for batch-norm "
                "statistics (never trained); rename them."
            )
        if self.inductive and not entry.stats:
            raise ConfigError(
                f"model.norm=inductive, but model.module={self.path} keeps no batch-norm "
                "statistics (a Linen batch_stats collection or NNX nnx.BatchStat variables); "
                "use model.norm=transductive, or add batch norm layers."
            )

    # --- groups and the submodules they name
    def groups(self, params):
        return label_by_names(params, head=self.cfg.head, blocks=self.cfg.blocks)

    def head_path(self, params) -> tuple:
        labels = _paths(self.groups(params))
        head = [p for p, label in labels.items() if label == HEAD]
        if not head:
            raise ConfigError(
                f"model.module={self.path} has no head among its parameters ({self._names()}); "
                "name the output layer head (or set model.head to a regex of its parameters)."
            )
        prefix = _common_prefix(head)
        if prefix in labels:  # a head of one parameter: its module is the parent
            prefix = prefix[:-1]
        if not prefix:
            raise ConfigError(
                f"model.module={self.path}: the head parameters {self._dotted(head)} are not one "
                "submodule; head() calls the submodule that holds them all, so name the output "
                "layer head (or set model.head to match one submodule's parameters)."
            )
        return prefix

    def block_paths(self, params) -> dict[int, tuple]:
        """{block index: path of the submodule} for the blocks of the group labels."""
        labels = _paths(self.groups(params))
        blocks: dict[int, tuple] = {}
        for path, label in labels.items():
            if not label.startswith("blocks."):
                continue
            key = _block_key(".".join(map(str, path)), self.head_re, self.block_re)
            prefixes = [path[:n] for n in range(1, len(path) + 1)]
            sub = next((p for p in prefixes if ".".join(map(str, p)) == key), None)
            if sub is None or sub in labels:
                rule = f"model.blocks={self.cfg.blocks!r}" if self.cfg.blocks else "the group rule"
                raise ConfigError(
                    f"{rule} makes {key!r} a block of model.module={self.path}, but it is not a "
                    "submodule (a parameter, or part of a name), so task conditioning cannot hook "
                    "its output; keep parameters inside submodules, or set model.blocks to a "
                    "regex matching whole submodule names (e.g. '^layer\\d+')."
                )
            blocks.setdefault(int(label.split(".")[1]), sub)
        return blocks

    def _names(self) -> str:
        entry = next(iter(self.entries.values()), None)
        return ", ".join(jax.tree.leaves(names(entry.template)))[:300] if entry else "?"

    @staticmethod
    def _dotted(paths) -> list[str]:
        return [".".join(map(str, p)) for p in paths]

    # --- the protocol
    def entry(self, n: int) -> _Entry:
        if n not in self.entries:
            with jax.ensure_compile_time_eval():  # concrete, also when init is traced
                entry, params = self.build_entry(n)
            self.check_state(entry, params)
            self.entries[n] = entry
        return self.entries[n]

    def entry_for(self, params) -> _Entry:
        for entry in self.entries.values():
            if entry.fits(params):
                return entry
        shapes = {".".join(map(str, p)): tuple(jnp.shape(v)) for p, v in _paths(params).items()}
        raise ValueError(
            f"model=flax: parameters {shapes} do not come from model.init of {self.path}"
        )

    def init(self, key, n_out):
        self.entry(1 if n_out is None else n_out)
        params, stats = self.build_params(key, 1 if n_out is None else n_out)
        if self.inductive:
            params = _with_state(params, stats)
        if n_out is None:  # features only: the head (built with one output) is dropped
            keep = jax.tree.map(lambda lab: lab != HEAD, self.groups(params))
            params = prune(jax.tree.map(lambda p, k: p if k else None, params, keep)) or {}
        return params

    def check_embed(self):
        if not self.has_embed:
            raise ConfigError(
                f"model.module={self.path} has no embed method, which this setting needs: "
                f"feature-based learners ({FEATURE_ALGOS}) read features, so the module must "
                "define embed(x) returning [B, D] features (its __call__ then being "
                "head(embed(x))). MAML, ANIL, Reptile and fine-tuning need only __call__."
            )

    def hooked_call(self, run, hook, blocks: dict[int, tuple]):
        """run(wrap) with wrap(i, fn) applying hook(i, .) to block i's output; each block must
        run exactly once."""
        calls = dict.fromkeys(blocks, 0)

        def wrap(i, out):
            calls[i] += 1
            if not isinstance(out, jax.Array):
                raise ConfigError(
                    f"block {i} ({'.'.join(map(str, blocks[i]))}) of model.module={self.path} "
                    f"returns {type(out).__name__}, not an array, so task conditioning cannot "
                    "apply to its output; make each block return one array (channels last)."
                )
            return hook(i, out)

        out = run(wrap)
        wrong = {i: c for i, c in calls.items() if c != 1}
        if wrong:
            i, c = next(iter(wrong.items()))
            raise ConfigError(
                f"block {i} ({'.'.join(map(str, blocks[i]))}) of model.module={self.path} runs "
                f"{c} times in embed, so task conditioning cannot apply to 'its output'; it needs "
                "every block (a top-level submodule, model.blocks) called once by embed."
            )
        return out

    def probe(self, n: int = 2) -> None:
        """Build and call the module abstractly: bad arguments or outputs fail here, clearly."""
        self.check_arguments()
        x = jax.ShapeDtypeStruct((2, *self.input_shape), jnp.float32)
        try:
            out = jax.eval_shape(self.probe_fn(n), jax.random.PRNGKey(0), x)
        except ConfigError:
            raise
        except Exception as error:  # the user's module: any failure building or calling it
            raise ConfigError(
                f"model.module={self.path} failed when built with {self.arguments(n)} and "
                f"called on x of shape [B, {', '.join(map(str, self.input_shape))}] "
                f"({_one_line(error)})."
            ) from None
        if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != (2, n):
            shape = getattr(out, "shape", type(out).__name__)
            raise ConfigError(
                f"model.module={self.path} built with {self.cfg.out_kwarg}={n} returns {shape} "
                f"for x of shape {x.shape}, not [B, {n}]: it must return one array of "
                f"[B, n_out] outputs, its number set by the argument model.out_kwarg="
                f"{self.cfg.out_kwarg}."
            )

    def arguments(self, n) -> str:
        args = {**self.cfg.kwargs, self.cfg.out_kwarg: n}
        return f"{self.cls.__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())})"

    def check_arguments(self) -> None:
        try:
            params = dict(inspect.signature(self.cls.__init__).parameters)
        except (TypeError, ValueError):
            return
        params.pop("self", None)
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return
        known = [k for k in params if k not in ("rngs", "parent", "name")]
        for key in (self.cfg.out_kwarg, *self.cfg.kwargs):
            if key not in params:
                which = (
                    "model.out_kwarg: set it to the argument that sets the number of outputs"
                    if key == self.cfg.out_kwarg
                    else "model.kwargs"
                )
                raise ConfigError(
                    f"model.module={self.path}: {self.cls.__name__} takes no argument {key!r} "
                    f"(from {which}); its arguments are {known}."
                )


class _NNX(_Adapter):
    def construct(self, key, n):
        from flax import nnx

        kwargs = {**self.cfg.kwargs, self.cfg.out_kwarg: n}
        return self.cls(**kwargs, rngs=nnx.Rngs(key))

    def build_params(self, key, n):
        from flax import nnx

        module = self.construct(key, n)
        return _pure(nnx.state(module, nnx.Param)), _pure(nnx.state(module, nnx.BatchStat))

    def build_entry(self, n):
        from flax import nnx

        module = self.construct(jax.random.PRNGKey(0), n)
        if self.inductive:
            graphdef, params, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
            params, stats = _pure(params), _pure(stats)
            entry = _Entry(n, _with_state(params, stats), _pure(rest), graphdef, stats=stats)
        else:
            graphdef, params, rest = nnx.split(module, nnx.Param, ...)
            params = _pure(params)
            entry = _Entry(n, params, _pure(rest), graphdef)
        return entry, params

    def probe_fn(self, n):
        values = _switch_values(self.call_switches, False, None)
        return lambda key, x: self.construct(key, n)(x, **values)

    def run(self, params, fn, switches=()):
        """fn(module, switch values) on the module rebuilt from params, in the traced mode."""
        from flax import nnx

        entry = self.entry_for(params)
        running, key = self.mode()
        module_params, stats = entry.split(_fill(params, entry.template))
        rest = entry.rest if key is None else _rekey(entry.rest, key)
        module = nnx.merge(entry.graphdef, module_params, *([stats] if stats else []), rest)
        module.set_attributes(
            deterministic=key is None, use_running_average=running, raise_if_not_found=False
        )
        out = fn(module, _switch_values(switches, running, key))
        if stats and not running:  # training: move the statistics to the module's update
            out = norm.follow(out, stats, _pure(nnx.state(module, nnx.BatchStat)))
        return out

    def apply(self, params, x):
        return self.run(params, lambda m, values: m(x, **values), self.call_switches)

    def embed(self, params, x, hook=None):
        self.check_embed()
        if hook is None:
            return self.run(params, lambda m, values: m.embed(x, **values), self.embed_switches)
        blocks = self.block_paths(params)

        def hooked(module, values):
            def run(wrap):
                for i, path in blocks.items():
                    parent = _nnx_get(module, path[:-1])
                    inner = _nnx_get(parent, path[-1:])
                    if not callable(inner):
                        raise ConfigError(
                            f"block {i} ({'.'.join(map(str, path))}) of model.module={self.path} "
                            f"is a {type(inner).__name__}, which cannot be called, so task "
                            "conditioning cannot hook its output; make each block a submodule."
                        )
                    _nnx_set(parent, path[-1], _HookedBlock(inner, i, wrap))
                return module.embed(x, **values)

            return self.hooked_call(run, hook, blocks)

        return self.run(params, hooked, self.embed_switches)

    def head(self, params, features):
        path = self.head_path(params)
        return self.run(params, lambda m, _: _nnx_get(m, path)(features))


def _rekey(rest, key):
    """The module's other variables with every RNG stream's key drawn from `key`."""
    flat = _paths(rest)
    for i, (path, value) in enumerate(flat.items()):
        if jax.dtypes.issubdtype(getattr(value, "dtype", None), jax.dtypes.prng_key):
            impl = jax.random.key_impl(value)
            flat[path] = jax.random.wrap_key_data(jax.random.fold_in(key, i), impl=impl)
    return _unflatten(flat)


def _pure(state) -> dict:
    """An NNX State as a nested dict of arrays (nnx.to_pure_dict; a State method before 0.11)."""
    from flax import nnx

    to_pure = getattr(nnx, "to_pure_dict", None)
    return to_pure(state) if to_pure is not None else state.to_pure_dict()


def _nnx_get(obj, path):
    for key in path:
        obj = obj[key] if isinstance(key, int) or not hasattr(obj, key) else getattr(obj, key)
    return obj


def _nnx_set(parent, key, value) -> None:
    if isinstance(key, int) or not hasattr(parent, key):
        parent[key] = value
    else:
        setattr(parent, key, value)


class _HookedBlock:
    """Stands in for an NNX block in a rebuilt module: its calls, their output hooked."""

    def __init__(self, inner, index, wrap):
        self._inner, self._index, self._wrap = inner, index, wrap

    def __call__(self, *args, **kwargs):
        return self._wrap(self._index, self._inner(*args, **kwargs))

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Linen(_Adapter):
    def construct(self, n):
        return self.cls(**self.cfg.kwargs, **{self.cfg.out_kwarg: n})

    def example(self):
        return jnp.zeros((1, *self.input_shape), jnp.float32)

    def variables(self, key, n):
        rngs = {"params": key, "dropout": jax.random.fold_in(key, 1)}
        values = _switch_values(self.call_switches, False, key)
        return self.construct(n).init(rngs, self.example(), **values)

    def build_params(self, key, n):
        variables = self.variables(key, n)
        return variables["params"], variables.get("batch_stats", {})

    def build_entry(self, n):
        variables = dict(self.variables(jax.random.PRNGKey(0), n))
        params = variables.pop("params")
        stats = variables.pop("batch_stats", {}) if self.inductive else None
        template = _with_state(params, stats) if self.inductive else params
        return _Entry(n, template, variables, stats=stats), params

    def probe_fn(self, n):
        module = self.construct(n)

        def probe(key, x):
            rngs = {"params": key, "dropout": key}
            values = _switch_values(self.call_switches, False, key)
            return module.init_with_output(rngs, x, **values)[0]

        return probe

    def probe(self, n: int = 2) -> None:
        super().probe(n)
        self.check_test_dropout(n)

    def check_test_dropout(self, n: int) -> None:
        """A `train`-only module under transductive batch norm is called with train=True at
        test: refuse it if that draws dropout masks (it then asks for a 'dropout' rng)."""
        if self.inductive or "train" not in self.call_switches:
            return
        if "deterministic" in self.call_switches:
            return
        from flax.errors import InvalidRngError

        module, x = self.construct(n), jax.ShapeDtypeStruct((2, *self.input_shape), jnp.float32)
        params = jax.eval_shape(lambda: self.variables(jax.random.PRNGKey(0), n))
        try:
            jax.eval_shape(
                lambda v, x: module.apply(v, x, train=True, mutable=True), dict(params), x
            )
        except InvalidRngError:
            raise ConfigError(
                f"model.module={self.path} draws dropout when called with train=True, which "
                "model.norm=transductive also uses at meta-test (batch statistics), so its test "
                "predictions would be random; give __call__ a `deterministic` argument for its "
                "dropout, or use model.norm=inductive (train=False at test)."
            ) from None

    def call(self, params, *args, switches=(), **kwargs):
        entry = self.entry_for(params)
        running, key = self.mode()
        module_params, stats = entry.split(_fill(params, entry.template))
        variables = {"params": module_params, **entry.rest}
        if stats:
            variables["batch_stats"] = stats
        rngs = {"dropout": jax.random.PRNGKey(0) if key is None else key}
        mutable = [c for c in variables if c != "params" and not (running and c == "batch_stats")]
        values = _switch_values(switches, running, key)
        module = self.construct(entry.n)
        out, updated = module.apply(
            variables, *args, rngs=rngs, mutable=mutable, **values, **kwargs
        )
        if stats and not running:  # training: move the statistics to the module's update
            out = norm.follow(out, stats, updated["batch_stats"])
        return out

    def apply(self, params, x):
        return self.call(params, x, switches=self.call_switches)

    def embed(self, params, x, hook=None):
        from flax import linen

        self.check_embed()
        embed = {"method": "embed", "switches": self.embed_switches}
        if hook is None:
            return self.call(params, x, **embed)
        blocks = self.block_paths(params)
        index = {path: i for i, path in blocks.items()}

        def run(wrap):
            active = set()

            def interceptor(next_fun, args, kwargs, context):
                path = tuple(context.module.path)
                if path not in index or path in active or context.method_name == "setup":
                    return next_fun(*args, **kwargs)
                active.add(path)
                try:
                    out = next_fun(*args, **kwargs)
                finally:
                    active.discard(path)
                return wrap(index[path], out)

            with linen.intercept_methods(interceptor):
                return self.call(params, x, **embed)

        return self.hooked_call(run, hook, blocks)

    def head(self, params, features):
        path = self.head_path(params)

        def call_head(module, feats):
            for key in path:
                module = _linen_child(module, key, self.path)
            return module(feats)

        return self.call(params, features, method=call_head)


def _linen_child(module, name: str, path: str):
    """The submodule `name` of a bound Linen module: an attribute set in setup(), or an entry
    of a list or dict attribute (Linen names those name_0, name_1, ...)."""
    from flax import linen

    child = getattr(module, name, None)
    if isinstance(child, linen.Module):
        return child
    for value in vars(module).values():
        items = value.values() if isinstance(value, dict) else value
        items = items if isinstance(items, (list, tuple)) or isinstance(value, dict) else [value]
        for item in items:
            if isinstance(item, linen.Module) and item.name == name:
                return item
    raise ConfigError(
        f"model.module={path}: the submodule {name!r} is not an attribute of "
        f"{type(module).__name__}, so its head cannot be called on features; define the head "
        "in setup() (self.head = nn.Dense(...)), not inline in an @nn.compact method."
    )


def make(cfg: FlaxConfig, input_shape: tuple[int, ...]) -> Model:
    cls = load_class(cfg.module)
    adapter = (_NNX if _flavour(cls, cfg.module) == "nnx" else _Linen)(cls, cfg, input_shape)
    adapter.probe()
    return Model(
        init=adapter.init,
        apply=adapter.apply,
        embed=adapter.embed,
        head=adapter.head,
        groups=adapter.groups,
        input_shape=tuple(input_shape),
    )


registry.register("model", "flax", FlaxConfig, make)
