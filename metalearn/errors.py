"""How a metalearn command reports a user's mistake: one paragraph on stderr and exit code 2.

Kept apart from `metalearn.cli` so that the commands it dispatches to (`metalearn compare`)
can use it without importing the module that imports them.
"""

from __future__ import annotations

import argparse
import sys


def fail(message: str) -> None:
    print(f"metalearn: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage errors reported as every metalearn error is."""

    def error(self, message: str) -> None:
        fail(f"{self.prog}: {message}. `{self.prog} --help` lists the arguments.")
