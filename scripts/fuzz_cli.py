"""Reliability fuzz harness for the `metalearn` command line.

It plays a careless or hostile user and a crashing machine: about 200 bad inputs and faults
(refused resumes, corrupt checkpoints and run files, `${oc.env:...}` interpolations, symlinks
out of a run, huge sizes, a full or read-only disk, concurrent runs, SIGKILL at random moments,
bad values), each in a fresh scratch directory. Two finished reference runs (a sinusoid MAML run
and an Omniglot ProtoNet run) are trained once at the start; every file of them is hashed
(sha256, recursively) before and after every case, so a refused command that still wrote into a
run is caught. Cases that must damage a run work on a copy of a reference run.

Each case prints one row: id, class, command (short), expected (`error`: refused with a clean
error; `ok`: must succeed; `any`: either, as long as it is clean), exit code, outcome, whether
the reference runs are unchanged, and PASS/FAIL with a note. Outcomes:

  ok           exit 0
  clean error  non-zero exit, stderr holds `metalearn: error:`, no `Traceback`
  traceback    a Python traceback in stdout or stderr
  crash        killed by a signal, abort, or `Fatal Python error`
  timeout      still running at the time limit (killed): never refused, so a failure
  wrong exit   exit 0 for a case that must be refused, non-zero for one that must succeed,
               or non-zero without `metalearn: error:`

Extra checks make a case fail too: the secret value of FUZZ_SECRET in any output or file,
a file outside a run (a symlink's target) changed, temp files left, a result that differs from
an uninterrupted run, a concurrent run refused without saying "in use".

The table and totals are written as Markdown to --out. Exit code 1 if any case failed.

Run from the repository root, in its venv, as root (it mounts tmpfs); about 11 minutes here:

    . .venv/bin/activate
    python scripts/fuzz_cli.py                      # the working tree's code
    python scripts/fuzz_cli.py --rev HEAD --out /tmp/fuzz_before.md   # a committed revision
    python scripts/fuzz_cli.py --only corrupt_checkpoint,symlinks --keep
    python scripts/fuzz_cli.py --list

metalearn processes run one at a time (except where a case is about concurrency), under
`nice -n 10` and an address-space limit (--mem-gb), so an allocation bomb fails in its own
process instead of exhausting the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
OMNIGLOT = "/work/shared/data/omniglot"  # the real release
SECRET_VAR, SECRET = "FUZZ_SECRET", "s3cr3t-value"

# Small but complete runs: every stage (train, validate, checkpoint, test) in a few seconds.
SINE = [
    "train.steps=20",
    "eval.every=10",
    "eval.num_tasks=20",
    "eval.val_tasks=10",
    "train.log_every=5",
    "progress=false",
]
OMNI = [
    "data=omniglot",
    f"data.root={OMNIGLOT}",
    "data.n_way=5",
    "data.k_shot=1",
    "data.k_query=2",
    "model.hidden=16",
    "train.meta_batch=2",
    "train.steps=6",
    "eval.every=3",
    "eval.num_tasks=10",
    "eval.val_tasks=5",
    "eval.batch=5",
    "progress=false",
]
# Synthetic Omniglot-format zips (tests/omniglot_fixture.py): 20 characters, a 12/4/4 split.
TINY = [
    "data=omniglot",
    "data.n_way=3",
    "data.k_shot=1",
    "data.k_query=2",
    "data.image_size=12",
    "data.split_sizes=[12,4,4]",
    "data.download=false",
    "model.hidden=8",
    "train.steps=6",
    "train.meta_batch=2",
    "train.log_every=2",
    "eval.every=3",
    "eval.num_tasks=10",
    "eval.val_tasks=5",
    "eval.batch=5",
    "progress=false",
]
# The reference runs' commands (the group choices spelled out, as a user re-running them would).
SINE_CMD = ["train", "algo=maml", *SINE]
OMNI_CMD = ["train", "algo=protonet", *OMNI]
# kill_resume: long enough to be killed mid-training, with several checkpoints.
KILL = [
    "train.steps=300",
    "train.checkpoint_every=50",
    "eval.every=100",
    "eval.num_tasks=20",
    "eval.val_tasks=10",
    "train.log_every=5",
    "progress=false",
]
LONG = ["train.steps=100000"]  # concurrent / signal cases: a run that is still going

# "@name" in a case's argv expands to one of these lists; "{name}" is a per-case path.
LISTS = {
    "@sine": SINE,
    "@omni": OMNI,
    "@tiny": TINY,
    "@sine_cmd": SINE_CMD,
    "@omni_cmd": OMNI_CMD,
    "@kill": KILL,
}
SHORT = {
    "@sine": "<SINE>",
    "@omni": "<OMNI>",
    "@tiny": "<TINY>",
    "@kill": "<KILL>",
    "@sine_cmd": "train algo=maml <SINE>",
    "@omni_cmd": "train algo=protonet <OMNI>",
}

FAILING = ("traceback", "crash", "timeout", "wrong exit", "harness error")


class Skip(Exception):
    """The case cannot run here (e.g. mount is not permitted); reported, not a failure."""


# --------------------------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below root (symlinks recorded, not followed; folders listed)."""
    root = Path(root)
    if root.is_symlink():
        return {".": "symlink:" + os.readlink(root)}
    if root.is_file():
        return {".": sha256(root)}
    if not root.exists():
        return {".": "<missing>"}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            try:
                if p.is_symlink():
                    out[rel] = "symlink:" + os.readlink(p)
                elif p.is_file():
                    out[rel] = sha256(p)
                elif p.is_dir():
                    out[rel + "/"] = "dir"
                else:
                    out[rel] = "special"
            except OSError as e:
                out[rel] = f"unreadable: {e}"
    return out


def diff_trees(before: dict, after: dict, allow_added: str | None = None) -> list[str]:
    """What changed between two hash_tree results; files added below allow_added are fine."""
    changes = []
    for k in sorted(set(before) | set(after)):
        if k not in after:
            changes.append(f"removed {k}")
        elif k not in before:
            if not (allow_added and k.startswith(allow_added)):
                changes.append(f"added {k}")
        elif before[k] != after[k]:
            changes.append(f"changed {k}")
    return changes


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def rewrite_npz(path: Path, edit: Callable[[dict], dict]) -> None:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays = edit(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _other_shapes(arrays: dict) -> dict:
    return {
        k: (v if k == "meta" else np.zeros(tuple(s + 1 for s in v.shape) or (2,), v.dtype))
        for k, v in arrays.items()
    }


def _drop_last_leaf(arrays: dict) -> dict:
    arrays.pop(sorted(k for k in arrays if k != "meta")[-1])  # keys: tree paths (or leaf_N)
    return arrays


def _object_leaf(arrays: dict) -> dict:
    first = sorted(k for k in arrays if k != "meta")[0]
    arrays[first] = np.array([{"x": 1}, None], dtype=object)  # needs pickle to load
    return arrays


def corrupt_file(path: Path, how: str, seed: int = 0) -> None:
    """Damage one file of a run the way a crash, a full disk or a careless edit would."""
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    rng = np.random.default_rng(seed)
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(rng.bytes(max(len(data), 64)))
    elif how == "invalid":  # neither valid YAML nor JSON
        path.write_bytes(b"{{{ this: is: [not valid\n\t- ]]\n")
    elif how == "binary":  # not UTF-8
        path.write_bytes(b"\xff\xfe\x00\x9c\x80" * 40)
    elif how == "missing":
        path.unlink()
    elif how == "dir":
        path.unlink()
        path.mkdir()
    elif how == "missing_array":
        rewrite_npz(path, _drop_last_leaf)
    elif how == "shapes":
        rewrite_npz(path, _other_shapes)
    elif how == "no_meta":
        rewrite_npz(path, lambda a: {k: v for k, v in a.items() if k != "meta"})
    elif how == "bad_meta":
        rewrite_npz(path, lambda a: {**a, "meta": np.frombuffer(b"not json {", np.uint8)})
    elif how == "object":
        rewrite_npz(path, _object_leaf)
    else:
        raise ValueError(how)


# Valid syntax, wrong types: what a hand edit or another tool could leave.
WRONG_TYPES = {
    "summary.json": '{"status": 7, "test": "none", "steps": "many", "overrides": {"a": 1}}\n',
    "overrides.yaml": "a: 1\nb: [2, 3]\n",  # a mapping where a list of key=value is expected
    "config.yaml": "- data\n- model\n- 3\n",  # a list where the config mapping is expected
}


def write_wrong_types(path: Path) -> None:
    path.write_text(WRONG_TYPES[path.name])


def checkpoint_step(run: Path) -> int | None:
    try:
        with np.load(run / "checkpoints" / "latest.npz") as data:
            return int(json.loads(bytes(data["meta"]).decode())["step"])
    except Exception:
        return None


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except Exception:
        return None


def last_traceback_line(text: str) -> str:
    """The exception line of the last traceback in text (e.g. `KeyError: 'leaf_3'`)."""
    block = text.rsplit("Traceback (most recent call last):", 1)[-1]
    for line in block.splitlines()[1:]:
        if line and not line.startswith((" ", "\t")) and not line.startswith("Set the env"):
            return line.strip()
    return "(no exception line)"


def error_line(stderr: str, stdout: str = "") -> str:
    """The error message: metalearn's, else argparse's `...: error:` line, else the first line."""
    for line in stderr.splitlines():
        if "metalearn: error:" in line:
            return line.split("metalearn: error:", 1)[1].strip()
    lines = [
        s.strip()
        for s in (stderr or stdout).splitlines()
        if s.strip() and "HYDRA_FULL_ERROR" not in s
    ]
    return next((s for s in lines if ": error:" in s), lines[0] if lines else "")


@dataclass
class Proc:
    argv: list[str]
    rc: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    timeout: float


def classify(p: Proc, expect: str) -> tuple[str, str]:
    """(outcome, note) of one metalearn process against the expected `ok`, `error` or `any`."""
    text = p.stdout + "\n" + p.stderr
    if p.timed_out:
        return "timeout", f"still running after {p.timeout:.0f} s; killed"
    fatal = re.search(r"Fatal Python error[^\n]*", text)
    if p.rc < 0 or p.rc in (134, 137, 139) or fatal:
        if fatal:
            return "crash", fatal.group(0)
        name = signal.Signals(-p.rc).name if p.rc < 0 else f"exit {p.rc}"
        hint = re.search(r"(Check failed[^\n]*|RESOURCE_EXHAUSTED[^\n]*|Aborted[^\n]*)", text)
        return "crash", f"{name}" + (f": {hint.group(0)[:120]}" if hint else "")
    if "Traceback (most recent call last)" in text:
        return "traceback", last_traceback_line(text)[:160]
    clean = "metalearn: error:" in p.stderr
    message = error_line(p.stderr, p.stdout)[:160]
    if p.rc == 0:
        return ("wrong exit", "exit 0: not refused") if expect == "error" else ("ok", "")
    if clean:
        if expect == "ok":
            return "wrong exit", f"refused: {message}"
        return "clean error", message
    return "wrong exit", f"exit {p.rc} without 'metalearn: error:': {message}"


# ----------------------------------------------------------------------------------- cases


@dataclass
class Case:
    id: str
    cls: str
    cmd: str  # short, for the table
    expect: str  # ok | error | any | a description for multi-process cases
    run: Callable[[CaseCtx], object]
    ref_evals: bool = False  # eval of a reference run: new files in its evals/ are expected
    scan_files: bool = False  # the secret must not appear in any file of the case's folder
    timeout: float | None = None


CASES: list[Case] = []


def short(argv: list[str]) -> str:
    text = " ".join(SHORT.get(a, a) for a in argv) or "(no arguments)"
    return text if len(text) <= 110 else text[:107] + "..."


def add(cls, slug, argv, expect, setup=None, check=None, **kw):
    """A case that is one metalearn command (argv may use @lists and {paths})."""
    env, cwd = kw.pop("env", None), kw.pop("cwd", None)

    def run(c: CaseCtx):
        if setup:
            setup(c)
        p = c.ml(argv, env=env(c) if env else None, cwd=cwd(c) if cwd else None)
        if check:
            check(c, p)
        return p

    CASES.append(Case(f"{cls}/{slug}", cls, kw.pop("cmd", None) or short(argv), expect, run, **kw))


def scenario(cls, slug, cmd, expect, **kw):
    """A case written as a function (several processes, signals): decorator."""

    def deco(fn):
        CASES.append(Case(f"{cls}/{slug}", cls, cmd, expect, fn, **kw))
        return fn

    return deco


class CaseCtx:
    """One case's scratch folder, its path variables and the processes it started."""

    def __init__(self, h: Harness, case: Case, folder: Path):
        self.h, self.case, self.dir = h, case, folder
        self.vars = {
            "case": str(folder),
            "ref_sine": str(h.refs["sine"]),
            "ref_omni": str(h.refs["omni"]),
            "omniglot": OMNIGLOT,
        }
        self.procs: list[Proc] = []
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.watched: dict[Path, dict] = {}
        self.background: list[subprocess.Popen] = []
        self.mounts: list[Path] = []

    def expand(self, argv: list[str]) -> list[str]:
        out = []
        for token in argv:
            if token in LISTS:
                out.extend(LISTS[token])
            else:
                out.append(re.sub(r"\{(\w+)\}", lambda m: self.vars.get(m[1], m[0]), token))
        return out

    def ml(self, argv, *, env=None, cwd=None, timeout=None) -> Proc:
        p = self.h.run(
            self.expand(argv),
            cwd or self.dir,
            env or self.h.env,
            timeout or self.case.timeout or self.h.timeout,
        )
        self.procs.append(p)
        return p

    def spawn(self, argv, name="bg", env=None) -> subprocess.Popen:
        """Start metalearn in the background, output to files (a full pipe would stall it)."""
        out = open(self.dir / f"{name}.stdout", "wb")
        err = open(self.dir / f"{name}.stderr", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "metalearn", *self.expand(argv)],
            cwd=self.dir,
            env=env or self.h.env,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            preexec_fn=self.h.limits,
            start_new_session=True,
        )
        proc.fuzz_files = (out, err, name, time.time())
        self.background.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen, timeout=None) -> Proc:
        """Wait for a background process (SIGKILL at the timeout) and collect its output."""
        out, err, name, started = proc.fuzz_files
        timeout = timeout or self.h.timeout
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
        out.close(), err.close()
        p = Proc(
            proc.args[3:],
            proc.returncode,
            (self.dir / f"{name}.stdout").read_text(errors="replace"),
            (self.dir / f"{name}.stderr").read_text(errors="replace"),
            timed_out,
            time.time() - started,
            timeout,
        )
        self.procs.append(p)
        return p

    def sigkill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def wait_for(self, path: Path, proc: subprocess.Popen, seconds=90.0) -> bool:
        deadline = time.time() + seconds
        while time.time() < deadline and proc.poll() is None:
            if path.exists():
                return True
            time.sleep(0.05)
        return path.exists()

    def copy(self, ref: str, name="run", parent: Path | None = None) -> Path:
        dest = copy_run(self.h.pristine[ref], (parent or self.dir) / name)
        self.vars["copy"] = str(dest)
        return dest

    def watch(self, path: Path) -> None:
        """Files that the case's commands must leave alone (hashed now and at the end)."""
        self.watched[Path(path)] = hash_tree(path)

    def mount(self, name: str, size: str) -> Path:
        folder = self.dir / name
        folder.mkdir(exist_ok=True)
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise Skip(f"mount -t tmpfs failed: {(r.stderr or r.stdout).strip()[:100]}")
        self.mounts.append(folder)
        self.h.mounts.add(folder)
        return folder

    def remount_ro(self, folder: Path) -> None:
        r = subprocess.run(
            ["mount", "-o", "remount,ro", str(folder)], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise Skip(f"mount -o remount,ro failed: {r.stderr.strip()[:100]}")

    def cleanup(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for f in proc.fuzz_files[:2]:
                f.close()
        for folder in reversed(self.mounts):
            self.h.unmount(folder)


# --- checks: each appends to c.failures when the run did not end as it must


def summary_completed(steps: int | None = None):
    def check(c: CaseCtx, p: Proc, run: str = "copy"):
        summary = read_json(Path(c.vars[run]) / "summary.json")
        if p.rc == 0 and (not isinstance(summary, dict) or summary.get("status") != "completed"):
            c.failures.append("exit 0 but summary.json is not 'completed'")
        elif p.rc == 0 and steps is not None and summary.get("steps") != steps:
            c.failures.append(f"summary steps={summary.get('steps')}, expected {steps}")

    return check


def says_in_use(c: CaseCtx, p: Proc) -> None:
    if p.rc not in (0, None) and not p.timed_out and "in use" not in p.stderr.lower():
        c.failures.append("refused without saying the run is 'in use'")


def no_temp_files(c: CaseCtx, p: Proc) -> None:
    left = [
        str(f.relative_to(c.dir))
        for f in Path(c.vars["copy"]).rglob(".*")
        if f.is_file() and (f.suffix in (".npz", ".tmp"))
    ]
    if left:
        c.failures.append(f"temp files remain: {', '.join(left[:3])}")


def both(*checks):
    def check(c, p):
        for ch in checks:
            ch(c, p)

    return check


# ============================================================================ the case list
# ---------------------------------------------------------------------------- resume_refused
# A resumed run keeps its data, model, algorithm and seed; a command that would change them is
# refused before anything is written. These target the reference runs themselves.

for slug, extra in [
    ("sine-hidden80", ["model.hidden=80"]),
    ("sine-algo-reptile", ["algo=reptile"]),
    ("sine-data-omniglot", ["data=omniglot"]),
    ("sine-model-conv4", ["model=conv4"]),
    ("sine-seed1", ["seed=1"]),
    ("sine-inner-lr", ["algo.inner_lr=0.9"]),
    ("sine-plus-algo-foo", ["+algo.foo=1"]),
    ("sine-plusplus-hidden", ["++model.hidden=80"]),
]:
    add("resume_refused", slug, ["train", "resume={ref_sine}", *extra], "error")
for slug, extra in [
    ("omni-hidden80", ["model.hidden=80"]),
    ("omni-nway3", ["data.n_way=3"]),
    ("omni-algo-maml", ["algo=maml"]),
    ("omni-data-sinusoid", ["data=sinusoid"]),
    ("omni-seed7", ["seed=7"]),
    ("omni-downsample", ["model.downsample=maxpool"]),
    ("omni-plus-algo-foo", ["+algo.foo=1"]),
]:
    add("resume_refused", slug, ["train", "resume={ref_omni}", *extra], "error")
# ... and the reference runs still evaluate afterwards.
add("resume_refused", "then-eval-sine", ["eval", "{ref_sine}"], "ok", ref_evals=True)
add("resume_refused", "then-eval-omni", ["eval", "{ref_omni}"], "ok", ref_evals=True)
add(
    "resume_refused",
    "then-eval-omni-latest",
    ["eval", "{ref_omni}", "--checkpoint", "latest"],
    "ok",
    ref_evals=True,
)

# ------------------------------------------------------------------------ rerun_same_command
# The command a user has in their shell history, again, with resume: it must resume.


def _copy_sine(c):
    c.copy("sine")


def _copy_omni(c):
    c.copy("omni")


add(
    "rerun_same_command",
    "sine-resume-true",
    ["@sine_cmd", "hydra.run.dir={copy}", "resume=true"],
    "ok",
    setup=_copy_sine,
    check=summary_completed(20),
)
add(
    "rerun_same_command",
    "omni-resume-true",
    ["@omni_cmd", "hydra.run.dir={copy}", "resume=true"],
    "ok",
    setup=_copy_omni,
    check=summary_completed(6),
)
add(
    "rerun_same_command",
    "sine-resume-path",
    ["@sine_cmd", "resume={copy}"],
    "ok",
    setup=_copy_sine,
    check=summary_completed(20),
)
add(
    "rerun_same_command",
    "omni-resume-path",
    ["@omni_cmd", "resume={copy}"],
    "ok",
    setup=_copy_omni,
    check=summary_completed(6),
)
add(
    "rerun_same_command",
    "sine-resume-more-steps",
    ["@sine_cmd", "train.steps=30", "hydra.run.dir={copy}", "resume=true"],
    "ok",
    setup=_copy_sine,
    check=summary_completed(30),
)
add(
    "rerun_same_command",
    "omni-resume-more-steps",
    ["@omni_cmd", "train.steps=9", "hydra.run.dir={copy}", "resume=true"],
    "ok",
    setup=_copy_omni,
    check=summary_completed(9),
)
add(
    "rerun_same_command",
    "sine-reordered-resume",
    [
        "train",
        "progress=false",
        *reversed(SINE[:-1]),
        "algo=maml",
        "resume=true",
        "hydra.run.dir={copy}",
    ],
    "ok",
    setup=_copy_sine,
    check=summary_completed(20),
)
add(
    "rerun_same_command",
    "sine-no-resume-into-finished",
    ["@sine_cmd", "hydra.run.dir={copy}"],
    "error",
    setup=_copy_sine,
)
add(
    "rerun_same_command",
    "omni-no-resume-into-finished",
    ["@omni_cmd", "hydra.run.dir={copy}"],
    "error",
    setup=_copy_omni,
)
add(
    "rerun_same_command",
    "sine-no-resume-into-ref",
    ["@sine_cmd", "hydra.run.dir={ref_sine}"],
    "error",
)
add(
    "rerun_same_command",
    "omni-no-resume-into-ref",
    ["@omni_cmd", "hydra.run.dir={ref_omni}"],
    "error",
)

# ------------------------------------------------------------------ killed_before_checkpoint
# A run killed after writing .hydra/ but before its first checkpoint: resuming it or re-running
# its command starts from step 0 and completes.


def only_hydra(ref, keep_metrics=False, temp=False):
    def setup(c):
        run = c.copy(ref)
        shutil.rmtree(run / "checkpoints")
        for name in ("summary.json", "train.log", "evals"):
            p = run / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        metrics = run / "metrics.jsonl"
        if keep_metrics:  # two train records were logged before the kill
            metrics.write_text("".join(metrics.read_text().splitlines(True)[:2]))
        else:
            metrics.unlink()
        if temp:  # killed while writing the first checkpoint
            (run / "checkpoints").mkdir()
            (run / "checkpoints" / ".latest.k1ll3d.npz").write_bytes(b"PK\x03\x04" + b"\0" * 300)

    return setup


def no_duplicate_records(c, p):
    records = [
        json.loads(line)
        for line in (Path(c.vars["copy"]) / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    keys = [(r.get("step"), r.get("split")) for r in records]
    if p.rc == 0 and len(keys) != len(set(keys)):
        c.failures.append("metrics.jsonl holds a step twice")


for ref, cmd, steps in (("sine", "@sine_cmd", 20), ("omni", "@omni_cmd", 6)):
    add(
        "killed_before_checkpoint",
        f"{ref}-resume-dir",
        ["train", "resume={copy}"],
        "ok",
        setup=only_hydra(ref),
        check=summary_completed(steps),
    )
    add(
        "killed_before_checkpoint",
        f"{ref}-rerun-command",
        [cmd, "hydra.run.dir={copy}"],
        "ok",
        setup=only_hydra(ref),
        check=summary_completed(steps),
    )
add(
    "killed_before_checkpoint",
    "sine-rerun-resume-true",
    ["@sine_cmd", "hydra.run.dir={copy}", "resume=true"],
    "ok",
    setup=only_hydra("sine"),
    check=summary_completed(20),
)
add(
    "killed_before_checkpoint",
    "sine-partial-metrics-resume",
    ["train", "resume={copy}"],
    "ok",
    setup=only_hydra("sine", keep_metrics=True),
    check=both(summary_completed(20), no_duplicate_records),
)
add(
    "killed_before_checkpoint",
    "sine-empty-checkpoints-dir",
    ["train", "resume={copy}"],
    "ok",
    setup=lambda c: (only_hydra("sine")(c), (Path(c.vars["copy"]) / "checkpoints").mkdir()),
    check=summary_completed(20),
)
add(
    "killed_before_checkpoint",
    "sine-first-temp-resume",
    ["train", "resume={copy}"],
    "ok",
    setup=only_hydra("sine", temp=True),
    check=both(summary_completed(20), no_temp_files),
)
add(
    "killed_before_checkpoint",
    "sine-first-temp-rerun",
    ["@sine_cmd", "hydra.run.dir={copy}"],
    "ok",
    setup=only_hydra("sine", temp=True),
    check=both(summary_completed(20), no_temp_files),
)


def leftover_temp(ref, names):
    def setup(c):
        run = c.copy(ref)
        rng = np.random.default_rng(1)
        for name in names:
            (run / name).write_bytes(rng.bytes(5000))  # a write cut short by the kill

    return setup


for ref, steps in (("sine", "30"), ("omni", "9")):
    add(
        "killed_before_checkpoint",
        f"{ref}-temp-latest-resume",
        ["train", "resume={copy}", f"train.steps={steps}"],
        "ok",
        setup=leftover_temp(ref, ["checkpoints/.latest.a1b2c3d4.npz"]),
        check=both(summary_completed(int(steps)), no_temp_files),
    )
add(
    "killed_before_checkpoint",
    "sine-temp-latest-best-resume",
    ["train", "resume={copy}"],
    "ok",
    setup=leftover_temp("sine", ["checkpoints/.latest.x9y8.npz", "checkpoints/.best.q7w6.npz"]),
    check=both(summary_completed(20), no_temp_files),
)
add(
    "killed_before_checkpoint",
    "sine-temp-summary-resume",
    ["train", "resume={copy}", "train.steps=30"],
    "ok",
    setup=leftover_temp("sine", [".summary.json.abcd1234.tmp"]),
    check=both(summary_completed(30), no_temp_files),
)

# -------------------------------------------------------------------------------- concurrent
# A run directory in use by a live process is refused ("in use"); once the owner is dead it
# can be resumed. Two runs started in the same second get different default directories.


def _long_run(c: CaseCtx, omni=False):
    run = c.dir / "R"
    c.vars["R"] = str(run)
    base = "@omni_cmd" if omni else "@sine_cmd"
    proc = c.spawn([base, *LONG, "hydra.run.dir={R}"], name="owner")
    if not c.wait_for(run / "checkpoints" / "latest.npz", proc):
        c.failures.append("setup: the long run wrote no checkpoint")
    return run, proc


def concurrent_probe(slug, probe, omni=False, cmd=""):
    @scenario("concurrent", slug, cmd, "error")
    def run(c: CaseCtx):
        _, owner = _long_run(c, omni)
        p = c.ml(probe, timeout=60)
        says_in_use(c, p)
        if owner.poll() is not None:
            c.failures.append(f"the running owner died (exit {owner.returncode})")
        return p


concurrent_probe(
    "sine-resume-true-while-running",
    ["@sine_cmd", *LONG, "hydra.run.dir={R}", "resume=true"],
    cmd="bg: train <SINE> steps=1e5 into R; then the same + resume=true",
)
concurrent_probe(
    "sine-resume-path-while-running",
    ["train", "resume={R}"],
    cmd="bg: train <SINE> steps=1e5 into R; then train resume=R",
)
concurrent_probe(
    "sine-resume-steps-while-running",
    ["train", "resume={R}", "train.steps=50"],
    cmd="bg: train <SINE> steps=1e5 into R; then train resume=R train.steps=50",
)
concurrent_probe(
    "sine-same-command-while-running",
    ["@sine_cmd", *LONG, "hydra.run.dir={R}"],
    cmd="bg: train <SINE> steps=1e5 into R; then the same command into R",
)
concurrent_probe(
    "omni-resume-path-while-running",
    ["train", "resume={R}"],
    omni=True,
    cmd="bg: train <OMNI> steps=1e5 into R; then train resume=R",
)


def killed_owner_resume(slug, omni, same_command):
    @scenario(
        "concurrent",
        slug,
        "bg: long run into R; SIGKILL it; then "
        + ("the same command + resume=true" if same_command else "train resume=R"),
        "ok",
    )
    def run(c: CaseCtx):
        run_dir, owner = _long_run(c, omni)
        time.sleep(0.5)
        c.sigkill(owner)
        step = checkpoint_step(run_dir) or 0
        c.notes.append(f"killed at checkpoint step {step}")
        base = ["@omni_cmd" if omni else "@sine_cmd", *LONG, "hydra.run.dir={R}", "resume=true"]
        extra = [f"train.steps={step + 6}"]
        p = c.ml(base + extra if same_command else ["train", "resume={R}", *extra])
        c.vars["copy"] = str(run_dir)
        summary_completed(step + 6)(c, p)
        return p


killed_owner_resume("sine-killed-owner-then-resume", False, False)
killed_owner_resume("omni-killed-owner-then-resume", True, False)
killed_owner_resume("sine-killed-owner-then-same-command", False, True)


@scenario(
    "concurrent",
    "two-default-dirs-same-second",
    "train <SINE> twice at the same moment, same cwd, default run dirs",
    "ok (both)",
)
def _two_default(c: CaseCtx):
    a, b = c.spawn(["@sine_cmd"], name="a"), c.spawn(["@sine_cmd"], name="b")
    pa, pb = c.finish(a), c.finish(b)
    runs = sorted(p.parent for p in (c.dir / "outputs").rglob("summary.json"))
    done = [r for r in runs if (read_json(r / "summary.json") or {}).get("status") == "completed"]
    if len(done) != 2:
        c.failures.append(f"{len(done)} completed run dirs, expected 2 different ones")
    return pa if classify(pa, "ok")[0] != "ok" else pb


@scenario(
    "concurrent",
    "two-runs-same-explicit-dir",
    "train <SINE> twice at the same moment into the same new hydra.run.dir",
    "one ok, one error",
)
def _two_same_dir(c: CaseCtx):
    c.vars["R"] = str(c.dir / "R")
    a = c.spawn(["@sine_cmd", "hydra.run.dir={R}"], name="a")
    b = c.spawn(["@sine_cmd", "hydra.run.dir={R}"], name="b")
    pa, pb = c.finish(a), c.finish(b)
    outcomes = [classify(p, "any")[0] for p in (pa, pb)]
    for p, outcome in zip((pa, pb), outcomes):
        if outcome not in ("ok", "clean error"):
            return p
    if sorted(outcomes) != ["clean error", "ok"]:
        c.failures.append(f"outcomes {outcomes}: exactly one run must own the directory")
    return pa if outcomes[0] == "clean error" else pb  # report the refused one


# ------------------------------------------------------------------------ corrupt_checkpoint
# On a copy: a checkpoint that cannot be what the run saved is refused with a clean error.


def corrupt(ref, rel, how):
    def setup(c):
        run = c.copy(ref)
        corrupt_file(run / rel, how)

    return setup


LATEST, BEST = "checkpoints/latest.npz", "checkpoints/best.npz"
for how in ("truncate", "zero", "missing_array", "shapes", "no_meta", "object"):
    add(
        "corrupt_checkpoint",
        f"sine-latest-{how}-resume",
        ["train", "resume={copy}"],
        "error",
        setup=corrupt("sine", LATEST, how),
    )
    add(
        "corrupt_checkpoint",
        f"sine-latest-{how}-eval-latest",
        ["eval", "{copy}", "--checkpoint", "latest"],
        "error",
        setup=corrupt("sine", LATEST, how),
    )
for how in ("truncate", "random", "missing_array", "shapes", "bad_meta"):
    add(
        "corrupt_checkpoint",
        f"sine-best-{how}-eval",
        ["eval", "{copy}"],
        "error",
        setup=corrupt("sine", BEST, how),
    )
add(
    "corrupt_checkpoint",
    "sine-best-truncate-resume",
    ["train", "resume={copy}"],
    "error",
    setup=corrupt("sine", BEST, "truncate"),
)
add(
    "corrupt_checkpoint",
    "sine-latest-is-dir-resume",
    ["train", "resume={copy}"],
    "error",
    setup=corrupt("sine", LATEST, "dir"),
)
for how in ("zero", "shapes"):
    add(
        "corrupt_checkpoint",
        f"omni-latest-{how}-resume",
        ["train", "resume={copy}"],
        "error",
        setup=corrupt("omni", LATEST, how),
    )
for how in ("truncate", "shapes"):
    add(
        "corrupt_checkpoint",
        f"omni-best-{how}-eval",
        ["eval", "{copy}"],
        "error",
        setup=corrupt("omni", BEST, how),
    )

# ------------------------------------------------------------------------- corrupt_run_files
# On a copy: a damaged summary.json / overrides.yaml / config.yaml. eval and resume refuse;
# compare still lists the run (marked), since one bad run must not hide the others.


def damage(ref, rel, how):
    def setup(c):
        run = c.copy(ref, name="damaged-run")  # a name `compare` must print
        if how == "wrong_types":
            write_wrong_types(run / rel)
        else:
            corrupt_file(run / rel, how)

    return setup


def listed(c: CaseCtx, p: Proc) -> None:
    if p.rc == 0 and Path(c.vars["copy"]).name not in p.stdout:
        c.failures.append("compare does not list the damaged run")


def marked_unreadable(rel):
    """compare lists the run as `unreadable: <file> ...` (issue 28), never as a run with the
    default settings."""

    def check(c: CaseCtx, p: Proc) -> None:
        listed(c, p)
        if p.rc == 0 and not re.search(rf"unreadable: [^\n]*{re.escape(rel)}", p.stdout):
            c.failures.append(f"compare does not mark the run `unreadable: {rel} ...`")

    return check


DAMAGES = {
    "summary.json": ("wrong_types", "missing"),
    ".hydra/overrides.yaml": ("invalid", "wrong_types", "missing"),
    ".hydra/config.yaml": ("zero", "invalid", "wrong_types", "missing"),
}
for rel, hows in DAMAGES.items():
    for how in hows:
        stem = Path(rel).stem
        # A killed run has no summary.json: eval and resume of it are fine. Neither command
        # needs summary.json or overrides.yaml to do its work (resume replaces both), so a
        # damaged one may be refused cleanly or passed over; config.yaml they need.
        need = "error" if stem == "config" else "any"
        if stem == "summary" and how == "missing":
            need = "ok"
        add(
            "corrupt_run_files",
            f"sine-{stem}-{how}-eval",
            ["eval", "{copy}"],
            need,
            setup=damage("sine", rel, how),
        )
        add(
            "corrupt_run_files",
            f"sine-{stem}-{how}-compare",
            ["compare", "{copy}"],
            "ok",
            setup=damage("sine", rel, how),
            # a damaged .hydra file is named (a missing one is not damage: a run may lack it)
            check=marked_unreadable(rel) if stem != "summary" and how != "missing" else listed,
        )
        add(
            "corrupt_run_files",
            f"sine-{stem}-{how}-resume",
            ["train", "resume={copy}"],
            need,
            setup=damage("sine", rel, how),
        )
add(
    "corrupt_run_files",
    "omni-config-invalid-eval",
    ["eval", "{copy}"],
    "error",
    setup=damage("omni", ".hydra/config.yaml", "invalid"),
)
add(
    "corrupt_run_files",
    "omni-config-wrong-types-resume",
    ["train", "resume={copy}"],
    "error",
    setup=damage("omni", ".hydra/config.yaml", "wrong_types"),
)

# ----------------------------------------------------------------------------- interpolation
# A run directory is data: reading one must never resolve `${oc.env:...}` (or run YAML tags).
# FUZZ_SECRET is set for every case; its value must appear in no output and no file.


def yaml_edit(ref, rel, edit):
    def setup(c):
        run = c.copy(ref)
        path = run / rel
        path.write_text(edit(path.read_text(), c))
        summary = run / "summary.json"
        if rel.endswith("overrides.yaml"):  # compare reads overrides.yaml only without these
            data = json.loads(summary.read_text())
            data.pop("overrides", None)
            summary.write_text(json.dumps(data))

    return setup


def set_key(dotted: str, value: str):
    """Set one key of a YAML mapping (e.g. algo.name) to a string."""

    def edit(text, c):
        data = yaml.safe_load(text)
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value
        return yaml.safe_dump(data, sort_keys=False)

    return edit


ENV = "${oc.env:FUZZ_SECRET}"
INTERP = [
    ("sine-config-seed", "sine", ".hydra/config.yaml", set_key("seed", ENV)),
    ("sine-config-algo-name", "sine", ".hydra/config.yaml", set_key("algo.name", ENV)),
    ("omni-config-data-root", "omni", ".hydra/config.yaml", set_key("data.root", ENV)),
    # two backslashes: an escaped backslash, then a live interpolation (OmegaConf's grammar)
    ("sine-config-escaped", "sine", ".hydra/config.yaml", set_key("algo.name", "\\\\" + ENV)),
    (
        "sine-config-nested-decode",
        "sine",
        ".hydra/config.yaml",
        set_key("eval.seed", "${oc.decode:" + ENV + "}"),
    ),
    ("sine-overrides-seed", "sine", ".hydra/overrides.yaml", lambda t, c: t + f"- seed={ENV}\n"),
    (
        "omni-overrides-root",
        "omni",
        ".hydra/overrides.yaml",
        lambda t, c: t + f"- data.root={ENV}\n",
    ),
]
for slug, ref, rel, edit in INTERP:
    for cmd in (
        ["eval", "{copy}"],
        ["compare", "{copy}"],
        ["train", "resume={copy}", "train.steps=30"],
    ):
        verb = {"eval": "eval", "compare": "compare", "train": "resume"}[cmd[0]]
        if (slug.endswith(("escaped", "decode")) and verb == "compare") or (
            "overrides" in slug and verb == "eval"
        ):  # compare/eval do not read that file
            continue
        add(
            "interpolation",
            f"{slug}-{verb}",
            cmd,
            "any",
            setup=yaml_edit(ref, rel, edit),
            scan_files=True,
        )
add(
    "interpolation",
    "sine-summary-literal-compare",
    ["compare", "{copy}"],
    "ok",
    setup=lambda c: (
        c.copy("sine"),
        (Path(c.vars["copy"]) / "summary.json").write_text(
            json.dumps(
                {
                    **json.loads((c.h.pristine["sine"] / "summary.json").read_text()),
                    "algo": ENV,
                    "overrides": [f"seed={ENV}"],
                }
            )
        ),
    ),
    scan_files=True,
)


def _python_tag(text, c):
    tag = f"seed: !!python/object/apply:os.system ['touch {c.dir}/pwned']"
    return re.sub(r"(?m)^seed: .*$", tag, text)


def not_pwned(c, p):
    if (c.dir / "pwned").exists():
        c.failures.append("a YAML tag in config.yaml ran a command")


for verb, cmd in (("eval", ["eval", "{copy}"]), ("resume", ["train", "resume={copy}"])):
    add(
        "interpolation",
        f"sine-config-python-tag-{verb}",
        cmd,
        "any",
        setup=yaml_edit("sine", ".hydra/config.yaml", _python_tag),
        check=not_pwned,
    )

# ---------------------------------------------------------------------------------- symlinks
# A run whose files are symlinks to places outside it: eval and resume must not write there.


def symlinked(rel, target_kind="move"):
    """target_kind: move (the real file/folder moved to outside/ and linked), dangling, loop,
    file (a folder replaced by a link to an outside file)."""

    def setup(c):
        run = c.copy("sine")
        outside = c.dir / "outside"
        outside.mkdir()
        (outside / "unrelated.txt").write_text("must stay as it is\n")
        link = run / rel
        if target_kind == "move":
            target = outside / Path(rel).name
            if link.exists():
                shutil.move(str(link), str(target))
            else:
                target.mkdir()
        elif target_kind == "dangling":
            link.unlink(missing_ok=True)
            target = outside / "not-yet.log"
        elif target_kind == "file":
            shutil.rmtree(link, ignore_errors=True)
            target = outside / "a-file"
            target.write_text("a file, not a folder\n")
        else:  # loop
            shutil.rmtree(link, ignore_errors=True) if link.is_dir() else link.unlink(True)
            target = link
        link.symlink_to(target)
        c.watch(outside)

    return setup


RESUME = ["train", "resume={copy}", "train.steps=30"]  # trains 10 more steps: every file written
for slug, rel, kind, verbs in [
    ("train-log", "train.log", "move", ("resume", "eval")),
    ("checkpoints-dir", "checkpoints", "move", ("resume", "eval")),
    ("evals-dir", "evals", "move", ("eval",)),
    ("metrics", "metrics.jsonl", "move", ("resume", "eval")),
    ("hydra-dir", ".hydra", "move", ("resume", "eval")),
    ("summary", "summary.json", "move", ("resume",)),
    ("latest-npz", "checkpoints/latest.npz", "move", ("resume",)),
    ("dangling-train-log", "train.log", "dangling", ("resume",)),
    ("evals-is-file", "evals", "file", ("eval",)),
    ("checkpoints-loop", "checkpoints", "loop", ("resume", "eval")),
]:
    for verb in verbs:
        argv = RESUME if verb == "resume" else ["eval", "{copy}"]
        add(
            "symlinks",
            f"{slug}-{verb}",
            argv,
            "error" if kind == "loop" else "any",
            setup=symlinked(rel, kind),
        )

# ------------------------------------------------------------------------------------- sizes
# Sizes no machine can hold are refused before any allocation: never an OOM, abort or hang.

B, G2, T40, E30 = "1000000000", str(2**31), str(2**40), str(10**30)
NAMES = {B: "1e9", G2: "2^31", T40: "2^40", E30: "1e30", "1e9": "1e9-float"}
SIZES = [
    ("sine", "data.k_shot", B),
    ("sine", "data.k_shot", T40),
    ("sine", "data.k_query", G2),
    ("sine", "train.meta_batch", G2),
    ("sine", "train.meta_batch", T40),
    ("sine", "model.hidden", B),
    ("sine", "model.hidden", E30),
    ("sine", "model.layers", B),
    ("sine", "eval.num_tasks", B),
    ("sine", "eval.val_tasks", G2),
    ("sine", "algo.inner_steps", B),
    ("sine", "algo.inner_steps", G2),
    ("sine", "train.steps", B),
    ("sine", "train.steps", E30),
    ("sine", "eval.inner_steps", B),
    ("sine", "eval.batch", G2),
    ("omni", "data.k_shot", B),
    ("omni", "data.n_way", G2),
    ("omni", "model.hidden", B),
    ("omni", "train.meta_batch", T40),
    ("omni", "eval.num_tasks", B),
    ("omni", "data.k_query", E30),
]
for ref, key, value in SIZES:
    argv = ["train", "@sine" if ref == "sine" else "@omni", f"{key}={value}"]
    if (key, value) == ("train.steps", B):  # a long run, but a valid one: a budget ends it
        add("sizes", f"{ref}-{key}={NAMES[value]}", [*argv, "train.max_minutes=0.05"], "ok")
        continue
    add("sizes", f"{ref}-{key}={NAMES[value]}", argv, "error")
for value in (B, G2, E30):
    add(
        "sizes",
        f"multi-sine-data.n_tasks={NAMES[value]}",
        ["train", "algo=multitask", "data=multi_sinusoid", "@sine", f"data.n_tasks={value}"],
        "error",
    )
add(
    "sizes",
    "sine-product-kshot-metabatch",
    ["train", "@sine", "data.k_shot=100000", "data.k_query=100000", "train.meta_batch=100000"],
    "error",
)
add(
    "sizes",
    "omni-product-nway-metabatch",
    ["train", "algo=protonet", "@omni", "data.n_way=1000", "train.meta_batch=100000"],
    "error",
)

# ----------------------------------------------------------------------------------- machine
# A full disk, a read-only folder, signals: a clean error, and the run stays resumable.


def fill(folder: Path, leave: int) -> None:
    """Fill a (tmpfs) folder's file system until only `leave` bytes are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / ".filler", "wb") as f:
        try:
            f.write(b"\0" * max(free - leave, 0))
            f.flush()
        except OSError:
            pass


def full_disk_train(slug, leave, omni=False):
    @scenario("machine", slug, f"train into a tmpfs with {leave // 1024} KiB free", "error")
    def run(c: CaseCtx):
        disk = c.mount("disk", "400k")
        fill(disk, leave)
        return c.ml(["@omni_cmd" if omni else "@sine_cmd", f"hydra.run.dir={disk}/run"])


full_disk_train("enospc-sine-0k", 0)
full_disk_train("enospc-sine-12k", 12 * 1024)
full_disk_train("enospc-sine-44k", 44 * 1024)
full_disk_train("enospc-omni-150k", 150 * 1024, omni=True)


def on_mount(slug, argv, expect, mode, cmd):
    """A copy of the sine reference on a tmpfs that is then filled (full) or made read-only."""

    @scenario("machine", slug, cmd, expect)
    def run(c: CaseCtx):
        disk = c.mount("disk", "1m")
        c.copy("sine", parent=disk)
        c.vars["disk"] = str(disk)
        if mode == "full":
            fill(disk, 0)
        else:
            c.remount_ro(disk)
        return c.ml(argv)


on_mount("enospc-eval-copy", ["eval", "{copy}"], "error", "full", "eval COPY on a full tmpfs")
on_mount(
    "enospc-resume-copy",
    ["train", "resume={copy}", "train.steps=40"],
    "error",
    "full",
    "train resume=COPY train.steps=40 on a full tmpfs",
)
on_mount(
    "enospc-compare-csv",
    ["compare", "{copy}", "--csv", "{disk}/table.csv"],
    "error",
    "full",
    "compare COPY --csv FULL/table.csv",
)
on_mount("readonly-eval-copy", ["eval", "{copy}"], "error", "ro", "eval COPY on a read-only tmpfs")
on_mount(
    "readonly-resume-copy",
    ["train", "resume={copy}", "train.steps=40"],
    "error",
    "ro",
    "train resume=COPY train.steps=40 on a read-only tmpfs",
)
on_mount(
    "readonly-compare-copy", ["compare", "{copy}"], "ok", "ro", "compare COPY on a read-only tmpfs"
)
on_mount(
    "readonly-compare-md",
    ["compare", "{copy}", "--md", "{disk}/t.md"],
    "error",
    "ro",
    "compare COPY --md RO/t.md",
)
on_mount(
    "readonly-train-into",
    ["@sine_cmd", "hydra.run.dir={disk}/new/run"],
    "error",
    "ro",
    "train <SINE> hydra.run.dir=RO/new/run",
)


@scenario(
    "machine", "readonly-cwd-default-dir", "train <SINE> with cwd on a read-only tmpfs", "error"
)
def _ro_cwd(c: CaseCtx):
    disk = c.mount("disk", "64k")
    c.remount_ro(disk)
    return c.ml(["@sine_cmd"], cwd=disk)


def cache_on_mount(slug, mode, expect):
    @scenario(
        "machine",
        slug,
        f"train <TINY> (synthetic omniglot), XDG_CACHE_HOME on a {mode} tmpfs",
        expect,
    )
    def run(c: CaseCtx):
        disk = c.mount("cache", "200k")
        if mode == "full":
            fill(disk, 0)
        else:
            c.remount_ro(disk)
        c.vars["data"] = str(c.h.tiny_zips())
        return c.ml(
            ["train", "algo=protonet", "@tiny", "data.root={data}", "hydra.run.dir={case}/run"],
            env={**c.h.env, "XDG_CACHE_HOME": str(disk)},
        )


cache_on_mount("readonly-data-cache", "read-only", "any")
cache_on_mount("enospc-data-cache", "full", "any")


def signalled(slug, sig, then_resume):
    name = signal.Signals(sig).name
    cmd = f"train <SINE> steps=1e5; {name} after the first checkpoint" + (
        "; then resume=R train.steps=step+6" if then_resume else ""
    )

    @scenario("machine", slug, cmd, "ok" if then_resume else "error")
    def run(c: CaseCtx):
        run_dir, proc = _long_run(c)
        time.sleep(0.3)
        proc.send_signal(sig)
        p = c.finish(proc, timeout=60)
        step = checkpoint_step(run_dir)
        if step is None:
            c.failures.append(f"no loadable latest.npz after {name}")
        if not then_resume:
            return p
        if classify(p, "error")[0] != "clean error":
            c.notes.append(f"the {name}'d run: {classify(p, 'error')[1]}")
        c.vars["copy"] = str(run_dir)
        q = c.ml(["train", "resume={R}", f"train.steps={(step or 0) + 6}"])
        summary_completed((step or 0) + 6)(c, q)
        return q


signalled("sigterm-mid-run", signal.SIGTERM, False)
signalled("sigint-mid-run", signal.SIGINT, False)
signalled("sigterm-then-resume", signal.SIGTERM, True)

# -------------------------------------------------------------------------------- bad_values
# Values a careless user types. All refused with one clean paragraph, except where noted.

BAD_SINE = [
    ("distributed-no-coordinator", ["distributed=true"]),
    ("amplitude-len1", ["data.amplitude=[1]"]),
    ("x-range-len3", ["data.x_range=[1,2,3]"]),
    ("steps-abc", ["train.steps=abc"]),
    ("outer-lr-list", ["train.outer_lr=[1]"]),
    ("meta-batch-dict", ["train.meta_batch={a:1}"]),
    ("steps-zero", ["train.steps=0"]),
    ("steps-negative", ["train.steps=-5"]),
    ("outer-lr-negative", ["train.outer_lr=-1"]),
    ("outer-lr-nan", ["train.outer_lr=nan"]),
    ("inner-lr-inf", ["algo.inner_lr=inf"]),
    ("inner-steps-zero", ["algo.inner_steps=0"]),
    ("k-shot-zero", ["data.k_shot=0"]),
    ("layers-negative", ["model.layers=-1"]),
    ("max-minutes-nan", ["train.max_minutes=nan"]),
    ("task-chunk-not-divisor", ["train.task_chunk=7"]),
    ("first-order-2", ["algo.first_order=2"]),
    ("first-order-yes", ["algo.first_order=yes"]),
    ("seed-2pow32", ["seed=4294967296"]),
    ("seed-negative", ["seed=-1"]),
    ("plus-algo-innerlr", ["+algo.innerlr=0.1"]),
    ("plusplus-train-foo", ["++train.foo=1"]),
    ("unknown-key-no-plus", ["train.foo=1"]),
    ("delete-train-steps", ["~train.steps"]),
    ("n-way-on-sinusoid", ["data.n_way=5"]),
    ("algo-nope", ["algo=nope"]),
    ("experiment-nope", ["experiment=nope"]),
    ("protonet-on-sinusoid", ["algo=protonet"]),
    ("resume-nonexistent", ["resume=/nonexistent/run"]),
    ("resume-ref-checkpoints-subdir", ["resume={ref_sine}/checkpoints"]),
    ("resume-empty-dir", ["resume={case}/empty"]),
    ("run-dir-is-file", ["hydra.run.dir={case}/afile"]),
    ("run-dir-under-file", ["hydra.run.dir={case}/afile/sub"]),
]


def _files(c):
    (c.dir / "afile").write_text("a file, not a folder\n")
    (c.dir / "empty").mkdir()
    (c.dir / "notarun.txt").write_text("hello\n")


for slug, extra in BAD_SINE:
    add("bad_values", f"sine-{slug}", ["train", "@sine", *extra], "error", setup=_files)
add("bad_values", "sine-multirun-bad-option", ["train", "-m", "@sine", "algo=maml,nope"], "error")
for slug, extra in [
    ("split-sizes-len2", ["data.split_sizes=[1,2]"]),
    ("split-sizes-too-many", ["data.split_sizes=[2000,100,423]"]),
    ("shots-over-20", ["data.k_shot=10", "data.k_query=15"]),
    ("root-nonexistent", ["data.root=/nonexistent/omniglot", "data.download=false"]),
]:
    add("bad_values", f"omni-{slug}", ["train", "algo=protonet", "@omni", *extra], "error")

# Broken datasets (synthetic Omniglot zips; data.download=false, there is no network).


def broken_zips(how):
    def setup(c):
        root = c.dir / "omniglot"
        shutil.copytree(c.h.tiny_zips(), root)
        bg, ev = root / "images_background.zip", root / "images_evaluation.zip"
        if how == "random":
            bg.write_bytes(np.random.default_rng(0).bytes(bg.stat().st_size))
        elif how == "truncated":
            bg.write_bytes(bg.read_bytes()[: bg.stat().st_size // 2])
        elif how == "no-evaluation":
            ev.unlink()
        elif how == "bad-png":  # one drawing is not a PNG
            with zipfile.ZipFile(bg) as z:
                entries = {n: z.read(n) for n in z.namelist()}
            first = sorted(n for n in entries if n.endswith(".png"))[0]
            entries[first] = b"this is not a png"
            with zipfile.ZipFile(bg, "w") as z:
                for n, data in entries.items():
                    z.writestr(n, data)
        elif how == "empty-folder":
            bg.unlink(), ev.unlink()
        c.vars["data"] = str(root)

    return setup


for how in ("random", "truncated", "no-evaluation", "bad-png", "empty-folder"):
    add(
        "bad_values",
        f"omni-dataset-{how}",
        ["train", "algo=protonet", "@tiny", "data.root={data}", "hydra.run.dir={case}/run"],
        "error",
        setup=broken_zips(how),
    )
add(
    "bad_values",
    "omni-dataset-too-few-characters",
    ["train", "algo=protonet", "@tiny", "data.root={data}", "data.split_sizes=[1100,100,423]"],
    "error",
    setup=broken_zips("none"),
)

# Received dataset files that must not be trusted (docs/RELIABILITY.md, "What each reader
# trusts"): a pickle whose payload runs a shell command, and a cache whose content was replaced.


class _Shell:
    """Pickles as os.system(command): a hostile dataset file's payload."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


MINI = [  # tiny learn2learn-format miniImageNet pickles: 4 classes of 3 images per split
    "data=mini_imagenet",
    "data.root={data}",
    "data.n_way=2",
    "data.k_shot=1",
    "data.k_query=1",
    "data.image_size=16",
    "model.hidden=8",
    "train.steps=4",
    "train.meta_batch=2",
    "eval.every=2",
    "eval.num_tasks=4",
    "eval.val_tasks=2",
    "eval.batch=2",
    "progress=false",
]


def _mini_pickles(c: CaseCtx) -> None:
    """learn2learn's three pickles; the validation one's class_dict is an os.system payload."""
    import pickle

    root = c.dir / "mini_imagenet"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "validation", "test"):
        classes = {f"n0{split[:2]}{k}": [3 * k, 3 * k + 1, 3 * k + 2] for k in range(4)}
        record = {
            "image_data": rng.integers(0, 256, (12, 10, 10, 3), dtype=np.uint8),
            "class_dict": _Shell(f"touch '{c.dir}/pwned'") if split == "validation" else classes,
        }
        (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(record, protocol=4))
    c.vars["data"] = str(root)


def _refused_unrun(c: CaseCtx, p: Proc) -> None:
    if (c.dir / "pwned").exists():
        c.failures.append("the pickle's payload ran a shell command")
    line = error_line(p.stderr, p.stdout)
    if "mini-imagenet-cache-validation.pkl" not in line or "posix.system" not in line:
        c.failures.append("the error does not name the file and the call it refused")
    after = p.stderr[p.stderr.find("metalearn: error:") :].strip().splitlines()
    if len(after) > 1:
        c.failures.append(f"the error is {len(after)} lines, not one paragraph")


add(
    "dataset_trust",
    "mini-imagenet-pickle-runs-shell",
    ["train", "algo=protonet", *MINI, "hydra.run.dir={case}/run"],
    "error",
    setup=_mini_pickles,
    check=_refused_unrun,
    cmd="train algo=protonet data=mini_imagenet <tiny> (a pickle whose payload is os.system)",
)


@scenario(
    "dataset_trust",
    "omni-cache-zeroed",
    "train <TINY>; zero the cache's images (same names, shapes, checksum array); train again",
    "ok",
)
def _zeroed_cache(c: CaseCtx):
    env = {**c.h.env, "XDG_CACHE_HOME": str(c.dir / "xdg")}  # not the shared cache
    c.vars["data"] = str(c.h.tiny_zips())
    argv = ["train", "algo=protonet", "@tiny", "data.root={data}"]
    first = c.ml([*argv, "hydra.run.dir={case}/first"], env=env)
    cached = sorted((c.dir / "xdg").rglob("omniglot-*.npz"))
    if first.rc != 0 or len(cached) != 1:
        c.failures.append(f"the first run failed or cached {len(cached)} files")
        return first
    original = cached[0].read_bytes()
    rewrite_npz(cached[0], lambda a: {**a, "images": np.zeros_like(a["images"])})
    second = c.ml([*argv, "hydra.run.dir={case}/second"], env=env)
    said = second.stdout + second.stderr + read_text(c.dir / "second" / "train.log")
    if "does not match its checksum" not in said:
        c.failures.append("the zeroed cache was not reported as rebuilt")
    if cached[0].read_bytes() != original:
        c.failures.append("the cache was not rebuilt to its original content")
    tests = [(read_json(c.dir / r / "summary.json") or {}).get("test") for r in ("first", "second")]
    if second.rc == 0 and (tests[0] is None or tests[0] != tests[1]):
        c.failures.append(f"the test metrics differ from the first run's: {tests}")
    return second


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# eval and compare with bad arguments (on the reference runs: a refusal writes nothing).
for slug, argv, expect in [
    ("split-nope", ["eval", "{ref_sine}", "--split", "nope"], "error"),
    ("checkpoint-nope", ["eval", "{ref_sine}", "--checkpoint", "nope"], "error"),
    ("unknown-flag", ["eval", "{ref_sine}", "--bogus"], "error"),
    ("no-args", ["eval"], "error"),
    ("not-key-value", ["eval", "{ref_sine}", "notkeyvalue"], "error"),
    ("num-tasks-abc", ["eval", "{ref_sine}", "eval.num_tasks=abc"], "error"),
    ("hidden80", ["eval", "{ref_sine}", "model.hidden=80"], "error"),
    ("group-override", ["eval", "{ref_sine}", "algo=reptile"], "error"),
    ("non-run-dir", ["eval", "{case}/empty"], "error"),
    ("a-file", ["eval", "{case}/notarun.txt"], "error"),
    ("checkpoints-subdir", ["eval", "{ref_sine}/checkpoints"], "error"),
]:
    add("bad_values", f"eval-{slug}", argv, expect, setup=_files)


def wrote(rel):
    def check(c, p):
        if p.rc == 0 and not (c.dir / rel).is_file():
            c.failures.append(f"exit 0 but {rel} was not written")

    return check


for slug, argv, expect, check in [
    (
        "csv-missing-folder",
        ["compare", "{ref_sine}", "--csv", "{case}/missing/folder/out.csv"],
        "ok",
        wrote("missing/folder/out.csv"),
    ),
    (
        "md-missing-folder",
        ["compare", "{ref_sine}", "{ref_omni}", "--md", "{case}/new/t.md"],
        "ok",
        wrote("new/t.md"),
    ),
    ("not-a-run-file", ["compare", "{case}/notarun.txt"], "error", None),
    ("nonexistent", ["compare", "/nonexistent/runs"], "error", None),
    ("no-args", ["compare"], "error", None),
    ("empty-dir", ["compare", "{case}/empty"], "any", None),
]:
    add("bad_values", f"compare-{slug}", argv, expect, setup=_files, check=check)
add("bad_values", "unknown-command", ["nope"], "error")
add("bad_values", "no-command", [], "error")

# ------------------------------------------------------------------------------- kill_resume
# SIGKILL at random moments (a fixed seed), then resume: the test metrics equal those of the
# same command run without interruption.

KILL_RNG = random.Random(20261201)
# Fractions of the run's metrics.jsonl lines, one drawn in each third of the run (early, middle,
# late), then two for the case that is killed twice.
KILL_MOMENTS = [(i + KILL_RNG.random()) / 3 for i in range(3)] + sorted(
    KILL_RNG.random() for _ in range(2)
)


def kill_at(c: CaseCtx, run: Path, fraction: float, total_lines: int, argv, name) -> str:
    """Start argv, SIGKILL it once metrics.jsonl has `fraction` of the run's lines."""
    target = max(1, int(fraction * (total_lines - 1)))
    proc = c.spawn(argv, name=name)
    deadline = time.time() + c.h.timeout
    while proc.poll() is None and time.time() < deadline:
        if count_lines(run / "metrics.jsonl") >= target:
            break
        time.sleep(0.002)
    finished = proc.poll() is not None
    c.sigkill(proc)
    c.finish(proc)
    step = checkpoint_step(run)
    return (
        f"{'finished before' if finished else 'SIGKILL at'} metrics line {target}/"
        f"{total_lines}, checkpoint step {step}"
    )


def same_test_metrics(c: CaseCtx, p: Proc, run: Path, base: dict | None = None) -> None:
    base = base if base is not None else c.h.kill_baseline()
    got = read_json(run / "summary.json") or {}
    if base is None:
        c.failures.append("setup: the uninterrupted run failed")
        return
    want, have = base["test"], got.get("test") or {}
    bad = [
        k
        for k in ("loss", "loss_ci95", "num_tasks")
        if not (
            isinstance(have.get(k), (int, float))
            and abs(have[k] - want[k]) <= 1e-6 * max(1.0, abs(want[k]))
        )
    ]
    if p.rc == 0 and bad:
        c.failures.append(
            "test metrics differ from the uninterrupted run: "
            + ", ".join(f"{k} {have.get(k)} != {want[k]}" for k in bad)
        )


def kill_case(n, fractions, resume_argv, how):
    @scenario(
        "kill_resume", f"sigkill-{n}", f"train <KILL>; SIGKILL at random moment(s); {how}", "ok"
    )
    def run(c: CaseCtx):
        base = c.h.kill_baseline()
        lines = base["_lines"] if base else 60
        run_dir = c.dir / "R"
        c.vars["R"] = c.vars["copy"] = str(run_dir)
        first = ["train", "@kill", "hydra.run.dir={R}"]
        c.notes.append(kill_at(c, run_dir, fractions[0], lines, first, "first"))
        for i, fraction in enumerate(fractions[1:]):  # killed again while resuming
            c.notes.append(kill_at(c, run_dir, fraction, lines, resume_argv, f"again{i}"))
        p = c.ml(resume_argv)
        same_test_metrics(c, p, run_dir)
        return p


kill_case(1, KILL_MOMENTS[0:1], ["train", "resume={R}"], "train resume=R")
kill_case(
    2,
    KILL_MOMENTS[1:2],
    ["train", "@kill", "hydra.run.dir={R}", "resume=true"],
    "the same command + resume=true",
)
kill_case(3, KILL_MOMENTS[2:3], ["train", "resume={R}"], "train resume=R")
kill_case(
    4, sorted(KILL_MOMENTS[3:5]), ["train", "resume={R}"], "resume=R killed again, then resume=R"
)


# ----------------------------------------------------------- issue 28: one paragraph, exit 2


def one_paragraph(*names):
    """Refused with exit 2 and one `metalearn: error:` paragraph that names each of `names`;
    no usage dump (argparse's and Hydra's own format print one)."""

    def check(c: CaseCtx, p: Proc) -> None:
        if p.timed_out or p.rc == 0:
            return  # classify reports these
        if p.rc != 2:
            c.failures.append(f"exit {p.rc}, not 2")
        start = p.stderr.find("metalearn: error:")
        after = p.stderr[start:].strip().splitlines() if start >= 0 else []
        if len(after) > 1:
            c.failures.append(f"the error is {len(after)} lines, not one paragraph")
        if "usage:" in (p.stdout + p.stderr).lower():
            c.failures.append("a usage text is printed")
        line = error_line(p.stderr, p.stdout)
        missing = [n for n in names if n not in line]
        if missing:
            c.failures.append(f"the error does not name {', '.join(missing)}")

    return check


def nothing_written(setup=None):
    """(setup, check): the case's folder (the command's cwd) is as it was after setup."""

    def before(c: CaseCtx) -> None:
        if setup:
            setup(c)
        c.vars["_tree"] = json.dumps(hash_tree(c.dir))

    def after(c: CaseCtx, p: Proc) -> None:
        changes = diff_trees(json.loads(c.vars["_tree"]), hash_tree(c.dir))
        if changes:
            c.failures.append(f"the case folder changed: {'; '.join(changes[:3])}")

    return before, after


# ------------------------------------------------------------------------------ eval_settings
# eval trains nothing: a setting only training reads is refused, naming the setting (and the
# one eval reads instead); overrides may follow the options; eval checks only what it uses, so
# the documented within-alphabet eval of an Omniglot run runs.


def eval_tasks(n):
    """eval's JSON result holds num_tasks == n (the override after the options took effect)."""

    def found(node) -> list:
        if isinstance(node, dict):
            here = [node["num_tasks"]] if "num_tasks" in node else []
            return here + [v for x in node.values() for v in found(x)]
        return [v for x in node for v in found(x)] if isinstance(node, list) else []

    def check(c: CaseCtx, p: Proc) -> None:
        try:
            counts = found(json.loads(p.stdout))
        except ValueError:
            counts = []
        if p.rc == 0 and (not counts or any(k != n for k in counts)):
            c.failures.append(f"the result's num_tasks are {counts}, not {n}")

    return check


for slug, override, names in [
    ("train-steps", "train.steps=5", ("train.steps",)),
    ("eval-every", "eval.every=5", ("eval.every",)),
    ("train-k-shot", "train.k_shot=3", ("train.k_shot", "data.k_shot")),
    ("seed", "seed=3", ("seed", "eval.seed")),
]:
    add(
        "eval_settings",
        f"sine-{slug}",
        ["eval", "{ref_sine}", override],
        "error",
        check=one_paragraph(*names),
    )
add(
    "eval_settings",
    "sine-overrides-after-options",
    ["eval", "{ref_sine}", "--checkpoint", "latest", "eval.num_tasks=3", "--no-save"],
    "ok",
    check=eval_tasks(3),
)
add(
    "eval_settings",
    "omni-within-alphabet",
    ["eval", "{ref_omni}", "data.episodes=within_alphabet"],
    "ok",
    ref_evals=True,
)

# -------------------------------------------------------------------------------- empty_paths
# An empty path is refused, never taken as the current folder (the case's folder, where
# nothing may appear); the reference runs are checked unchanged as for every case.

OMNI_NO_ROOT = [a for a in OMNI if not a.startswith("data.root=")]


def _query_folder(c: CaseCtx) -> None:
    (c.dir / "query").mkdir()


for slug, argv, names, setup, cmd in [
    ("train-resume", ["train", "@sine", "resume="], ("resume",), None, "train <SINE> resume=''"),
    (
        "omni-data-root",
        ["train", "algo=protonet", *OMNI_NO_ROOT, "data.root="],
        ("data.root",),
        None,
        "train algo=protonet <OMNI without data.root> data.root=''",
    ),
    ("eval", ["eval", ""], ("run_dir", "empty path"), None, "eval ''"),
    ("compare", ["compare", ""], ("paths", "empty path"), None, "compare ''"),
    (
        "predict-support",
        ["predict", "{ref_omni}", "--support", "", "--query", "{case}/query"],
        ("--support", "empty path"),
        _query_folder,
        "predict {ref_omni} --support '' --query {case}/query",
    ),
]:
    before, after = nothing_written(setup)
    add(
        "empty_paths",
        slug,
        argv,
        "error",
        setup=before,
        check=both(one_paragraph(*names), after),
        cmd=cmd,
    )
# started inside a run, an empty resume= must not resume that run (the current folder)
before, after = nothing_written(_copy_sine)
add(
    "empty_paths",
    "train-resume-inside-a-run",
    ["train", "resume=", "train.steps=30"],
    "error",
    setup=before,
    check=both(one_paragraph("resume"), after),
    cwd=lambda c: c.vars["copy"],
    cmd="(cwd: a copy of the sine run) train resume='' train.steps=30",
)

# ------------------------------------------------------------------------------ unknown_flags
# Every command answers an unknown flag with the same one paragraph (Hydra's parser printed its
# usage and exited 1; argparse printed its usage).

for slug, argv in [
    ("top-level", ["--bogus"]),
    ("train", ["train", "--bogus"]),
    ("eval", ["eval", "{ref_sine}", "--bogus"]),
    ("compare", ["compare", "--bogus"]),
    ("predict", ["predict", "--bogus"]),
]:
    add("unknown_flags", slug, argv, "error", check=one_paragraph("--bogus"))

# ------------------------------------------------------------------------------------ signals
# SIGTERM stops training within one step: a checkpoint of that step, `Stopped by SIGTERM`,
# exit 2, and the same command with resume=true ends with an uninterrupted run's test metrics.
# Nothing is logged or validated between step 1 and the end (log_every, eval.every and
# checkpoint_every beyond train.steps), so no logged step's sync hides a late stop.

SIG = [
    "train.steps=3000",
    "train.log_every=100000",
    "eval.every=100000",
    "train.checkpoint_every=100000",
    "eval.num_tasks=20",
    "eval.val_tasks=10",
    "progress=false",
]
LISTS["@sig"], SHORT["@sig"] = SIG, "<SIG>"
SIG_STEPS = 3000


def sigterm_resume(slug, delay):
    @scenario(
        "signals",
        slug,
        f"train <SIG>; SIGTERM {delay} s after step 1 is logged; the same + resume=true",
        "ok",
    )
    def run(c: CaseCtx):
        base = c.h.uninterrupted("signals", ["train", *SIG])
        run_dir = c.dir / "R"
        c.vars["R"] = c.vars["copy"] = str(run_dir)
        argv = ["train", "@sig", "hydra.run.dir={R}"]
        proc = c.spawn(argv, name="first")
        deadline = time.time() + c.h.timeout
        while proc.poll() is None and time.time() < deadline:
            if count_lines(run_dir / "metrics.jsonl") >= 1:  # step 1's record
                break
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is not None:
            c.failures.append("setup: the run ended before the signal")
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        first = c.finish(proc, timeout=60)
        took = time.time() - sent
        step = checkpoint_step(run_dir)
        c.notes.append(f"stopped at step {step}/{SIG_STEPS}, exit {first.rc} {took:.1f} s after")
        if first.rc != 2 or "Stopped by SIGTERM" not in first.stderr:
            c.failures.append(f"the SIGTERM'd run: exit {first.rc}, no 'Stopped by SIGTERM'")
        if step is None:
            c.failures.append("no loadable latest.npz after SIGTERM")
        elif step >= SIG_STEPS:
            c.failures.append("the run went on to its last step after SIGTERM")
        p = c.ml([*argv, "resume=true"])
        same_test_metrics(c, p, run_dir, base)
        return p


sigterm_resume("sigterm-early-resume-true", 0.3)
sigterm_resume("sigterm-later-resume-true", 1.5)


# ---------------------------------------------------------------------------------- harness


class Harness:
    def __init__(self, args):
        self.args = args
        self.timeout = args.timeout
        self.root = Path(tempfile.mkdtemp(prefix="fuzz_cli-", dir=args.scratch))
        self.mounts: set[Path] = set()
        self.refs = {
            "sine": self.root / "refs" / "sine_maml",
            "omni": self.root / "refs" / "omni_protonet",
        }
        self.pristine = {k: self.root / "pristine" / v.name for k, v in self.refs.items()}
        self.pristine_hash: dict[str, dict] = {}
        self._baselines: dict[str, dict] = {}
        self._tiny = None
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            not in (
                "HYDRA_FULL_ERROR",
                "METALEARN_DATA",
                "METALEARN_COORDINATOR",
                "METALEARN_NUM_PROCESSES",
                "METALEARN_PROCESS_ID",
                "TFDS_DATA_DIR",
                "PYTHONPATH",
            )
        }
        env.update(
            XDG_CACHE_HOME=str(self.root / "xdg"),  # the Omniglot cache, built once
            JAX_COMPILATION_CACHE_DIR=str(self.root / "jax-cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
            # as tests/conftest.py: compile faster; the arrays are tiny
            XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip(),
            **{SECRET_VAR: SECRET},
        )
        if args.rev:
            code = self.root / "code"
            code.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", args.rev], capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
            self.rev_id = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", args.rev],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            env["PYTHONPATH"] = str(code)  # ahead of the editable install's finder
        self.env = env

    def limits(self):
        os.nice(10)
        cap = int(self.args.mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    def run(self, argv, cwd, env, timeout) -> Proc:
        started = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "metalearn", *argv],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            preexec_fn=self.limits,
            start_new_session=True,
        )
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
        return Proc(
            argv,
            proc.returncode,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
            timed_out,
            time.time() - started,
            timeout,
        )

    def unmount(self, folder: Path) -> None:
        if folder not in self.mounts:
            return
        r = subprocess.run(["umount", str(folder)], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        self.mounts.discard(folder)

    def code_under_test(self) -> str:
        r = subprocess.run(
            [sys.executable, "-c", "import metalearn; print(metalearn.__file__)"],
            env=self.env,
            capture_output=True,
            text=True,
            cwd=self.root,
        )
        return r.stdout.strip() or r.stderr.strip()[-200:]

    def train_refs(self) -> None:
        for name, cmd in (("sine", SINE_CMD), ("omni", OMNI_CMD)):
            p = self.run([*cmd, f"hydra.run.dir={self.refs[name]}"], self.root, self.env, 600)
            if p.rc != 0 or not (self.refs[name] / "checkpoints" / "best.npz").exists():
                sys.exit(
                    f"fuzz_cli: the reference {name} run failed (exit {p.rc}):\n"
                    f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
                )
            copy_run(self.refs[name], self.pristine[name])
            self.pristine_hash[name] = hash_tree(self.pristine[name])

    def restore_ref(self, name: str) -> None:
        ref = self.refs[name]
        if ref.is_symlink() or ref.is_file():
            ref.unlink()
        elif ref.exists():
            shutil.rmtree(ref)
        copy_run(self.pristine[name], ref)

    def kill_baseline(self) -> dict | None:
        """The uninterrupted run that kill_resume cases must match (trained on first use)."""
        return self.uninterrupted("kill", ["train", *KILL])

    def uninterrupted(self, name: str, argv: list[str]) -> dict | None:
        """The summary of argv run without interruption (trained on first use), with `_lines`:
        its metrics.jsonl's line count; None if it failed."""
        if name not in self._baselines:
            run = self.root / f"{name}_baseline"
            p = self.run([*argv, f"hydra.run.dir={run}"], self.root, self.env, 600)
            summary = read_json(run / "summary.json") if p.rc == 0 else None
            self._baselines[name] = (
                {**summary, "_lines": count_lines(run / "metrics.jsonl")} if (summary) else {}
            )
        return self._baselines[name] or None

    def tiny_zips(self) -> Path:
        if self._tiny is None:
            sys.path.insert(0, str(REPO / "tests"))
            from omniglot_fixture import make_omniglot_zips

            self._tiny = make_omniglot_zips(self.root / "fixtures" / "omniglot", 3, 2, 4)
        return self._tiny


@dataclass
class Row:
    case: Case
    rc: object = ""
    outcome: str = ""
    refs_ok: bool = True
    failures: list = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.outcome in FAILING or not self.refs_ok or bool(self.failures)


def run_case(h: Harness, case: Case) -> Row:
    folder = h.root / "cases" / case.id.replace("/", "__")
    folder.mkdir(parents=True)
    c = CaseCtx(h, case, folder)
    row = Row(case)
    started = time.time()
    for name in h.refs:  # the reference runs are exactly as trained before every case
        if hash_tree(h.refs[name]) != h.pristine_hash[name]:
            h.restore_ref(name)
    try:
        result = case.run(c)
        expect = (
            case.expect
            if case.expect in ("ok", "error", "any")
            else ("ok" if case.expect.startswith("ok") else "any")
        )
        row.outcome, note = classify(result, expect)
        row.rc = "timeout" if result.timed_out else result.rc
        row.note = note
    except Skip as skip:
        row.outcome, row.note = "skipped", str(skip)
    except Exception:
        row.outcome = "harness error"
        row.note = traceback.format_exc().strip().splitlines()[-1][:160]
    finally:
        c.cleanup()
    for name, ref in h.refs.items():
        changes = diff_trees(
            h.pristine_hash[name], hash_tree(ref), "evals/" if case.ref_evals else None
        )
        if changes:
            row.refs_ok = False
            row.failures.append(f"reference {name} changed: {'; '.join(changes[:3])}")
        if changes or hash_tree(ref) != h.pristine_hash[name]:
            h.restore_ref(name)
    for path, before in c.watched.items():
        changes = diff_trees(before, hash_tree(path))
        if changes:
            row.failures.append(f"outside the run changed: {'; '.join(changes[:3])}")
    leaked = [p for p in c.procs if SECRET in p.stdout or SECRET in p.stderr]
    if leaked:
        where = "stderr" if SECRET in leaked[0].stderr else "stdout"
        row.failures.append(f"secret printed to {where} by `metalearn {leaked[0].argv[0]}`")
    if case.scan_files:
        hits = [
            str(f.relative_to(folder))
            for f in folder.rglob("*")
            if f.is_file() and not f.is_symlink() and SECRET.encode() in f.read_bytes()
        ]
        if hits:
            row.failures.append(f"secret written to {', '.join(hits[:3])}")
    row.failures.extend(c.failures)
    row.note = "; ".join([n for n in [row.note, *c.notes] if n]).replace(str(folder), "$CASE")
    row.failures = [f.replace(str(folder), "$CASE") for f in row.failures]
    row.note, row.failures = (
        row.note.replace(str(h.root), "$S"),
        [f.replace(str(h.root), "$S") for f in row.failures],
    )
    row.seconds = time.time() - started
    if not h.args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return row


def totals(rows: list[Row]) -> dict[str, int]:
    count = lambda outcome: sum(r.outcome == outcome for r in rows)  # noqa: E731
    return {
        "cases tried": sum(r.outcome != "skipped" for r in rows),
        "clean errors": count("clean error"),
        "ok": count("ok"),
        "tracebacks": count("traceback"),
        "crashes": count("crash"),
        "timeouts": count("timeout"),
        "wrong exits": count("wrong exit"),
        "runs changed (reference or outside files)": sum(
            not r.refs_ok or any("outside the run" in f for f in r.failures) for r in rows
        ),
        "secret leaks": sum(any("secret" in f for f in r.failures) for r in rows),
        "other failed checks": sum(
            any(not f.startswith(("reference", "outside", "secret")) for f in r.failures)
            for r in rows
        ),
        "harness errors": count("harness error"),
        "skipped": count("skipped"),
        "failing cases": sum(r.failed for r in rows),
    }


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_markdown(path: Path, rows: list[Row], h: Harness, elapsed: float, done: bool) -> None:
    lines = [
        "# metalearn CLI fuzz results" + ("" if done else " (partial)"),
        "",
        "- code under test: "
        + (f"git revision `{h.args.rev}` = `{h.rev_id}`" if h.args.rev else "the working tree"),
        f"- command: `{' '.join(['python', 'scripts/fuzz_cli.py', *sys.argv[1:]])}`",
        f"- wall time: {elapsed / 60:.1f} min",
        "- in commands: "
        + "; ".join(
            f"`{v}` = `{' '.join(LISTS[k])}`"
            for k, v in SHORT.items()
            if k in ("@sine", "@omni", "@tiny", "@kill")
        ),
        "  `{ref_sine}`, `{ref_omni}`: the reference runs; `{copy}`: a copy of one in the case's"
        " folder `{case}`; `R`: a run dir in the case's folder; `$S`: the scratch root",
        "",
        "| totals | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in totals(rows).items()],
        "",
        "| id | class | command | expected | exit | outcome | refs unchanged | result | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        result = "FAIL" if r.failed else ("skip" if r.outcome == "skipped" else "pass")
        notes = "; ".join([*r.failures, r.note] if r.note else r.failures)
        lines.append(
            f"| {cell(r.case.id)} | {r.case.cls} | `{cell(r.case.cmd)}` | "
            f"{cell(r.case.expect)} | {r.rc} | {r.outcome} | "
            f"{'yes' if r.refs_ok else '**NO**'} | {result} | {cell(notes)} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="CLASS[,CLASS] (or case ids / id prefixes) to run")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folders")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per command")
    parser.add_argument("--out", default=str(REPO / "scripts" / "fuzz_cli_results.md"))
    parser.add_argument(
        "--rev", help="test this git revision (git archive) instead of the working tree, e.g. HEAD"
    )
    parser.add_argument("--scratch", default=None, help="parent of the scratch root (/tmp)")
    parser.add_argument(
        "--mem-gb", type=float, default=8.0, help="address-space limit per metalearn process"
    )
    parser.add_argument(
        "--sizes-timeout",
        type=float,
        default=45.0,
        help="seconds per sizes case: a refusal takes ~3 s, so anything still "
        "running then was not refused",
    )
    args = parser.parse_args()

    cases = CASES
    if args.only:
        wanted = args.only.split(",")
        cases = [c for c in CASES if c.cls in wanted or any(c.id.startswith(w) for w in wanted)]
        if not cases:
            parser.error(f"--only {args.only}: no such class or case")
    for c in cases:
        if c.cls == "sizes":
            c.timeout = args.sizes_timeout
    if args.list:
        for c in cases:
            print(f"{c.id:<58} {c.expect:<18} {c.cmd}")
        print(f"{len(cases)} cases")
        return 0

    started = time.time()
    h = Harness(args)
    h.code = h.code_under_test()
    out = Path(args.out)
    print(
        f"scratch: {h.root}\ncode under test: {h.code}\ntraining the reference runs ...", flush=True
    )
    rows: list[Row] = []
    try:
        h.train_refs()
        print(f"{'id':<50} {'expect':<8} {'exit':>7} {'outcome':<12} refs  result  command / notes")
        for i, case in enumerate(cases, 1):
            row = run_case(h, case)
            rows.append(row)
            result = "FAIL" if row.failed else ("skip" if row.outcome == "skipped" else "pass")
            notes = "; ".join([*row.failures, row.note] if row.note else row.failures)
            print(
                f"{case.id:<50} {case.expect[:8]:<8} {str(row.rc):>7} {row.outcome:<12} "
                f"{'yes' if row.refs_ok else 'NO ':<4}  {result:<6}  {case.cmd}"
                + (
                    f"\n{'':>50}   -> {notes[:300]}"
                    if row.failed or row.outcome == "skipped"
                    else ""
                ),
                flush=True,
            )
            if i % 10 == 0:
                write_markdown(out, rows, h, time.time() - started, done=False)
    finally:
        for folder in list(h.mounts):
            h.unmount(folder)
        elapsed = time.time() - started
        write_markdown(out, rows, h, elapsed, done=len(rows) == len(cases))
        if not args.keep:
            shutil.rmtree(h.root, ignore_errors=True)
    print("\ntotals:")
    for k, v in totals(rows).items():
        print(f"  {k:<42} {v}")
    print(f"wall time {elapsed / 60:.1f} min; table written to {out}")
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
