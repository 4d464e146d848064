"""Time ResNet-12 ProtoNet and MAML steps on 84x84 5-way 1-shot episodes: metalearn against
learn2learn's ResNet12Backbone (PyTorch) in the same run.

    python scripts/bench_backbones.py                    # -> scripts/bench_backbones_results.md
    python scripts/bench_backbones.py --algo protonet --steps 2

The metalearn rows time the train step `metalearn train data=mini_imagenet model=resnet12`
compiles (experiment.prepare), fed episodes of a synthetic miniImageNet written in
learn2learn's pickle format (no miniImageNet here; random pixels cost the same as real ones).
Both sides use the same network (12,424,320 parameters before the head, DropBlock off: rate 0),
one episode per step (meta-batch 1), 15 queries per class, Adam; MAML: 1 inner SGD step, second
order. Every configuration runs in a fresh process; read the speedup column (learn2learn s/step
/ this s/step, same algorithm, this run).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_maml import _learn2learn_maml, _peak_rss_gb, _timed_steps, time_train_step  # noqa: E402

N_WAY, K_SHOT, N_QUERY, IMAGE, INNER_LR, OUTER_LR = 5, 1, 15, 84, 0.01, 1e-3
ALGOS = ("protonet", "maml")


def write_synthetic_mini_imagenet(folder: Path, classes: int = 8, per_class: int = 20) -> Path:
    """learn2learn's mini-imagenet-cache-{split}.pkl files of random 84x84 RGB images."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split in ("train", "validation", "test"):
        images = rng.integers(0, 256, (classes * per_class, IMAGE, IMAGE, 3), dtype=np.uint8)
        index = {f"n{split[:2]}{c:06d}": list(range(c * per_class, (c + 1) * per_class))
                 for c in range(classes)}  # fmt: skip
        with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": index}, f)
    return folder


# ------------------------------------------------------------------------------------- JAX
def run_jax(cfg: dict) -> dict:
    overrides = [
        "data=mini_imagenet", f"data.root={cfg['root']}", f"data.image_size={IMAGE}",
        f"data.n_way={N_WAY}", f"data.k_shot={K_SHOT}", f"data.k_query={N_QUERY}",
        "model=resnet12", "model.drop_rate=0.0", f"algo={cfg['algo']}", "train.meta_batch=1",
        f"train.outer_lr={OUTER_LR}",
    ]  # fmt: skip
    if cfg["algo"] == "maml":
        overrides += [f"algo.inner_lr={INNER_LR}", "algo.inner_steps=1", "algo.first_order=false"]
    _, session, times, loss = time_train_step(overrides, cfg["steps"], cfg["warmup"])
    return {"times": times, "compile_s": session.progress["compile_time_s"], "loss": loss}


# ----------------------------------------------------------------------------------- PyTorch
def _learn2learn_resnet12():
    """learn2learn's ResNet12Backbone without its package __init__ (gym, torchvision, ...)."""
    stub = sys.modules.get("learn2learn")  # bench_maml._learn2learn_maml's, if loaded first
    root = (stub.__path__[0] if stub is not None
            else importlib.util.find_spec("learn2learn").submodule_search_locations[0])  # fmt: skip
    for name, sub in (("learn2learn", ""), ("learn2learn.vision", "vision"),
                      ("learn2learn.vision.models", "vision/models")):  # fmt: skip
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(root, sub)]
            sys.modules[name] = package
    sys.modules["learn2learn"].nn = importlib.import_module("learn2learn.nn")
    return importlib.import_module("learn2learn.vision.models.resnet12").ResNet12Backbone


def run_torch(cfg: dict) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    maml_class = _learn2learn_maml() if cfg["algo"] == "maml" else None  # before the stubs below
    backbone = _learn2learn_resnet12()(avg_pool=True, dropblock_dropout=0.0)
    rng = np.random.default_rng(0)
    sx = torch.tensor(rng.random((N_WAY * K_SHOT, 3, IMAGE, IMAGE)), dtype=torch.float32)
    qx = torch.tensor(rng.random((N_WAY * N_QUERY, 3, IMAGE, IMAGE)), dtype=torch.float32)
    sy = torch.arange(N_WAY).repeat_interleave(K_SHOT)
    qy = torch.arange(N_WAY).repeat_interleave(N_QUERY)
    state = {}

    if cfg["algo"] == "protonet":
        opt = torch.optim.Adam(backbone.parameters(), OUTER_LR)

        def run_step():
            opt.zero_grad(set_to_none=True)
            features = backbone(torch.cat([sx, qx]))
            support, query = features[: len(sx)], features[len(sx) :]
            protos = torch.stack([support[sy == c].mean(0) for c in range(N_WAY)])
            loss = F.cross_entropy(-(torch.cdist(query, protos) ** 2), qy)
            loss.backward()
            opt.step()
            state["loss"] = loss.item()

    else:
        model = torch.nn.Sequential(backbone, torch.nn.Linear(640, N_WAY))
        maml = maml_class(model, lr=INNER_LR, first_order=False)
        opt = torch.optim.Adam(maml.parameters(), OUTER_LR)

        def run_step():
            opt.zero_grad(set_to_none=True)
            learner = maml.clone()
            learner.adapt(F.cross_entropy(learner(sx), sy))
            loss = F.cross_entropy(learner(qx), qy)
            loss.backward()
            opt.step()
            state["loss"] = loss.item()

    times = _timed_steps(run_step, cfg["steps"], cfg["warmup"])
    return {"times": times, "compile_s": 0.0, "loss": state["loss"]}


# ------------------------------------------------------------------------------------ driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    ap.add_argument("--algo", choices=ALGOS, action="append")
    ap.add_argument("--timeout", type=float, default=2400, help="seconds per configuration")
    ap.add_argument("--out", type=Path, default=ROOT / "scripts" / "bench_backbones_results.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        cfg = json.loads(args.worker)
        out = run_jax(cfg) if cfg["impl"] == "jax (metalearn)" else run_torch(cfg)
        print("RESULT " + json.dumps({**out, "peak_rss_gb": _peak_rss_gb()}), flush=True)
        return

    load_start, rows = os.getloadavg()[0], []
    with tempfile.TemporaryDirectory() as folder:
        root = write_synthetic_mini_imagenet(Path(folder))
        cache = Path(folder) / "cache"  # the resized arrays, private to this run
        env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
        for algo in args.algo or ALGOS:
            for impl in ("jax (metalearn)", "learn2learn"):
                cfg = {"impl": impl, "algo": algo, "root": str(root), "steps": args.steps,
                       "warmup": args.warmup}  # fmt: skip
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
                print(f"running {impl:<16} {algo} ...", flush=True)
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                       timeout=args.timeout)  # fmt: skip
                    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                    res = json.loads(lines[-1][7:]) if lines else {"error": r.stderr[-400:]}
                except subprocess.TimeoutExpired:
                    res = {"error": f"timed out after {args.timeout:.0f} s"}
                res = {**cfg, **res}
                if "times" in res:
                    res["median"] = statistics.median(res["times"])
                    print(f"  {res['median']:.2f} s/step  compile {res['compile_s']:.1f} s  "
                          f"peak RSS {res['peak_rss_gb']:.2f} GB", flush=True)  # fmt: skip
                else:
                    print("  FAILED: " + res["error"], flush=True)
                rows.append(res)
    table = _table(rows, args, load_start)
    print("\n" + table)
    args.out.write_text(table)
    print(f"written to {args.out}")


def _table(rows: list[dict], args, load_start: float) -> str:
    peer = {r["algo"]: r["median"] for r in rows if r["impl"] == "learn2learn" and "median" in r}
    lines = [
        f"ResNet-12 (64-160-320-640, DropBlock off) train step, {N_WAY}-way {K_SHOT}-shot, "
        f"{N_QUERY} queries/class, {IMAGE}x{IMAGE}x3, one episode per step, Adam {OUTER_LR}; "
        f"MAML: 1 inner SGD step lr {INNER_LR}, second order. float32, {os.cpu_count()} CPU "
        f"cores. Median of {args.steps} steps after {args.warmup} warm-up, each configuration in "
        "a fresh process; speedup = learn2learn s/step / this s/step (same algorithm, this run).",
        "",
        "| implementation | algorithm | s/step | compile s | peak RSS GB | "
        "speedup vs learn2learn |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "median" not in r:
            lines.append(f"| {r['impl']} | {r['algo']} | failed: {r['error'][:80]} | | | |")
            continue
        ratio = f"{peer[r['algo']] / r['median']:.2f}x" if r["algo"] in peer else "-"
        comp = f"{r['compile_s']:.1f}" if r["impl"].startswith("jax") else "-"
        lines.append(f"| {r['impl']} | {r['algo']} | {r['median']:.2f} | {comp} | "
                     f"{r['peak_rss_gb']:.2f} | {ratio} |")  # fmt: skip
    lines.append("")
    lines.append(
        f"Load average (1 min) at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
