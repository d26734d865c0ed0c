"""Conditionally conjugate hierarchies (Gamma-Poisson "pumps", Beta-binomial with a hyperprior,
Dirichlet-multinomial) and marginalised Gaussian mixtures (``MixtureSameFamily``)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions.transforms import OrderedTransform

from benchmarks.zoo._data import rng, to_jax
from benchmarks.zoo.registry import register

# -- Gamma-Poisson: pump failures (Gaver & O'Muircheartaigh 1987; BUGS "pumps")
_PUMP_T = [94.3, 15.7, 62.9, 126.0, 5.24, 31.4, 1.05, 1.05, 2.1, 10.5]
_PUMP_X = [5, 1, 5, 14, 3, 19, 1, 1, 4, 22]


def pumps(exposure, failures=None):
    """alpha ~ Exponential(1), beta ~ Gamma(0.1, 1), theta_i ~ Gamma(alpha, beta),
    failures_i ~ Poisson(theta_i exposure_i)."""
    alpha = numpyro.sample("alpha", dist.Exponential(1.0))
    beta = numpyro.sample("beta", dist.Gamma(0.1, 1.0))
    with numpyro.plate("pump", exposure.shape[0]):
        theta = numpyro.sample("theta", dist.Gamma(alpha, beta))
        numpyro.sample("failures", dist.Poisson(theta * exposure), obs=failures)


def _pumps_data():
    return to_jax((np.asarray(_PUMP_T),), {"failures": np.asarray(_PUMP_X, np.int32)})


# -- Beta-binomial with a hyperprior on the mean and concentration (BDA3 5.3 style)
@functools.lru_cache(maxsize=1)
def _beta_binomial_np(J=25):
    r = rng(51)
    trials = r.integers(10, 51, J).astype(np.int32)
    theta = r.beta(4.0, 16.0, J)
    return trials, r.binomial(trials, theta).astype(np.int32)


def beta_binomial(trials, y=None):
    """phi ~ Beta(1, 1) (mean), kappa ~ Gamma(2, 0.1) (concentration),
    theta_j ~ Beta(phi kappa, (1 - phi) kappa), y_j ~ Binomial(trials_j, theta_j)."""
    phi = numpyro.sample("phi", dist.Beta(1.0, 1.0))
    kappa = numpyro.sample("kappa", dist.Gamma(2.0, 0.1))
    with numpyro.plate("group", trials.shape[0]):
        theta = numpyro.sample("theta", dist.Beta(phi * kappa, (1 - phi) * kappa))
        numpyro.sample("y", dist.Binomial(trials, theta), obs=y)


def _beta_binomial_data():
    trials, y = _beta_binomial_np()
    return to_jax((trials,), {"y": y})


# -- Dirichlet-multinomial: groups of category counts around a shared base
@functools.lru_cache(maxsize=1)
def _dirmult_np(G=8, K=4):
    r = rng(52)
    base = np.array([0.4, 0.3, 0.2, 0.1])
    totals = r.integers(30, 101, G)
    p = r.dirichlet(20.0 * base, G)
    counts = np.stack([r.multinomial(n, pg) for n, pg in zip(totals, p)]).astype(np.int32)
    return totals.astype(np.int32), counts


def dirichlet_multinomial(totals, counts=None, num_categories=4):
    """base ~ Dirichlet(1), conc ~ Gamma(2, 0.1), p_g ~ Dirichlet(conc base),
    counts_g ~ Multinomial(totals_g, p_g)."""
    base = numpyro.sample("base", dist.Dirichlet(jnp.ones(num_categories)))
    conc = numpyro.sample("conc", dist.Gamma(2.0, 0.1))
    with numpyro.plate("group", totals.shape[0]):
        p = numpyro.sample("p", dist.Dirichlet(conc * base))
        numpyro.sample("counts", dist.Multinomial(totals, p), obs=counts)


def _dirmult_data():
    totals, counts = _dirmult_np()
    return to_jax((totals,), {"counts": counts})


# -- marginalised Gaussian mixtures
@functools.lru_cache(maxsize=2)
def _mixture_np(weights, locs, scales, n, seed):
    r = rng(seed)
    comp = r.choice(len(weights), size=n, p=np.asarray(weights))
    return np.asarray(locs)[comp] + np.asarray(scales)[comp] * r.standard_normal(n)


def gaussian_mixture(y, num_components):
    """w ~ Dirichlet(1), loc = ordered(u), u_k ~ N(0, 3) pushed through ``OrderedTransform``
    (loc_1 < loc_2 < ...: no label switching), scale_k ~ HalfNormal(2),
    y_i ~ sum_k w_k N(loc_k, scale_k) (MixtureSameFamily)."""
    K = num_components
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(K)))
    base = dist.Normal(jnp.zeros(K), 3.0).to_event(1)
    loc = numpyro.sample("loc", dist.TransformedDistribution(base, OrderedTransform()))
    with numpyro.plate("component", K):
        scale = numpyro.sample("scale", dist.HalfNormal(2.0))
    mix = dist.MixtureSameFamily(dist.Categorical(probs=w), dist.Normal(loc, scale))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", mix, obs=y)


def _gmm2_data():
    y = _mixture_np((0.3, 0.7), (-2.0, 1.5), (0.7, 1.0), 200, 53)
    return to_jax((y, 2), {})


def _gmm3_data():
    y = _mixture_np((0.3, 0.4, 0.3), (-3.0, 0.0, 3.5), (0.6, 0.8, 0.5), 300, 54)
    return to_jax((y, 3), {})


register(
    "pumps",
    pumps,
    _pumps_data,
    12,
    "conjugate",
    expfam=True,
    quick=True,
    note="Gamma-Poisson with Exponential and Gamma hyperpriors and exposures",
)
register(
    "beta_binomial",
    beta_binomial,
    _beta_binomial_data,
    27,
    "conjugate",
    expfam=True,
    target_accept=0.9,
)
register(
    "dirichlet_multinomial",
    dirichlet_multinomial,
    _dirmult_data,
    28,
    "conjugate",
    expfam=True,
    target_accept=0.9,
)


def _quantile_init(data: Callable, K: int) -> Callable:
    """NUTS start for a K-component mixture: locs at the data's (k + 1/2)/K quantiles."""

    def init():
        (y, _), _ = data()
        return {"loc": jnp.quantile(y, (jnp.arange(K) + 0.5) / K)}

    return init


for _name, _data, _K in (("gmm_2", _gmm2_data, 2), ("gmm_3", _gmm3_data, 3)):
    register(
        _name,
        gaussian_mixture,
        _data,
        3 * _K - 1,
        "mixture",
        expfam=True,
        nuts_init=_quantile_init(_data, _K),
        note="local modes exist (components merged); NUTS starts in the main mode",
    )
