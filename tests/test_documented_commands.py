"""Every `metalearn ...` command in the fenced code blocks of README.md and docs/*.md, checked
as the real command checks it, so that a documented command cannot break silently.

- `metalearn train` (each job of a `-m` sweep, and the two ends of each dimension of an Optuna
  search space): composed by Hydra from conf/ with the command's own overrides, then every check
  of the real command that needs no compiled program: the typed config (config.to_config, as
  run_plan.plan calls it) and experiment.build_checked (the data, the training episodes, the
  model and learner, the parameters' memory), which experiment.prepare runs first. A sweep's
  job the docs show failing (a `# job failed: MESSAGE` comment under the command) must fail
  with that message, the others must pass. The compiled step and its memory check (the rest of
  prepare) run in the one slow test, for one job of each command.
- `metalearn eval | compare | predict`: run in this process through the cli functions, on tiny
  real runs that a module fixture trains with the documented train commands (plus settings
  that make them tiny); the documented paths and placeholders (RUN_DIR, outputs/...) map to
  them in PATHS.

Data: the documented Omniglot commands use the real dataset's sizes (the 1,100 / 100 / 423
split, 60-way training, 20-way tests within one alphabet), which the tiny zip fixture of
tests/conftest.py cannot hold. The loader (load_omniglot, whose reading of the release's files
tests/test_omniglot.py covers) is replaced by synthetic images with the release's layout: its
50 alphabets with their real numbers of characters, 20 drawings each. Everything after the
loader (splits, episodes and their checks) is the real code. Data that is absent here is named
in ABSENT_DATA with the reason; those commands are checked up to the config, then skipped.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metalearn import cli
from metalearn.config import ConfigError, register_schemas, to_config
from metalearn.data import omniglot, omniglot_alphabets
from metalearn.data.tfds import TfdsConfig
from metalearn.experiment import build_checked

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}  # fenced blocks whose lines are commands
FEWEST_COMMANDS = 30  # the docs held 37 commands when this was written: an extractor finding
# fewer is broken, not the docs (it would otherwise pass with nothing to check)

# ------------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Command:
    where: str  # "docs/SWEEPS.md:21"
    argv: tuple[str, ...]  # after `metalearn`
    fails_with: str | None = None  # a `# job failed: MESSAGE` comment right below the command

    @property
    def id(self) -> str:
        text = " ".join(self.argv)
        return f"{self.where} {text[:70]}{'...' if len(text) > 70 else ''}"


def commands_in(path: Path) -> list[Command]:
    """The `metalearn ...` commands of the shell blocks of a Markdown file: `\\` continuations
    joined, comments and `[optional]` brackets dropped, `a && metalearn ...` split."""
    found, lines = [], path.read_text().splitlines()
    fence, i = None, 0
    while i < len(lines):
        line, number = lines[i], i + 1
        i += 1
        if line.lstrip().startswith("```"):
            fence = line.strip()[3:].strip().lower() if fence is None else None
            continue
        if fence not in SHELL_BLOCKS or "metalearn" not in line:
            continue
        while line.rstrip().endswith("\\") and i < len(lines):
            line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
        expected = None
        if i < len(lines) and lines[i].strip().startswith("# job failed:"):
            expected = lines[i].strip().removeprefix("# job failed:").strip()
        line = re.sub(r"\[(--[^\]]+)\]", r"\1", line.strip().removeprefix("$ "))
        lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
        lexer.whitespace_split, lexer.commenters = True, "#"
        segment: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "|", "&"):
                if segment[:1] == ["metalearn"]:
                    where = f"{path.relative_to(ROOT)}:{number}"
                    found.append(Command(where, tuple(segment[1:]), expected))
                segment = []
            else:
                segment.append(token)
    return found


COMMANDS = [command for path in DOCS for command in commands_in(path)]


def test_the_extractor_finds_the_documented_commands():
    assert len(COMMANDS) >= FEWEST_COMMANDS, [c.id for c in COMMANDS]
    assert {c.argv[0] for c in COMMANDS} == {"train", "eval", "compare", "predict"}
    assert {c.where.split(":")[0] for c in COMMANDS} >= {
        "README.md", "docs/RESULTS.md", "docs/SWEEPS.md"
    }  # fmt: skip
    # the parts the extractor must take apart
    lr_sweep = next(c for c in COMMANDS if "train.outer_lr=0.001,-1,0.01" in c.argv)
    assert lr_sweep.fails_with.startswith("train.outer_lr=-1.0 is not allowed")
    flax = next(c for c in COMMANDS if "model=flax" in c.argv)
    assert flax.argv[-1] == "model.kwargs={width: 64}"  # the `\` continuation, unquoted
    assert ("train",) in [c.argv for c in COMMANDS]  # `pip install -e . && metalearn train`
    predict = next(c for c in COMMANDS if c.argv[0] == "predict")
    assert predict.argv[-2:] == ("--output", "labels.csv")  # `[--output labels.csv]`


# ------------------------------------------------------------------------------------- data

# The release's alphabets and their numbers of characters (964 background, 659 evaluation).
BACKGROUND = {
    "Alphabet_of_the_Magi": 20, "Anglo-Saxon_Futhorc": 29, "Arcadian": 26, "Armenian": 41,
    "Asomtavruli_(Georgian)": 40, "Balinese": 24, "Bengali": 46,
    "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14, "Braille": 26, "Burmese_(Myanmar)": 34,
    "Cyrillic": 33, "Early_Aramaic": 22, "Futurama": 26, "Grantha": 43, "Greek": 24,
    "Gujarati": 48, "Hebrew": 22, "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16,
    "Japanese_(hiragana)": 52, "Japanese_(katakana)": 47, "Korean": 40, "Latin": 26,
    "Malay_(Jawi_-_Arabic)": 40, "Mkhedruli_(Georgian)": 41, "N_Ko": 33,
    "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14, "Sanskrit": 42, "Syriac_(Estrangelo)": 23,
    "Tagalog": 17, "Tifinagh": 55,
}  # fmt: skip
EVALUATION = {
    "Angelic": 20, "Atemayar_Qelisayer": 26, "Atlantean": 26, "Aurek-Besh": 26, "Avesta": 26,
    "Ge_ez": 26, "Glagolitic": 45, "Gurmukhi": 45, "Kannada": 41, "Keble": 26, "Malayalam": 47,
    "Manipuri": 40, "Mongolian": 30, "Old_Church_Slavonic_(Cyrillic)": 45, "Oriya": 46,
    "Sylheti": 28, "Syriac_(Serto)": 23, "Tengwar": 25, "Tibetan": 42, "ULOG": 26,
}  # fmt: skip
_SYNTHETIC: dict[int, omniglot.OmniglotArrays] = {}


def synthetic_omniglot(root=None, *, image_size: int = 28, **_) -> omniglot.OmniglotArrays:
    """What load_omniglot returns for the release, with random images (made once per size)."""
    if image_size not in _SYNTHETIC:
        sizes = [*BACKGROUND.values(), *EVALUATION.values()]
        alphabet = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        names = [*BACKGROUND, *EVALUATION]
        shape = (len(alphabet), omniglot.DRAWINGS, image_size, image_size)
        _SYNTHETIC[image_size] = omniglot.OmniglotArrays(
            images=np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8),
            alphabet=alphabet,
            background=alphabet < len(BACKGROUND),
            alphabets=tuple(names),
            characters=tuple(
                f"{names[a]}/character{i + 1:02d}" for a, n in enumerate(sizes) for i in range(n)
            ),
        )
    return _SYNTHETIC[image_size]


# Data options whose files are absent here: their commands are checked up to the typed config.
ABSENT_DATA = {
    TfdsConfig: "TFDS datasets (data=tfds, cifar_fs, ...) are read from tensorflow-datasets "
    "builds, none of which is present in the test environment (tests/test_tfds.py checks the "
    "reader on a synthetic build)",
}


def has_plugin(module: str) -> bool:
    return importlib.util.find_spec(f"hydra_plugins.{module}") is not None


# Hydra launcher presets (conf/hydra/launcher/) and the plugin (below hydra_plugins) each needs.
LAUNCHER_PLUGINS = {
    "joblib_local": "hydra_joblib_launcher",
    "joblib": "hydra_joblib_launcher",
    "slurm": "hydra_submitit_launcher",
    "ray_cluster": "hydra_ray_launcher",
}
FLAX_MODULE = '''
import jax
from flax import nnx


class ResNet(nnx.Module):
    """A small NNX network for the README's `model=flax model.module=mypkg.nets:ResNet`."""

    def __init__(self, width: int = 8, num_classes: int = 5, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, width, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def embed(self, x):
        return jax.nn.relu(self.conv(x)).mean(axis=(1, 2))

    def __call__(self, x):
        return self.head(self.embed(x))
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The folder the documented commands run in, with the data they read: the synthetic
    Omniglot, a private cache, and the README's `mypkg.nets:ResNet` Flax module."""
    folder = tmp_path_factory.mktemp("docs")
    (folder / "mypkg").mkdir()
    (folder / "mypkg" / "__init__.py").write_text("")
    (folder / "mypkg" / "nets.py").write_text(FLAX_MODULE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(omniglot, "load_omniglot", synthetic_omniglot)
        patch.setattr(omniglot_alphabets, "load_omniglot", synthetic_omniglot)
        patch.delenv("METALEARN_DATA", raising=False)
        patch.setenv("XDG_CACHE_HOME", str(folder / "cache"))
        patch.chdir(folder)
        register_schemas()
        yield folder
    sys.modules.pop("mypkg.nets", None)
    sys.modules.pop("mypkg", None)


# ---------------------------------------------------------------------------- train: check


def split_train_args(argv: tuple[str, ...]) -> tuple[bool, list[str], list[str]]:
    """(multirun?, the job's overrides, Hydra's own overrides) of `metalearn train ARGS`."""
    assert argv[0] == "train"
    argv = argv[1:]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    flags = [a for a in argv if a.startswith("-") and a not in ("-m", "--multirun")]
    assert not flags, f"a train flag this test does not know: {flags}"
    overrides = [a for a in argv if not a.startswith("-")]
    hydra = [o for o in overrides if o.lstrip("+~").startswith("hydra")]
    return multirun, [o for o in overrides if o not in hydra], hydra


def compose(overrides: list[str], hydra: bool = False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=hydra)


@functools.cache
def _composed_groups(groups: tuple[str, ...]):
    return compose(list(groups))


def compose_job(overrides: list[str]):
    """compose(overrides), faster for the jobs of a sweep: Hydra composes the defaults that
    the group choices (algo=maml, experiment=...) select, then applies the value overrides
    (ConfigLoaderImpl._apply_overrides_to_config); the first step is shared by the jobs that
    choose the same groups (a Hydra composition takes ~0.2 s), the second is Hydra's own."""
    import copy

    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    is_group = [(CONF / o.key_or_group).is_dir() or "/" in o.key_or_group for o in parsed]
    groups = tuple(o.input_line for o, group in zip(parsed, is_group, strict=True) if group)
    cfg = copy.deepcopy(_composed_groups(groups))
    values = [o for o, group in zip(parsed, is_group, strict=True) if not group]
    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    return cfg


def sweep_jobs(multirun: bool, overrides: list[str], hydra_overrides: list[str]):
    """The overrides of each job the sweeper would run (an Optuna search: the two ends of every
    dimension of its space), and the reason Hydra's side of the command could not be composed
    here, if any."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    sweeps = [o for o in parsed if o.is_sweep_override()]
    assert multirun or not sweeps, f"a sweep without -m: {overrides}"
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    launcher = next((o.split("=", 1)[1] for o in hydra_overrides if "hydra/launcher=" in o), None)
    if launcher is not None and not has_plugin(LAUNCHER_PLUGINS[launcher]):
        assert (CONF / "hydra" / "launcher" / f"{launcher}.yaml").is_file()
        plugin = LAUNCHER_PLUGINS[launcher]
        jobs = [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        return jobs, f"hydra/launcher={launcher} needs the Hydra plugin {plugin}, not installed"
    searched = any(o.startswith("hparams_search=") for o in plain)
    composed = (
        compose(plain + hydra_overrides, hydra=True).hydra if hydra_overrides or searched else None
    )
    if composed is None or composed.runtime.choices.get("hydra/sweeper") != "optuna":
        jobs = [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        return jobs, None
    # Optuna: a sweep override on the command line replaces or adds a dimension of the space,
    # a plain value takes its key out (docs/SWEEPS.md)
    space = dict(composed.sweeper.params or {})
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override():
            space[key] = override.input_line.split("=", 1)[1]
        else:
            space.pop(key, None)
    ends: list[list[str]] = [[], []]
    for key, text in space.items():
        value = parser.parse_override(f"{key}={text}").value()
        if hasattr(value, "list"):  # choice(...)
            low, high = value.list[0], value.list[-1]
        else:  # interval(...) or range(...)
            low, high = value.start, getattr(value, "end", getattr(value, "stop", None))
        if "int" in text.split("(")[0]:
            low, high = int(low), int(high)
        ends[0].append(f"{key}={low}")
        ends[1].append(f"{key}={high}")
    return [plain + end for end in ends], None


@functools.cache
def _check_job(overrides: tuple[str, ...]):
    return check_job(list(overrides))


def check_job(overrides: list[str]):
    """Every check of `metalearn train OVERRIDES` before its first compiled program; returns
    the config, or the reason its data cannot be read here."""
    cfg = to_config(compose_job(overrides), overrides)
    absent = next((why for kind, why in ABSENT_DATA.items() if isinstance(cfg.data, kind)), None)
    if absent is None:
        build_checked(cfg)
    return cfg, absent


def check_train(command: Command):
    multirun, overrides, hydra_overrides = split_train_args(command.argv)
    jobs, unchecked = sweep_jobs(multirun, overrides, hydra_overrides)
    failed, absent = [], set()
    for job in jobs:
        try:
            _, why = _check_job(tuple(job))  # the same job in two commands is checked once
        except ConfigError as error:
            failed.append((job, str(error)))
            continue
        if why:
            absent.add(why)
    if command.fails_with is None:
        assert not failed, failed
    else:  # the docs show this job failing, with this message
        assert [message for _, message in failed] == [command.fails_with], failed
        assert len(jobs) > 1, "a documented failing job, in a sweep that goes on"
    reasons = sorted(absent) + ([unchecked] if unchecked else [])
    if reasons:
        pytest.skip(f"{len(jobs)} job(s) checked as far as they go here: {'; '.join(reasons)}")


# ---------------------------------------------------------------------- runs for eval & co


def metalearn(argv: list[str], capsys) -> tuple[int, str, str]:
    """`metalearn ARGV` in this process: (exit code, stdout, stderr)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    saved = {id(lg): (lg.handlers[:], lg.level) for lg in loggers if isinstance(lg, logging.Logger)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["metalearn", *argv])
        code = 0
        try:
            cli.main()
        except SystemExit as exit_:
            code = exit_.code or 0
        finally:  # Hydra configured logging for the job's streams: put it back as it was
            for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
                if isinstance(lg, logging.Logger):
                    handlers, level = saved.get(id(lg), ([], logging.NOTSET))
                    lg.handlers[:] = handlers
                    lg.setLevel(level)
    out, err = capsys.readouterr()
    return code, out, err


# Settings that make a documented training run tiny (the commands' own settings are kept).
# (Hydra's logging is left alone: its dictConfig would close the handlers pytest captures with.)
TINY = ["train.steps=1", "train.meta_batch=1", "eval.every=1", "eval.num_tasks=2",
        "eval.val_tasks=2", "train.log_every=1", "progress=false",
        "hydra/job_logging=none", "hydra/hydra_logging=none"]  # fmt: skip
# conv4 on 16 x 16 images (a third of the work; 4 max-pools need 16 pixels)
TINY_CONV = ["model.hidden=4", "data.image_size=16"]
# The runs the documented eval / compare / predict commands read, each trained with the
# documented command that makes it (plus TINY).
RUNS = {
    # the README's first block: `metalearn train algo=maml data=omniglot`, a run of outputs/
    # (on 8 x 8 images: its eval runs 2,000 tasks of 10 inner steps; strided conv4 fits 8 pixels)
    "outputs/2026-11-22/10-00-00_maml_omniglot": [
        "algo=maml",
        "data=omniglot",
        "model.hidden=4",
        "data.image_size=8",
    ],  # fmt: skip
    # docs/RESULTS.md, the ProtoNets 60-way runs
    "runs/proto20_random": ["experiment=protonet_omniglot_20w1s", *TINY_CONV],
    # without rotations, as the case issue 28 found eval refusing: 60-way training episodes that
    # no single alphabet holds (the largest has 55 characters), which eval must not check
    "runs/proto20_alphabet": [
        "experiment=protonet_omniglot_20w1s",
        "data.split=alphabet",
        "data.rotations=false",
        *TINY_CONV,
    ],  # fmt: skip
}
SWEEPS = {
    # docs/SWEEPS.md's sweep with a failing job (on 2 of its 3 values: one run, one failure)
    "outputs/lr_sweep": ["-m", "train.outer_lr=0.001,-1"],
    # README's multi-task grid, on 2 of its 7 conditionings: --negative-transfer reads each
    # task's gain against conditioning=separate
    "outputs/multirun/conditioning": [
        "-m",
        "algo=multitask",
        "data=multi_sinusoid",
        "conditioning=none,separate",
    ],  # fmt: skip
}
# The documented paths and placeholders, and what they stand for here.
PATHS = {
    **{path: path for path in (*RUNS, *SWEEPS)},
    "outputs/": "outputs",
    "outputs/multirun/2026-11-22/10-00-00": "outputs/lr_sweep",
    "outputs/multirun/...": "outputs/multirun/conditioning",
    "RUN_DIR": "runs/proto20_random",
    "RUN": "runs/proto20_random",
    "<run>": "runs/proto20_random",
    "my_classes/": "my_classes",
    "to_label/": "to_label",
    "labels.csv": "labels.csv",
    "report/": "report",
}


@pytest.fixture(scope="module")
def runs(workdir):
    """Train the runs of RUNS and SWEEPS in `workdir`, and write predict's image folders."""
    with _capture() as capsys:
        for path, overrides in RUNS.items():
            code, out, err = metalearn(
                ["train", *overrides, *TINY, f"hydra.run.dir={path}"], capsys
            )
            assert code == 0 and (workdir / path / "summary.json").is_file(), (path, out, err)
        for path, overrides in SWEEPS.items():
            code, out, err = metalearn(
                ["train", *overrides, *TINY, f"hydra.sweep.dir={path}"], capsys
            )
            statuses = sorted(
                json.loads(summary.read_text())["status"]
                for summary in (workdir / path).glob("*/summary.json")
            )
            # a sweep with a failed job exits 1 once every job has run (docs/SWEEPS.md)
            assert code == (1 if "failed" in statuses else 0), (path, code, err)
            assert statuses.count("completed") >= 1, (path, statuses, out, err)
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (workdir / "my_classes" / name).mkdir(parents=True)
        for i in range(2):
            image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(image).save(workdir / "my_classes" / name / f"{i}.png")
    (workdir / "to_label").mkdir()
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(workdir / "to_label" / "q.png")
    return workdir


@contextlib.contextmanager
def _capture():
    """A capsys-like reader for a module fixture (pytest's capsys is function-scoped)."""
    import io

    class Capture:
        def readouterr(self):
            out, err = sys.stdout.getvalue(), sys.stderr.getvalue()
            sys.stdout.seek(0), sys.stdout.truncate(), sys.stderr.seek(0), sys.stderr.truncate()
            return out, err

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield Capture()


def mapped(command: Command) -> list[str]:
    """The command's arguments with its paths and placeholders mapped by PATHS; a path the
    table does not know fails the test, so that a new documented command gets a run."""
    argv = []
    for arg in command.argv[1:]:
        if arg.startswith("-") or "=" in arg:
            argv.append(arg)
            continue
        assert arg in PATHS, f"{command.id}: add {arg!r} to PATHS (what it stands for here)"
        argv.append(PATHS[arg])
    return argv


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command(command: Command, request, capsys):
    workdir = request.getfixturevalue("workdir")
    if command.argv[0] == "train":
        check_train(command)
        return
    request.getfixturevalue("runs")
    argv = [command.argv[0], *mapped(command)]
    code, out, err = metalearn(argv, capsys)
    assert code == 0, f"metalearn {' '.join(argv)} exited {code}:\n{err}"
    if command.argv[0] == "eval":
        result = json.loads(out)
        assert result["test"]["num_tasks"] >= 1 and np.isfinite(result["test"]["accuracy"])
    elif command.argv[0] == "predict":
        assert out.splitlines() and all(line.endswith((",a", ",b")) for line in out.splitlines())
        assert (workdir / "labels.csv").read_text().startswith("path,predicted_class\n")
    else:  # compare: its table, with the failed job the docs show
        assert out.splitlines()[0].startswith("run"), out
        if "outputs/lr_sweep" in argv:
            assert "failed: train.outer_lr=-1.0 is not allowed" in out, out
        if "--negative-transfer" in argv:
            report = Path(argv[argv.index("--negative-transfer") + 1])
            assert (workdir / report / "negative_transfer.md").is_file()


def test_eval_checks_the_episodes_it_draws_not_the_training_ones(workdir):
    """Issue 28: eval of a run trained on 60-way episodes tests within one alphabet, which
    holds at most 55 characters: training's check refuses that shape, evaluation's does not."""
    from metalearn.experiment import build

    overrides = ["experiment=protonet_omniglot_20w1s", "data.split=alphabet",
                 "data.rotations=false", "data.episodes=within_alphabet"]  # fmt: skip
    with pytest.raises(
        ConfigError, match="train.n_way=60 classes .* no alphabet of the meta-train split has 60"
    ):
        build(to_config(compose(overrides), overrides))
    exp = build(to_config(compose(overrides), overrides, "evaluate"), "evaluate")
    assert exp.source.n_out == 20 and exp.train_sample is exp.source.sample


def test_a_sweep_job_is_composed_as_hydra_composes_it(workdir):
    """compose_job's shortcut (the group choices composed once per sweep) gives Hydra's own
    composition of each job; checked on sweeps over values, groups and an experiment."""
    from omegaconf import OmegaConf

    for argv in (
        ("train", "-m", "train.outer_lr=0.001,-1", "algo=maml,reptile"),
        ("train", "-m", "seed=0,1", "experiment=maml_sinusoid"),
    ):
        jobs, _ = sweep_jobs(*split_train_args(argv))
        assert len(jobs) == 4 if "algo=maml,reptile" in argv else len(jobs) == 2
        for job in jobs:
            assert OmegaConf.to_container(compose_job(job)) == OmegaConf.to_container(compose(job))


# The documented commands that are checked in part (then skipped, with the reason), counted:
# TFDS data is absent here (ABSENT_DATA); the Slurm and Ray launchers need Hydra plugins that
# the test environment does not install (LAUNCHER_PLUGINS), with which they are checked fully.
CHECKED_IN_PART = {
    "TFDS data": (("data=tfds", "data=cifar_fs"), 3),
    "the Slurm launcher": (("hydra/launcher=slurm",), 3),
    "the Ray launcher": (("hydra/launcher=ray_cluster",), 2),
}


@pytest.mark.parametrize("reason", CHECKED_IN_PART)
def test_the_commands_checked_in_part_are_counted(reason):
    arguments, count = CHECKED_IN_PART[reason]
    found = [c.id for c in COMMANDS if set(c.argv) & set(arguments)]
    assert len(found) == count, found


@pytest.mark.slow
def test_documented_train_commands_compile(workdir, tmp_path):
    """The rest of what `metalearn train` checks before writing: experiment.prepare compiles
    the training step and checks its memory, for the first job of each documented command."""
    import time

    from metalearn.experiment import prepare
    from metalearn.rundir import RunDir

    checked = set()
    for n, command in enumerate(c for c in COMMANDS if c.argv[0] == "train"):
        multirun, overrides, hydra_overrides = split_train_args(command.argv)
        jobs, _ = sweep_jobs(multirun, overrides, hydra_overrides)
        cfg = to_config(compose_job(jobs[0]), jobs[0])
        if any(isinstance(cfg.data, kind) for kind in ABSENT_DATA):
            continue
        key = repr(cfg)  # the same config in two commands is compiled once
        if key in checked:
            continue
        started = time.perf_counter()
        prepare(cfg, RunDir(tmp_path / str(n)))
        print(f"{command.id}: {time.perf_counter() - started:.1f} s")
        checked.add(key)
    assert len(checked) >= FEWEST_COMMANDS // 3
