"""Hierarchical models: eight schools (centered and non-centered), a radon-like varying-intercept
regression, item response (1PL and 2PL) and Neal's funnel (centered and non-centered)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from benchmarks.zoo._data import rng, to_jax
from benchmarks.zoo.registry import register

# -- eight schools (Rubin 1981; BDA3 5.5)
_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools_centered(sigma, y=None):
    """mu ~ N(0, 5), tau ~ HalfCauchy(5), theta_j ~ N(mu, tau), y_j ~ N(theta_j, sigma_j)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(sigma, y=None):
    """As the centered model with theta_j = mu + tau * theta_tilde_j, theta_tilde_j ~ N(0, 1)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        tt = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * tt)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def _eight_schools_data():
    return to_jax((_SIGMA,), {"y": _Y})


# -- radon-like varying intercepts (Gelman & Hill 2007, ch. 12)
@functools.lru_cache(maxsize=1)
def _radon_np():
    r = rng(12)
    J = 24
    counts = r.integers(3, 16, size=J)
    county = np.repeat(np.arange(J), counts)
    floor = (r.random(county.size) < 0.3).astype(float)
    a = 1.5 + 0.4 * r.standard_normal(J)
    y = a[county] - 0.7 * floor + 0.75 * r.standard_normal(county.size)
    return county.astype(np.int32), floor, y, J


def radon(county, floor, num_counties, log_radon=None):
    """a_j ~ N(mu_a, sigma_a) (centered), log_radon_i ~ N(a_county[i] + b floor_i, sigma_y)."""
    mu_a = numpyro.sample("mu_a", dist.Normal(0.0, 10.0))
    sigma_a = numpyro.sample("sigma_a", dist.HalfNormal(5.0))
    b = numpyro.sample("b", dist.Normal(0.0, 10.0))
    sigma_y = numpyro.sample("sigma_y", dist.HalfNormal(5.0))
    with numpyro.plate("county", num_counties):
        a = numpyro.sample("a", dist.Normal(mu_a, sigma_a))
    with numpyro.plate("house", county.shape[0]):
        numpyro.sample("log_radon", dist.Normal(a[county] + b * floor, sigma_y), obs=log_radon)


def _radon_data():
    county, floor, y, J = _radon_np()
    return to_jax((county, floor, J), {"log_radon": y})


# -- item response theory
@functools.lru_cache(maxsize=2)
def _irt_np(seed, students, items, two_pl):
    r = rng(seed)
    theta = r.standard_normal(students)
    b = r.normal(0.0, 1.0, items)
    a = np.exp(r.normal(0.0, 0.3, items)) if two_pl else np.ones(items)
    p = 1 / (1 + np.exp(-(a * (theta[:, None] - b))))
    return (r.random((students, items)) < p).astype(np.int32)


def irt_1pl(num_students, num_items, y=None):
    """Rasch: theta_s ~ N(0, 1), b_i ~ N(mu_b, sigma_b), y_si ~ Bernoulli(logit theta_s - b_i)."""
    mu_b = numpyro.sample("mu_b", dist.Normal(0.0, 2.0))
    sigma_b = numpyro.sample("sigma_b", dist.HalfNormal(2.0))
    with numpyro.plate("student", num_students, dim=-2):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
    with numpyro.plate("item", num_items, dim=-1):
        b = numpyro.sample("b", dist.Normal(mu_b, sigma_b))
    with numpyro.plate("student", num_students, dim=-2), numpyro.plate("item", num_items, dim=-1):
        numpyro.sample("y", dist.Bernoulli(logits=theta - b), obs=y)


def irt_2pl(num_students, num_items, y=None):
    """2PL: a_i ~ LogNormal(0, 0.5), b_i ~ N(0, 2), y_si ~ Bernoulli(logit a_i (theta_s - b_i))."""
    with numpyro.plate("student", num_students, dim=-2):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
    with numpyro.plate("item", num_items, dim=-1):
        a = numpyro.sample("a", dist.LogNormal(0.0, 0.5))
        b = numpyro.sample("b", dist.Normal(0.0, 2.0))
    with numpyro.plate("student", num_students, dim=-2), numpyro.plate("item", num_items, dim=-1):
        numpyro.sample("y", dist.Bernoulli(logits=a * (theta - b)), obs=y)


def _irt1_data():
    return to_jax((40, 12), {"y": _irt_np(21, 40, 12, False)})


def _irt2_data():
    return to_jax((40, 10), {"y": _irt_np(22, 40, 10, True)})


# -- Neal's funnel (Neal 2003), 10-D
FUNNEL_DIM = 9


def funnel_centered(dim=FUNNEL_DIM):
    """v ~ N(0, 3), x_k ~ N(0, exp(v / 2)): a prior only, the hardest geometry of the zoo."""
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    numpyro.sample("x", dist.Normal(jnp.zeros(dim), jnp.exp(v / 2)).to_event(1))


def funnel_noncentered(dim=FUNNEL_DIM):
    """The same distribution with x = exp(v / 2) x_raw, x_raw ~ N(0, I)."""
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    x_raw = numpyro.sample("x_raw", dist.Normal(jnp.zeros(dim), 1.0).to_event(1))
    numpyro.deterministic("x", jnp.exp(v / 2) * x_raw)


def _no_data():
    return (), {}


register(
    "eight_schools_centered",
    eight_schools_centered,
    _eight_schools_data,
    10,
    "hierarchical",
    expfam=True,
    twin="eight_schools_noncentered",
    twin_sites={"mu": "mu", "tau": "tau", "theta": "theta"},
    quick=True,
    note="centered funnel geometry; reference from the non-centered twin (same posterior)",
)
register(
    "eight_schools_noncentered",
    eight_schools_noncentered,
    _eight_schools_data,
    10,
    "hierarchical",
    expfam=True,
    target_accept=0.95,
    quick=True,
)
register("radon", radon, _radon_data, 28, "hierarchical", expfam=True, target_accept=0.9)
register("irt_1pl", irt_1pl, _irt1_data, 54, "item response", expfam=True)
register("irt_2pl", irt_2pl, _irt2_data, 60, "item response", expfam=True)
register(
    "funnel_centered",
    funnel_centered,
    _no_data,
    10,
    "funnel",
    expfam=False,
    twin="funnel_noncentered",
    twin_sites={"v": "v", "x": "x"},
    note="prior only; reference from the non-centered twin (exact: v ~ N(0, 3), sd x = e^2.25)",
)
register("funnel_noncentered", funnel_noncentered, _no_data, 10, "funnel", expfam=False)
