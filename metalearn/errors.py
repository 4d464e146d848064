"""How a metalearn command reports a user's mistake: one paragraph on stderr and exit code 2.

Kept apart from `metalearn.cli` so that the commands it dispatches to (`metalearn compare`)
can use it without importing the module that imports them.
"""

from __future__ import annotations

import argparse
import re
import sys


def fail(message: str) -> None:
    print(f"metalearn: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage errors reported as every metalearn error is. An unknown option
    is named as such before anything else is checked (argparse would first complain about the
    positional arguments it then lacks)."""

    def error(self, message: str) -> None:
        fail(f"{self.prog}: {message}. `{self.prog} --help` lists the arguments.")

    def parse_known_args(self, args=None, namespace=None):
        unknown = unknown_options(self, sys.argv[1:] if args is None else args)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return super().parse_known_args(args, namespace)


def unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The tokens of argv that look like options (-x, --name, --name=value) and that `parser`
    does not define, by argparse's rules: unique prefixes of long options are allowed, negative
    numbers and everything after `--` are not options."""
    known = parser._option_string_actions  # argparse's own table of option strings
    unknown = []
    for token in argv:
        if token == "--":
            break
        if not token.startswith("-") or token == "-" or _NUMBER.fullmatch(token):
            continue
        name = token.split("=", 1)[0]
        if name in known or (not name.startswith("--") and name[:2] in known):  # -cVALUE
            continue
        if name.startswith("--") and any(o.startswith(name) for o in known if o[:2] == "--"):
            continue
        unknown.append(token)
    return unknown


_NUMBER = re.compile(r"-\d+(\.\d*)?([eE][-+]?\d+)?|-\.\d+")


def path_argument(text: str) -> str:
    """argparse `type=` of a path argument: an empty path is refused, since the system would
    take it as the current folder, which the user did not name."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a path: an empty path would be taken as the current folder; give "
            "the path itself (. for the current folder)"
        )
    return text
