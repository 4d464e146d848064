"""The on-disk format of a run: metrics.jsonl, summary.json, checkpoints/, .hydra/.

Every file that is replaced (summary, checkpoints) is written to a temporary name and renamed,
so a killed run leaves the previous version intact; metrics.jsonl is only ever appended to.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

# Files whose presence means the directory already holds a run.
RUN_MARKERS = ("metrics.jsonl", "summary.json", "checkpoints", ".hydra")


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
    every write is skipped, so exactly one process writes each file."""

    def __init__(self, path: str | os.PathLike, primary: bool = True):
        self.path = Path(path)
        self.primary = primary

    def ensure_fresh(self) -> None:
        """Refuse a directory that already holds a run, before anything is written to it."""
        if not self.primary:
            return
        found = [m for m in RUN_MARKERS if (self.path / m).exists()]
        if found:
            raise RunDirError(
                f"The run directory {self.path} already holds a run (found {', '.join(found)}). "
                "metalearn never writes over an earlier run: choose another directory with "
                "hydra.run.dir=PATH, or leave it out to get a new timestamped one."
            )
        self.path.mkdir(parents=True, exist_ok=True)

    def write_text(self, relative: str, text: str) -> None:
        if not self.primary:
            return
        atomic_write_bytes(self.path / relative, text.encode())

    def log_metrics(self, record: dict) -> None:
        if not self.primary:
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after `step` (a resumed run logs them again)."""
        if not self.primary:
            return
        kept = [r for r in read_metrics(self.path / "metrics.jsonl") if r["step"] <= step]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write_bytes(self.path / "metrics.jsonl", text.encode())

    def write_summary(self, summary: dict) -> None:
        if not self.primary:
            return
        atomic_write_json(self.path / "summary.json", summary)

    def save_checkpoint(self, name: str, tree: Any, meta: dict) -> None:
        """Save a pytree's leaves (as numpy) and JSON metadata to checkpoints/<name>.npz."""
        if not self.primary:
            return
        leaves = jax.tree.leaves(jax.device_get(tree))
        arrays = {f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path = self.path / "checkpoints" / f"{name}.npz"
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

    def load_checkpoint(self, name: str, template: Any) -> tuple[Any, dict]:
        """Restore a checkpoint into the structure of `template` (a freshly initialised tree)."""
        path = self.path / "checkpoints" / f"{name}.npz"
        if not path.exists():
            raise RunDirError(f"{path} does not exist: the run has no '{name}' checkpoint.")
        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            leaves, treedef = jax.tree.flatten(template)
            loaded = [data[f"leaf_{i}"] for i in range(len(leaves))]
        for have, want in zip(loaded, leaves):
            if have.shape != np.shape(want):
                raise RunDirError(
                    f"{path} holds an array of shape {have.shape} where this configuration "
                    f"expects {np.shape(want)}: the overrides change the model's shape."
                )
        return jax.tree.unflatten(treedef, loaded), meta


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records; a last line cut short by a kill is skipped."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def find_runs(paths: list[str]) -> list[Path]:
    """Every run directory (one holding summary.json or .hydra/config.yaml) below the paths."""
    runs = set()
    for root in map(Path, paths):
        if not root.exists():
            raise RunDirError(f"{root} does not exist; give a run directory or a folder of runs.")
        for marker in ("summary.json", ".hydra/config.yaml"):
            for found in root.rglob(marker):
                runs.add(found.parent if marker == "summary.json" else found.parent.parent)
    return sorted(runs)
