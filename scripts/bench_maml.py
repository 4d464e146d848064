"""Time one MAML outer step on Omniglot 5-way 1-shot: metalearn (JAX) against PyTorch peers.

Every configuration runs in a fresh subprocess (so peak RSS and compile caches do not mix) and
JAX and PyTorch configurations are interleaved, because the machine is shared and noisy: read
the speedup column (fastest PyTorch s/step / this s/step, same order and downsample, same run).

    python scripts/bench_maml.py                 # full table -> scripts/bench_maml_results.md
    python scripts/bench_maml.py --quick         # smoke run, tiny sizes
    python scripts/bench_maml.py --only jax --downsample maxpool --order second
    python scripts/bench_maml.py --flax          # also model=flax (scripts/flax_conv4.py)
    python scripts/bench_maml.py --bf16          # also train.precision=bf16

The metalearn rows time the train step `metalearn train` itself compiles (experiment.prepare), not a
copy of it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_WAY, K_SHOT, N_QUERY, INNER_LR, OUTER_LR, IMAGE = 5, 1, 15, 0.4, 1e-3, 28
# model=flax: a Flax NNX conv4 defined like the built-in one (scripts/flax_conv4.py)
FLAX_CONV4 = "flax_conv4:Conv4"


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _timed_steps(run_step, steps: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        run_step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------------------------- JAX
def time_train_step(overrides: list[str], steps: int, warmup: int):
    """Time the train step `metalearn train <overrides>` runs: composed by Hydra, built, checked
    and compiled by experiment.prepare, fed its own episodes (sampled inside the step, as in
    training). -> (config, session, step times, last loss)."""
    sys.path.insert(0, str(ROOT))
    import tempfile

    import jax
    from hydra import compose, initialize_config_dir

    from metalearn.config import register_schemas, to_config
    from metalearn.experiment import prepare
    from metalearn.rundir import RunDir

    register_schemas()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        config = to_config(compose("config", overrides=overrides), overrides)
    with tempfile.TemporaryDirectory() as folder:  # prepare writes nothing; the run is never made
        session = prepare(config, RunDir(Path(folder) / "run"))
    state = {"s": session.state, "step": 0}

    def run_step():
        state["step"] += 1
        key = jax.random.fold_in(session.train_key, state["step"])
        state["s"], metrics = session.train_step(
            state["s"], session.train_arrays, key, state["step"]
        )
        state["loss"] = float(metrics["loss"])  # blocks until the step is done

    times = _timed_steps(run_step, steps, warmup)
    return config, session, times, state["loss"]


def jax_overrides(cfg: dict) -> list[str]:
    """The `metalearn train` command line of this configuration."""
    overrides = [
        "data=omniglot",
        "algo=maml",
        f"data.n_way={N_WAY}",
        f"data.k_shot={K_SHOT}",
        f"data.k_query={N_QUERY}",
        f"data.image_size={IMAGE}",
        f"algo.inner_lr={INNER_LR}",
        f"algo.inner_steps={cfg['inner_steps']}",
        f"algo.first_order={str(cfg['order'] == 'first').lower()}",
        f"train.outer_lr={OUTER_LR}",
        f"train.meta_batch={cfg['meta_batch']}",
    ]
    if cfg.get("omniglot"):
        overrides.append(f"data.root={cfg['omniglot']}")
    if cfg["task_chunk"] is not None:  # 0: the whole meta-batch at once
        overrides.append(f"train.task_chunk={cfg['task_chunk'] or cfg['meta_batch']}")
    if cfg["model"] in ("flax", "flax-fast-conv"):
        sys.path.insert(0, str(ROOT / "scripts"))
        fast = str(cfg["model"] == "flax-fast-conv").lower()
        kwargs = f"{{downsample: {cfg['downsample']}, fast_conv: {fast}}}"
        overrides += ["model=flax", f"model.module={FLAX_CONV4}", f"model.kwargs={kwargs}"]
    else:
        overrides.append(f"model.downsample={cfg['downsample']}")
    if cfg["impl"] == "jax (metalearn, bf16)":
        overrides.append("train.precision=bf16")
    return overrides


def run_jax(cfg: dict) -> dict:
    """Time the train step `metalearn train` runs on Omniglot episodes (time_train_step)."""
    import jax

    config, session, times, loss = time_train_step(jax_overrides(cfg), cfg["steps"], cfg["warmup"])
    cost = session.train_step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    chunk = config.train.task_chunk
    if chunk is None:
        from metalearn.task_chunks import auto_task_chunk

        chunk = auto_task_chunk(cfg["meta_batch"], N_WAY * (K_SHOT + N_QUERY), image_data=True)
    return {
        "times": times,
        "compile_s": session.progress["compile_time_s"],
        # XLA counts a loop body once: one chunk's FLOPs (plus the optimizer's, negligible)
        "gflop": (cost or {}).get("flops", 0.0) / 1e9 * (cfg["meta_batch"] // chunk),
        "loss": loss,
        "backend": jax.default_backend(),
        "task_chunk": chunk,
    }


def _torch_model(downsample: str):
    from torch import nn

    layers, cin = [], 1
    for _ in range(4):
        stride = 2 if downsample == "stride" else 1
        layers += [
            nn.Conv2d(cin, 64, 3, stride=stride, padding=1),
            nn.BatchNorm2d(64, track_running_stats=False),
            nn.ReLU(),
        ]
        if downsample == "maxpool":
            layers.append(nn.MaxPool2d(2))
        cin = 64

    class Conv4(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(64, N_WAY)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    return Conv4()


def run_torch(cfg: dict) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    d, first_order, t = cfg["downsample"], cfg["order"] == "first", cfg["meta_batch"]
    model = _torch_model(d)
    rng = np.random.default_rng(0)
    ns, nq = N_WAY * K_SHOT, N_WAY * N_QUERY
    sx = torch.tensor(rng.standard_normal((t, ns, 1, IMAGE, IMAGE)), dtype=torch.float32)
    sy = torch.arange(N_WAY).repeat_interleave(K_SHOT).repeat(t, 1)
    qx = torch.tensor(rng.standard_normal((t, nq, 1, IMAGE, IMAGE)), dtype=torch.float32)
    qy = torch.arange(N_WAY).repeat_interleave(N_QUERY).repeat(t, 1)
    opt = torch.optim.Adam(model.parameters(), OUTER_LR)
    state = {}

    if cfg["impl"] == "torch.func":
        from torch.func import functional_call, grad

        params = dict(model.named_parameters())

        def loss(p, x, y):
            return F.cross_entropy(functional_call(model, p, (x,)), y)

        inner_grad = grad(loss)

        def run_step():
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for i in range(t):  # per-task loop; the query loss is backpropagated task by task
                p = params
                for _ in range(cfg["inner_steps"]):
                    g = inner_grad(p, sx[i], sy[i])
                    if first_order:
                        g = {k: v.detach() for k, v in g.items()}
                    p = {k: p[k] - INNER_LR * g[k] for k in p}
                task_loss = loss(p, qx[i], qy[i]) / t
                task_loss.backward()
                total += task_loss.item()
            opt.step()
            state["loss"] = total

    elif cfg["impl"] == "learn2learn":
        MAML = _learn2learn_maml()
        maml = MAML(model, lr=INNER_LR, first_order=first_order)

        def run_step():
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for i in range(t):
                learner = maml.clone()
                for _ in range(cfg["inner_steps"]):
                    learner.adapt(F.cross_entropy(learner(sx[i]), sy[i]))
                task_loss = F.cross_entropy(learner(qx[i]), qy[i]) / t
                task_loss.backward()
                total += task_loss.item()
            opt.step()
            state["loss"] = total

    else:
        raise ValueError(cfg["impl"])

    times = _timed_steps(run_step, cfg["steps"], cfg["warmup"])
    return {"times": times, "compile_s": 0.0, "gflop": 0.0, "loss": state["loss"]}


def _learn2learn_maml():
    """learn2learn's MAML class without running its package __init__, which imports gym,
    torchvision and lightning (none of which the MAML module needs, and torchvision has no build
    matching the CPU torch here)."""
    import importlib
    import importlib.util
    import types

    root = importlib.util.find_spec("learn2learn").submodule_search_locations[0]
    for name, sub in (("learn2learn", ""), ("learn2learn.algorithms", "algorithms")):
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(root, sub)]
        sys.modules[name] = package
    return importlib.import_module("learn2learn.algorithms.maml").MAML


# ------------------------------------------------------------------------------------ driver
def worker(cfg: dict) -> None:
    out = run_jax(cfg) if cfg["impl"].startswith("jax") else run_torch(cfg)
    out["peak_rss_gb"] = _peak_rss_gb()
    print("RESULT " + json.dumps(out), flush=True)


def learn2learn_available() -> str | None:
    """None if importable, else the reason it is not."""
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import bench_maml; "
    code += "bench_maml._learn2learn_maml()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--inner-steps", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: meta-batch 2, 2 steps")
    ap.add_argument("--only", choices=["jax", "torch"], help="run one side only")
    ap.add_argument("--order", choices=["second", "first"], action="append")
    ap.add_argument("--downsample", choices=["maxpool", "stride"], action="append")
    ap.add_argument(
        "--flax",
        action="store_true",
        help="also time the same step with model=flax and a Flax conv4 like the built-in one",
    )
    ap.add_argument(
        "--bf16", action="store_true", help="also time the built-in model with train.precision=bf16"
    )
    ap.add_argument(
        "--omniglot",
        default=str(ROOT.parent / "shared" / "data" / "omniglot"),
        help="the Omniglot release folder (data.root); the episodes are real Omniglot tasks",
    )
    ap.add_argument(
        "--task-chunk",
        type=int,
        action="append",
        help="JAX tasks per vmapped chunk, repeatable for an A/B in one run; 0: the whole "
        "meta-batch at once (default: metalearn's automatic choice)",
    )
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    ap.add_argument("--out", type=Path, default=ROOT / "scripts" / "bench_maml_results.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.quick:
        args.meta_batch, args.steps, args.warmup = 2, 2, 1

    l2l_missing = learn2learn_available()
    torch_impls = ["torch.func"] + ([] if l2l_missing else ["learn2learn"])
    configs = []
    for d in args.downsample or ["maxpool", "stride"]:
        for order in args.order or ["second", "first"]:
            flax_impls = ["jax (model=flax)", "jax (model=flax, conv_ops conv)"]
            jax_impls = ["jax (metalearn)"] + (flax_impls if args.flax else [])
            jax_impls += ["jax (metalearn, bf16)"] if args.bf16 else []
            impls = ([] if args.only == "torch" else jax_impls) + (
                [] if args.only == "jax" else torch_impls
            )
            jax_chunks = args.task_chunk or [None]  # None: metalearn's automatic choice
            for impl in impls:
                for chunk in jax_chunks if impl.startswith("jax") else [None]:
                    configs.append(
                        {
                            "impl": impl,
                            "order": order,
                            "downsample": d,
                            "meta_batch": args.meta_batch,
                            "inner_steps": args.inner_steps,
                            "steps": args.steps,
                            "warmup": args.warmup,
                            "model": {
                                "jax (model=flax)": "flax",
                                "jax (model=flax, conv_ops conv)": "flax-fast-conv",
                            }.get(impl, "conv4"),
                            "omniglot": args.omniglot,
                            "task_chunk": chunk,
                        }
                    )

    load_start = os.getloadavg()[0]
    rows = []
    for cfg in configs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
        label = f"{cfg['impl']:<16} {cfg['order']:<6} {cfg['downsample']:<7}"
        print(f"running {label} ...", flush=True)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            res = json.loads(line[-1][7:]) if line else {"error": r.stderr.strip()[-400:]}
        except subprocess.TimeoutExpired:
            res = {"error": f"timed out after {args.timeout:.0f} s"}
        res = {**cfg, **res}  # the worker's task_chunk is the one it resolved
        if "times" in res:
            res["median"] = statistics.median(res["times"])
            print(
                f"  {res['median']:.3f} s/step  compile {res['compile_s']:.1f} s  "
                f"peak RSS {res['peak_rss_gb']:.2f} GB  loss {res['loss']:.4f}",
                flush=True,
            )
        else:
            print("  FAILED: " + res["error"], flush=True)
        rows.append(res)

    table = _table(rows, args, l2l_missing)
    table += (
        f"\nLoad average (1 min) at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores. Above the core count the PyTorch side slows down far more than "
        "XLA's (its OpenMP threads wait on each other), so the speedups are only meaningful on an "
        "idle machine.\n"
    )
    print("\n" + table)
    args.out.write_text(table)
    print(f"written to {args.out}")


def _table(rows: list[dict], args, l2l_missing: str | None) -> str:
    best = {}
    for r in rows:
        if "median" in r and not r["impl"].startswith("jax"):
            key = (r["order"], r["downsample"])
            best[key] = min(best.get(key, float("inf")), r["median"])
    lines = [
        f"MAML outer step, Omniglot {N_WAY}-way {K_SHOT}-shot, conv4-64, {IMAGE}x{IMAGE}x1 "
        "(metalearn: the train step `metalearn train data=omniglot algo=maml` compiles, on its "
        "own Omniglot episodes; PyTorch: random inputs of the same shapes), "
        f"{N_QUERY} queries/class, meta-batch {args.meta_batch}, "
        f"{args.inner_steps} inner SGD step(s) lr {INNER_LR}, Adam {OUTER_LR}, float32, "
        f"{os.cpu_count()} CPU cores. Median of {args.steps} steps after {args.warmup} warm-up; "
        "each configuration in a fresh process; speedup = fastest PyTorch s/step (same order "
        "and downsample, this run) / this s/step.",
        "",
        "| implementation | order | downsample | tasks per chunk | s/step | compile s | "
        "peak RSS GB | speedup vs fastest PyTorch | GFLOP (XLA) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "median" not in r:
            lines.append(
                f"| {r['impl']} | {r['order']} | {r['downsample']} | | failed: {r['error'][:80]} "
                "| | | | |"
            )
            continue
        b = best.get((r["order"], r["downsample"]))
        ratio = f"{b / r['median']:.2f}x" if b else "-"
        gflop = f"{r['gflop']:.0f}" if r.get("gflop") else "-"
        jax_row = r["impl"].startswith("jax")
        comp = f"{r['compile_s']:.1f}" if jax_row else "-"
        chunk = r["task_chunk"] if jax_row else "1 (loop)"
        lines.append(
            f"| {r['impl']} | {r['order']} | {r['downsample']} | {chunk} | {r['median']:.3f} | "
            f"{comp} | {r['peak_rss_gb']:.2f} | {ratio} | {gflop} |"
        )
    so_fo = {}
    for r in rows:
        if "median" in r and r["impl"] == "jax (metalearn)":  # the first --task-chunk given
            so_fo.setdefault((r["downsample"], r["order"]), r["median"])
    for d in ("maxpool", "stride"):
        if (d, "second") in so_fo and (d, "first") in so_fo:
            lines.append("")
            lines.append(
                f"JAX {d}: second/first order time ratio "
                f"{so_fo[(d, 'second')] / so_fo[(d, 'first')]:.2f}"
            )
    builtin = {(r["order"], r["downsample"]): r["median"] for r in rows
               if r.get("median") and r["impl"] == "jax (metalearn)"}  # fmt: skip
    for r in rows:
        key = (r["order"], r["downsample"])
        if r.get("median") and r["impl"].startswith("jax (model=flax") and key in builtin:
            lines.append("")
            lines.append(
                f"{r['impl'][5:-1]} / built-in conv4, {key[0]} order {key[1]}: "
                f"{r['median'] / builtin[key]:.2f}x the time per step"
            )
    lines.append("")
    lines.append(
        "learn2learn: "
        + ("measured above." if l2l_missing is None else f"not installed ({l2l_missing}).")
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
