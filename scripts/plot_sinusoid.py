"""Plot adapted fits on test sinusoids, as in the MAML paper's Figure 2.

    python scripts/plot_sinusoid.py MAML_RUN BASELINE_RUN --out docs/sinusoid_fits.png

For a few fixed test tasks it draws the true function, the K support points, the meta-learned
model before adaptation and after 1 and 10 gradient steps, and the pre-trained baseline after
10 steps. Each run is restored from its best checkpoint with the run's own configuration.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from metalearn.data.sinusoid import sinusoid_curve  # noqa: E402
from metalearn.experiment import restore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("maml_run")
    parser.add_argument("baseline_run")
    parser.add_argument("--out", default="docs/sinusoid_fits.png")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--seed", type=int, default=12345, help="the key the tasks come from")
    args = parser.parse_args()

    maml, maml_params, _ = restore(args.maml_run, [])
    base, base_params, _ = restore(args.baseline_run, [])
    data = maml.cfg.data
    grid = jnp.linspace(data.x_range[0], data.x_range[1], 200)[:, None]

    fig, axes = plt.subplots(1, args.tasks, figsize=(5 * args.tasks, 3.8), squeeze=False)
    for ax, i in zip(axes[0], range(args.tasks)):
        k_task, k_adapt = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(args.seed), i))
        task = maml.source.sample(k_task, (), False)
        truth = sinusoid_curve(k_task, data.amplitude, data.phase, grid)
        ax.plot(grid, truth, color="red", lw=2, label="ground truth")
        ax.scatter(task.support.x, task.support.y, color="purple", marker="^", zorder=5,
                   label=f"{len(task.support.x)} support points")  # fmt: skip
        for steps, style in ((0, ":"), (1, "--"), (10, "-")):
            adapted = maml.algo.adapt(maml_params, task.support, k_adapt, steps)
            pred = maml.algo.predict(maml_params, adapted, grid)
            ax.plot(grid, pred, "g" + style, label=f"MAML, {steps} grad steps")
        adapted = base.algo.adapt(base_params, task.support, k_adapt, 10)
        ax.plot(grid, base.algo.predict(base_params, adapted, grid), color="tab:blue",
                ls="-.", label="pre-trained, 10 grad steps")  # fmt: skip
        ax.set_title(f"test task {i}")
        ax.set_xlabel("x")
    axes[0][0].set_ylabel("y")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
