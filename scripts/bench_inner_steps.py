"""Peak memory and step time of one meta-training step as the number of inner steps grows.

Methods: MAML (second order), MAML with `algo.remat=true`, first-order MAML and iMAML. Each
configuration is composed from conf/ exactly as `metalearn train` composes it (so the tuned
paper defaults apply), built with `metalearn.experiment.build` and `make_train_step`, and
measured in a fresh subprocess:

- XLA memory: the compiled step's `memory_analysis()`; "XLA peak" = arguments + outputs + temps
  - aliased (the donated train state is reused for the new state, so it is counted once). This
  is what buffer assignment plans, so it does not depend on the machine's load.
- RSS growth: the process's peak resident memory while running the step (VmHWM, reset after
  compilation) minus its resident memory just before; what the OS actually saw.
- Step time: median wall time of a few steps after one warm-up step (compilation excluded).

    python scripts/bench_inner_steps.py                         # omniglot conv4, ~10 min
    python scripts/bench_inner_steps.py --data sinusoid         # MLP, fast
    python scripts/bench_inner_steps.py --steps-list 1,5 --meta-batch 2 --timed 2
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20

# label -> overrides; the inner-step count and meta-batch are added per configuration.
METHODS = {
    "maml (2nd order)": ["algo=maml"],
    "maml + remat": ["algo=maml", "algo.remat=true"],
    "first order": ["algo=maml", "algo.first_order=true"],
    "imaml": ["algo=imaml"],
}
BASELINE = "maml (2nd order)"


# ------------------------------------------------------------------------------------ worker
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Release freed heap memory, then reset VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from metalearn.config import register_schemas, to_config

    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_config(hydra_compose("config", overrides))


def measure(job: dict) -> dict:
    import jax

    from metalearn.experiment import build
    from metalearn.train_step import TrainState, make_train_step

    cfg = compose(job["overrides"])
    exp = build(cfg)
    params = exp.algo.init(jax.random.PRNGKey(cfg.seed))
    state = TrainState(params, exp.optimizer.init(params))
    arrays = exp.source.splits["train"]
    step_fn = make_train_step(exp, cfg.train.meta_batch)
    key = jax.random.PRNGKey(1)

    t0 = time.perf_counter()
    compiled = step_fn.lower(state, arrays, key, 1).compile()
    out = {"compile_s": time.perf_counter() - t0}
    mem = compiled.memory_analysis()
    out.update(
        temp_mb=mem.temp_size_in_bytes / MB,
        argument_mb=mem.argument_size_in_bytes / MB,
        output_mb=mem.output_size_in_bytes / MB,
        alias_mb=mem.alias_size_in_bytes / MB,
    )
    out["xla_peak_mb"] = out["argument_mb"] + out["output_mb"] - out["alias_mb"] + out["temp_mb"]
    if out["xla_peak_mb"] > job["max_mem_mb"]:
        out["error"] = f"not run: XLA plans {out['xla_peak_mb']:.0f} MB, above --max-mem-gb"
        return out

    times, cpu_times = [], []
    for i in range(1 + job["timed"]):
        if i == 1:  # after the warm-up step, whose one-off allocations are not the step's
            rss_ok = _reset_peak_rss()
            rss_before = _status_kb("VmRSS")
        t, c = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, arrays, jax.random.fold_in(key, i), i + 1)
        loss = float(metrics["loss"])  # blocks until the step has finished
        if i == 0:  # before any update: equal for the three MAML variants at one step count
            out["first_loss"] = loss
        if i > 0:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    if rss_ok:
        out["rss_growth_mb"] = (_status_kb("VmHWM") - rss_before) / 1024
    out.update(times=times, median_s=statistics.median(times), cpu_s=statistics.median(cpu_times))
    return out


def worker(job: dict) -> None:
    try:
        out = measure(job)
    except Exception as e:  # reported in the table; the driver goes on with the next config
        text = f"{type(e).__name__}: {e}"
        oom = "RESOURCE_EXHAUSTED" in text or isinstance(e, MemoryError)
        out = {"error": "out of memory" if oom else text.splitlines()[0][:200]}
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------ driver
def run_job(job: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = {**os.environ, "METALEARN_DATA": os.environ.get(
        "METALEARN_DATA", str(ROOT.parent / "shared" / "data" / "omniglot"))}  # fmt: skip
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][7:])
    if r.returncode in (-9, 137):
        return {"error": "killed (out of memory?)"}
    return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:200]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps-list", default="1,5,10,25,50", help="inner-step counts, e.g. 1,5,10")
    ap.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-batch")
    ap.add_argument("--data", choices=["omniglot", "sinusoid"], default="omniglot")
    ap.add_argument("--methods", default=",".join(METHODS), help="subset of: " + ", ".join(METHODS))
    ap.add_argument("--timed", type=int, help="timed steps after one warm-up (5; sinusoid 20)")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per configuration")
    ap.add_argument("--max-mem-gb", type=float, default=None,
                    help="skip running a config whose XLA peak exceeds this (default: 80%% of "
                    "MemAvailable)")  # fmt: skip
    ap.add_argument("--override", action="append", default=[], help="extra key=value, repeatable")
    ap.add_argument("--out", type=Path, default=ROOT / "scripts" / "bench_inner_steps_results.md")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "inner_steps_memory.png")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    steps_list = sorted({int(s) for s in args.steps_list.split(",")})
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or min(steps_list) < 1 or (args.timed is not None and args.timed < 1):
        ap.error(f"unknown methods {unknown} (known: {list(METHODS)}); or a count below 1")
    if args.timed is None:
        args.timed = 5 if args.data == "omniglot" else 20
    if args.max_mem_gb is None:
        args.max_mem_gb = 0.8 * _meminfo_kb("MemAvailable") / 2**20
    code, fingerprint = code_state()
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    rows = []
    for method in methods:
        gave_up = None  # after a timeout or OOM, larger inner-step counts are not tried
        for n in steps_list:
            row = {"method": method, "inner_steps": n}
            if gave_up:
                row["error"] = f"skipped ({gave_up} at fewer steps)"
            else:
                job = {
                    "overrides": [f"data={args.data}", *METHODS[method], f"algo.inner_steps={n}",
                                  f"train.meta_batch={args.meta_batch}", *args.override],
                    "timed": args.timed,
                    "max_mem_mb": args.max_mem_gb * 1024,
                }  # fmt: skip
                row.update(run_job(job, args.timeout))
                err = row.get("error", "")
                if err.startswith(("timed out", "out of memory", "killed", "not run")):
                    gave_up = err.split(":")[0].split(" after")[0]
            rows.append(row)
            print(_progress_line(row), flush=True)

    if code_state()[1] != fingerprint:
        code += "; WARNING: the library or conf/ changed during this run, rows may differ in code"
    meta = {
        "code": code,
        "data": args.data,
        "meta_batch": args.meta_batch,
        "timed": args.timed,
        "overrides": args.override,
        "load": (load_before, os.getloadavg()),
        "minutes": (time.perf_counter() - t_start) / 60,
    }
    text = report(rows, meta)
    print("\n" + text)
    args.out.write_text(text)
    plot(rows, meta, args.plot)
    print(f"written {args.out} and {args.plot}")


def code_state() -> tuple[str, str]:
    """(description, fingerprint) of the metalearn package and conf/ this run measures: other
    people may be editing the library, and the figures only hold for one version of it."""
    # The search location, not .origin: the editable install can resolve to a namespace spec.
    package = Path(list(importlib.util.find_spec("metalearn").submodule_search_locations)[0])
    files = sorted(package.rglob("*.py")) + sorted((ROOT / "conf").rglob("*.yaml"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(package.parent), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return f"metalearn at {package} (not a git checkout; files {digest})", digest
    dirty = git("status", "--porcelain", "--", "metalearn", "conf")
    state = "with uncommitted changes in metalearn/ or conf/" if dirty else "clean"
    return f"metalearn at git {commit}, {state} (files {digest})", digest


def _meminfo_kb(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _mb(x: float) -> str:
    """Three significant figures or so, without exponents (sinusoid figures are ~0.1 MB)."""
    digits = 0 if x >= 100 else 1 if x >= 10 else 2 if x >= 1 else 3
    return f"{x:.{digits}f}"


def _progress_line(r: dict) -> str:
    head = f"{r['method']:<17} inner_steps={r['inner_steps']:<3}"
    if "median_s" not in r:
        return f"{head} {r['error']}"
    return (
        f"{head} XLA peak {_mb(r['xla_peak_mb'])} MB (temp {_mb(r['temp_mb'])})  "
        f"RSS +{_mb(r.get('rss_growth_mb', float('nan')))} MB  {r['median_s']:.4f} s/step  "
        f"(CPU {r['cpu_s']:.4f} s)  "
        f"compile {r['compile_s']:.1f} s  step-1 loss {r['first_loss']:.4f}"
    )


def _setup(meta: dict) -> str:
    what = (
        "Omniglot 5-way 1-shot (15 queries per class), conv4-64 (stride)"
        if meta["data"] == "omniglot"
        else "sinusoid regression (K=10), MLP 40-40"
    )
    extra = f", overrides {' '.join(meta['overrides'])}" if meta["overrides"] else ""
    (b1, _, _), (a1, _, _) = meta["load"]
    return (
        f"{what}, meta-batch {meta['meta_batch']}{extra}; learning rates and iMAML's lambda/CG "
        f"steps from conf/ (tuned for data={meta['data']}). {meta['code']}. "
        f"{os.cpu_count()} CPU cores, jax {_jax_version()}. Each configuration in a fresh "
        "process. **XLA peak** = argument + "
        "output + temp - aliased bytes from the compiled step's memory_analysis() "
        "(deterministic); **temp** is the part that holds the backward pass's residuals; "
        "**RSS growth** = peak resident memory during the steps minus resident memory before "
        f"them (VmHWM, measured). Step time: median of {meta['timed']} steps after one warm-up, "
        "as wall time and as the process's CPU time (all threads; less sensitive to other "
        "processes on the machine, so the time ratio uses it). "
        "Step-1 query loss: the post-adaptation query loss before any outer update, a check "
        "that the three MAML variants compute the same thing. "
        f"The machine is shared and noisy (1-min load average {b1:.1f} at the start, {a1:.1f} "
        "at the end): wall times can move by 2x between runs, so read the CPU-time ratios to "
        f"second-order MAML at the same inner-step count. Run took {meta['minutes']:.1f} min."
    )


def _jax_version() -> str:
    from importlib.metadata import version

    return version("jax")


def report(rows: list[dict], meta: dict) -> str:
    base = {r["inner_steps"]: r for r in rows if r["method"] == BASELINE and "median_s" in r}

    def ratio(r, key):
        b = base.get(r["inner_steps"])
        return f"{r[key] / b[key]:.2f}" if b and b[key] else "-"

    lines = [
        _setup(meta),
        "",
        "| method | inner steps | XLA peak MB | XLA temp MB | peak / 2nd-order | RSS growth MB "
        "| s/step | CPU s/step | CPU time / 2nd-order | compile s | step-1 query loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "median_s" not in r:
            planned = _mb(r["xla_peak_mb"]) if "xla_peak_mb" in r else "-"
            lines.append(
                f"| {r['method']} | {r['inner_steps']} | {planned} | | | | {r['error']} | | | | |"
            )
            continue
        rss = _mb(r["rss_growth_mb"]) if "rss_growth_mb" in r else "-"
        lines.append(
            f"| {r['method']} | {r['inner_steps']} | {_mb(r['xla_peak_mb'])} | {_mb(r['temp_mb'])} "
            f"| {ratio(r, 'xla_peak_mb')} | {rss} | {r['median_s']:.4f} | {r['cpu_s']:.4f} | "
            f"{ratio(r, 'cpu_s')} | "
            f"{r['compile_s']:.1f} | {r['first_loss']:.4f} |"
        )
    lines += ["", _growth_summary(rows)]
    return "\n".join(lines) + "\n"


def _growth_summary(rows: list[dict]) -> str:
    """Per method: how much XLA peak memory and time grow from the fewest to the most steps."""
    parts = []
    for method in dict.fromkeys(r["method"] for r in rows):
        ok = [r for r in rows if r["method"] == method and "median_s" in r]
        if len(ok) < 2:
            continue
        a, b = ok[0], ok[-1]
        slope = (b["xla_peak_mb"] - a["xla_peak_mb"]) / (b["inner_steps"] - a["inner_steps"])
        parts.append(
            f"{method}: {a['inner_steps']} -> {b['inner_steps']} inner steps, XLA peak x"
            f"{b['xla_peak_mb'] / a['xla_peak_mb']:.2f} ({slope:+.2f} MB per inner step), "
            f"CPU time x{b['cpu_s'] / a['cpu_s']:.2f}"
        )
    return "Growth: " + "; ".join(parts) + "." if parts else ""


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    ticks = sorted({r["inner_steps"] for r in rows})
    for method in dict.fromkeys(r["method"] for r in rows):
        ok = [r for r in rows if r["method"] == method and "median_s" in r]
        if not ok:
            continue
        n = [r["inner_steps"] for r in ok]
        ax_mem.plot(n, [r["xla_peak_mb"] for r in ok], "o-", label=method)
        (line,) = ax_time.plot(n, [r["median_s"] for r in ok], "o-", label=f"{method} (wall)")
        ax_time.plot(n, [r["cpu_s"] for r in ok], "x--", color=line.get_color(), alpha=0.6,
                     label=f"{method} (CPU)")  # fmt: skip
    panels = ((ax_mem, "XLA peak memory (MB)"), (ax_time, "s / step (median)"))
    for ax, ylabel in panels:
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("inner steps")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_time.set_yscale("log")
    ax_time.yaxis.set_major_formatter(ScalarFormatter())
    ax_time.yaxis.set_minor_formatter(ScalarFormatter())
    name = "Omniglot 5w1s conv4" if meta["data"] == "omniglot" else "sinusoid MLP"
    fig.suptitle(f"One meta-training step, {name}, meta-batch {meta['meta_batch']} (CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
