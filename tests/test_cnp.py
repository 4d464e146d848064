"""Neural processes: the CNP and the latent NP are invariant to the order and padding of the
context set; the CNP is trained by the Gaussian log-likelihood of the targets and learns GP
regression; the NP's ELBO against a hand computation; a CLI run of each on data=gp."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import metalearn
from scipy import stats

from metalearn.algorithms import ALGORITHMS
from metalearn.algorithms.base import gaussian_loss
from metalearn.algorithms.cnp import CNPConfig
from metalearn.data.gp import GPConfig, make_source
from metalearn.evaluate import make_evaluator
from metalearn.experiment import Experiment
from metalearn.train_step import TrainState, make_train_step
from metalearn.types import Split, Task

KEY = jax.random.PRNGKey(0)


def cnp(source, **settings):
    cfg = CNPConfig(**settings)
    return ALGORITHMS["cnp"](cfg, None, None, n_out=source.n_out, source=source)


def random_cnp(**settings):
    """A CNP with random weights (biases too, so no symmetry hides a bug)."""
    source = make_source(GPConfig())
    algo = cnp(source, hidden=16, representation=8, **settings)
    params = algo.init(KEY)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return algo, jax.tree.unflatten(tree, noisy), source


def gp_task(key, **settings):
    return make_source(GPConfig(**settings)).sample(key, (), False)


def predictions(algo, params, support, x):
    return algo.predict(params, algo.adapt(params, support, KEY), x)


def test_predictions_are_invariant_to_permuting_the_context():
    algo, params, _ = random_cnp()
    task = gp_task(KEY)
    order = jax.random.permutation(jax.random.PRNGKey(3), len(task.support.x))
    permuted = jax.tree.map(lambda a: a[order], task.support)  # padding slots move too
    mean, std = predictions(algo, params, task.support, task.query.x)
    mean_p, std_p = predictions(algo, params, permuted, task.query.x)
    np.testing.assert_allclose(mean_p, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std_p, std, rtol=1e-5, atol=1e-5)


def test_padded_context_and_targets_give_the_unpadded_result():
    """Eight real context points and five targets, unpadded and padded with junk values: the
    same predictions and the same evaluation metrics."""
    algo, params, _ = random_cnp()
    xs, ys, xq, yq = jax.random.normal(KEY, (4, 8, 1))
    xq, yq = xq[:5], yq[:5]

    def pad(x, y, slots):
        junk = jnp.full((slots - len(x), 1), 5.0)
        return Split(jnp.concatenate([x, junk]), jnp.concatenate([y, -junk]),
                     jnp.arange(slots) < len(x))  # fmt: skip

    plain = Task(Split(xs, ys), Split(xq, yq), jnp.zeros((), jnp.int32))
    padded = Task(pad(xs, ys, 20), pad(xq, yq, 11), jnp.zeros((), jnp.int32))
    mean, std = predictions(algo, params, plain.support, xq)
    mean_p, std_p = predictions(algo, params, padded.support, xq)
    np.testing.assert_allclose(mean_p, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std_p, std, rtol=1e-5, atol=1e-6)
    _, metrics = algo.evaluate(params, plain, KEY, 0)
    _, metrics_p = algo.evaluate(params, padded, KEY, 0)
    for name in ("log_likelihood", "mse"):
        np.testing.assert_allclose(metrics_p[name], metrics[name], rtol=1e-5)
    # and in training, where the targets are the context and query points together
    loss, _ = algo.meta_loss(params, plain, KEY)
    loss_p, _ = algo.meta_loss(params, padded, KEY)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-5)


def test_training_loss_is_the_nll_of_context_and_targets():
    """meta_loss against scipy's Gaussian log-density of the predictions at the context and
    target points (context_in_targets), and at the targets only when it is off."""
    algo, params, _ = random_cnp()
    task = gp_task(jax.random.PRNGKey(5))
    r = algo.adapt(params, task.support, KEY)

    def nll(split):
        mean, std = (np.asarray(a, np.float64) for a in algo.predict(params, r, split.x))
        real = np.asarray(split.mask)
        return -stats.norm(mean[real], std[real]).logpdf(np.asarray(split.y)[real])

    both = np.concatenate([nll(task.support), nll(task.query)]).mean()
    np.testing.assert_allclose(algo.meta_loss(params, task, KEY)[0], both, rtol=1e-4)
    query_only = cnp(make_source(GPConfig()), hidden=16, representation=8,
                     context_in_targets=False)  # fmt: skip
    np.testing.assert_allclose(
        query_only.meta_loss(params, task, KEY)[0], nll(task.query).mean(), rtol=1e-4
    )


def test_the_predictive_std_is_bounded_below():
    algo, params, _ = random_cnp(min_std=0.25)
    task = gp_task(KEY)
    _, std = predictions(algo, params, task.support, 30 * jnp.linspace(-1, 1, 50)[:, None])
    assert float(std.min()) >= 0.25


def test_short_training_improves_held_out_log_likelihood():
    """300 steps of meta-batch 16 on data=gp (EQ, 3..20 context and target points) raise the
    held-out log-likelihood per target point by more than the two evaluations' 95% CIs."""
    source = make_source(GPConfig(k_shot=20, k_query=20))
    algo = cnp(source, hidden=32, representation=32, encoder_layers=2)
    exp = Experiment(None, source, None, algo, gaussian_loss, optax.adam(3e-3))
    params = algo.init(KEY)
    state = TrainState(params, exp.optimizer.init(params))
    step = make_train_step(exp, meta_batch=16)
    evaluate = make_evaluator(algo, source, gaussian_loss, 0, batch=50)
    before = evaluate(state.params, "test", 200, 1)
    for i in range(300):
        state, _ = step(state, (), jax.random.fold_in(KEY, i))
    after = evaluate(state.params, "test", 200, 1)
    margin = before["log_likelihood_ci95"] + after["log_likelihood_ci95"]
    assert after["log_likelihood"] > before["log_likelihood"] + margin, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["cnp", "np"])
def test_metalearn_train_on_gp_reports_predictive_metrics(algo, tmp_path, env):
    run = tmp_path / algo
    metalearn(
        ["train", f"algo={algo}", "data=gp", "data.kernel=matern52", "train.steps=20",
         "train.meta_batch=4", "eval.every=10", "eval.val_tasks=8", "eval.num_tasks=16",
         f"hydra.run.dir={run}"],
        env, tmp_path, check=True,
    )  # fmt: skip
    test = json.loads((run / "summary.json").read_text())["test"]
    assert test["num_tasks"] == 16
    for name in ("log_likelihood", "mse", "coverage_50", "coverage_90", "coverage_95"):
        assert np.isfinite(test[name]) and f"{name}_ci95" in test
    assert 0 <= test["coverage_50"] <= test["coverage_90"] <= test["coverage_95"] <= 1
    if algo == "np":
        assert np.isfinite(test["joint_log_likelihood"])


# ---------------------------------------------------------------------------------------------
# The latent-variable NP


def tiny_np(**settings):
    from metalearn.algorithms.np import NPConfig, functions

    cfg = NPConfig(hidden=4, encoder_layers=1, decoder_layers=1, representation=3, latent=2,
                   samples=5, **settings)  # fmt: skip
    fns = functions(cfg, 1, 1)
    params = fns.init(KEY)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree.unflatten(
        tree, [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    algo = ALGORITHMS["np"](cfg, None, None, n_out=1, source=make_source(GPConfig()))
    return cfg, fns, algo, params


def numpy_mlp(layers, h):
    for i, layer in enumerate(layers):
        h = h @ np.asarray(layer["w"], np.float64) + np.asarray(layer["b"], np.float64)
        h = np.maximum(h, 0) if i < len(layers) - 1 else h
    return h


def test_np_elbo_against_a_hand_written_computation():
    """The ELBO per target point of a tiny NP on a padded task, written out in float64 numpy:
    both encoders' masked means, z = mu_T + sigma_T eps, the decoder's Gaussian log-density at
    the context and query points, and the KL of two diagonal Gaussians in its textbook form."""
    _, fns, _, params = tiny_np()
    task = gp_task(jax.random.PRNGKey(7), k_shot=6, k_query=5, min_shot=2, min_query=2)
    eps = np.array([0.3, -1.1])
    s, q = task.support, task.query
    real_c = np.asarray(s.mask)
    xy_c = np.concatenate([np.asarray(s.x), np.asarray(s.y)], -1)[real_c]
    real_t = np.concatenate([np.asarray(s.mask), np.asarray(q.mask)])
    xy_t = np.concatenate([np.concatenate([s.x, s.y], -1), np.concatenate([q.x, q.y], -1)])
    xy_t = np.asarray(xy_t, np.float64)[real_t]

    def q_z(xy):
        stats_ = numpy_mlp(params["latent_encoder"], xy).mean(0)
        return stats_[:2], 0.1 + 0.9 / (1 + np.exp(-stats_[2:]))

    r = numpy_mlp(params["encoder"], xy_c).mean(0)
    mu_c, sd_c = q_z(xy_c)
    mu_t, sd_t = q_z(xy_t)
    z = mu_t + sd_t * eps
    h = np.concatenate([np.tile(np.r_[r, z], (len(xy_t), 1)), xy_t[:, :1]], -1)
    out = numpy_mlp(params["decoder"], h)
    mean, std = out[:, 0], 0.1 + 0.9 * np.log1p(np.exp(out[:, 1]))
    log_lik = stats.norm(mean, std).logpdf(xy_t[:, 1]).sum()
    kl = np.sum(np.log(sd_c / sd_t) + (sd_t**2 + (mu_t - mu_c) ** 2) / (2 * sd_c**2) - 0.5)
    want = (log_lik - kl) / len(xy_t)
    np.testing.assert_allclose(fns.elbo(params, task, jnp.asarray(eps)), want, rtol=1e-4)
    assert kl > 0  # the two posteriors differ, so the KL term is exercised


def test_np_predictions_are_invariant_to_context_order_and_padding():
    _, _, algo, params = tiny_np()
    xs, ys, xq = jax.random.normal(KEY, (3, 7, 1))
    order = jax.random.permutation(jax.random.PRNGKey(3), 7)
    junk = jnp.full((4, 1), 3.0)
    mask = jnp.arange(11) < 7
    plain = Split(xs, ys)
    permuted = Split(xs[order], ys[order])
    padded = Split(jnp.concatenate([xs, junk]), jnp.concatenate([ys, junk]), mask)
    want = algo.predict(params, algo.adapt(params, plain, KEY), xq)
    for support in (permuted, padded):  # the same key draws the same eps for z
        got = algo.predict(params, algo.adapt(params, support, KEY), xq)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # one z per test-time sample; the mixture's std keeps the decoder's lower bound
    r, z = algo.adapt(params, plain, KEY)
    assert z.shape == (5, 2)
    _, std = want
    assert np.all(np.asarray(std) >= 0.1)
