"""What `metalearn compare` makes of finished runs, one module per layer (each imports only the
ones above it in this list):

- `runs`: read a run directory (summary.json, overrides, metrics.jsonl), never raising;
- `table`: the table of runs and its text, Markdown and CSV renderings;
- `plots`: the learning-curve and test-metric PNGs (`compare --plot`);
- `transfer`: the negative-transfer report of multi-task runs (`compare --negative-transfer`);
- `compare`: the `metalearn compare` command.

Nothing is imported here, so that importing one layer does not import the others (or matplotlib).
"""
