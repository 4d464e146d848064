"""The on-disk format of a run: metrics.jsonl, summary.json, checkpoints/, .hydra/.

Every file that is replaced (summary, checkpoints) is written to a temporary name and renamed,
so a killed run leaves the previous version intact; metrics.jsonl is only ever appended to.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

# Files whose presence means the directory already holds a run.
RUN_MARKERS = ("metrics.jsonl", "summary.json", "checkpoints", ".hydra")
# The folders a run writes to, where a killed write may have left a temporary file.
WRITTEN_FOLDERS = (".", ".hydra", "checkpoints", "evals")
LEGACY_LEAF = re.compile(r"^leaf_\d+$")  # checkpoints before 2026-12 keyed arrays by leaf index


class RunDirError(ValueError):
    """A run directory that cannot be used; the message is shown to the user as is."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class RunDir:
    """A run's directory. With primary=False (processes other than 0 of a multi-host job)
    every write is skipped, so exactly one process writes each file.

    Every write goes through `inside()`, which refuses a path below the run directory that
    passes through a symlink, so a received run cannot redirect metalearn's writes elsewhere.
    """

    def __init__(self, path: str | os.PathLike, primary: bool = True):
        refuse_empty_path(path)
        self.path = Path(path)
        self.primary = primary
        self._lock_fd: int | None = None

    # -------------------------------------------------------------------- state and lock

    def holds_run(self) -> bool:
        return self.path.is_dir() and any((self.path / m).exists() for m in RUN_MARKERS)

    def started(self) -> bool:
        """The run saved a checkpoint to resume from (else it was killed before its first)."""
        return (self.path / "checkpoints" / "latest.npz").exists()

    def check_folder(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(
                f"The run directory {self.path} is a file, not a folder: give a folder with "
                "hydra.run.dir=PATH (or resume=PATH)."
            )

    def lock(self) -> None:
        """Hold the run directory for this process, creating it if needed.

        An advisory lock on the directory itself (flock): the kernel drops it when the process
        ends, however it ends, so a killed run never leaves a stale lock, and nothing is written.
        """
        if not self.primary or self._lock_fd is not None:
            return
        self.check_folder()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(
                f"The run directory {self.path} is in use by another metalearn process (a run "
                "or a resume of it is still going). Wait for it to end, or stop it (a stopped "
                "run can be resumed); two processes on one run would mix their results."
            ) from None
        self._lock_fd = fd

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def remove_stale_temps(self) -> list[Path]:
        """Delete temporary files that a killed write left behind (call with the lock held)."""
        removed = []
        for folder in WRITTEN_FOLDERS:
            where = self.path / folder
            if not where.is_dir() or where.is_symlink():
                continue
            for tmp in where.glob(".*.*"):
                if tmp.is_file() and not tmp.is_symlink() and _is_temp_name(tmp.name):
                    tmp.unlink()
                    removed.append(tmp)
        return removed

    # ------------------------------------------------------------------------------ writes

    def inside(self, relative: str) -> Path:
        """The path of `relative` in the run, refusing one that passes through a symlink."""
        current = self.path
        for part in Path(relative).parts:
            current = current / part
            if current.is_symlink():
                raise RunDirError(
                    f"{current} is a symlink (to {os.readlink(current)}): metalearn writes only "
                    f"inside the run directory {self.path}, so it will not follow it. Replace the "
                    "link with a plain file or folder."
                )
        return current

    def check_writable(self, relative: str = ".") -> None:
        """Fail now, before any work, if the run's folder `relative` cannot be written."""
        if not self.primary:
            return
        folder = self.inside(relative)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise RunDirError(
                f"Cannot write to {folder} ({error.strerror or error}): check that the folder "
                "is writable and its disk has room, then run the command again."
            ) from None

    def write_text(self, relative: str, text: str) -> None:
        if not self.primary:
            return
        atomic_write_bytes(self.inside(relative), text.encode())

    def write_json(self, relative: str, obj: Any) -> None:
        if not self.primary:
            return
        atomic_write_json(self.inside(relative), obj)

    def open_append(self, relative: str):
        """A text file opened for appending, never through a symlink."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
        return os.fdopen(os.open(self.inside(relative), flags, 0o644), "a")

    def log_metrics(self, record: dict) -> None:
        if not self.primary:
            return
        with self.open_append("metrics.jsonl") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after `step` (a resumed run logs them again)."""
        if not self.primary:
            return
        kept = [r for r in read_metrics(self.path / "metrics.jsonl") if r.get("step", 0) <= step]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write_bytes(self.inside("metrics.jsonl"), text.encode())

    def write_summary(self, summary: dict) -> None:
        self.write_json("summary.json", summary)

    # ------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, name: str, tree: Any, meta: dict) -> None:
        """Save a pytree's leaves (as numpy, keyed by their tree path) and JSON metadata to
        checkpoints/<name>.npz, atomically."""
        if not self.primary:
            return
        flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
        arrays = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path = self.inside(f"checkpoints/{name}.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_arrays(self, name: str) -> dict[str, np.ndarray]:
        """A checkpoint's arrays keyed by tree path (jax.tree_util.keystr), for reading part of
        another run's parameters without rebuilding it (init_from)."""
        return self._read_checkpoint(name)[0]

    def _read_checkpoint(self, name: str) -> tuple[dict[str, np.ndarray], dict]:
        path = self.path / "checkpoints" / f"{name}.npz"
        if not path.exists():
            raise RunDirError(f"{path} does not exist: the run has no '{name}' checkpoint.")
        try:
            with np.load(path, allow_pickle=False) as data:
                stored = {key: data[key] for key in data.files}
            meta = json.loads(bytes(stored.pop("meta")).decode())
            if not isinstance(meta, dict):
                raise ValueError("its metadata is not a JSON object")
        except Exception as error:  # any way a damaged file fails to read (zip, npy, JSON)
            raise RunDirError(
                f"The checkpoint {path} is damaged and cannot be read ({_reason(error)}). "
                f"{_CHECKPOINT_ADVICE[name]}"
            ) from None
        return stored, meta

    def load_checkpoint(self, name: str, template: Any) -> tuple[Any, dict]:
        """Restore a checkpoint into the structure of `template` (a freshly initialised tree).

        Arrays are matched to the template by tree path and checked for shape and dtype, so a
        checkpoint can never load into the wrong parameters; a damaged file is a RunDirError.
        """
        path = self.path / "checkpoints" / f"{name}.npz"
        stored, meta = self._read_checkpoint(name)
        flat, treedef = jax.tree_util.tree_flatten_with_path(template)
        wanted = [(jax.tree_util.keystr(p), leaf) for p, leaf in flat]
        if stored and all(LEGACY_LEAF.match(k) for k in stored):
            stored = {k: stored.get(f"leaf_{i}") for i, (k, _) in enumerate(wanted)}
        stored = _moved_paths(stored, wanted)
        problems = []
        for key, leaf in wanted:
            have = stored.get(key)
            if have is None:
                problems.append(f"{key} is missing")
            elif have.shape != np.shape(leaf) or have.dtype != np.result_type(leaf):
                problems.append(
                    f"{key} is {have.dtype}{list(have.shape)} in the checkpoint but "
                    f"{np.result_type(leaf)}{list(np.shape(leaf))} in this configuration"
                )
        extra = sorted(set(stored) - {key for key, _ in wanted})
        if extra:
            problems.append(f"the checkpoint also holds {', '.join(extra[:3])}")
        if problems:
            shown = "; ".join(problems[:4]) + ("; ..." if len(problems) > 4 else "")
            raise RunDirError(
                f"The checkpoint {path} does not fit this configuration: {shown}. The settings "
                "that shape the model (model.*, data.n_way, algo.* sizes) must be the run's own; "
                "drop the overrides that change them."
            )
        return jax.tree_util.tree_unflatten(treedef, [stored[k] for k, _ in wanted]), meta


def _moved_paths(stored: dict, wanted: list) -> dict:
    """stored, with arrays of an older layout under the path the template has now: a wanted
    path missing from the checkpoint takes the one unclaimed stored array of its shape whose
    path is its own with components left out (multihead's ['heads']['w'], before 2026-12,
    is ['heads']['head']['w'] now)."""
    unclaimed = set(stored) - {key for key, _ in wanted}
    moved = {}
    for key, leaf in wanted:
        if key in stored or not unclaimed:
            continue
        parts = _PATH_PART.findall(key)
        fits = [
            old
            for old in unclaimed
            if stored[old].shape == np.shape(leaf) and _is_subpath(_PATH_PART.findall(old), parts)
        ]
        if len(fits) == 1:
            moved[key] = fits[0]
            unclaimed.discard(fits[0])
    kept = {k: v for k, v in stored.items() if k not in moved.values()}
    return kept | {key: stored[old] for key, old in moved.items()}


_PATH_PART = re.compile(r"\[[^\]]*\]|\.\w+")  # ['heads'], [0], .params in a keystr


def _is_subpath(short: list[str], long: list[str]) -> bool:
    """short is long with some components left out, ending with the same leaf name."""
    if not short or len(short) >= len(long) or short[-1] != long[-1]:
        return False
    rest = iter(long)
    return all(part in rest for part in short)


_CHECKPOINT_ADVICE = {
    "latest": "Resume from the run's last good copy if you have one; otherwise delete "
    "checkpoints/latest.npz, and `resume=` then restarts the run from step 0.",
    "best": "Evaluate the latest checkpoint instead (`metalearn eval RUN --checkpoint latest`), "
    "or train the run again.",
}


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_temp_name(name: str) -> bool:
    """Names made by atomic_write_bytes (.NAME.XXXX.tmp) and save_checkpoint (.NAME.XXXX.npz)."""
    return name.startswith(".") and (name.endswith(".tmp") or name.endswith(".npz"))


class _PlainLoader(yaml.SafeLoader):
    """safe_load without aliases: metalearn never writes them, and nested ones expand
    exponentially (a received file could make the reader run out of time or memory)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("it uses YAML aliases, which metalearn never writes")
        return super().compose_node(parent, index)


def read_run_yaml(path: Path) -> Any:
    """A YAML file of a run (.hydra/config.yaml, overrides.yaml) as plain data, or RunDirError.

    Run directories are shared, so reading one must do nothing its author chose: the file is
    parsed as plain YAML (no tags, no aliases). Give the result to OmegaConf only through
    `literal()`, so that an interpolation such as `${oc.env:SECRET}` never resolves.
    """
    try:
        return yaml.load(Path(path).read_text(), Loader=_PlainLoader)  # noqa: S506 (safe)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as error:
        reason = getattr(error, "strerror", None) or _reason(error).splitlines()[0]
        raise RunDirError(
            f"{path} cannot be read as YAML ({reason}): the run directory is damaged. metalearn "
            "wrote this file; restore it from a copy of the run, or delete the run."
        ) from None


def literal(value: Any) -> Any:
    """Plain data with every OmegaConf interpolation escaped into a literal string."""
    if isinstance(value, str):
        # OmegaConf reads \${ as a literal ${, and \\ before ${ as one literal backslash.
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {k: literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [literal(v) for v in value]
    return value


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records; lines that do not decode (a last line cut short by a kill, or
    damage) are skipped."""
    records = []
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # bad UTF-8 or JSON, absurd nesting
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def refuse_empty_path(path: str | os.PathLike, what: str = "a run directory") -> None:
    """Path("") is the current folder: an empty path (a variable that was not set) must not
    stand for it."""
    if isinstance(path, str) and not path.strip():
        raise RunDirError(
            f"{path!r} is not {what}: an empty path would be taken as the current folder. Give "
            "the path itself (. for the current folder)."
        )


def find_runs(paths: list[str]) -> list[Path]:
    """Every run directory (one holding summary.json or .hydra/config.yaml) below the paths."""
    for path in paths:
        refuse_empty_path(path, "a run directory or a folder of runs")
    runs = set()
    for root in map(Path, paths):
        if not root.exists():
            raise RunDirError(f"{root} does not exist; give a run directory or a folder of runs.")
        for marker in ("summary.json", ".hydra/config.yaml"):
            for found in root.rglob(marker):
                runs.add(found.parent if marker == "summary.json" else found.parent.parent)
    return sorted(runs)
