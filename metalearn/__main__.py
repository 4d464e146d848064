"""`python -m metalearn` is the `metalearn` command."""

from metalearn.cli import main

main()
