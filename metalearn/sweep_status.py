"""A Hydra callback that makes a multirun exit non-zero when any of its jobs failed.

Failed jobs do not stop the sweep (each is recorded in its own run directory); this only makes
the failure visible to scripts and CI once every job has run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger("metalearn")


class ExitNonZeroOnFailedJobs(Callback):
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        started = getattr(self, "started", 0.0)
        failed = []
        for summary in Path(str(config.hydra.sweep.dir)).glob("*/summary.json"):
            if summary.stat().st_mtime < started:
                continue  # from an earlier sweep into the same folder
            try:
                status = json.loads(summary.read_text()).get("status")
            except (OSError, ValueError, AttributeError):
                status = "failed"  # a summary that does not read is no completed job
            if status in ("failed", "interrupted"):
                failed.append(summary.parent.name)
        if failed:
            log.error("%d job(s) failed: %s", len(failed), ", ".join(sorted(failed)))
            raise SystemExit(1)
