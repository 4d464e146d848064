"""Environment steps per second of RL² training: metalearn (JAX) against a PyTorch RL² loop.

Both train the same learner on the same task distribution: a GRU policy and value over
(one-hot observation, one-hot previous action, previous reward, done), hidden state kept across
a trial's episodes, PPO (GAE over each trial, algo.epochs passes of algo.minibatches minibatches
of trials, clipped loss, value loss, entropy bonus, Adam with gradient clipping).

- metalearn: the train step `metalearn train algo=rl2 data=...` compiles (experiment.prepare,
  via scripts/bench_maml.py::time_train_step): rollouts vmapped over trials, each a lax.scan, the
  PPO epochs a scan, all in one jitted step.
- PyTorch: what a typical implementation does (written here, not a dependency): the
  environments stepped in numpy batched over trials in a Python loop over the trial's steps, the
  GRUCell and the PPO replay stepped in a Python loop too; run with 1 thread and with all cores
  (on a shared machine the default thread pool can be 10x slower on these small ops), the ratio
  taken against the faster.

One train step = train.meta_batch trials of data.episodes x episode_steps environment steps; the
figure is those steps / the median seconds per train step (after warm-up steps, which include
compiling). The machine is shared: the load average is printed and recorded.

    python scripts/bench_rl2.py                  # full run -> scripts/bench_rl2_results.md
    python scripts/bench_rl2.py --quick          # smoke run, few steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "bench_rl2_results.md"
LOAD_WARNING = 1.5

# (name, metalearn overrides, PyTorch environment settings)
ENVS = {
    "bandit": (
        ["data=bandit", "data.arms=5", "data.episodes=10"],
        {"kind": "bandit", "arms": 5, "episodes": 10},
    ),
    "tabular_mdp": (
        ["data=tabular_mdp"],  # 10 states, 5 actions, 10 episodes of 10 steps
        {"kind": "mdp", "states": 10, "actions": 5, "episodes": 10, "episode_steps": 10},
    ),
}
# RL2Config's defaults, which the PyTorch loop copies
PPO = {
    "gamma": 0.99,
    "lam": 0.3,
    "clip": 0.2,
    "epochs": 4,
    "minibatches": 4,
    "value_coef": 0.5,
    "entropy_coef": 0.01,
    "max_grad_norm": 0.5,
    "lr": 1e-3,
}


def _timed(run_step, steps: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        run_step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------------------------- JAX
def run_jax(env: str, trials: int, hidden: int, steps: int, warmup: int) -> dict:
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_maml import time_train_step

    overrides = [
        "algo=rl2",
        *ENVS[env][0],
        f"model.hidden={hidden}",
        f"train.meta_batch={trials}",
        f"train.outer_lr={PPO['lr']}",
    ]
    t0 = time.perf_counter()
    config, session, times, loss = time_train_step(overrides, steps, warmup)
    from metalearn.envs import make_env

    trial_steps = make_env(config.data).trial_steps
    return {
        "impl": "metalearn (JAX, jit+vmap)",
        "s_per_step": statistics.median(times),
        "env_steps": trials * trial_steps,
        "warmup_s": time.perf_counter() - t0 - sum(times),
        "loss": loss,
    }


# --------------------------------------------------------------------------------- PyTorch
class NumpyEnvs:
    """`trials` environments of one family stepped together in numpy (one task each)."""

    def __init__(self, spec: dict, trials: int, rng):
        self.spec, self.b, self.rng = spec, trials, rng
        if spec["kind"] == "bandit":
            self.n_obs, self.n_actions, self.episode_steps = 1, spec["arms"], 1
        else:
            self.n_obs, self.n_actions = spec["states"], spec["actions"]
            self.episode_steps = spec["episode_steps"]
        self.trial_steps = spec["episodes"] * self.episode_steps

    def sample_tasks(self):
        import numpy as np

        rng, b = self.rng, self.b
        if self.spec["kind"] == "bandit":
            self.probs = rng.random((b, self.n_actions))
        else:
            s, a = self.n_obs, self.n_actions
            self.means = 1.0 + rng.standard_normal((b, s, a))
            self.p_cum = np.cumsum(rng.dirichlet(np.ones(s), (b, s, a)), axis=-1)
        return self.reset()

    def reset(self):
        import numpy as np

        self.t = np.zeros(self.b, np.int64)
        if self.spec["kind"] == "bandit":
            self.state = np.zeros(self.b, np.int64)
        else:
            self.state = self.rng.integers(0, self.n_obs, self.b)
        return self.state.copy()

    def step(self, action):
        import numpy as np

        rows = np.arange(self.b)
        if self.spec["kind"] == "bandit":
            reward = (self.rng.random(self.b) < self.probs[rows, action]).astype(np.float32)
            return self.state.copy(), reward, np.ones(self.b, bool)
        s = self.state
        reward = self.means[rows, s, action] + self.rng.standard_normal(self.b)
        u = self.rng.random(self.b)[:, None]
        nxt = np.minimum((u > self.p_cum[rows, s, action]).sum(-1), self.n_obs - 1)
        self.t += 1
        done = self.t >= self.episode_steps
        fresh = self.rng.integers(0, self.n_obs, self.b)
        self.state = np.where(done, fresh, nxt)
        self.t = np.where(done, 0, self.t)
        return self.state.copy(), reward.astype(np.float32), done


def torch_trainer(env: str, trials: int, hidden: int, seed: int = 0):
    """One RL² PPO train step (rollout of `trials` trials, then the PPO epochs) per call."""
    import numpy as np
    import torch
    from torch import nn

    torch.manual_seed(seed)
    envs = NumpyEnvs(ENVS[env][1], trials, np.random.default_rng(seed))
    n_obs, n_act, T = envs.n_obs, envs.n_actions, envs.trial_steps
    size = n_obs + n_act + 2

    class Agent(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.GRUCell(size, hidden)
            self.head = nn.Linear(hidden, n_act + 1)

        def forward(self, x, h):
            h = self.cell(x, h)
            out = self.head(h)
            return h, out[:, :n_act], out[:, n_act]

    agent = Agent()
    opt = torch.optim.Adam(agent.parameters(), lr=PPO["lr"])
    eye_obs, eye_act = torch.eye(n_obs), torch.eye(n_act)

    def inputs(obs, prev_a, prev_r, prev_d):
        pa = torch.where(prev_a[:, None] >= 0, eye_act[prev_a.clamp(min=0)], 0.0)
        return torch.cat([eye_obs[obs], pa, prev_r[:, None], prev_d[:, None]], 1)

    def rollout():
        obs = torch.from_numpy(envs.sample_tasks())
        h = torch.zeros(trials, hidden)
        prev_a = torch.full((trials,), -1, dtype=torch.long)
        prev_r, prev_d = torch.zeros(trials), torch.zeros(trials)
        xs, acts, logps, vals, rews = [], [], [], [], []
        with torch.no_grad():
            for _ in range(T):
                x = inputs(obs, prev_a, prev_r, prev_d)
                h, logits, value = agent(x, h)
                dist = torch.distributions.Categorical(logits=logits)
                a = dist.sample()
                nxt, r, d = envs.step(a.numpy())
                xs.append(x), acts.append(a), logps.append(dist.log_prob(a)), vals.append(value)
                obs, prev_a = torch.from_numpy(nxt), a
                prev_r, prev_d = torch.from_numpy(r), torch.from_numpy(d.astype(np.float32))
                rews.append(prev_r)
        stack = lambda v: torch.stack(v, 1)  # noqa: E731 [B, T, ...]
        return stack(xs), stack(acts), stack(logps), stack(vals), stack(rews)

    def gae(rew, val):
        adv = torch.zeros_like(rew)
        last = torch.zeros(trials)
        for t in reversed(range(T)):  # one trajectory per trial, no bootstrap at its end
            nv = val[:, t + 1] if t + 1 < T else torch.zeros(trials)
            delta = rew[:, t] + PPO["gamma"] * nv - val[:, t]
            last = delta + PPO["gamma"] * PPO["lam"] * last
            adv[:, t] = last
        return adv, adv + val

    def train_step():
        x, act, old_logp, val, rew = rollout()
        adv, ret = gae(rew, val)
        mb = trials // PPO["minibatches"]
        for _ in range(PPO["epochs"]):
            order = torch.randperm(trials)
            for i in range(PPO["minibatches"]):
                idx = order[i * mb : (i + 1) * mb]
                h = torch.zeros(mb, hidden)
                logits, values = [], []
                for t in range(T):  # replay the GRU along the recorded trials
                    h, lg, v = agent(x[idx, t], h)
                    logits.append(lg), values.append(v)
                logits, values = torch.stack(logits, 1), torch.stack(values, 1)
                logp_all = torch.log_softmax(logits, -1)
                logp = logp_all.gather(-1, act[idx, :, None])[..., 0]
                entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
                a = adv[idx]
                a = (a - a.mean()) / (a.std(unbiased=False) + 1e-8)
                ratio = (logp - old_logp[idx]).exp()
                clipped = ratio.clamp(1 - PPO["clip"], 1 + PPO["clip"])
                policy_loss = -torch.minimum(ratio * a, clipped * a).mean()
                value_loss = 0.5 * (values - ret[idx]).pow(2).mean()
                loss = policy_loss + PPO["value_coef"] * value_loss - PPO["entropy_coef"] * entropy
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), PPO["max_grad_norm"])
                opt.step()
        return float(loss.detach())

    return train_step, trials * T


def run_torch(env: str, trials: int, hidden: int, steps: int, warmup: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)  # on a loaded machine 1 thread is often the faster
    train_step, env_steps = torch_trainer(env, trials, hidden)
    out = {}

    def run_step():
        out["loss"] = train_step()

    t0 = time.perf_counter()
    times = _timed(run_step, steps, warmup)
    return {
        "impl": f"PyTorch {torch.__version__} loop ({threads} thread{'s' * (threads > 1)})",
        "s_per_step": statistics.median(times),
        "env_steps": env_steps,
        "warmup_s": time.perf_counter() - t0 - sum(times),
        "loss": out["loss"],
    }


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    parser.add_argument("--trials", type=int, default=32, help="train.meta_batch")
    parser.add_argument("--hidden", type=int, default=64, help="model.hidden")
    parser.add_argument("--steps", type=int, default=20, help="timed train steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 timed steps, 1 warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 3, 1
    if args.trials % PPO["minibatches"]:
        parser.error(f"--trials={args.trials} must be a multiple of {PPO['minibatches']}")

    load_before = os.getloadavg()
    rows = []
    for env in args.envs:
        runs = [run_jax] + [
            lambda *a, n=n: run_torch(*a, threads=n) for n in sorted({1, os.cpu_count() or 1})
        ]
        for run in runs:
            row = run(env, args.trials, args.hidden, args.steps, args.warmup)
            row["env"] = env
            row["env_steps_per_s"] = row["env_steps"] / row["s_per_step"]
            rows.append(row)
            print(
                f"{env:12s} {row['impl']:34s} {row['s_per_step']:8.4f} s/step "
                f"{row['env_steps_per_s']:12,.0f} env steps/s",
                flush=True,
            )
    load_after = os.getloadavg()
    write(rows, args, load_before, load_after)


def write(rows, args, load_before, load_after) -> None:
    peak_load = max(load_before[0], load_after[0])
    header = (
        f"RL² training throughput: {args.trials} trials per train step, GRU {args.hidden}, PPO "
        f"{PPO['epochs']} epochs x {PPO['minibatches']} minibatches, float32, "
        f"{os.cpu_count()} CPU cores. Median of {args.steps} train steps after {args.warmup} "
        "warm-up (which include compiling); env steps/s = trials x steps per trial / s per "
        "train step; ratio = this row's env steps/s / the fastest PyTorch row's (1 thread or "
        "all cores), same environment, same run. "
        "Bandit: 5 arms x 10 pulls (10 steps per trial); tabular MDP: 10 states, 5 actions, "
        "10 episodes x 10 steps (100 steps per trial)."
    )
    lines = [header, ""]
    lines.append(
        f"Load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} "
        f"(5/15 min after: {load_after[1]:.2f}/{load_after[2]:.2f})."
    )
    if peak_load > LOAD_WARNING:
        warning = (
            f"WARNING: the load average was above {LOAD_WARNING} (other work shared the CPU "
            "cores): these figures are not final; rerun on an idle machine."
        )
        lines.append(warning)
        print(warning)
    if args.steps < 10:
        lines.append(
            f"Only {args.steps} timed steps (a check that the script works): not final figures."
        )
    lines += [
        "",
        "| environment | implementation | s/train step | env steps/step | env steps/s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    table = []
    for row in rows:
        torch_row = max(
            (r for r in rows if r["env"] == row["env"] and r["impl"].startswith("PyTorch")),
            key=lambda r: r["env_steps_per_s"],
        )
        ratio = row["env_steps_per_s"] / torch_row["env_steps_per_s"]
        table.append(
            f"| {row['env']} | {row['impl']} | {row['s_per_step']:.4f} | {row['env_steps']} | "
            f"{row['env_steps_per_s']:,.0f} | {ratio:.1f}x |"
        )
    lines += table
    lines += ["", f"Command: `python scripts/bench_rl2.py {' '.join(sys.argv[1:])}`".rstrip()]
    text = "\n".join(lines) + "\n"
    print("\n".join(table))
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
