"""The benchmark's exact ELBOs (``benchmarks/bench_gym.py``): the ill-conditioned Gaussian's closed
form and item-response's Gauss-Hermite quadrature against plain Monte Carlo of the same ELBO,
in float64, on small instances (the benchmark's own are the same code at larger sizes)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside ngvi/

from benchmarks import bench_gym as bg  # noqa: E402
from ngvi import MeanFieldGaussian  # noqa: E402
from ngvi.report.scoring import crn_noise, make_elbo_scorer  # noqa: E402

pytestmark = pytest.mark.x64


def _point(d, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=d) * 0.5), jnp.asarray(np.exp(rng.normal(size=d) * 0.3 - 1))


def _monte_carlo(target, args, kwargs, loc, scale, draws=65536, repeats=8):
    """(mean, standard error) of the plain Monte Carlo ELBO over independent draw sets."""
    score = make_elbo_scorer(target, args, kwargs, crn_noise(target.dim, draws))
    vals = [float(score(loc, scale, crn_noise(target.dim, draws, seed=s))) for s in range(repeats)]
    return np.mean(vals), np.std(vals, ddof=1) / np.sqrt(repeats)


def test_ill_conditioned_exact_elbo_matches_monte_carlo_and_its_optimum():
    cov = jnp.asarray(bg._ill_conditioned_cov(d=8))
    model, args, kwargs = bg.ill_conditioned_gaussian, (cov,), {}
    target = MeanFieldGaussian(model).setup(jax.random.PRNGKey(0), args, kwargs)
    exact = bg.exact_scorer("ill_conditioned_gaussian", target, args, kwargs)
    loc, scale = _point(8)
    mean, se = _monte_carlo(target, args, kwargs, loc, scale)
    assert abs(float(exact(loc, scale)) - mean) < 4 * se + 1e-9
    # the mean-field optimum in closed form: loc = 0, scale_i^-2 = (cov^-1)_ii
    opt_scale = jnp.asarray(np.diag(np.linalg.inv(np.asarray(cov))) ** -0.5)
    grads = jax.grad(lambda m, s: exact(m, s), argnums=(0, 1))(jnp.zeros(8), opt_scale)
    assert max(float(jnp.max(jnp.abs(g))) for g in grads) < 1e-8
    assert float(exact(jnp.zeros(8), opt_scale)) > float(exact(loc, scale))


def test_item_response_quadrature_matches_monte_carlo():
    (student, question), kw = bg._irt_data(num_students=12, num_questions=5, seed=1)
    kwargs = {**kw, "num_students": 12, "num_questions": 5}
    model, args = bg.item_response, (student, question)
    target = MeanFieldGaussian(model).setup(jax.random.PRNGKey(0), args, kwargs)
    exact = bg.exact_scorer("item_response", target, args, kwargs)
    loc, scale = _point(target.dim, seed=2)
    mean, se = _monte_carlo(target, args, kwargs, loc, scale)
    value = float(exact(loc, scale))
    assert abs(value - mean) < 4 * se + 1e-9
    finer = bg.exact_elbo_item_response(target, student, question, kw["y"], nodes=128)
    assert abs(float(finer(loc, scale)) - value) < 1e-9


def test_targets_without_an_exact_elbo_get_none():
    model, args, kwargs = bg.load("banana")
    target = MeanFieldGaussian(model).setup(jax.random.PRNGKey(0), args, kwargs)
    assert bg.exact_scorer("banana", target, args, kwargs) is None


def _diagonal_gaussian(m, v):
    import numpyro
    import numpyro.distributions as dist

    numpyro.sample("z", dist.Normal(m, jnp.sqrt(v)).to_event(1))


def test_noise_floor_oracle_against_its_closed_form():
    """``benchmarks/bench_noise_floor.py`` on N(m, diag v), whose mean-field optimum is the
    target: the default antithetic, moment-matched noise makes both estimates exact (the oracle
    stays at the optimum); one plain draw a step leaves the oracle d / T nats short after T
    steps (1 / 2T a coordinate from the mean, whose estimate has variance v / T, and 1 / 2T from
    the precision, relative variance 2 / T)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from benchmarks import bench_noise_floor as nf

    d = 20
    rng = np.random.default_rng(0)
    m, v = jnp.asarray(rng.normal(size=d)), jnp.asarray(np.exp(rng.normal(size=d)))
    guide = MeanFieldGaussian(_diagonal_gaussian)
    guide.setup(jax.random.PRNGKey(0), (m, v), {})

    def elbo(loc, scale):  # exact, vectorised over leading dims
        terms = -0.5 * jnp.log(2 * jnp.pi * v) - ((loc - m) ** 2 + scale**2) / (2 * v)
        return jnp.sum(terms + jnp.log(scale), -1) + 0.5 * d * np.log(2 * np.pi * np.e)

    loc, scale = m, jnp.sqrt(v)
    best = float(elbo(loc, scale))
    steps = nf.GRID[-1]
    for k in (8, 1):
        g, h = nf.estimates(guide, (m, v), {}, loc, scale, k, steps, jax.random.PRNGKey(k))
        gaps = nf.oracle_gaps(elbo, loc, scale, g, h, best)
        if k == 8:
            assert max(abs(x) for t in nf.GRID for x in gaps[t]) < 1e-9
        else:
            for t in (200, steps):
                assert np.mean(gaps[t]) == pytest.approx(d / t, rel=0.3)
